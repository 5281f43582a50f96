"""The listing and inspection commands answer without importing torch (a torch import costs seconds on a
laptop and tens of seconds on a loaded CI runner); the commands that build networks still load it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# runs one command in-process through the real CLI entry, then reports whether torch was imported
PROBE = """
import json, sys
from distillctl import cli
code = 0
try:
    cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"torch": "torch" in sys.modules, "code": code}), file=sys.stderr)
"""


def probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [["students", "list", "--json"], ["teacher", "list", "--json"],
                                     ["teacher", "info", "r50-moco", "--json"], ["methods", "list", "--json"],
                                     ["recipes", "list", "--json"], ["--help"]])
def test_listing_commands_do_not_import_torch(command):
    assert probe(*command) == {"torch": False, "code": 0}


def test_the_lazy_teacher_package_still_loads_torch_when_a_loader_is_used():
    code = "import sys; from distillctl.teachers import load_teacher; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True"
