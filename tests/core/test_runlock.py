"""One writer per run directory (distillctl/runlock.py): a second process is refused with exit 2 naming the holder,
whatever the path spelling; the directory is untouched; a killed holder blocks nobody; one process may nest."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distillctl import runlock
from distillctl.errors import EXIT_USAGE, UsageError
from tests.conftest import REPO, run_cli, tiny_run_args

HOLD = ("import sys, time; from distillctl.runlock import acquire; acquire(sys.argv[1], 'test holder'); "
        "print('held', flush=True); time.sleep(600)")
TRY = ("import sys; from distillctl.runlock import acquire\n"
       "try:\n    acquire(sys.argv[1]).release()\nexcept Exception as exc:\n    print(exc); sys.exit(exc.exit_code)\n")


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture
def holder_of():
    """Start a process that holds a directory's lock (until killed); yields the starter."""
    started: list[subprocess.Popen] = []

    def start(directory: Path) -> subprocess.Popen:
        process = _python(HOLD, str(directory))
        started.append(process)
        assert process.stdout.readline().strip() == "held", process.stderr.read()
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def _try_from_another_process(directory: Path | str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", TRY, str(directory)], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with the sha256 of its bytes."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def _fake_run(directory: Path) -> Path:
    """A run directory with a recipe, a manifest and a checkpoint (contents are arbitrary bytes)."""
    (directory / "distill" / "checkpoints").mkdir(parents=True)
    (directory / "recipe.yaml").write_text("name: locked\n")
    (directory / "manifest.json").write_text('{"stages": {}}')
    (directory / "distill" / "checkpoints" / "ckpt_000000003.pt").write_bytes(os.urandom(256))
    return directory


@pytest.mark.parametrize("spelling", ["relative", "absolute", "symlink"])
def test_another_spelling_of_a_held_directory_is_refused(tmp_path: Path, holder_of, monkeypatch, spelling: str):
    run = _fake_run(tmp_path / "runs" / "a")
    held_by = holder_of(run)  # locked through its absolute path
    before = _snapshot(run)
    monkeypatch.chdir(tmp_path)
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(run, target_is_directory=True)
    other = {"relative": Path("runs/a"), "absolute": Path(str(tmp_path) + "/runs/../runs/a"),
             "symlink": Path("link")}[spelling]
    with pytest.raises(UsageError) as refused:
        runlock.acquire(other)
    assert refused.value.exit_code == EXIT_USAGE == 2
    message = refused.value.message
    assert f"pid {held_by.pid} " in message and "test holder" in message and "wait for it or stop it" in message
    assert "\n" not in message and refused.value.hint is None  # one line
    assert _snapshot(run) == before


def test_a_killed_holder_blocks_nobody(tmp_path: Path, holder_of):
    run = _fake_run(tmp_path / "run")
    held_by = holder_of(run)
    refused = _try_from_another_process(run)
    assert refused.returncode == 2 and f"pid {held_by.pid} " in refused.stdout, (refused.stdout, refused.stderr)
    held_by.send_signal(signal.SIGKILL)
    held_by.wait()
    assert (run / runlock.LOCK_NAME).is_file()  # the stale lock file stays ...
    assert runlock.holder(run)["pid"] == held_by.pid
    with runlock.hold(run) as lock:  # ... and blocks nobody
        assert lock.held
        assert runlock.holder(run)["pid"] == os.getpid()
    assert _try_from_another_process(run).returncode == 0


def test_one_process_nests_and_another_waits_for_the_outermost_release(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    outer = runlock.acquire(run)
    inner = runlock.acquire("run")  # another spelling of the same directory: counted, not refused
    sub = runlock.acquire(run / "teacher_pretrain")  # a nested pipeline's own run directory
    assert outer.held and inner.held and sub.held
    sub.release()
    inner.release()
    assert _try_from_another_process(run).returncode == 2  # the outer acquisition still holds it
    outer.release()
    assert _try_from_another_process(run).returncode == 0


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path):
    """DataLoader workers are forked from the holder: they must not hold the run after it released or died."""
    run = tmp_path / "run"
    lock = runlock.acquire(run)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only sleeps
        import time

        time.sleep(30)
        os._exit(0)
    try:
        lock.release()
        assert _try_from_another_process(run).returncode == 0
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_directory_the_lock_created_goes_away_if_nothing_was_written(tmp_path: Path):
    with runlock.hold(tmp_path / "runs" / "new"):
        assert (tmp_path / "runs" / "new" / runlock.LOCK_NAME).is_file()
    assert not (tmp_path / "runs").exists()
    with runlock.hold(tmp_path / "kept"):
        (tmp_path / "kept" / "recipe.yaml").write_text("name: kept\n")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [runlock.LOCK_NAME, "recipe.yaml"]
    assert (tmp_path / "kept" / runlock.LOCK_NAME).read_bytes() == b""  # no stale holder record


def test_without_fcntl_there_is_no_lock_and_no_crash(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(runlock, "fcntl", None)
    with runlock.hold(tmp_path / "run") as lock:
        assert not lock.held
        assert _try_from_another_process(tmp_path / "run").returncode == 0  # nothing to be refused by


def _one_error_line(result: subprocess.CompletedProcess, pid: int) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "hint:" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"in use by pid {pid} " in errors[0], result.stderr
    assert errors[0].endswith("wait for it or stop it"), result.stderr


def test_cli_gate_on_a_held_directory_exits_2(tmp_path: Path, holder_of):
    """``distillctl gate`` rewrites summary.json: refused (one line, exit 2) while another process holds the run."""
    run = _fake_run(tmp_path / "run")
    (run / "summary.json").write_text('{"student": {"knn_top1": 50.0}}')
    held_by = holder_of(run)
    before = _snapshot(run)
    _one_error_line(run_cli("gate", str(run), "--set", "gates.min_student_knn=10"), held_by.pid)
    assert _snapshot(run) == before


@pytest.mark.slow
def test_cli_eval_recording_into_a_held_run_exits_2(tmp_path: Path, holder_of):
    """``eval knn RUN`` records into the run's summary.json (and caches under it): refused while the run is held."""
    run = _fake_run(tmp_path / "run")
    (run / "student").mkdir()
    held_by = holder_of(run)
    before = _snapshot(run)
    _one_error_line(run_cli("eval", "knn", str(run), "--data", "builtin:digits"), held_by.pid)
    assert _snapshot(run) == before


@pytest.mark.slow
def test_cli_run_on_a_held_directory_exits_2_and_touches_nothing(tmp_path: Path, holder_of, tiny_teacher_file):
    """The real CLI: `run --restart` through a symlink to a directory another process holds is refused before the
    restart discards anything; one error line, exit 2, every file byte-identical."""
    run = _fake_run(tmp_path / "run")
    held_by = holder_of(run)
    before = _snapshot(run)
    (tmp_path / "link").symlink_to(run, target_is_directory=True)
    result = run_cli(*tiny_run_args(tiny_teacher_file, tmp_path / "link", "--restart"))
    _one_error_line(result, held_by.pid)
    assert _snapshot(run) == before
