"""``distillctl protocol list|show|run``: benchmark protocols (a grid of pretrain runs, one results table)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from distillctl.cli_common import console, print_json

HELP = ("Benchmark protocols: a grid of SSL pre-training runs (methods × students) under one budget, evaluated "
        "in one results table.")
app = typer.Typer(help=HELP, no_args_is_help=True)


def _names(value: Optional[str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    if not names:
        from distillctl.errors import UsageError

        raise UsageError("--methods/--archs need at least one comma-separated name")
    return names


@app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="JSON output.")) -> None:
    """Protocols shipped in recipes/protocols/.

    Example: distillctl protocol list
    """
    from distillctl.protocol import list_protocols, load_protocol

    rows = []
    for path in list_protocols():
        spec = load_protocol(str(path))
        rows.append({"name": spec.name, "path": str(path), "title": spec.title, "methods": spec.grid.methods,
                     "archs": spec.grid.archs, "cells": len(spec.grid.methods) * len(spec.grid.archs)})
    if json_out:
        print_json({"protocols": rows})
        return
    table = Table(title="benchmark protocols")
    for column in ("name", "cells", "methods × archs", "title"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], str(row["cells"]), f"{', '.join(row['methods'])} × {', '.join(row['archs'])}",
                      escape(row["title"]))
    console.print(table)


@app.command("show")
def show(name: str = typer.Argument(..., help="Protocol name (recipes/protocols/<name>.yaml) or YAML path."),
         json_out: bool = typer.Option(False, "--json", help="The validated protocol as one JSON object.")) -> None:
    """Print a protocol: its grid, shared settings and the assumptions it makes where the paper gives no value.

    Example: distillctl protocol show lightweight-ssl
    """
    from distillctl.protocol import find_protocol, load_protocol

    spec = load_protocol(name)
    if json_out:
        print_json({"name": spec.name, "path": str(find_protocol(name)), "protocol": spec.model_dump(mode="json")})
        return
    typer.echo(find_protocol(name).read_text().rstrip())


@app.command("run")
def run(
    name: str = typer.Argument(..., help="Protocol name (e.g. lightweight-ssl) or YAML path."),
    data: str = typer.Option(..., "--data", help="Pre-training images: a flat folder (unlabelled, e.g. STL-10 "
                             "unlabeled) or an ImageFolder whose labels are ignored."),
    eval_train: str = typer.Option(..., "--eval-train", help="Labelled ImageFolder: kNN bank and linear-probe "
                                   "training split (e.g. STL-10 train)."),
    eval_val: str = typer.Option(..., "--eval-val", help="Labelled ImageFolder scored by kNN and the probe "
                                 "(e.g. STL-10 test)."),
    out: Path = typer.Option(..., "--out", "-o", help="Protocol directory (runs/, floors/, results.json, results.md)."),
    budget_images: Optional[int] = typer.Option(None, "--budget-images", help="Training images seen per cell "
                                                "(default: the protocol's budget.images)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated subset of SSL methods "
                                          "(default: the protocol's grid)."),
    archs: Optional[str] = typer.Option(None, "--archs", help="Comma-separated students (aliases, timm names, "
                                        "tv:<torchvision name>; default: the protocol's grid)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=8, help="Input resolution (default: the "
                                             "protocol's data.image_size)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json as one JSON object on stdout."),
) -> None:
    """Run every cell of a protocol as a normal pretrain run, evaluate each student (kNN + linear probe) and the
    random-init floor of each student on the labelled splits, and write results.json + results.md.

    Resumable: rerun the same command; finished cells are skipped and an interrupted one resumes from its last
    checkpoint. lightweight-ssl is arXiv 2110.11160's comparison: the paper fixes the grid (MoCo v2, SimCLR, BYOL ×
    MobileNetV2, EfficientNet-lite0, ShuffleNetV2, SqueezeNet, ResNet-18) and the data roles (unlabelled
    pre-training, labelled evaluation); the budget, optimiser, image size and evaluation settings are
    distillctl's stated assumptions (distillctl protocol show lightweight-ssl). lightweight-ssl_cpu is a smoke
    variant that finishes in seconds.

    Example: distillctl protocol run lightweight-ssl --data stl10/unlabeled --eval-train stl10/train --eval-val stl10/test --out runs/lw-ssl
    """
    from distillctl.protocol import ProtocolInputs, load_protocol, plan, run_protocol

    spec = load_protocol(name)
    inputs = ProtocolInputs(data=data, eval_train=eval_train, eval_val=eval_val, out=out.expanduser(),
                            budget_images=budget_images, methods=_names(methods), archs=_names(archs),
                            image_size=image_size, device=device)
    results = run_protocol(plan(spec, inputs))
    if json_out:
        print_json(results)
        return
    console.print((out / "results.md").read_text(), highlight=False, markup=False)
    console.print(f"results: {out / 'results.json'} · {out / 'results.md'}", highlight=False)
