"""The method contract (II): what a distillation (or SSL-only) method declares and computes.

A method is an ``nn.Module`` so that its train-only heads, queues, EMA encoders and other
persistent state live in ``state_dict()`` and are checkpointed with the student for exact resume.
The trainer owns data, views, the teacher call or cache lookup, AMP, DDP, schedules and checkpoints;
the method owns heads, loss and state. Registration is one decorator.

Flow per step (see ``distillctl/train/loop.py``)::

    req = method.requirements(size)      # views, teacher outputs + taps, teacher mode, BN mode, grouping
    images = [view_0, view_1, ...]       # one normalised batch per ViewSpec in req.views
    teacher = [dict(pooled=..., proj=..., <teacher tap>=...) or None per view]  # views with teacher=True
    student = [student_backbone(img) for views with student=True]   # pooled features (+ student_taps)
    loss, logs = method.loss(MethodInputs(...))   # logs: detached 0-dim tensors, read at log steps only
    ... backward, optimizer step ...
    method.after_step(inputs)            # enqueue, EMA update, per-sample state (under no_grad)

What a method can ask for (all optional; a method that asks for none of it is a contract-I method):

- **Taps** (``student_taps`` / ``teacher_taps``): intermediate outputs from the same forward, e.g.
  ``"stage:-1"`` (last CNN stage map), ``"tokens"`` (ViT CLS/register/patch tokens), ``"attn:-1"`` (last
  block's attention probabilities); see :mod:`distillctl.taps`. Student taps arrive in
  ``MethodInputs.student_taps`` (one dict per student view), teacher taps inside each teacher view's output
  dict under the tap's name. A feature cache stores teacher taps beside the pooled outputs (flattened, one row
  per stored view; ``distillctl/cache``), so a method that reads the teacher's map of the student's own view
  (PCD, dense-reg) runs from the cache like any other; ``auto`` runs the teacher online instead when the maps
  would not fit a sensible cache (:func:`distillctl.pipeline` sizes it). The deployable student carries no hooks.
- **Grouped forward** (``grouping="by_resolution"``): views of one resolution go through the student as one
  concatenated batch (and through an online teacher likewise), split back per view, as the published
  multi-crop code does (DINO's MultiCropWrapper). BatchNorm then sees the whole group's statistics.
  Default ``"per_view"``: one forward per view (what contract-I methods were written and checked against).
- **Co-trained teacher** (``teacher_mode="co_trained"``): the teacher trains with the student (DoGo, OSS,
  SimDis online): its parameters form their own optimiser group (``teacher_lr_scale``,
  ``teacher_weight_decay``), its BatchNorm runs in train mode, its outputs carry gradients, its gradients
  are averaged across ranks with the student's, it is checkpointed and resumed exactly and never cached.
  The student stays the deployable artefact; the teacher is written beside it
  (``student/teacher_cotrained.safetensors``). ``MethodInputs.teacher`` is the live teacher.
- **Per-sample state**: :class:`distillctl.methods.sample_state.SampleState`, a table indexed by dataset
  index (pseudo-labels, assignments, memory banks) that every rank holds identically; create it in
  ``setup`` from ``self.num_samples`` (set by the trainer before ``setup``), update it in ``after_step``.
- **One cacheability rule**: :func:`teacher_plan` decides none / cached / online / co-trained from the
  method's declared ``teacher_mode``, the effective teacher BatchNorm mode, the teacher views' augmentation
  and the teacher taps; nothing else decides it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from distillctl.data.views import ViewSpec

TeacherMode = Literal["cached_exact", "cached_approx", "online", "none", "co_trained"]
TeacherOutput = Literal["pooled", "proj"]
Grouping = Literal["per_view", "by_resolution"]


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
    # co_trained: the teacher is optimised with the student (never cached; BN in train mode).
    # This is the method's claim; teacher_plan() applies BN mode, view specs and taps to decide.
    teacher_mode: TeacherMode = "cached_exact"
    teacher_bn: Literal["eval", "train"] = "eval"
    needs_index: bool = False
    student_taps: tuple[str, ...] = ()  # e.g. ("stage:-1",), ("tokens", "attn:-1"); see distillctl.taps
    teacher_taps: tuple[str, ...] = ()  # delivered in each teacher view's output dict under the tap name
    grouping: Grouping = "per_view"  # by_resolution: same-size views forwarded as one concatenated batch
    teacher_lr_scale: float = 1.0  # co_trained: the teacher group's lr = lr · scale (same schedule)
    teacher_weight_decay: float | None = None  # co_trained: None = train.weight_decay

    def forward_groups(self, slots: list[int]) -> list[list[int]]:
        """The given view slots partitioned into forward groups (in slot order within a group)."""
        if self.grouping == "per_view":
            return [[slot] for slot in slots]
        groups: dict[int, list[int]] = {}
        for slot in slots:
            groups.setdefault(self.views[slot].spec.size, []).append(slot)
        return list(groups.values())


RunTeacherMode = Literal["none", "cached", "online", "co_trained"]


@dataclass(frozen=True)
class TeacherPlan:
    """How a run gets its teacher targets, and why (the one cacheability decision, see :func:`teacher_plan`)."""

    mode: RunTeacherMode
    cacheable: Literal["cached_exact", "cached_approx", "no"]  # what a feature cache would give this method
    reason: str = ""  # why no cache is possible ("" when one is)
    note: str = ""  # said on screen when ``auto`` chose online although the method itself allows a cache


def cacheability(requirements: Requirements, teacher_bn: str) -> tuple[str, str]:
    """``("cached_exact" | "cached_approx", "")`` when a feature cache can stand in for the teacher, else
    ``("no", reason)``. The cache is built once with eval-mode BatchNorm from views of one augmentation and
    stores pooled/projected outputs and teacher taps of those views (each also at the quarter turns the method
    shows, if it rotates them), so any of these rules it out: a teacher that
    is absent, co-trained or declared online; teacher views of more than one augmentation; teacher BatchNorm in
    train mode (the cache could not reproduce the recorded mode). Whether a tap cache is worth its disk is the
    pipeline's size rule, not this one."""
    declared = requirements.teacher_mode
    if declared == "none":
        return "no", "the method uses no teacher"
    if declared == "co_trained":
        return "no", "its teacher trains with the student"
    if declared == "online":
        return "no", "its teacher targets depend on per-step inputs, so the teacher must run online"
    # rotated copies of one augmentation (DLKD) are one spec: the cache stores each crop at every rotation
    specs = {dataclasses.replace(view.spec, quarter_turns=0) for view in requirements.views if view.teacher}
    if len(specs) > 1:
        return "no", f"its teacher sees views of {len(specs)} different augmentations; a cache stores one"
    if teacher_bn == "train":
        return "no", "its teacher BatchNorm runs in train mode, and the cache is built with eval-mode BatchNorm"
    return declared, ""


def teacher_plan(requirements: Requirements, teacher_bn: str, requested: str = "auto",
                 method: str = "the method") -> TeacherPlan:
    """Decide the run's teacher mode from the method's needs and the request (``auto | online | cached``).

    ``cached`` that cannot be honoured is refused (exit 2, one line); ``auto`` takes the cache when possible
    and otherwise runs the teacher online (co-trained teachers are always live)."""
    from distillctl.errors import UsageError

    cacheable, reason = cacheability(requirements, teacher_bn)
    if requirements.teacher_mode == "none":
        return TeacherPlan("none", "no", reason)
    if requested == "cached" and cacheable == "no":
        hint = ("use --teacher-bn eval, or --teacher-mode online" if teacher_bn == "train" and "BatchNorm" in reason
                else "use --teacher-mode auto" if requirements.teacher_mode == "co_trained"
                else "use --teacher-mode online")
        raise UsageError(f"--teacher-mode cached is not possible for {method}: {reason}", hint=hint)
    if requirements.teacher_mode == "co_trained":
        return TeacherPlan("co_trained", "no", reason)
    if requested == "online" or cacheable == "no":
        note = ""
        if requested == "auto" and requirements.teacher_mode in ("cached_exact", "cached_approx"):
            note = f"{method}: teacher runs online, not from a feature cache: {reason}"
        return TeacherPlan("online", cacheable, reason, note)
    return TeacherPlan("cached", cacheable)


@dataclass
class TeacherDims:
    pooled: int
    proj: int | None = None
    # the teacher network itself (frozen), for methods that size heads from its taps (dense-reg, PCD)
    backbone: nn.Module | None = field(default=None, repr=False, compare=False)
    projection: nn.Module | None = field(default=None, repr=False, compare=False)  # its projection head (PCD)


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
    # one dict per view with student=True (same order as student_features): requirements.student_taps
    student_taps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    teacher: object | None = None  # the live distillctl Teacher in co_trained mode (None otherwise)
    steps_per_epoch: int = 0  # optimizer steps per epoch (schedules over iterations, e.g. SimDis's EMA); 0: unknown


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
    # True: loss() runs the networks itself (e.g. MAE's masked encoder pass on the visible tokens, and MAE-lite's
    # teacher on the same tokens), so its views go through neither trainer forward and it asks for no teacher outputs
    own_forwards: ClassVar[bool] = False

    def __init__(self, params: MethodParams, student_dim: int, teacher_dims: TeacherDims | None) -> None:
        super().__init__()
        self.params = params
        self.student_dim = student_dim
        self.teacher_dims = teacher_dims
        self.num_samples: int | None = None  # training-set size; the trainer sets it before setup()

    # --- declared needs -------------------------------------------------------------------------
    def requirements(self, image_size: int) -> Requirements:
        raise NotImplementedError

    # --- per step -------------------------------------------------------------------------------
    def loss(self, inputs: MethodInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(scalar loss, logs). Log values are detached 0-dim tensors (or Python floats): the trainer reads them
        on the host at log steps only, so a method must not call ``float()``/``.item()`` on device tensors here."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, inputs: MethodInputs) -> None:
        """Update persistent state after the optimizer step (enqueue, EMA). Default: nothing."""

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent schedules. Default: nothing."""

    def setup(self, student: nn.Module) -> None:
        """Called once after construction with the student (e.g. to create an EMA copy or, from
        ``self.num_samples``, per-sample state), before a checkpoint is restored into the method."""

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
    from distillctl.methods import load_all

    load_all()  # imports every method module so they register

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
