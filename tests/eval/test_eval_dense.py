"""Dense probe (task mosaic-2x2): mosaics, labels, feature maps and scores against loop-based references."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from distillctl.eval.dense import (DenseProbeConfig, cell_labels, dense_probe_maps, feature_map, label_map,
                                   mosaic_indices, segmentation_scores, tile)
from tests.conftest import run_cli


def test_tile_and_labels_match_a_pixel_loop():
    quadrants = torch.arange(2 * 4 * 1 * 3 * 3, dtype=torch.float32).view(2, 4, 1, 3, 3)
    labels = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 6]])
    mosaics, maps = tile(quadrants), label_map(labels, 3)
    assert mosaics.shape == (2, 1, 6, 6) and maps.shape == (2, 6, 6)
    for m in range(2):
        for y in range(6):
            for x in range(6):
                q = 2 * (y // 3) + (x // 3)
                assert mosaics[m, 0, y, x] == quadrants[m, q, 0, y % 3, x % 3]
                assert maps[m, y, x] == labels[m, q]
    cells = cell_labels(labels, (3, 2))  # cell centres at rows 1/6, 1/2, 5/6 of the side: quadrant rows 0, 1, 1
    assert cells[0].tolist() == [[1, 2], [3, 4], [3, 4]]


def test_mosaic_indices_are_seeded_and_use_each_image_once_per_pass():
    first, again = mosaic_indices(10, 5, seed=3), mosaic_indices(10, 5, seed=3)
    assert torch.equal(first, again) and first.shape == (5, 4)
    assert sorted(first.flatten()[:10].tolist()) == list(range(10))
    assert not torch.equal(first, mosaic_indices(10, 5, seed=4))


def test_segmentation_scores_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (3, 5, 5), generator=generator)
    predicted = torch.where(torch.rand(3, 5, 5, generator=generator) < 0.6, truth,
                            torch.randint(0, 4, (3, 5, 5), generator=generator))
    predicted[predicted == 3] = 2  # class 3 never predicted: IoU 0, still counted (it is in the truth)
    pixel_accuracy, miou, per_class = segmentation_scores(predicted, truth, num_classes=5)
    ious = []
    for c in range(5):
        inter = sum(int(p == c and t == c) for p, t in zip(predicted.flatten().tolist(), truth.flatten().tolist()))
        union = sum(int(p == c or t == c) for p, t in zip(predicted.flatten().tolist(), truth.flatten().tolist()))
        ious.append(100.0 * inter / union if union else None)
    assert per_class == pytest.approx(ious) and per_class[4] is None and per_class[3] == 0.0
    assert miou == pytest.approx(sum(ious[:4]) / 4)
    assert pixel_accuracy == pytest.approx(100.0 * (predicted == truth).float().mean().item())


def test_vit_feature_map_is_the_patch_tokens_on_their_grid():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1, img_size=64, patch_size=8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(images)
        maps = feature_map(model, images)
    assert maps.shape == (2, 192, 8, 8)
    for y in range(8):
        for x in range(8):
            assert torch.equal(maps[:, :, y, x], tokens[:, 1 + 8 * y + x])
    cnn = timm.create_model("resnet18", num_classes=0).eval()
    with torch.no_grad():
        assert feature_map(cnn, images).shape == (2, 512, 2, 2)


def _maps(quadrants: torch.Tensor, informative: bool, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(quadrants.shape[0], 8, 4, 4, generator=generator)
    if not informative:
        return noise
    signal = torch.nn.functional.one_hot(cell_labels(quadrants, (4, 4)), 8).permute(0, 3, 1, 2).float()
    return 3.0 * signal + 0.3 * noise


def test_probe_reads_classes_from_informative_maps_and_not_from_noise():
    generator = torch.Generator().manual_seed(0)
    train_q = torch.randint(0, 8, (60, 4), generator=generator)
    val_q = torch.randint(0, 8, (30, 4), generator=generator)
    config = DenseProbeConfig(epochs=10, lrs=(0.1,), weight_decays=(0.0,), batch_size=256)
    good = dense_probe_maps(_maps(train_q, True, generator), train_q, _maps(val_q, True, generator), val_q, 8, 16, config)
    noise = dense_probe_maps(_maps(train_q, False, generator), train_q, _maps(val_q, False, generator), val_q, 8, 16,
                             config)
    # bilinear upsampling blurs the quadrant borders a little; the interior is classified exactly
    assert good.pixel_accuracy > 90 and good.miou > 80
    assert noise.pixel_accuracy < 30 and noise.miou < 20
    assert good.feature_grid == [4, 4] and good.protocol["task"] == "mosaic-2x2"


@pytest.mark.slow
def test_cli_dense_probe_reports_miou_far_above_chance_and_is_deterministic(trained_teacher_file, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    random_file = tmp_path / "random_r10t.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t", num_classes=0).state_dict().items()},
              str(random_file))
    scores = {}
    for name, path in (("trained", trained_teacher_file), ("random", random_file), ("again", random_file)):
        result = run_cli("eval", "dense", f"teacher:{path}", "--teacher-arch", "resnet10t", "--data", "builtin:digits",
                         "--input-size", "32", "--mosaics", "150", "--val-mosaics", "60", "--epochs", "10",
                         "--crop-pct", "1.0", "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        scores[name] = json.loads(result.stdout)["dense"]
    assert scores["trained"]["feature_grid"] == [2, 2] and scores["trained"]["protocol"]["val_mosaics"] == 60
    # 10 digit classes: chance pixel accuracy is 10%; frozen 2x2 maps of either network locate the digits
    for name in ("trained", "random"):
        assert scores[name]["pixel_accuracy"] > 40 and scores[name]["miou"] > 25, scores
    assert scores["again"] == scores["random"]  # seeded mosaics and SGD order: the same numbers again
