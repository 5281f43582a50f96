"""Verbs for CI pipelines: ``gate`` (quality gates of a finished run), ``verify`` (a release bundle),
``schema`` (the JSON Schemas of the machine-readable outputs). Heavy imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from distillctl.cli_common import console, print_json

GATE_HELP = """Check a finished run against quality gates (the recipe's gates:, or --set gates.KEY=VALUE).

Records the report in summary.json under 'gates' and exits 3 naming each failed gate, its measured value and
margin. Nothing is retrained: the run's summary.json holds the accuracy numbers; latency is measured now.

Example: distillctl gate runs/quickstart --set gates.min_student_knn=80 --set gates.max_latency_ms=5
"""


def gate_command(
    run_dir: Path = typer.Argument(..., help="A run directory (with recipe.yaml and summary.json)."),
    set_: list[str] = typer.Option([], "--set", help="Override a gate: --set gates.min_student_knn=80 (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print the gates report as one JSON object on stdout."),
) -> None:
    from distillctl.errors import GateError
    from distillctl.gates import check_run, gates_from_overrides
    from distillctl.rundir import RunDir

    run = RunDir(run_dir).require()
    gates = gates_from_overrides(run.recipe().gates, list(set_))
    try:
        report = check_run(run.path, gates)
    except GateError:
        render_gates(run.summary().get("gates") or {}, json_out)
        raise
    render_gates(report, json_out)


def render_gates(report: dict[str, Any], json_out: bool = False) -> None:
    """The gates report as one JSON object (``--json``) or a table on stderr."""
    if json_out:
        print_json(report)
        return
    results = report.get("results") or {}
    if not results:
        console.print("gates: none set (recipe gates: section)", highlight=False)
        return
    from rich.table import Table

    table = Table(title="quality gates")
    for column in ("gate", "threshold", "measured", "margin", "passed"):
        table.add_column(column, justify="left" if column == "gate" else "right")
    for name, entry in results.items():
        measured = "not measured" if entry["measured"] is None else f"{entry['measured']:.4g}{entry['unit']}"
        margin = "-" if entry["margin"] is None else f"{entry['margin']:+.4g}{entry['unit']}"
        bound = (">= " if name.startswith("min_") else "<= ") + f"{entry['threshold']:.4g}{entry['unit']}"
        table.add_row(name, bound, measured, margin, "yes" if entry["passed"] else "[bold red]NO[/]")
    console.print(table)


VERIFY_HELP = """Verify a release bundle: re-hash every file and re-run parity on its samples.

Every file must match the bundle's sha256 manifest and each ONNX artefact must still compute the bundled reference
embeddings of the sample inputs. Exit 3 on any mismatch (changed, missing or unlisted file; parity).

Example: distillctl verify release/ --json
"""


def verify_command(
    bundle: Path = typer.Argument(..., help="A bundle directory written by distillctl export RUN --bundle OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print the verification report as one JSON object on stdout."),
) -> None:
    from distillctl.export.bundle import verify_bundle

    report = verify_bundle(bundle)
    if json_out:
        print_json(report)
        return
    for rel, entry in report["parity"].items():
        if entry.get("skipped"):
            console.print(f"parity {rel} ({entry['precision']}): skipped — {entry['skipped']}", highlight=False)
            continue
        console.print(f"parity {rel} ({entry['precision']}): min cos {entry['min_cosine']:.6f}, "
                      f"max|Δ| {entry['max_abs']:.3g} — ok", highlight=False)
    console.print(f"bundle {report['bundle']}: {report['files']} files match the manifest; parity ok", highlight=False)


SCHEMA_HELP = """Print the JSON Schema of a machine-readable output (summary, model_card, bench, bundle_manifest).

Without NAME, list the schemas. Example: distillctl schema summary > summary.schema.json
"""


def schema_command(
    name: str = typer.Argument(None, help="summary | model_card | bench | bundle_manifest (omit to list)."),
    json_out: bool = typer.Option(False, "--json", help="List the schema names as one JSON object (with no NAME)."),
) -> None:
    from distillctl import schemas

    if name is None:
        if json_out:
            print_json({"schemas": schemas.names()})
        else:
            for schema_name in schemas.names():
                console.print(f"{schema_name}: {schemas.load(schema_name).get('title', '')}", highlight=False,
                              markup=False)
        return
    print_json(schemas.load(name))


def register(app: typer.Typer) -> None:
    app.command("gate", help=GATE_HELP)(gate_command)
    app.command("verify", help=VERIFY_HELP)(verify_command)
    app.command("schema", help=SCHEMA_HELP)(schema_command)
