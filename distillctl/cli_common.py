"""Shared CLI plumbing: console handling, JSON output, error-to-exit-code mapping.

Sub-command modules (``teachers/cli.py``, ``export/cli.py``, ``cache/cli.py``, …) build their own
``typer.Typer`` apps with these helpers; ``cli.py`` mounts them. Commands raise
:class:`distillctl.errors.DistillError`; :func:`run_main` turns it into one line on stderr and
the documented exit code (traceback only with ``--debug`` / ``DISTILLCTL_DEBUG=1``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console


def _log_width(stream) -> int | None:  # noqa: ANN001
    """Terminals: their width. Logs and pipes (CI): COLUMNS if set, else 200, so tables are not cut at Rich's
    default of 80 columns. Rich writes no ANSI codes when the stream is not a terminal and honours NO_COLOR."""
    if stream.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 200


# Human output goes to stderr so that `--json` leaves exactly one JSON object on stdout.
console = Console(stderr=True, width=_log_width(sys.stderr))
stdout_console = Console(width=_log_width(sys.stdout))


def phase(message: str) -> None:
    """One plain line saying what a long step is doing now (eval, export, bundle), on the main process only."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return
    console.print(message, highlight=False, markup=False, soft_wrap=True)


def debug_enabled() -> bool:
    return os.environ.get("DISTILLCTL_DEBUG", "") not in ("", "0")


def print_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def is_tty() -> bool:
    return sys.stderr.isatty()
