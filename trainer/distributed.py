"""Process-group helpers; the only module of the project that imports torch.distributed.

Scope: start/stop the process group from torchrun's environment (gloo on CPU, nccl on CUDA), wrap a
model in DDP or shard it with FSDP2 (`fully_shard` per transformer block, then the root, on an
explicit device mesh), activation checkpointing per block, switch gradient sync per micro-step,
clip sharded gradients, save/load sharded checkpoints with torch.distributed.checkpoint (DCP),
and the few collectives the loop needs. Every helper is a no-op (or the identity) in a single
process, so the loop has no `if ddp:` branches.

FSDP in one process: there is nothing to shard, so `shard_model` leaves the model plain; its
checkpoints are still DCP folders, so a run moves between 1, 2, 4 ... processes (DCP reshards
on load: a DTensor shard or a plain tensor is read from whatever layout was saved).
References: torchtitan `parallelize.py` (per-block fully_shard, AC), PyTorch's FSDP2 and DCP docs.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint


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


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (MiniMindLM.model.layers): the unit of sharding and recompute."""
    return unwrap(model).model.layers


def shard_model(model: nn.Module, env: DistEnv, param_dtype: torch.dtype | None,
                reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` each block, then the root (embeddings, final norm, lm_head), on a 1-D
    device mesh over all ranks; returns the same module, its parameters now DTensor shards.

    param_dtype (bf16 on GPUs from --dtype): the dtype blocks compute in; gradients are reduced
    in fp32 (MixedPrecisionPolicy.reduce_dtype) and the sharded master weights stay fp32.
    reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3, one more
    all-gather in backward) or keep them until backward (ZeRO-2-like, more memory, less traffic).
    In one process there is nothing to shard: the model stays plain (see the module docstring).
    """
    if not env.distributed:
        return model
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # the root's parameters are used last in forward and first in backward: keeping them
    # gathered after forward saves one all-gather (torchtitan does the same)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or what it wraps) is an FSDP2 module."""
    return isinstance(unwrap(model), FSDPModule)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of keeping them (per-block
    torch.utils.checkpoint, non-reentrant). Applied to the instance's forward, so parameter names,
    state dicts and the model file stay as they are; under FSDP the block's own hooks (on
    `__call__`) gather its weights again for the recompute. Dropout masks are replayed (the RNG
    state is restored), so gradients equal the plain ones. Call before `shard_model`/DDP/compile."""
    for block in _blocks(model):
        if getattr(block, "_recompute", False):
            continue
        plain = block.forward

        @functools.wraps(plain)
        def forward(*args: Any, _plain=plain, _block=block, **kwargs: Any) -> Any:
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)
        block.forward, block._recompute = forward, True
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) unless `sync`.

    With gradient accumulation only the last micro-step needs the sync: the earlier ones
    would move the same bytes k-1 extra times (MiniMind syncs every micro-step). DDP decides in
    forward whether the following backward syncs, so forward *and* backward run inside this context.
    FSDP keeps the unsharded gradients of the skipped steps and reduce-scatters their sum once.
    """
    plain = unwrap(model)
    if isinstance(plain, FSDPModule):
        plain.set_requires_gradient_sync(sync)
        yield
        return
    ddp = model if isinstance(model, DDP) else getattr(model, "_orig_mod", None)
    if sync or not isinstance(ddp, DDP):
        yield
    else:
        with ddp.no_sync():
            yield


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ that also works on FSDP's sharded gradients: the norm over DTensor shards
    is reduced over ranks inside get_total_norm (torch 2.13 returns it as a replicated DTensor),
    so every rank clips by the global norm, the number one process computes; `full_tensor()`
    makes it a plain tensor for the loop's finiteness check and logging. Returns the norm
    before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: the model's `state_dict()` holds whole tensors (gathered from every rank's shards)
    instead of DTensor shards, so code written for a plain model (save_pretrained, the adapter
    export) writes a plain, single-file folder. A collective on entry: all ranks enter, then any
    rank may call state_dict alone. Tied tensors (lm_head = embed_tokens) stay one tensor. The
    whole model is held on every rank meanwhile. The identity for an unsharded model."""
    plain = unwrap(model)
    if not isinstance(plain, FSDPModule):
        yield plain
        return
    canonical: dict[int, str] = {}
    alias = {name: canonical.setdefault(id(p), name)
             for name, p in plain.named_parameters(remove_duplicate=False)}
    full: dict[str, torch.Tensor] = {}
    for name, value in plain.state_dict().items():       # same order on every rank
        if alias.get(name, name) in full:
            full[name] = full[alias[name]]
        else:
            full[name] = value.full_tensor() if isinstance(value, DTensor) else value

    def whole(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
        for key, value in state.items():     # values replaced in place, no key added
            state[key] = full.get(key, value)
    handle = plain.register_state_dict_post_hook(whole)
    try:
        yield plain
    finally:
        handle.remove()


def local_bytes(tensor: torch.Tensor | None) -> int:
    """Bytes this rank holds of `tensor`: its own shard of a DTensor, all of a plain tensor."""
    if tensor is None:
        return 0
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, frozen: bool
               ) -> tuple[dict[str, Any], StateDictOptions]:
    """What a sharded checkpoint holds: parameters by name (DTensor shards under FSDP) and the
    optimizer state keyed by parameter name (not index), so any world size can read it.
    frozen: leave out parameters that do not train (a LoRA base, reloaded from its folder)."""
    options = StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)
    msd, osd = get_state_dict(unwrap(model), optimizer, options=options)
    return {"model": msd, "optimizer": osd}, options


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load without a process group; one process is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 frozen: bool = False) -> None:
    """Each rank writes its shards of the weights and optimizer state into `folder` (DCP); rank 0
    adds the .metadata file. A collective; the folder's completeness is the caller's COMPLETE."""
    state, _ = _dcp_state(model, optimizer, frozen)
    with _one_process_quiet():
        dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 frozen: bool = False) -> None:
    """Fill `model` and `optimizer` from a DCP folder saved at any world size (a collective).
    A name the checkpoint lacks is an error (raised by DCP), never a silent fresh tensor."""
    state, options = _dcp_state(model, optimizer, frozen)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)


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
