"""Downloads: hash gates (exit 3, bad file not kept), resume, TOFU lock, --sha256 / --no-verify,
licence gate, offline message, mirrors, import and verify — all against a 127.0.0.1 server."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from distillctl.cli import main
from distillctl.errors import GateError, InputError, UsageError
from distillctl.teachers import load_teacher
from distillctl.teachers.fetch import cache_home
from teacher_helpers import derive_entry, torch_bytes, unused_port, vit_tiny, write_registry

ARCH = {"builder": "timm", "name": "vit_small_patch16_224", "kwargs": {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 6}}
NAME = "tiny-dino"
FILE = "dino_deitsmall16_pretrain.pth"


def payload(seed: int = 0) -> tuple[bytes, torch.nn.Module]:
    model = vit_tiny(seed=seed)
    return torch_bytes(dict(model.state_dict())), model


def register(tmp_path, monkeypatch, url: str, **overrides) -> None:
    body = derive_entry("dino-vits16", arch=ARCH, embed_dim=48, sources=[{"url": url}], **overrides)
    write_registry(tmp_path / "extra.yaml", {NAME: body}, monkeypatch)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def folder(home):
    return home / "teachers" / NAME


def lock(home) -> dict:
    path = home / "lock.json"
    return json.loads(path.read_text())["teachers"] if path.exists() else {}


@pytest.fixture
def served(server, tmp_path, monkeypatch):
    data, model = payload()
    server.files[f"/dino/{FILE}"] = data
    register(tmp_path, monkeypatch, f"{server.url}/dino/{FILE}")
    return data, model


def test_hash_mismatch_exits_3_and_file_not_kept(served, teacher_home, capsys):
    code, _, err = run_cli(["teacher", "download", NAME, "--sha256", "0" * 64], capsys)
    assert code == 3 and "failed verification" in err
    assert not (folder(teacher_home) / FILE).exists() and not (folder(teacher_home) / "meta.json").exists()
    assert (folder(teacher_home) / f"{FILE}.rejected").exists()
    assert NAME not in lock(teacher_home)


def test_explicit_sha256_pin_accepts_right_file(served, teacher_home):
    import hashlib

    data, model = served
    teacher = load_teacher(NAME, sha256=hashlib.sha256(data).hexdigest())
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(teacher.backbone(images), model(images), atol=1e-5)
    assert NAME not in lock(teacher_home)  # an explicit pin needs no TOFU record


def test_tofu_recorded_then_enforced(served, server, teacher_home, caplog):
    import hashlib

    data, _ = served
    with caplog.at_level(logging.WARNING, logger="distillctl.teachers"):
        first = load_teacher(NAME)
    assert lock(teacher_home)[NAME]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "sha256 not published; pinned" in caplog.text
    # Upstream silently changes the file; a fresh download must not be trusted.
    server.files[f"/dino/{FILE}"] = payload(seed=5)[0]
    for leftover in folder(teacher_home).iterdir():
        leftover.unlink()
    with pytest.raises(GateError, match="from lock"):
        load_teacher(NAME)
    assert not (folder(teacher_home) / FILE).exists()
    assert lock(teacher_home)[NAME]["sha256"] == hashlib.sha256(data).hexdigest()  # lock unchanged
    assert first.sha256


def test_tampered_cached_file_is_caught(served, teacher_home):
    load_teacher(NAME)
    raw = folder(teacher_home) / FILE
    raw.write_bytes(raw.read_bytes()[:-10] + b"0123456789")
    (folder(teacher_home) / "meta.json").unlink()  # force re-use of the raw file
    with pytest.raises(GateError):
        load_teacher(NAME)
    assert not raw.exists() and (folder(teacher_home) / f"{FILE}.rejected").exists()


def test_no_verify_is_explicit_and_logged(served, server, teacher_home, caplog):
    load_teacher(NAME)
    server.files[f"/dino/{FILE}"] = payload(seed=6)[0]
    for leftover in folder(teacher_home).iterdir():
        leftover.unlink()
    with caplog.at_level(logging.WARNING, logger="distillctl.teachers"):
        teacher = load_teacher(NAME, no_verify=True)
    assert "--no-verify" in caplog.text and teacher.sha256
    meta = json.loads((folder(teacher_home) / "meta.json").read_text())
    assert meta["raw"]["verified"] is False
    with pytest.raises(GateError):  # without the flag the unverified store is not trusted
        load_teacher(NAME)


def test_published_md5_prefix_is_checked(server, tmp_path, monkeypatch, teacher_home):
    data, _ = payload()
    server.files[f"/dino/{FILE}"] = data
    register(tmp_path, monkeypatch, f"{server.url}/dino/{FILE}", published_hash={"md5_prefix": "deadbeef"})
    with pytest.raises(GateError, match="md5"):
        load_teacher(NAME)


def test_interrupted_download_resumes_with_range(served, server, teacher_home):
    data, model = served
    server.drop_after[f"/dino/{FILE}"] = len(data) // 3
    teacher = load_teacher(NAME)
    ranges = [r for path, r in server.requests if path == f"/dino/{FILE}"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(data) // 3}-"
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(teacher.backbone(images), model(images), atol=1e-5)


def test_partial_file_from_an_earlier_run_resumes(served, server, teacher_home):
    data, _ = served
    folder(teacher_home).mkdir(parents=True)
    (folder(teacher_home) / f"{FILE}.part").write_bytes(data[:1000])
    load_teacher(NAME)
    assert server.requests[-1][1] == "bytes=1000-"


def test_server_without_range_restarts_cleanly(served, server, teacher_home):
    data, _ = served
    server.support_range = False
    server.drop_after[f"/dino/{FILE}"] = len(data) // 2
    teacher = load_teacher(NAME)
    assert len(server.requests) == 2 and teacher.embed_dim == 48


def test_license_gate(server, tmp_path, monkeypatch, capsys):
    data, _ = payload()
    server.files[f"/dino/{FILE}"] = data
    register(tmp_path, monkeypatch, f"{server.url}/dino/{FILE}", license={"id": "CC-BY-NC-4.0", "commercial": False})
    with pytest.raises(UsageError, match="CC-BY-NC-4.0"):
        load_teacher(NAME)
    assert server.requests == []  # nothing fetched before acceptance
    code, _, err = run_cli(["teacher", "download", NAME], capsys)
    assert code == 2 and "--accept-license" in err
    code, _, _ = run_cli(["teacher", "download", NAME, "--accept-license"], capsys)
    assert code == 0
    assert load_teacher(NAME, accept_license=True).license == "CC-BY-NC-4.0"


def test_offline_message_is_fast_and_actionable(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{unused_port()}/dino/{FILE}"
    register(tmp_path, monkeypatch, url)
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        load_teacher(NAME)
    assert time.monotonic() - start < 5
    assert url in info.value.message and f"distillctl teacher import {NAME} FILE" in info.value.hint
    code, out, err = run_cli(["teacher", "download", NAME], capsys)
    assert code == 2 and url in err and "teacher import" in err and "Traceback" not in err
    monkeypatch.setenv("DISTILLCTL_OFFLINE", "1")
    with pytest.raises(InputError, match="offline mode"):
        load_teacher(NAME)


def test_http_404_is_input_error(server, tmp_path, monkeypatch):
    register(tmp_path, monkeypatch, f"{server.url}/gone/{FILE}")
    with pytest.raises(InputError, match="HTTP 404"):
        load_teacher(NAME)


def test_mirror_replaces_host(served, server, tmp_path, monkeypatch):
    data, _ = served
    server.files[f"/dino/dino_deitsmall16_pretrain/{FILE}"] = data
    register(tmp_path, monkeypatch, f"https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/{FILE}")
    teacher = load_teacher(NAME, mirror=server.url)
    assert server.requests[-1][0] == f"/dino/dino_deitsmall16_pretrain/{FILE}"
    assert teacher.source.startswith(f"registry:{server.url}")
    monkeypatch.setenv("DISTILLCTL_MIRROR", server.url + "/")
    from distillctl.teachers.resolve import entry_urls
    from distillctl.teachers.registry import load_registry

    assert entry_urls(load_registry().resolve(NAME), None) == [f"{server.url}/dino/dino_deitsmall16_pretrain/{FILE}"]


def test_import_then_offline_use_and_verify(tmp_path, monkeypatch, teacher_home, capsys):
    data, model = payload()
    register(tmp_path, monkeypatch, f"http://127.0.0.1:{unused_port()}/dino/{FILE}")
    source = tmp_path / FILE
    source.write_bytes(data)
    code, _, err = run_cli(["teacher", "import", NAME, str(source)], capsys)
    assert code == 0, err
    teacher = load_teacher(NAME)  # no network needed now
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(teacher.backbone(images), model(images), atol=1e-5)
    code, out, _ = run_cli(["teacher", "verify", NAME, "--json"], capsys)
    assert code == 0 and json.loads(out)["raw"]["structure"] == "ok"
    backbone = folder(teacher_home) / "backbone.safetensors"
    backbone.write_bytes(backbone.read_bytes()[:-4] + b"\0\0\0\1")
    code, _, err = run_cli(["teacher", "verify", NAME], capsys)
    assert code == 3 and "changed since conversion" in err
    raw = folder(teacher_home) / FILE
    raw.write_bytes(b"x" + raw.read_bytes()[1:])
    code, _, err = run_cli(["teacher", "verify", NAME], capsys)
    assert code == 3 and not raw.exists()


def test_cache_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLCTL_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_home() == tmp_path / "a"
    monkeypatch.delenv("DISTILLCTL_HOME")
    assert cache_home() == tmp_path / "b" / "distillctl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_home() == tmp_path / "h" / ".cache" / "distillctl"


def test_convert_command_for_a_torch_family_and_verify_unknown(tmp_path, monkeypatch, capsys):
    data, model = payload()
    register(tmp_path, monkeypatch, f"http://127.0.0.1:{unused_port()}/dino/{FILE}")
    code, _, err = run_cli(["teacher", "verify", NAME], capsys)
    assert code == 2 and "not in the cache" in err
    source = tmp_path / FILE
    source.write_bytes(data)
    code, out, err = run_cli(["teacher", "convert", NAME, str(source), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["conversion"]["family"] == "dino"
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(load_teacher(NAME).backbone(images), model(images), atol=1e-5)
