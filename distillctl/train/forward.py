"""One micro-batch's forwards: the teacher's outputs per view (cache lookup or live, grouped) and the student's
pooled features and taps per view (grouped), as the method contract describes (``methods/base.py``).

Grouping: ``Requirements.forward_groups`` partitions the view slots; each group runs as one concatenated batch
(so BatchNorm in train mode sees the group's statistics, as in the published multi-crop code) and its outputs
are split back per view. A group of one view is a plain call on that view's batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from distillctl.methods.base import MethodInputs, Requirements
from distillctl.taps import TapRecorder


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _concat(images: list[torch.Tensor], group: list[int]) -> torch.Tensor:
    if len(group) == 1:
        return images[group[0]]
    batch = torch.cat([images[slot] for slot in group])
    if images[group[0]].is_contiguous(memory_format=torch.channels_last):
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def _split(values: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per view of a group: each value's rows of that view (dim 0)."""
    if len(sizes) == 1:
        return [values]
    parts = {key: value.split(sizes) for key, value in values.items()}
    return [{key: parts[key][i] for key in values} for i in range(len(sizes))]


def student_forward(forward: Callable[[torch.Tensor], torch.Tensor], recorder: TapRecorder,
                    requirements: Requirements, images: list[torch.Tensor], slots: list[int],
                    ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Pooled features and taps of the student for ``slots`` (in slot order), one forward per group."""
    features: dict[int, torch.Tensor] = {}
    taps: dict[int, dict[str, torch.Tensor]] = {}
    for group in requirements.forward_groups(slots):
        sizes = [images[slot].shape[0] for slot in group]
        pooled = forward(_concat(images, group))
        group_taps = recorder.take() if recorder.taps else {}
        for slot, part in zip(group, _split({"pooled": pooled, **group_taps}, sizes)):
            features[slot] = part.pop("pooled")
            taps[slot] = part
    return [features[slot] for slot in slots], [taps[slot] for slot in slots]


def teacher_outputs(teacher, cache, requirements: Requirements, images: list[torch.Tensor], slots: list[int],
                    sources: torch.Tensor, stored: torch.Tensor, device: torch.device, amp: str,
                    co_trained: bool = False) -> list[dict[str, torch.Tensor] | None]:
    """Per view slot: the teacher's outputs for the image that slot shows (``sources``: the sample itself, or
    its neighbour for neighbour views), from the cache or a live forward (grouped; with gradient when the
    teacher is co-trained). Teacher taps are keyed by tap name beside ``pooled`` / ``proj``."""
    outputs: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    if cache is not None:
        for slot in slots:
            looked_up = cache.lookup(sources[:, slot], stored[:, slot], taps=requirements.teacher_taps)
            outputs[slot] = {key: looked_up[key].to(device)
                             for key in (*requirements.teacher_outputs, *requirements.teacher_taps)}
        return outputs
    for group in requirements.forward_groups(slots):
        sizes = [images[slot].shape[0] for slot in group]
        with autocast(device, amp):
            result = teacher.forward(_concat(images, group), requirements.teacher_outputs,
                                     taps=requirements.teacher_taps, grad=co_trained)
        result = {key: value.float() for key, value in result.items()}
        for slot, part in zip(group, _split(result, sizes)):
            outputs[slot] = part
    return outputs


def merge_inputs(parts: list[MethodInputs]) -> MethodInputs:
    """Concatenate micro-batch inputs so ``after_step`` (enqueue, EMA, centring) runs once per optimizer step."""
    def cat(tensors):
        return torch.cat([t.detach() for t in tensors])

    first = parts[0]
    teacher = [None if out is None else {key: cat([p.teacher_outputs[slot][key] for p in parts]) for key in out}
               for slot, out in enumerate(first.teacher_outputs)]
    extras = {key: cat([p.extras[key] for p in parts]) for key in first.extras
              if all(key in p.extras and p.extras[key].ndim > 0 for p in parts)}
    student_taps = [{key: cat([p.student_taps[i][key] for p in parts]) for key in taps}
                    for i, taps in enumerate(first.student_taps)]
    return MethodInputs(student_features=[cat([p.student_features[i] for p in parts])
                                          for i in range(len(first.student_features))],
                        teacher_outputs=teacher,
                        images=[cat([p.images[i] for p in parts]) for i in range(len(first.images))],
                        index=cat([p.index for p in parts]), epoch=first.epoch, step=first.step,
                        total_epochs=first.total_epochs, student=first.student, extras=extras,
                        student_taps=student_taps, teacher=first.teacher, steps_per_epoch=first.steps_per_epoch)
