"""User-facing failure classes. Each carries the process exit code the CLI returns.

Exit codes (architecture contract): 0 ok · 1 failure while running · 2 bad usage or bad input ·
3 a verification gate failed (hash, parity, accuracy budget, cache fingerprint) ·
4 preempted (SIGTERM/SIGINT) after a checkpoint was written; resume with ``--resume``.

Under torchrun each worker exits with these codes; torchrun itself reports 1 when any worker fails
(``distillctl run --nproc N`` maps a forwarded preemption back to 4).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_PREEMPTED = 4


class DistillError(Exception):
    """Base class: a one-line message plus an optional hint, mapped to an exit code."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(DistillError):
    """Bad flags, unknown names, bad recipe values (exit 2)."""

    exit_code = EXIT_USAGE


class InputError(DistillError):
    """Missing paths, unreadable or mismatched files, bad data (exit 2)."""

    exit_code = EXIT_USAGE


class GateError(DistillError):
    """A verification gate failed: hash, parity, accuracy budget, cache fingerprint (exit 3)."""

    exit_code = EXIT_GATE


class TrainingError(DistillError):
    """Failure while running, e.g. a non-finite loss (exit 1)."""

    exit_code = EXIT_FAILURE


class Preempted(DistillError):
    """SIGTERM/SIGINT received; a checkpoint was written (exit 4)."""

    exit_code = EXIT_PREEMPTED


def nearest(name: str, choices: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """The closest valid names to ``name``, for 'did you mean' hints."""
    import difflib

    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.4)


def unknown_name(kind: str, name: str, choices: list[str] | tuple[str, ...]) -> UsageError:
    """Error for an unknown method/student/recipe/teacher name, listing valid ones."""
    close = nearest(name, choices)
    hint = f"did you mean: {', '.join(close)}?" if close else None
    listed = ", ".join(sorted(choices))
    return UsageError(f"unknown {kind} '{name}'; valid: {listed}", hint=hint)
