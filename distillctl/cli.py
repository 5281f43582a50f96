"""The ``distillctl`` command line. Thin: parse, call a stage, render with Rich, map errors to exit codes."""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from distillctl import __version__
from distillctl.cli_common import console, debug_enabled
from distillctl.errors import DistillError, EXIT_USAGE

app = typer.Typer(
    name="distillctl",
    help="Distil a large self-supervised vision teacher into a small deployable student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"distillctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["DISTILLCTL_DEBUG"] = "1"


def _mount_subcommands() -> None:
    """Sub-apps live next to the code they drive; each module exposes ``app`` (a Typer)."""
    from importlib import import_module

    for module_name, command_name in (
        ("distillctl.teachers.cli", "teacher"),
        ("distillctl.cache.cli", "cache"),
        ("distillctl.eval.cli", "eval"),
    ):
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not built yet
            raise
        app.add_typer(module.app, name=command_name)
    for module_name in ("distillctl.export.cli", "distillctl.commands", "distillctl.ci_commands"):
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)


_mount_subcommands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map errors to exit codes."""
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code != 0:  # a command's typer.Exit(code) comes back as the return value
            sys.exit(code)
    except DistillError as exc:
        if debug_enabled():
            console.print_exception()
        console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            console.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(EXIT_USAGE if isinstance(exc, click.exceptions.UsageError) else exc.exit_code)
        if debug_enabled():
            raise
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False, soft_wrap=True)
        console.print("[dim]hint:[/] rerun with --debug for the traceback", highlight=False)
        sys.exit(1)
