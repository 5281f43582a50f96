"""Synchronised BatchNorm for the student under DDP (``train.sync_bn``), on GPU and on CPU.

``torch.nn.SyncBatchNorm`` only runs on CUDA/XPU tensors (torch 2.14 raises "expected input tensor to
be on GPU" on CPU), so on CPU (gloo) the student's BatchNorm layers become :class:`GlooSyncBatchNorm`:
batch statistics are summed over ranks with a differentiable all-reduce (backward: all-reduce of the gradient),
so the normalisation — and its gradient — equal a single process seeing the whole global batch.
State-dict keys stay those of ``BatchNorm*d``, so the saved student loads into a plain timm model.
"""

from __future__ import annotations

import torch
from torch import nn

from distillctl.train import distributed


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        import torch.distributed as dist

        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank's batch (any backend, any device)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.is_distributed()):
            return super().forward(input)
        reduce_dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / input.shape[1]], dtype=torch.float32, device=input.device)
        values = input.float()
        stats = torch.cat([values.sum(reduce_dims), (values * values).sum(reduce_dims), count])
        stats = _AllReduceSum.apply(stats)
        channels = input.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (values - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm layer: torch's SyncBatchNorm on CUDA, :class:`GlooSyncBatchNorm` elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        replacement = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                        module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                replacement.weight.copy_(module.weight)
                replacement.bias.copy_(module.bias)
                replacement.weight.requires_grad_(module.weight.requires_grad)
                replacement.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                replacement.running_mean.copy_(module.running_mean)
                replacement.running_var.copy_(module.running_var)
                replacement.num_batches_tracked.copy_(module.num_batches_tracked)
        replacement.train(module.training)
        return replacement.to(next(iter(module.buffers()), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module


def uses_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

