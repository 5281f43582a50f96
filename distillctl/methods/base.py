"""The method contract: what a distillation (or SSL-only) method declares and computes.

A method is an ``nn.Module`` so that its train-only heads, queues, EMA encoders and other
persistent state live in ``state_dict()`` and are checkpointed with the student for exact resume.
The trainer owns data, views, the teacher call or cache lookup, AMP, DDP, schedules and checkpoints;
the method owns heads, loss and state. Registration is one decorator.

Flow per step (see ``distillctl/train/loop.py``)::

    req = method.requirements()          # views, teacher outputs, teacher mode, BN mode
    images = [view_0, view_1, ...]       # one normalised batch per ViewSpec in req.views
    teacher = [dict(pooled=..., proj=...) or None per view]   # only for views with teacher=True
    student = [student_backbone(img) for views with student=True]  # pooled features
    loss, logs = method.loss(MethodInputs(...))
    ... backward, optimizer step ...
    method.after_step(inputs)            # enqueue, EMA update (under no_grad)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from distillctl.data.views import ViewSpec

TeacherMode = Literal["cached_exact", "cached_approx", "online", "none"]
TeacherOutput = Literal["pooled", "proj"]


class MethodParams(BaseModel):
    """Base for each method's hyper-parameters (recipe ``method.params``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MethodView:
    """One view the method wants: its augmentation, and who sees it."""

    spec: ViewSpec
    teacher: bool = True
    student: bool = True


@dataclass(frozen=True)
class Requirements:
    views: tuple[MethodView, ...]
    teacher_outputs: frozenset[str] = frozenset({"pooled"})
    # cached_exact: cached targets are exactly what the method trains on (teacher sees the student's view);
    # cached_approx: published recipe feeds the teacher a fresh augmentation (cache replays stored ones);
    # online: needs a live teacher; none: SSL-only, no teacher.
    teacher_mode: TeacherMode = "cached_exact"
    teacher_bn: Literal["eval", "train"] = "eval"
    needs_index: bool = False


@dataclass
class TeacherDims:
    pooled: int
    proj: int | None = None


@dataclass
class MethodInputs:
    """Everything a method sees at one step."""

    student_features: list[torch.Tensor]  # pooled student embeddings, one per view with student=True
    teacher_outputs: list[dict[str, torch.Tensor] | None]  # per view in requirements.views
    images: list[torch.Tensor]  # normalised view batches, per view in requirements.views
    index: torch.Tensor  # dataset indices of the batch (B,)
    epoch: float  # fractional epoch (step / steps_per_epoch)
    step: int
    total_epochs: int
    student: nn.Module | None = None  # the student backbone (for EMA key encoders)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement ``requirements`` and ``loss``."""

    name: ClassVar[str]
    title: ClassVar[str]  # e.g. "SimReg: Regression for self-supervised KD (BMVC 2021)"
    objective: ClassVar[str]  # one paragraph: the loss in words and symbols
    published: ClassVar[str]  # headline numbers with their source
    # official code read (repo@commit) and the agreement measured against it, or "no official code"
    sources: ClassVar[str] = ""
    # each under-specified detail: the choice made and why
    assumptions: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[MethodParams]] = MethodParams
    kind: ClassVar[Literal["distill", "ssl"]] = "distill"
    # True: built with one TeacherDims per teacher (recipe teacher.extra) and reads outputs pooled_k / proj_k
    multi_teacher: ClassVar[bool] = False
    # True: queue rows serve as contrastive negatives (InfoNCE), so a queue longer than the training set holds
    # stale copies of the current image among them; False for queues of soft-target anchors (SEED, CompRess)
    queue_negatives: ClassVar[bool] = False

    def __init__(self, params: MethodParams, student_dim: int, teacher_dims: TeacherDims | None) -> None:
        super().__init__()
        self.params = params
        self.student_dim = student_dim
        self.teacher_dims = teacher_dims

    # --- declared needs -------------------------------------------------------------------------
    def requirements(self, image_size: int) -> Requirements:
        raise NotImplementedError

    # --- per step -------------------------------------------------------------------------------
    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        """Update persistent state after the optimizer step (enqueue, EMA). Default: nothing."""

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent schedules. Default: nothing."""

    def setup(self, student: nn.Module) -> None:
        """Called once after construction with the student (e.g. to create an EMA copy)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Head parameters optimised together with the student (EMA copies excluded)."""
        return [p for p in self.parameters() if p.requires_grad]


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as ``--method <cls.name>``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    import distillctl.methods  # noqa: F401  (imports every method module so they register)

    return dict(_REGISTRY)


def get_method(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        from distillctl.errors import unknown_name

        raise unknown_name("method", name, list(methods))
    return methods[name]


def build_method(name: str, params: BaseModel | dict, student_dim: int, teacher_dims: TeacherDims | None) -> Method:
    """Construct a method from its typed ``Params`` (``recipe.method.typed_params``; a dict is validated here)."""
    cls = get_method(name)
    if not isinstance(params, cls.Params):
        from distillctl.config import typed_method_params

        params = typed_method_params(name, dict(params or {}), "method.params")
    return cls(params, student_dim, teacher_dims)


GatherFn = Callable[[torch.Tensor], torch.Tensor]
