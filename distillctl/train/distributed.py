"""torch.distributed helpers. Nothing here assumes a single process; without an initialised
process group every helper degrades to the identity, so the same code runs under torchrun.

Backend choice is automatic: NCCL when the run's device is CUDA (each process pinned to the GPU of its
``LOCAL_RANK``), gloo otherwise. Collective timeouts default to 60 minutes (rank 0 alone evaluates and
writes files while the others wait at a barrier); ``DISTILLCTL_DIST_TIMEOUT_MIN`` changes it.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# the primitives methods use live in the infrastructure layer (methods never import the trainer); re-exported
from distillctl._infra import DistInfo, all_gather_concat, all_reduce_mean, info, is_distributed  # noqa: F401


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set a world size above one."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device_type: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (gloo on CPU, NCCL on GPU); idempotent."""
    if not launched_by_torchrun() or is_distributed():
        return info()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(minutes=float(os.environ.get("DISTILLCTL_DIST_TIMEOUT_MIN", "60")))
    dist.init_process_group(backend=backend, timeout=timeout)
    if backend != "gloo":
        open_control_group(timeout)
    return info()


# host-side control values (stop votes, bad-image counts, log-step means, pickled objects) travel in a gloo group
# when the default group is NCCL: a per-step vote then neither copies to the GPU nor waits behind the step's queued
# kernels (an NCCL all-reduce read back with .cpu() is a full host sync every step)
_CONTROL_GROUP: dist.ProcessGroup | None = None


def open_control_group(timeout: datetime.timedelta | None = None) -> None:
    """Create the gloo control group (collective: every rank calls it, right after ``init_process_group``)."""
    global _CONTROL_GROUP
    _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout)


def _control() -> tuple[dist.ProcessGroup | None, torch.device]:
    """The group and device of a control collective: the gloo control group on the CPU, else the default group
    on :func:`collective_device`."""
    if _CONTROL_GROUP is not None:
        return _CONTROL_GROUP, torch.device("cpu")
    return None, collective_device()


def local_device(device: str) -> str:
    """``cuda`` → ``cuda:<LOCAL_RANK>`` under torchrun, so each process drives its own GPU."""
    if device == "cuda" and is_distributed():
        return f"cuda:{info().local_rank}"
    return device


def collective_device() -> torch.device:
    """Where small control tensors must live for the active backend (NCCL needs CUDA tensors)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_concat` for tensors whose dim 0 differs between ranks (padded on the wire)."""
    if not is_distributed():
        return tensor
    device = tensor.device
    size = torch.tensor([tensor.shape[0]], device=collective_device())
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=collective_device())
    padded[: tensor.shape[0]] = tensor.to(padded.device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)], dim=0).to(device)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few Python numbers over ranks (one small collective; e.g. stop flags, bad-image counts)."""
    if not is_distributed():
        return list(values)
    group, device = _control()
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.cpu().tolist()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (rank order); ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=_control()[0])
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_control()[0])
    return holder[0]


def main_first(action, *args, **kwargs):
    """Run ``action`` on rank 0 only, then tell every rank whether it raised.

    Whatever rank 0 raises (a DistillError, an OSError, any other exception, even KeyboardInterrupt), the
    failure is broadcast before it propagates, so the other ranks raise too instead of waiting at the next
    collective forever. Rank 0 re-raises its own exception (traceback intact; an OSError becomes a
    TrainingError as before); the others raise the same DistillError class with the same message, or a
    TrainingError naming rank 0's exception type and message.
    """
    from distillctl.errors import DistillError, TrainingError

    result, failure, notice = None, None, None
    if info().is_main:
        try:
            result = action(*args, **kwargs)
        except DistillError as exc:
            failure, notice = exc, (type(exc).__name__, exc.message, exc.hint)
        except OSError as exc:
            failure = TrainingError(f"rank 0 could not write: {exc}")
            failure.__cause__ = exc
            notice = ("TrainingError", failure.message, failure.hint)
        except BaseException as exc:  # noqa: BLE001 -- every failure must reach the other ranks
            failure, notice = exc, ("TrainingError", f"rank 0 failed: {type(exc).__name__}: {exc}", None)
    message = broadcast_object(notice)
    if failure is not None:
        raise failure
    if message is not None:
        import distillctl.errors as errors

        raise getattr(errors, message[0], TrainingError)(message[1], hint=message[2])
    return result


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's module (what a DDP wrapper does at
    construction), so all ranks start from the same weights whatever their RNG state."""
    if not is_distributed():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


def destroy() -> None:
    """Tear the process group down (end of a torchrun-launched command)."""
    global _CONTROL_GROUP
    if is_distributed():
        dist.destroy_process_group()  # every group, the control group included
    _CONTROL_GROUP = None
