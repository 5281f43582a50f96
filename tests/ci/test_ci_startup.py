"""Light start-up (issue 17 §7): help and listing verbs import no training stack; the static indexes they use
stay equal to what they stand for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "timm", "onnx", "onnxruntime", "torchvision", "sklearn")

PROBE = """
import json, sys
sys.argv = ["distillctl", *json.loads(sys.argv[1])]
from distillctl.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open(OUT, "w") as handle:
    json.dump({"code": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}, handle)
"""


@pytest.mark.parametrize("args", [["--help"], ["methods", "list"], ["methods", "list", "--json"], ["run", "--help"],
                                  ["recipes", "list"], ["gate", "--help"], ["export", "--help"]])
def test_help_and_listing_do_not_import_the_training_stack(args, tmp_path):
    out = tmp_path / "probe.json"
    code = f"OUT = {str(out)!r}\nHEAVY = {HEAVY!r}\n" + PROBE
    result = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    probe = json.loads(out.read_text())
    assert probe["code"] in (0, None), result.stderr[-2000:]
    assert probe["heavy"] == [], f"distillctl {' '.join(args)} imported {probe['heavy']}"


def test_method_catalogue_matches_the_registry():
    from distillctl import method_catalogue

    index = json.loads(method_catalogue.INDEX.read_text())
    assert index["methods"] == method_catalogue.live_rows(), \
        "distillctl/method_catalogue.json is stale: regenerate it with `python -m distillctl.method_catalogue`"
    assert index["source_files"] == method_catalogue.source_files(), \
        "a method file was added or removed: regenerate with `python -m distillctl.method_catalogue`"
    assert method_catalogue.rows() == index["methods"]


def test_lazy_group_help_matches_the_modules():
    from importlib import import_module

    from distillctl.cli import LAZY_GROUPS

    for name, (module_name, help_text) in LAZY_GROUPS.items():
        module_help = import_module(module_name).app.info.help.split("\n\n")[0]
        assert module_help == help_text, f"cli.LAZY_GROUPS['{name}'] help differs from {module_name}.app's"


def test_unknown_command_is_a_usage_error_with_a_suggestion():
    from tests.conftest import run_cli

    result = run_cli("evl")
    assert result.returncode == 2 and "Did you mean 'eval'" in result.stderr
