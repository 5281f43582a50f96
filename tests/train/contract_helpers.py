"""A tiny contract-II probe method (taps, grouping, co-trained teacher, per-sample state) and in-process jobs.

The probe is not registered (``--method`` never sees it); tests hand it to ``train()`` directly. Run as a
module (``python -m tests.train.contract_helpers OUT``) it trains the co-trained job in a fresh process, so a
test can kill it with ``DISTILLCTL_TEST_KILL_AT_STEP`` and resume it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from distillctl.config import DataConfig, TrainConfig
from distillctl.data.datasets import open_dataset
from distillctl.data.views import ViewSpec
from distillctl.methods.base import Method, MethodInputs, MethodParams, MethodView, Requirements, TeacherDims
from distillctl.methods.sample_state import SampleState
from distillctl.teachers.base import Teacher
from distillctl.train.loop import TrainJob


class ProbeParams(MethodParams):
    student_taps: tuple[str, ...] = ("stage:-1",)
    teacher_taps: tuple[str, ...] = ()
    teacher_mode: str = "online"
    grouping: str = "per_view"
    views: int = 2
    teacher_lr_scale: float = 0.5
    tap_dim: int = 96  # channels of the first student tap (test_resnet's last stage: 96)


class Probe(Method):
    """Loss = MSE(head(mean-pooled student tap), teacher pooled) per view; co-trained: + the teacher's own
    contrast of its two views. Keeps, per sample, the last step it was seen (``SampleState``)."""

    name = "probe"
    title = objective = published = "contract-II probe"
    Params = ProbeParams

    def __init__(self, params: ProbeParams, student_dim: int, teacher_dims: TeacherDims | None) -> None:
        super().__init__(params, student_dim, teacher_dims)
        self.head = nn.Linear(params.tap_dim, teacher_dims.pooled)
        self.seen: SampleState | None = None
        self.recorded: list[MethodInputs] = []

    def setup(self, student: nn.Module) -> None:
        self.seen = SampleState(self.num_samples, dtype=torch.long, fill=-1)

    def requirements(self, image_size: int) -> Requirements:
        view = MethodView(ViewSpec(size=image_size, family="mocov2", scale=(0.5, 1.0), flip=True))
        return Requirements(views=(view,) * self.params.views, teacher_outputs=frozenset({"pooled"}),
                            teacher_mode=self.params.teacher_mode, student_taps=self.params.student_taps,
                            teacher_taps=self.params.teacher_taps, grouping=self.params.grouping,
                            teacher_lr_scale=self.params.teacher_lr_scale, needs_index=True)

    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, float]]:
        self.recorded.append(inputs)
        tap = self.params.student_taps[0]
        terms = []
        for taps, teacher in zip(inputs.student_taps, inputs.teacher_outputs):
            feature = taps[tap].flatten(2).mean(-1) if taps[tap].ndim == 4 else taps[tap].mean(1)
            target = teacher["pooled"] if inputs.teacher is not None else teacher["pooled"].detach()
            terms.append(F.mse_loss(self.head(feature), target))
        loss = sum(terms) / len(terms)
        if inputs.teacher is not None:  # co-trained: the teacher also pulls its two views together
            a, b = (F.normalize(out["pooled"], dim=1) for out in inputs.teacher_outputs[:2])
            loss = loss + (2 - 2 * (a * b).sum(1)).mean()
        return loss, {}

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        self.seen.update(inputs.index, torch.full_like(inputs.index, inputs.step))


def tiny_teacher(seed: int = 1) -> Teacher:
    torch.manual_seed(seed)
    backbone = timm.create_model("test_resnet", num_classes=0)
    return Teacher(name="tiny", arch="test_resnet", backbone=backbone, embed_dim=backbone.num_features,
                   sha256="1" * 64)


def probe_job(out: Path, images: int = 64, batch: int = 16, seed: int = 0, teacher: Teacher | None = None,
              student_arch: str = "test_resnet", image_size: int = 16, **params) -> TrainJob:
    """A few-step probe job at 16 px on digits; same seed → same initial weights."""
    torch.manual_seed(seed)
    kwargs = {"img_size": image_size} if "vit" in student_arch else {}
    student = timm.create_model(student_arch, num_classes=0, **kwargs)
    teacher = teacher or tiny_teacher()
    params.setdefault("tap_dim", student.num_features if "vit" in student_arch else student.feature_info[-1]["num_chs"])
    method = Probe(ProbeParams(**params), student.num_features, TeacherDims(teacher.embed_dim))
    out.mkdir(parents=True, exist_ok=True)
    settings = TrainConfig(epochs=2, batch_size=batch, lr=0.05, checkpoint_every_minutes=None, checkpoint_every_steps=2,
                           log_every=1, keep_last=10)
    return TrainJob(method=method, student=student, dataset=open_dataset("builtin:digits").subset(range(images)),
                    train=settings, data=DataConfig(image_size=image_size), out_dir=out,
                    metrics_path=out / "metrics.jsonl", fingerprint="probe", teacher=teacher)


def cotrained_job(out: Path) -> TrainJob:
    return probe_job(out, teacher_mode="co_trained")


def saved_state(job: TrainJob) -> dict[str, torch.Tensor]:
    """Student, method and co-trained teacher tensors after training, for bit-exact comparison."""
    state = {f"student.{k}": v for k, v in job.student.state_dict().items()}
    state.update({f"method.{k}": v for k, v in job.method.state_dict().items()})
    state.update({f"teacher.{k}": v for k, v in job.teacher.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


if __name__ == "__main__":  # python -m tests.train.contract_helpers OUT [GRAD_ACCUM]; under torchrun: one file per rank
    from safetensors.torch import save_file

    from distillctl.train import distributed
    from distillctl.train.loop import train

    rank = distributed.init_from_env("cpu").rank
    target = Path(sys.argv[1])
    job = cotrained_job(target)
    job.train.grad_accum = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    train(job)
    save_file(saved_state(job), str(target / ("final.safetensors" if rank == 0 else f"final_rank{rank}.safetensors")))
