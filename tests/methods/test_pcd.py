"""PCD: the pixel InfoNCE against a loop, the SpatialAdaptor against the vector head at every location, the MHSA
block, the queue, and training + exact resume through the CLI."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distillctl.methods.base import MethodInputs, TeacherDims
from distillctl.methods.pcd import PCD, MapSelfAttention, PCDParams, SpatialAdaptor, pixel_info_nce


def test_pixel_info_nce_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    student = torch.nn.functional.normalize(torch.randn(2, 4, 2, 3, generator=generator), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(2, 4, 2, 3, generator=generator), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(5, 4, generator=generator), dim=1)
    terms = []
    for b in range(2):
        for y in range(2):
            for x in range(3):
                s, t = student[b, :, y, x], teacher[b, :, y, x]
                positive = math.exp(float(s @ t) / 0.2)
                negatives = sum(math.exp(float(s @ q) / 0.2) for q in queue)
                terms.append(-math.log(positive / (positive + negatives)))
    assert float(pixel_info_nce(student, teacher, queue, 0.2)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_spatial_adaptor_is_the_vector_head_at_every_location():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4))
    with torch.no_grad():
        head[1].running_mean.normal_()
        head[1].running_var.uniform_(0.5, 2.0)
    head.eval()
    adaptor = SpatialAdaptor(head).train()  # train mode must not matter: BatchNorm uses the running statistics
    maps = torch.randn(2, 6, 3, 2)
    out = adaptor(maps)
    assert out.shape == (2, 4, 3, 2) and adaptor.out_channels(6) == 4
    for b in range(2):
        for y in range(3):
            for x in range(2):
                with torch.no_grad():
                    assert torch.allclose(out[b, :, y, x], head(maps[b, :, y, x][None])[0], atol=1e-5)
    assert not list(adaptor.parameters())  # buffers only: never trained
    identity = SpatialAdaptor(None)
    assert torch.equal(identity(maps), maps) and identity.out_channels(6) == 6


def test_mhsa_block_attends_over_locations_with_a_residual():
    torch.manual_seed(0)
    block = MapSelfAttention(8, 2).eval()
    maps = torch.randn(2, 8, 3, 3)
    tokens = maps.flatten(2).transpose(1, 2)
    normed = block.norm(tokens)
    expected = tokens + block.attention(normed, normed, normed)[0]
    assert torch.allclose(block(maps), expected.transpose(1, 2).reshape(2, 8, 3, 3), atol=1e-6)


def test_queue_takes_every_teacher_location():
    stage = SimpleNamespace(feature_info=[{"module": "m", "num_chs": 8, "reduction": 1}])
    method = PCD(PCDParams(queue_size=50, hidden_dim=16, mhsa_heads=2), 8, TeacherDims(8, backbone=stage))
    method.setup(stage)
    teacher_map = torch.randn(3, 8, 2, 2)
    inputs = MethodInputs(student_features=[torch.zeros(3, 8)], teacher_outputs=[{"stage:-1": teacher_map}],
                          images=[torch.zeros(3, 3, 8, 8)], index=torch.arange(3), epoch=0.0, step=0, total_epochs=1,
                          student_taps=[{"stage:-1": torch.randn(3, 8, 4, 4)}])
    loss, logs = method.loss(inputs)
    assert torch.isfinite(loss) and -1 <= logs["pos_cos"] <= 1
    method.after_step(inputs)
    assert int(method.queue.filled) == 12 and int(method.queue.ptr) == 12
    expected = torch.nn.functional.normalize(teacher_map, dim=1).permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.allclose(method.queue.data[:12], expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode, expected", [("auto", "cached"), ("online", "online")])
def test_trains_and_resumes_exactly(tmp_path, tiny_teacher_file, mode, expected) -> None:
    """From a feature cache holding the teacher's stage map (the default) and with the teacher online."""
    import json

    from pooled_e2e import train_and_resume

    train_and_resume(tmp_path, tiny_teacher_file, "pcd",
                     ["--image-size", "32", "--set", "method.params.student_tap=stage:-2",
                      "--set", "method.params.teacher_tap=stage:-2", "--set", "method.params.queue_size=100",
                      "--set", "method.params.hidden_dim=64", "--teacher-mode", mode])
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["teacher"]["mode"] == expected
    cache = tmp_path / "full" / "cache"
    if expected == "cached":
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["teacher"]["taps"]["stage:-2"]["shape"] == [256, 2, 2]  # resnet18 layer3 at 32 px
        assert (cache / "tap-stage_-2" / "shard_00000.npy").is_file()
        stages = json.loads((tmp_path / "full" / "manifest.json").read_text())["stages"]
        assert stages["cache"]["fingerprint"] == manifest["fingerprint"]  # the stage key names the taps too
    else:
        assert not cache.exists()
