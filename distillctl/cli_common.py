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

# Human output goes to stderr so that `--json` leaves exactly one JSON object on stdout.
console = Console(stderr=True)
stdout_console = Console()


def debug_enabled() -> bool:
    return os.environ.get("DISTILLCTL_DEBUG", "") not in ("", "0")


def print_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def is_tty() -> bool:
    return sys.stderr.isatty()
