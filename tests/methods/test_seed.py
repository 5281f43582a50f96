"""SEED under mixed precision: the teacher targets, the queue and the τ_T = 1e-4 logits stay fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillctl.methods.seed import Seed, SeedParams, seed_loss
from method_harness import STUDENT_DIM, TEACHER_DIMS, TinyNet, TinyTeacher, make_images, make_inputs


def test_bf16_autocast_keeps_targets_and_queue_fp32() -> None:
    torch.manual_seed(0)
    method = Seed(SeedParams(queue_size=64), STUDENT_DIM, TEACHER_DIMS)
    student, teacher = TinyNet(STUDENT_DIM), TinyTeacher()
    inputs = make_inputs(method, student, [teacher], make_images(method, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_loss, _ = method.loss(inputs)
        head = method.head(inputs.student_features[0])
    assert head.dtype == torch.bfloat16 and amp_loss.dtype == torch.float32
    target = F.normalize(inputs.teacher_outputs[0][method.target_key].double(), dim=1)
    queue = method.queue.data.double()
    student = F.normalize(head.detach().double(), dim=1)
    reference = float(seed_loss(student, target, queue, 0.2, 1e-4))
    rounded = float(seed_loss(student, target.bfloat16().double(), queue.bfloat16().double(), 0.2, 1e-4))
    amp_error, rounded_error = abs(float(amp_loss.detach()) - reference), abs(rounded - reference)
    assert amp_error <= 1e-5 * reference
    assert rounded_error > 100 * amp_error
