"""Loss functions as pure functions (no state, no I/O).

Scope: label helpers, per-token log-probs, `add_aux_loss` (the MoE load-balancing term every
stage's objective carries), the `loss_fn(model, batch) -> (loss, metrics)` used by pretraining and
SFT, plus `batch_weight`, which the loop uses to combine micro-batches. The cross-entropy itself
(`causal_lm_loss`) and `IGNORE_INDEX` are the model's (model/model.py), re-exported here.

Convention: `labels` are aligned with `input_ids` and shifted here (position t predicts token t+1);
-100 marks positions without loss (padding, prompts).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.model import IGNORE_INDEX, causal_lm_loss  # noqa: F401  (the one definition of each)

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], "tuple[torch.Tensor, dict[str, Any]]"]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels[:, 1:] padded with `ignore_index` at the end, so targets line up with logits[:, :]."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(input_ids[:, t+1] | ≤ t) for t < T-1, [N, T-1] float32 (fused cross-entropy)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def add_aux_loss(loss: torch.Tensor, out: Any, metrics: dict[str, Any]) -> torch.Tensor:
    """`loss` plus the MoE load-balancing loss of the trained model's output `out` (its
    `aux_loss`, summed over layers; 0 for a dense model), which is logged as `aux_loss`.

    Every stage adds it to its own objective: the router keeps balancing whatever the loss. Only
    the trained model's: a frozen reference's or teacher's aux loss has nothing to train.
    """
    aux = getattr(out, "aux_loss", None)
    if not isinstance(aux, torch.Tensor):
        return loss
    metrics["aux_loss"] = aux.detach()
    return loss + aux


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of supervised next-token positions in aligned labels (what causal_lm_loss averages)."""
    return (labels[..., 1:] != ignore_index).sum()


def batch_weight(batch: Mapping[str, Any], ignore_index: int = IGNORE_INDEX) -> float:
    """Weight of a micro-batch when the loop combines micro-batches (and ranks) into one step.

    The number of supervised tokens when the batch has `labels`, else its number of samples. With
    per-micro-batch mean losses weighted by this, a step's gradient equals the gradient of the mean
    over all supervised tokens of the global batch however it is split — MiniMind's plain 1/k
    average over-weights micro-batches with few supervised tokens (short SFT answers, padding).
    Computed on the host copy of the batch, so it costs no device sync.
    """
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if isinstance(labels, torch.Tensor):
        return float(count_targets(labels, ignore_index))
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return float(first.shape[0]) if first is not None else 1.0


def packing_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's extra inputs for packed rows (`document_ids`: attention per conversation and
    positions restarting), {} for ordinary batches; every forward of a packed batch needs them."""
    return {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pretraining / SFT loss: the model's cross-entropy on `input_ids`/`labels` + its MoE aux loss.

    The attention mask is deliberately not passed: training batches are right-padded
    (dataset.collate), so causality already hides every pad from every real token, pads carry
    label -100, and without a mask the model can use SDPA's causal fast path (flash attention on
    GPU) instead of a materialised [B, 1, S, S] mask; packed SFT rows pass their `document_ids`
    (a block-diagonal mask, which is what packing needs). Metrics stay tensors on the device; the loop
    reads them only at log time.
    """
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], **packing_inputs(batch))
    metrics: dict[str, Any] = {"ce_loss": out.ce_loss.detach()}
    # ce + aux is also the model's out.loss (the same addition, so the same bits)
    return add_aux_loss(out.ce_loss, out, metrics), metrics
