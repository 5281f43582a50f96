"""Taps: named intermediate outputs of a student or teacher network, recorded during the forward that trains it.

A method lists the taps it needs in ``Requirements.student_taps`` / ``teacher_taps``; the trainer attaches a
:class:`TapRecorder` to the network for the duration of training and reads what one forward recorded. Tap names:

- ``stage:i`` — output of feature stage ``i`` as timm's ``feature_info`` lists them (the same indices as
  ``forward_intermediates``; for timm CNNs 0 is the stem, 1… the residual stages, so a ResNet's
  ``stage:-1`` is layer4's B×C×H×W map; for ViTs a stage is a block, B×N×D tokens). Negative indices count
  from the end.
- ``tokens`` — a ViT's final tokens after its last norm, B×N×D: CLS, then register tokens (if any), then patch
  tokens (``num_prefix_tokens`` of them come before the patches; see :func:`split_tokens`).
- ``attn:b`` — the attention probabilities softmax(q·kᵀ·d^-½) of ViT block ``b``, B×heads×N×N. timm's fused
  attention never materialises them, so they are computed from the block's own q and k (the qkv projection's
  output in this forward, with q_norm/k_norm applied), differentiable; the block itself still runs fused.
- ``module:<dotted.name>`` — the output of any named submodule (teachers without ``feature_info``).

Why hooks rather than a second forward or ``forward_intermediates``: the pooled embedding must come from exactly
the forward the deployable model runs (``forward_intermediates`` + ``forward_head`` is a different code path in
some timm models), and a second pass would double the cost and see other BatchNorm statistics. Hooks are removed
when training ends (:meth:`TapRecorder.detach`), so the saved and exported student is the unchanged timm model.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from distillctl.errors import InputError


def _feature_modules(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if not info:
        return []
    return [entry["module"] for entry in info]


def _block_attention(model: nn.Module, index: int, tap: str) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        raise InputError(f"tap '{tap}': {type(model).__name__} has no transformer blocks")
    try:
        block = blocks[index]
    except IndexError:
        raise InputError(f"tap '{tap}': block {index} out of range ({len(blocks)} blocks)") from None
    attention = getattr(block, "attn", None)
    if attention is None or not all(hasattr(attention, name) for name in ("qkv", "num_heads", "scale")):
        raise InputError(f"tap '{tap}': block {index} has no timm-style attention (qkv, num_heads, scale)")
    return attention


def _parse_index(tap: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"tap '{tap}': '{text}' is not an integer index") from None


def resolve_tap(model: nn.Module, tap: str) -> tuple[nn.Module, str]:
    """The module a tap hooks and how its output is read (``"output"`` or ``"attention"``)."""
    kind, _, arg = tap.partition(":")
    modules = dict(model.named_modules())
    if kind == "stage":
        names = _feature_modules(model)
        if not names:
            raise InputError(f"tap '{tap}': {type(model).__name__} has no timm feature_info",
                             hint="use a timm model, or a 'module:<name>' tap")
        index = _parse_index(tap, arg)
        if not -len(names) <= index < len(names):
            raise InputError(f"tap '{tap}': stage {index} out of range ({len(names)} stages: {', '.join(names)})")
        return modules[names[index]], "output"
    if kind == "tokens" and not arg:
        if not hasattr(model, "num_prefix_tokens") or "norm" not in modules:
            raise InputError(f"tap 'tokens': {type(model).__name__} is not a timm vision transformer")
        return modules["norm"], "output"
    if kind == "attn":
        return _block_attention(model, _parse_index(tap, arg), tap), "attention"
    if kind == "module" and arg:
        if arg not in modules:
            raise InputError(f"tap '{tap}': no submodule named '{arg}'")
        return modules[arg], "output"
    raise InputError(f"unknown tap '{tap}' (expected stage:<i>, tokens, attn:<block> or module:<name>)")


def attention_logits(attention: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """q·kᵀ·scale (before the softmax) of a timm ``Attention`` from its qkv projection output (B×N×3·dim)."""
    batch, tokens, _ = qkv.shape
    heads = attention.num_heads
    q, k, _v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attention.q_norm(q), attention.k_norm(k)
    return (q * attention.scale) @ k.transpose(-2, -1)


def attention_probabilities(attention: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ·scale) of a timm ``Attention`` from its qkv projection output (B×N×3·dim)."""
    return attention_logits(attention, qkv).softmax(dim=-1)


class TapRecorder:
    """Forward hooks that store the named taps of one forward in ``values``; :meth:`take` hands them over.

    Attach once for the whole of training (``with TapRecorder(model, taps):``); an empty tap list attaches
    nothing. Recording is on while attached: every forward overwrites the previous values.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str]) -> None:
        self.model = model
        self.taps = tuple(dict.fromkeys(taps))
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._targets = [(tap, *resolve_tap(model, tap)) for tap in self.taps]

    def attach(self) -> "TapRecorder":
        if self._handles:
            return self
        for tap, module, read in self._targets:
            if read == "attention":
                self._handles.append(module.qkv.register_forward_hook(self._attention_hook(tap, module)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(tap)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.values = {}

    def _output_hook(self, tap: str):
        def hook(_module, _inputs, output) -> None:
            self.values[tap] = output
        return hook

    def _attention_hook(self, tap: str, attention: nn.Module):
        def hook(_module, _inputs, qkv) -> None:
            self.values[tap] = attention_probabilities(attention, qkv)
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The taps of the last forward (every requested tap must have been recorded)."""
        missing = [tap for tap in self.taps if tap not in self.values]
        if missing:
            raise RuntimeError(f"taps {missing} were not recorded by the last forward")
        values, self.values = self.values, {}
        return {tap: values[tap] for tap in self.taps}

    def __enter__(self) -> "TapRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def split_tokens(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(CLS B×D or None, register tokens B×R×D, patch tokens B×P×D) of a timm ViT's ``tokens`` tap."""
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    cls = tokens[:, 0] if has_cls else None
    registers = tokens[:, 1 if has_cls else 0:prefix]
    return cls, registers, tokens[:, prefix:]


def check_taps(model: nn.Module, taps: Iterable[str], who: str) -> None:
    """Resolve every tap once up front, so a bad tap name fails before any work (exit 2)."""
    for tap in taps:
        try:
            resolve_tap(model, tap)
        except InputError as exc:
            raise InputError(f"{who}: {exc.message}", hint=exc.hint) from None
