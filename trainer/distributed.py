"""Process-group helpers; the only module of the project that imports torch.distributed.

Scope: start/stop the process group from torchrun's environment (gloo on CPU, nccl on CUDA), wrap a
model in DDP, switch gradient sync per micro-step, and the few collectives the loop needs. Every
helper is a no-op (or the identity) in a single process, so the loop has no `if ddp:` branches.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    """Resolve 'auto' and give each local rank its own GPU."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if backend == "nccl" else {}))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def cleanup() -> None:
    """Leave the process group (safe to call in a single process). All ranks meet first: a rank
    that tears gloo down while its peer still talks to it can abort the peer at exit ("terminate
    called without an active exception", seen once in a suite run of test_distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP-wrap under torchrun; rank 0's parameters are broadcast to all ranks by the constructor."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile wrappers (for saving and config access)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce unless `sync`.

    With gradient accumulation only the last micro-step needs the all-reduce: the earlier ones
    would move the same bytes k-1 extra times (MiniMind syncs every micro-step). DDP decides in
    forward whether the following backward syncs, so forward *and* backward run inside this context.
    """
    ddp = model if isinstance(model, DDP) else getattr(model, "_orig_mod", None)
    if sync or not isinstance(ddp, DDP):
        yield
    else:
        with ddp.no_sync():
            yield


@contextlib.contextmanager
def main_process_first(env: DistEnv) -> Iterator[None]:
    """Run the body on rank 0 first, then on the others (e.g. build a data cache once, then read it)."""
    if not env.is_main:
        barrier()
    yield
    if env.is_main:
        barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (identity in one process); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for all ranks (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
