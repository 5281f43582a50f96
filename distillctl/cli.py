"""The ``distillctl`` command line. Thin: parse, call a stage, render with Rich, map errors to exit codes."""

from __future__ import annotations

import logging
import os
import sys

import typer
import typer.core
import typer.main
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
        logging.getLogger("distillctl").setLevel(logging.DEBUG)


# Command groups imported only when used: `distillctl --help` and the listing verbs must not pay for torch.
# name -> (module with a Typer `app`, the one-line help `distillctl --help` shows; a test keeps both in step)
LAZY_GROUPS = {
    "teacher": ("distillctl.teachers.cli", "Named SSL teachers: list, inspect, download (verified), import, verify, convert."),
    "cache": ("distillctl.cache.cli", "Feature cache: run the teacher once over K stored views per image, replay them "
              "during distillation."),
    "eval": ("distillctl.eval.cli", "Evaluate frozen embeddings (weighted kNN, linear probe) of a run, student or "
             "exported artefact."),
    "protocol": ("distillctl.protocol_cli", "Benchmark protocols: a grid of SSL pre-training runs (methods × students) "
                 "under one budget, evaluated in one results table."),
}


class _LazyGroup(typer.core.TyperGroup):
    """The root group: the LAZY_GROUPS are listed from their static help and imported when invoked."""

    _listing = False

    def list_commands(self, ctx):  # noqa: ANN001
        return [*LAZY_GROUPS, *(name for name in super().list_commands(ctx) if name not in LAZY_GROUPS)]

    def get_command(self, ctx, cmd_name: str):  # noqa: ANN001
        if cmd_name in LAZY_GROUPS and cmd_name not in self.commands:
            module_name, help_text = LAZY_GROUPS[cmd_name]
            if self._listing:  # the root --help only needs the one-line help
                return typer.core.TyperGroup(name=cmd_name, help=help_text)
            from importlib import import_module

            command = typer.main.get_command(import_module(module_name).app)
            command.name = cmd_name
            self.commands[cmd_name] = command
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx, args):  # noqa: ANN001
        try:
            return super().resolve_command(ctx, args)
        except _click_exceptions().UsageError as exc:  # suggest lazy groups too ("evl" -> "eval")
            if args and "Did you mean" not in exc.message:
                import difflib

                close = difflib.get_close_matches(args[0], self.list_commands(ctx))
                if close:
                    exc.message = f"{exc.message.rstrip('.')}. Did you mean {', '.join(repr(c) for c in close)}?"
            raise

    def format_help(self, ctx, formatter):  # noqa: ANN001
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False


app.info.cls = _LazyGroup


def _mount_subcommands() -> None:
    """Top-level verbs register themselves (their modules import nothing heavy at import time)."""
    from importlib import import_module

    for module_name in ("distillctl.export.cli", "distillctl.commands", "distillctl.ci_commands"):
        import_module(module_name).register(app)


_mount_subcommands()


def _click_exceptions():
    """The click that typer runs on: typer >= 0.20 vendors its own (``typer._click``), whose usage errors are not
    ``click.exceptions.UsageError`` — matching the wrong one turned an unknown command into exit 1 instead of 2."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer: plain click
        from click import exceptions
    return exceptions


class ConsoleLogHandler(logging.Handler):
    """Renders the domain code's log records (loggers under ``distillctl``) on the CLI's stderr console.

    Domain code only logs (``distillctl._infra.get_logger``); Rich lives here. Warnings read ``warning: …``,
    errors ``error: …``, information is printed as is. Messages are plain text, never Rich markup."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = escape(self.format(record))
            if record.levelno >= logging.ERROR:
                text = f"[bold red]error:[/] {text}"
            elif record.levelno >= logging.WARNING:
                text = f"[yellow]warning:[/] {text}"
            console.print(text, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


def install_log_handler() -> None:
    """Route ``distillctl.*`` records (INFO and above; DEBUG too under ``--debug``) to :class:`ConsoleLogHandler`."""
    root = logging.getLogger("distillctl")
    if not any(isinstance(handler, ConsoleLogHandler) for handler in root.handlers):
        root.addHandler(ConsoleLogHandler())
    root.setLevel(logging.DEBUG if debug_enabled() else logging.INFO)
    root.propagate = False


def _reveal_causes(exc: BaseException | None) -> None:
    """``--debug``: the traceback shows every exception of the chain, also one hidden by ``raise … from None``
    (without ``--debug`` the error stays one line; the cause is for whoever debugs it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__suppress_context__ = False
        exc = exc.__cause__ or exc.__context__


def _leave_process_group() -> None:
    """Tear down a torchrun worker's process group before the interpreter exits.

    Left to interpreter shutdown, gloo's C++ threads can be destroyed while still joinable and the worker
    aborts ("terminate called without an active exception", SIGABRT) after a run that succeeded, which
    torchrun reports as a failure. Only a command that initialised a group pays for the import.
    """
    if "torch.distributed" not in sys.modules:
        return
    from distillctl.train.distributed import destroy

    try:
        destroy()
    except Exception:  # noqa: BLE001 -- the command's own outcome (exit code, message) is what counts
        pass


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map errors to exit codes."""
    install_log_handler()
    try:
        _run_app(argv)
    finally:
        _leave_process_group()


def _run_app(argv: list[str] | None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code != 0:  # a command's typer.Exit(code) comes back as the return value
            sys.exit(code)
    except DistillError as exc:
        if debug_enabled():
            _reveal_causes(exc)
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
        click_exceptions = _click_exceptions()
        if isinstance(exc, click_exceptions.ClickException):
            exc.show()
            sys.exit(EXIT_USAGE if isinstance(exc, click_exceptions.UsageError) else exc.exit_code)
        if debug_enabled():
            _reveal_causes(exc)
            raise
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False, soft_wrap=True)
        console.print("[dim]hint:[/] rerun with --debug for the traceback", highlight=False)
        sys.exit(1)
