"""Optimizer and learning-rate schedule.

Scope: AdamW with two parameter groups (weight decay on matrices only) and a cosine schedule with
linear warmup and a floor. The schedule is a pure function of the step, so resuming needs only the
step number (its `state_dict` is kept for the checkpoint's completeness).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, trainable: Iterable[nn.Parameter] | None, weight_decay: float
                 ) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed and a non-decayed group.

    No decay for 1-D tensors (norm weights, biases) and embeddings: decaying a norm gain pulls it to
    0 rather than to its natural value 1, and rare tokens' embeddings would shrink merely for being
    rare. A tied lm_head shares the embedding tensor and is listed once.
    """
    chosen = {id(p) for p in trainable} if trainable is not None else None
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad or (chosen is not None and id(p) not in chosen):
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_ids or "embed" in name
        (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
    if chosen is not None and len(seen) != len(chosen):
        raise ValueError("some `trainable` parameters are not parameters of the model "
                         "(or have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
                    eps: float, device_type: str) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel when on GPU (one launch for all parameters)."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


class CosineSchedule:
    """lr(step) = lr * factor(step): linear warmup, then cosine from 1 down to `min_ratio`.

    Each group's base lr is stored as `initial_lr` the first time, so groups may start with their
    own lr (e.g. a LoRA stage with a higher lr for some parameters).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int,
                 min_ratio: float) -> None:
        self.optimizer, self.max_steps = optimizer, max_steps
        self.warmup_steps, self.min_ratio = warmup_steps, min_ratio
        self.last_step = -1
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def factor(self, step: int) -> float:
        """Multiplier of the base lr at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.max_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, step: int) -> float:
        """Set every group's lr for `step`; returns the first group's lr (for logging)."""
        f = self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f
        self.last_step = step
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "max_steps": self.max_steps,
                "warmup_steps": self.warmup_steps, "min_ratio": self.min_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
