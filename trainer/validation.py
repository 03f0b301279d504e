"""Validation for the training loop: the loss, its perplexity and the loss_fn's own scalar
metrics on each validation set, sharded over ranks and all-reduced, plus the eval hooks.

Its own module so trainer/loop.py reads as the optimisation alone; `fit` calls `evaluate` at every
`eval_every` and at the end.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from trainer import distributed as dist
from trainer.config import TrainConfig
from trainer.losses import batch_weight
from trainer.sampler import eval_indices

EvalHook = Callable[[nn.Module], Mapping[str, float]]


def to_device(batch: Any, device: torch.device) -> Any:
    """Copy a dict of tensors to `device`; non_blocking overlaps the copy with compute (pinned)."""
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def evaluate(model: nn.Module, eval_sets: Mapping[str, Dataset], loss_fn: Callable, cfg: TrainConfig,
             env: dist.DistEnv, collate_fn: Callable, autocast: Callable,
             hooks: Sequence[EvalHook] = ()) -> dict[str, float]:
    """Validation loss and perplexity per set (token-weighted, sharded over ranks, all-reduced),
    the loss_fn's own scalar metrics averaged the same way (DPO's held-out reward accuracy and
    margin, for example), plus the hooks' metrics (run on the main rank alone, then broadcast: no
    collectives inside).

    Runs the plain module, not the DDP wrapper: no gradient sync is wanted, and ranks may see a
    different number of batches.
    """
    was_training, out, losses = model.training, {}, []
    model.eval()
    with torch.no_grad():
        for name, ds in eval_sets.items():
            total = torch.zeros(2, device=env.device)
            sums: dict[str, float] = {}
            mine: list[Any] = list(eval_indices(len(ds), cfg.batch_size, cfg.eval_batches,
                                                env.rank, env.world_size))
            if dist.is_sharded(model):
                # each FSDP forward is a collective: a rank with fewer batches runs padding
                # forwards (sample 0, weight 0) until every rank has run as many
                most = dist.all_reduce_max(torch.tensor(len(mine), device=env.device))
                mine += [None] * (int(most.item()) - len(mine))
            for idx in mine:
                batch = collate_fn([ds[i] for i in (idx if idx is not None else [0])])
                w = batch_weight(batch) if idx is not None else 0.0
                with autocast():
                    loss, metrics = loss_fn(model, to_device(batch, env.device))
                total += torch.stack([loss.detach().float() * w, torch.tensor(w, device=env.device)])
                for key, v in metrics.items():
                    if key != "loss" and (not isinstance(v, torch.Tensor) or v.numel() == 1):
                        sums[key] = sums.get(key, 0.0) + float(v) * w
            # Every rank reduces the metric names rank 0 saw, in one order (a rank without a batch
            # adds zeros).
            names = dist.broadcast_object(sorted(sums))
            reduced = dist.all_reduce_sum(torch.cat([total, torch.tensor(
                [sums.get(k, 0.0) for k in names], device=env.device, dtype=total.dtype)])).tolist()
            loss_sum, weight = reduced[:2]
            value = loss_sum / max(weight, 1e-12)
            out[f"val/{name}/loss"], out[f"val/{name}/ppl"] = value, math.exp(min(value, 50.0))
            out.update({f"val/{name}/{k}": v / max(weight, 1e-12) for k, v in zip(names, reduced[2:])})
            losses.append(value)
        extra: dict[str, float] = {}
        for hook in hooks if env.is_main else ():
            with autocast():
                extra.update(hook(model))
    model.train(was_training)
    if losses:
        out["val_loss"] = sum(losses) / len(losses)
    return {**out, **(dist.broadcast_object(extra) if hooks else {})}
