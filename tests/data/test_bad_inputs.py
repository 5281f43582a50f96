"""The bad-input corpus: each case ends in one error line, its documented exit code, and no partial files.

Committed cases live in tests/data/bad_inputs/ (recipes, a fake ONNX file); the others (truncated or
foreign checkpoints, paths with spaces and unicode) are generated per test from the tiny teacher."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from distillctl.cli import main

CORPUS = Path(__file__).resolve().parent / "bad_inputs"


@dataclass
class Case:
    name: str
    argv: Callable[[Path, Path], list[str]]  # (tmp dir, teacher file) → CLI arguments
    code: int
    fragment: str
    writes_nothing: bool = True  # fails before the run directory is created


def _run(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--teacher", str(teacher), "--teacher-arch", "resnet18", "--student", "tiny-cnn", "--method",
            "simreg", "--data", "builtin:digits", "--image-size", "16", "--epochs", "1", "--batch-size", "32",
            "--teacher-mode", "online", "--out", str(out), "--set", "data.subset=64", "--set", "export.enabled=false",
            *extra]


def _recipe(file: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, teacher: ["run", "--recipe", str(CORPUS / file), "--out", str(tmp / "run")]


def _truncated_teacher(tmp: Path, teacher: Path) -> list[str]:
    broken = tmp / "tëacher fïle.safetensors"
    broken.write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 3])
    return _run(broken, tmp / "run")


def _foreign_training_checkpoint(tmp: Path, teacher: Path) -> list[str]:
    checkpoints = tmp / "run" / "distill" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"step": 3, "fingerprint": "0" * 64}, checkpoints / "ckpt_000000003.pt")
    return _run(teacher, tmp / "run")


def _truncated_training_checkpoint(tmp: Path, teacher: Path) -> list[str]:
    checkpoints = tmp / "run" / "distill" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "ckpt_000000003.pt").write_bytes(b"PK\x03\x04 truncated")
    return [*_run(teacher, tmp / "run"), "--resume"]


def _not_onnx(tmp: Path, teacher: Path) -> list[str]:
    target = tmp / "mödel dir" / "bad model.onnx"
    target.parent.mkdir()
    shutil.copy(CORPUS / "not_onnx.onnx", target)
    return ["eval", "knn", str(target), "--data", "builtin:digits"]


def _export_non_run(tmp: Path, teacher: Path) -> list[str]:
    (tmp / "not a run").mkdir()
    return ["export", str(tmp / "not a run")]


CASES = [
    Case("malformed-yaml", _recipe("malformed.yaml"), 2, "is not valid YAML (line 2, column 1)"),
    Case("not-a-mapping", _recipe("not_a_mapping.yaml"), 2, "must be a mapping of sections"),
    Case("wrong-type", _recipe("wrong_type.yaml"), 2, "invalid value for 'train.epochs': Input should be a valid integer"),
    Case("negative-lr", _recipe("negative_lr.yaml"), 2, "invalid value for 'train.lr': Input should be greater than 0"),
    Case("zero-batch", _recipe("zero_batch.yaml"), 2, "invalid value for 'train.batch_size'"),
    Case("huge-image-size", _recipe("huge_image_size.yaml"), 2, "'data.image_size': Input should be less than or equal to 1024"),
    Case("fraction-above-one", _recipe("fraction_above_one.yaml"), 2, "'data.max_bad_fraction'"),
    Case("bad-resume-mode", _recipe("bad_resume.yaml"), 2, "'train.resume': Input should be 'auto' or 'required'"),
    Case("unknown-section", _recipe("unknown_section.yaml"), 2, "unknown key 'trian'"),
    Case("unknown-key", _recipe("unknown_key.yaml"), 2, "unknown key 'train.grad_acum'"),
    Case("unknown-method", _recipe("unknown_method.yaml"), 2, "unknown method 'simregg'"),
    Case("unknown-student", lambda tmp, t: _run(t, tmp / "run", "--student", "mobilenetv9000"), 2,
         "unknown student architecture 'mobilenetv9000'"),
    Case("negative-epochs-flag", lambda tmp, t: _run(t, tmp / "run", "--epochs", "-3"), 2, "'train.epochs'"),
    Case("huge-batch-flag", lambda tmp, t: _run(t, tmp / "run", "--batch-size", "99999999"), 2, "'train.batch_size'"),
    Case("zero-nproc", lambda tmp, t: _run(t, tmp / "run", "--nproc", "0"), 2, "--nproc must be >= 1, got 0"),
    Case("missing-data-with-spaces-and-unicode", lambda tmp, t: _run(t, tmp / "run", "--data", str(tmp / "dätä ünï" / "train")),
         2, "data path does not exist"),
    Case("truncated-teacher-checkpoint", _truncated_teacher, 2, "tëacher fïle.safetensors"),
    Case("teacher-of-another-architecture", lambda tmp, t: _run(t, tmp / "run", "--teacher-arch", "resnet34"), 2, "missing"),
    Case("training-checkpoint-of-another-config", _foreign_training_checkpoint, 2,
         "belongs to a different configuration (fingerprint mismatch)", writes_nothing=False),
    Case("truncated-training-checkpoint-with-resume", _truncated_training_checkpoint, 2,
         "--resume: no loadable checkpoint", writes_nothing=False),
    Case("grad-accum-not-dividing-the-batch", lambda tmp, t: _run(t, tmp / "run", "--set", "train.grad_accum=5"), 2,
         "is not divisible by train.grad_accum=5", writes_nothing=False),
    Case("onnx-file-that-is-not-onnx", _not_onnx, 2, "cannot load ONNX model"),
    Case("export-of-a-non-run-directory", _export_non_run, 2, "no student checkpoint in"),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, tmp_path, tiny_teacher_file, capsys):
    argv = case.argv(tmp_path, tiny_teacher_file)
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    stderr = capsys.readouterr().err
    assert exited.value.code == case.code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert case.fragment in " ".join(stderr.split()), stderr  # Rich may wrap long lines
    after = _tree(tmp_path)
    assert not [name for name in after if ".tmp" in name], after.keys()  # no half-written files
    assert not (tmp_path / "run" / "student").exists()
    for name, content in before.items():
        if name not in after and "/checkpoints/" in name:  # an unreadable checkpoint is set aside, not lost
            name = name.replace("/checkpoints/", "/checkpoints/unreadable/")
        assert after[name] == content, f"{name} was modified"  # inputs (incl. old checkpoints) untouched
    if case.writes_nothing:
        assert after.keys() == before.keys(), sorted(set(after) - set(before))
