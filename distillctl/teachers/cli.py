"""``distillctl teacher ...``: list, inspect, download, import, verify and convert registry teachers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from distillctl.cli_common import console, print_json
from distillctl.errors import InputError, UsageError
from distillctl.teachers.fetch import entry_urls, lock_path, read_lock, teacher_dir
from distillctl.teachers.registry import TeacherEntry, load_registry
from distillctl.teachers.store import read_manifest

app = typer.Typer(
    help="Named SSL teachers: list, inspect, download (verified), import, verify, convert.\n\nExample: distillctl teacher list",
    no_args_is_help=True,
)

JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
SHA = typer.Option(None, "--sha256", help="Pin the expected sha256 of the raw file (beats registry and lock).")
NO_VERIFY = typer.Option(False, "--no-verify", help="Skip hash verification (logged; the result is marked unverified).")
MIRROR = typer.Option(None, "--mirror", help="Base URL replacing the hosts of the registry URLs (or DISTILLCTL_MIRROR).")
ACCEPT = typer.Option(False, "--accept-license", help="Accept a non-commercial or custom licence.")


def _hash_state(entry: TeacherEntry) -> dict[str, Any]:
    locked = read_lock().get(entry.name)
    state: dict[str, Any] = {"pinned_sha256": entry.sha256, "published_md5_prefix":
                             entry.published_hash.md5_prefix if entry.published_hash else None,
                             "published_sha256_prefix": entry.published_hash.sha256_prefix if entry.published_hash else None,
                             "locked_sha256": locked["sha256"] if locked else None}
    state["state"] = "pinned" if entry.sha256 else ("tofu-locked" if locked else "tofu-unrecorded")
    return state


def _row(entry: TeacherEntry) -> dict[str, Any]:
    manifest = read_manifest(teacher_dir(entry.name))
    return {"name": entry.name, "aliases": entry.aliases, "title": entry.title, "arch": entry.arch.label(),
            "family": entry.family, "embed_dim": entry.embed_dim, "head_dim": entry.head_dim,
            "license": entry.license.id, "license_requires_acceptance": entry.license.requires_acceptance,
            "reference_top1": entry.reference.linear_top1, "cached": manifest is not None,
            "sha256": entry.sha256, "explicit_convert": entry.needs_explicit_convert}


@app.command("list", help="List the registry with licences and reference accuracy.\n\nExample: distillctl teacher list --json")
def list_teachers(json_output: bool = JSON) -> None:
    rows = [_row(entry) for entry in load_registry().teachers.values()]
    if json_output:
        print_json({"teachers": rows})
        return
    table = Table(title="distillctl teachers", show_lines=False)
    for column in ("name", "aliases", "arch", "method", "dim", "licence", "ref top-1", "cached"):
        table.add_column(column, no_wrap=column in ("name", "arch", "licence", "ref top-1"))
    for row in rows:
        dim = f"{row['embed_dim']}" + (f" (proj {row['head_dim']})" if row["head_dim"] else "")
        licence = row["license"] + (" \\[accept]" if row["license_requires_acceptance"] else "")
        top1 = f"{row['reference_top1']:.1f}" if row["reference_top1"] is not None else "—"
        arch = row["arch"].split(":", 1)[1]
        table.add_row(row["name"], ", ".join(row["aliases"]), escape(arch), escape(row["title"]), dim, licence, top1,
                      "yes" if row["cached"] else "")
    if console.is_terminal:
        console.print(table)
    else:  # piped or logged: do not squeeze the table into 80 columns
        from rich.console import Console

        Console(file=console.file, width=170, no_color=True).print(table)
    console.print("[dim]\\[accept] = non-commercial/custom licence: needs --accept-license[/]")


@app.command(help="Show one teacher: resolution, sources, hash state, preprocessing, licence.\n\nExample: distillctl teacher info r50-moco")
def info(name: str = typer.Argument(..., help="Registry name or alias."), mirror: Optional[str] = MIRROR,
         json_output: bool = JSON) -> None:
    entry = load_registry().resolve(name)
    folder = teacher_dir(entry.name)
    manifest = read_manifest(folder)
    data = _row(entry) | {
        "resolved_from": name, "sources": entry_urls(entry, mirror), "filename": entry.filename, "hash": _hash_state(entry),
        "format": entry.format, "head_layout": entry.head.layout if entry.head else None,
        "teacher_feature": entry.teacher_feature, "preprocess": entry.preprocess.model_dump(),
        "reference": entry.reference.model_dump(), "license_note": entry.license.note, "notes": entry.notes,
        "cache_dir": str(folder), "converted_sha256": manifest["backbone"]["sha256"] if manifest else None,
    }
    if json_output:
        print_json(data)
        return
    if name != entry.name:
        console.print(f"{name} → {entry.summary_line()}", highlight=False)
    else:
        console.print(entry.summary_line(), highlight=False)
    hash_state = data["hash"]
    hash_text = {"pinned": f"pinned sha256 {entry.sha256}",
                 "tofu-locked": f"sha256 {hash_state['locked_sha256']} (trusted on first use, {lock_path()})",
                 "tofu-unrecorded": "no published sha256: recorded on first download (TOFU)"}[hash_state["state"]]
    if hash_state["published_md5_prefix"]:
        hash_text += f"; published md5 prefix {hash_state['published_md5_prefix']}"
    if hash_state["published_sha256_prefix"]:
        hash_text += f"; published sha256 prefix {hash_state['published_sha256_prefix']} (enforced)"
    pre = entry.preprocess
    lines = [
        ("arch", f"{entry.arch.label()}  ({entry.family} checkpoint, {entry.format})"),
        ("features", f"{entry.embed_dim}-d backbone" + (f", projection head {entry.head.layout}" if entry.head else ", no head")),
        ("source", "\n".join(data["sources"])), ("file", entry.filename), ("hash", hash_text),
        ("preprocess", f"resize {pre.resize} → crop {pre.input_size} ({pre.interpolation}), mean {list(pre.mean)}, std {list(pre.std)}"),
        ("licence", entry.license.id + (" — needs --accept-license" if entry.license.requires_acceptance else "")
         + (f" ({entry.license.note})" if entry.license.note else "")),
        ("reference", f"linear top-1 {entry.reference.linear_top1}% — {entry.reference.protocol} [{entry.reference.source}]"),
        ("cache", f"{folder} ({'converted, sha256 ' + data['converted_sha256'][:16] + '…' if manifest else 'not downloaded'})"),
    ] + [("note", note) for note in entry.notes]
    for key, value in lines:
        console.print(f"  [bold]{key:<11}[/] {escape(value)}", highlight=False, soft_wrap=True)


def _prepared(entry: TeacherEntry, stored: Any) -> dict[str, Any]:
    return {"name": entry.name, "raw_sha256": stored.manifest["raw"]["sha256"], "sha256": stored.sha256,
            "verified": stored.manifest["raw"]["verified"], "cache_dir": str(teacher_dir(entry.name)),
            "conversion": stored.manifest.get("conversion")}


@app.command(help="Download, verify and convert teachers into the cache (resumable).\n\n"
                  "Example: distillctl teacher download r50-moco dino-vits16")
def download(names: list[str] = typer.Argument(..., help="Registry names or aliases."), sha256: Optional[str] = SHA,
             no_verify: bool = NO_VERIFY, mirror: Optional[str] = MIRROR, accept_license: bool = ACCEPT,
             force: bool = typer.Option(False, "--force", help="Re-verify and re-convert even if already converted."),
             json_output: bool = JSON) -> None:
    from distillctl.teachers.resolve import license_gate, prepare_entry

    if sha256 and len(names) > 1:
        raise UsageError("--sha256 applies to one teacher; download them one at a time")
    registry = load_registry()
    entries = [registry.resolve(name) for name in names]
    for entry in entries:  # all licences first: fail before anything is fetched
        license_gate(entry.name, entry.license.id, entry.license.requires_acceptance, accept_license)
    results = []
    for entry in entries:
        stored = prepare_entry(entry, sha256=sha256, no_verify=no_verify, mirror=mirror, force=force)
        results.append(_prepared(entry, stored))
        console.print(f"[green]ok[/] {entry.name}: raw sha256 {results[-1]['raw_sha256'][:16]}…, converted "
                      f"{stored.sha256[:16]}… in {results[-1]['cache_dir']}", highlight=False)
    if json_output:
        print_json({"teachers": results})


@app.command("import", help="Air-gapped install: verify and convert a file you fetched yourself.\n\n"
                            "Example: distillctl teacher import r50-moco ./moco_v2_800ep_pretrain.pth.tar")
def import_teacher(name: str = typer.Argument(..., help="Registry name or alias."),
                   file: Path = typer.Argument(..., help="The downloaded checkpoint file."), sha256: Optional[str] = SHA,
                   no_verify: bool = NO_VERIFY, accept_license: bool = ACCEPT, json_output: bool = JSON) -> None:
    from distillctl.teachers.resolve import license_gate, prepare_entry

    entry = load_registry().resolve(name)
    license_gate(entry.name, entry.license.id, entry.license.requires_acceptance, accept_license)
    if entry.needs_explicit_convert:
        raise UsageError(f"'{entry.name}' is a {entry.format} file", hint=f"use: distillctl teacher convert {entry.name} {file}")
    stored = prepare_entry(entry, sha256=sha256, no_verify=no_verify, import_from=file)
    result = _prepared(entry, stored)
    console.print(f"[green]ok[/] imported {file} as {entry.name} (sha256 {result['raw_sha256'][:16]}…)", highlight=False)
    if json_output:
        print_json(result)


@app.command(help="Re-hash the raw file and re-check its structure against the converted teacher.\n\n"
                  "Example: distillctl teacher verify r50-moco")
def verify(name: str = typer.Argument(..., help="Registry name or alias."), json_output: bool = JSON) -> None:
    from distillctl.teachers.verify import verify_entry

    result = verify_entry(load_registry().resolve(name))
    if json_output:
        print_json(result)
    else:
        console.print(f"[green]ok[/] {result['name']}: {result['summary']}", highlight=False)


@app.command(help="Explicitly convert a checkpoint that needs an optional extra (BYOL .pkl, SimCLR TF) or a torch "
                  "family file into the cache.\n\nExample: distillctl teacher convert byol-r50 ./pretrain_res50x1.pkl")
def convert(name: str = typer.Argument(..., help="Registry name or alias."),
            file: Path = typer.Argument(..., help="The original checkpoint file."),
            accept_license: bool = ACCEPT, json_output: bool = JSON) -> None:
    from distillctl.teachers.external import convert_external
    from distillctl.teachers.resolve import license_gate, prepare_entry

    entry = load_registry().resolve(name)
    license_gate(entry.name, entry.license.id, entry.license.requires_acceptance, accept_license)
    if not file.is_file():
        raise InputError(f"file not found: {file}")
    if not entry.needs_explicit_convert:
        stored = prepare_entry(entry, import_from=file)
    else:
        stored = convert_external(entry, file)
    result = _prepared(entry, stored)
    console.print(f"[green]ok[/] converted {file} as {entry.name} ({result['sha256'][:16]}…)", highlight=False)
    if json_output:
        print_json(result)

