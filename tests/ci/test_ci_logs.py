"""Logs that read well in CI (issue 17 §6): plain lines without ANSI codes when stderr is not a terminal, each
training line naming its stage, long phases announced, tables not cut at 80 columns, timestamped metrics."""

from __future__ import annotations

import json
import re

import pytest

from distillctl.train.progress import plain_line

ANSI = re.compile(r"\x1b\[")


def test_plain_progress_line_names_the_stage_and_rounds_numbers():
    line = plain_line("distill", 40, 44, 0, 0.746123456, 0.00610612, 2502.4, 12.0)
    assert line == "[distill] step 40/44 (91%) loss 0.7461 lr 0.00611 2,502 img/s elapsed 0:00:12 ETA 0:00:01"


@pytest.mark.slow
def test_run_log_is_plain_and_says_what_it_does(ci_run):
    out, summary, stderr = ci_run
    assert not ANSI.search(stderr)
    assert "distill: training" in stderr and re.search(r"^\[distill\] step \d+/\d+ \(\d+%\)", stderr, re.M)
    for phase in ("eval: student: embedding the bank", "eval: teacher: embedding the queries",
                  "export: ONNX fp32", "export: parity of student.onnx", "export: INT8 calibration",
                  "kNN accuracy of", "export: model card"):
        assert phase in stderr, phase
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["stage"] == "distill" and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", row["time"])
                        for row in rows)


@pytest.mark.slow
def test_tables_are_not_cut_at_80_columns_in_logs(ci_run):
    from tests.conftest import run_cli

    result = run_cli("gate", str(ci_run[0]), "--set", "gates.min_student_knn=1", "--set",
                     "gates.min_student_teacher_ratio=0.01", env={"NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    assert not ANSI.search(result.stderr)
    widths = [len(line) for line in result.stderr.splitlines() if "min_student_teacher_ratio" in line]
    assert widths and "…" not in result.stderr
    listing = run_cli("methods", "list")
    assert max(len(line) for line in listing.stderr.splitlines()) > 80  # titles on one line, not wrapped at 80
