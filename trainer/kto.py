"""KTO (Kahneman–Tversky Optimisation) as pure functions, on unpaired feedback.

Scope: the KTO loss with its KL reference point and desirable/undesirable weights, and
`make_kto_loss`, the loop's `loss_fn(model, batch) -> (loss, metrics)` on batches of
`dataset.lm_dataset.kto_collate` (one completion per sample and whether it is desirable, plus the
mismatched prompt/completion rows of the KL estimate).

Reference (Ethayarajh et al. 2024, eq. 8; TRL's KTOTrainer, which LLaMA-Factory's `kto` stage
uses). With r(x, y) = log π(y|x) - log π_ref(y|x) (log-probs summed over the completion) and the
reference point z = max(0, mean over the batch's mismatched pairs (x_i, y_{i-1}) of r), detached:

    desirable y:    L = λ_D · (1 - σ(β (r - z)))
    undesirable y:  L = λ_U · (1 - σ(β (z - r)))

averaged over the batch's samples. Defaults as TRL and LLaMA-Factory: β 0.1, λ_D = λ_U = 1
(TRL's desirable_weight / undesirable_weight, LLaMA-Factory's kto_chosen_weight /
kto_rejected_weight; the paper advises λ_D n_D / (λ_U n_U) in [1, 4/3] for n_D desirable and
n_U undesirable samples). The policy's log-probs of the mismatched pairs are computed without
gradient, as TRL does. One difference: TRL averages z over all processes; here each micro-batch
has its own z (no collective inside a loss, which validation could not match across ranks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from trainer import distributed as dist
from trainer.dpo import ReferenceFn, pad_cat, sequence_logps
from trainer.losses import LossFn, add_aux_loss


@dataclass(frozen=True)
class KTOSettings:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    sft_weight: float = 0.0      # weight of an NLL term on the desirable completions (LLaMA-Factory's ftx)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0, got "
                             f"{self.desirable_weight}, {self.undesirable_weight}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")


def kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: max(0, mean log-ratio of the mismatched pairs), no gradient."""
    return (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             settings: KTOSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses [B] and implicit rewards β·r [B] (detached); `desirable` [B] bool."""
    beta = settings.beta
    logratio = logps - ref_logps
    good = settings.desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - kl)))
    bad = settings.undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, good, bad), (beta * logratio).detach()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def make_kto_loss(settings: KTOSettings, reference: ReferenceFn) -> LossFn:
    """`loss_fn(model, batch) -> (loss, metrics)` for trainer.loop.fit on `kto_collate` batches.

    loss = mean KTO loss + sft_weight · NLL(desirable completions' tokens) + MoE aux loss.
    Metrics: kl (the reference point z), rewards/chosen and rewards/rejected (mean β·r over the
    desirable / undesirable samples of the batch, 0 where there are none), rewards/margins (their
    difference), logps/chosen (per token).
    """
    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, labels = batch["kto_input_ids"], batch["kto_labels"]
        kl_ids, kl_labels = batch["kl_input_ids"], batch["kl_labels"]
        desirable = batch["kto_tag"].bool()
        # the reference scores both kinds of rows in one forward
        both_ids, both_labels = pad_cat([ids, kl_ids], [labels, kl_labels])
        ref_logps, ref_kl_logps = reference(model, both_ids, both_labels, batch).chunk(2)
        with torch.no_grad():   # the plain module: a gradient-free forward stays out of DDP's way
            kl_logps = sequence_logps(dist.unwrap(model)(input_ids=kl_ids).logits, kl_labels)[0]
        out = model(input_ids=ids)
        logps, counts = sequence_logps(out.logits, labels)
        kl = kl_estimate(kl_logps, ref_kl_logps)
        losses, rewards = kto_loss(logps, ref_logps, desirable, kl, settings)
        loss = losses.mean()
        good, bad = desirable.float(), (~desirable).float()
        chosen, rejected = _masked_mean(rewards, good), _masked_mean(rewards, bad)
        metrics: dict[str, Any] = {"kto_loss": loss.detach(), "kl": kl, "rewards/chosen": chosen,
                                   "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                                   "logps/chosen": _masked_mean(logps.detach() / counts.clamp(min=1), good)}
        if settings.sft_weight > 0:
            nll = -(logps * good).sum() / (counts * good).sum().clamp(min=1)
            loss = loss + settings.sft_weight * nll
            metrics["sft_nll"] = nll.detach()
        return add_aux_loss(loss, out, metrics), metrics

    return loss_fn
