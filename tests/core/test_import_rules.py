"""Layering rules, checked on the source with ``ast`` (every import, also those inside functions).

- ``distillctl._infra`` (atomic writes, sha256, logging, collective primitives) imports nothing from distillctl.
- Methods do not import the trainer (``distillctl.train``): what they share with it lives in ``_infra``/``data``.
- Teachers do not import methods or the feature cache.
- Domain code logs; Rich (and the CLI console) only in the CLI modules and the progress displays.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distillctl"
# modules that render to the terminal: the CLI layer and the live progress displays
UI_MODULES = {"__main__.py", "cli.py", "cli_common.py", "commands.py", "ci_commands.py", "cache/cli.py", "eval/cli.py",
              "export/cli.py", "teachers/cli.py", "protocol_cli.py", "cache/progress.py", "train/progress.py",
              "teachers/fetch.py"}  # fetch: the download progress bar (its messages are log records)


def imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (``from . import x`` resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ["distillctl", *path.relative_to(PACKAGE).parent.parts]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def modules_under(folder: str) -> list[Path]:
    root = PACKAGE / folder
    return sorted(root.rglob("*.py")) if root.is_dir() else [root]


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in files:
        for name in sorted(imported_modules(path)):
            if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden):
                found.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return found


@pytest.mark.parametrize("files, forbidden", [
    ("_infra.py", ("distillctl",)),
    ("methods", ("distillctl.train",)),
    ("teachers", ("distillctl.methods", "distillctl.cache")),
])
def test_layering(files, forbidden):
    assert violations(modules_under(files), forbidden) == []


def test_domain_code_logs_instead_of_printing_with_rich():
    domain = [p for p in PACKAGE.rglob("*.py") if str(p.relative_to(PACKAGE)) not in UI_MODULES]
    assert violations(domain, ("rich", "distillctl.cli_common", "distillctl.cli")) == []


def test_the_checker_sees_nested_and_relative_imports():
    module = PACKAGE / "methods" / "_probe_for_rules.py"
    module.write_text("def f():\n    from ..train import loop\n    import distillctl.train.data\n")
    try:
        assert {"distillctl.train", "distillctl.train.loop", "distillctl.train.data"} <= imported_modules(module)
        assert len(violations([module], ("distillctl.train",))) == 3
    finally:
        module.unlink()


def test_cli_renders_domain_log_records(capsys):
    from distillctl._infra import get_logger
    from distillctl.cli import install_log_handler

    install_log_handler()
    get_logger("distillctl.pipeline").warning("queue [bold]never[/] fills")
    get_logger("pipeline").info("distill: skipped")
    err = capsys.readouterr().err
    assert "warning: queue [bold]never[/] fills" in err  # plain text, markup not interpreted
    assert "distill: skipped" in err
