"""Preference optimisation as pure functions: DPO (sigmoid, with label smoothing), hinge, IPO,
SimPO and ORPO.

Scope: per-sequence log-probabilities over the response tokens, the three pairwise losses, the
implicit-reward metrics, the three ways of getting the reference log-probs (from a frozen copy or
the policy with its LoRA adapters switched off, both trainer/reference.py's, or numbers
precomputed once over the dataset) and `make_dpo_loss`, which turns them into the loop's
`loss_fn(model, batch) -> (loss, metrics)`.

References (maths only, no code taken):
- DPO, Rafailov et al. 2023: L = -log σ(β[(log π_c - log π_r) - (log ref_c - log ref_r)]), with
  log π the *summed* log-probs of the response. Label smoothing ε (conservative DPO, Mitchell
  2023) assumes the labels are flipped with probability ε:
  L = -(1-ε) log σ(βh) - ε log σ(-βh).
- IPO, Azar et al. 2023: L = (h - 1/(2β))², a squared loss that does not push h to infinity.
  Following the TRL implementation, h uses log-probs averaged over response tokens.
- SimPO, Meng et al. 2024: reference-free; L = -log σ(β(avg log π_c - avg log π_r) - γ), the
  length-normalised log-prob as the reward and γ a target margin.
- Hinge (SLiC, Zhao et al. 2023; LLaMA-Factory's `hinge`, which is TRL's DPO `loss_type="hinge"`):
  L = max(0, 1 - βh) with h as in DPO (summed log-probs): pairs already ranked by a margin 1/β
  stop pulling.
- ORPO, Hong et al. 2024 (TRL's ORPOTrainer, LLaMA-Factory's `orpo`): reference-free, with p the
  per-token average probability exp(avg log π) of a response,
  L = -avg log π_c + β·(-log σ(log odds(p_c) - log odds(p_r))), odds(p) = p / (1 - p):
  the SFT NLL of the chosen answer plus β times the odds-ratio term (β = TRL's and LLaMA-Factory's
  0.1; both average log-probs over the response tokens; this NLL is per pair, as LLaMA-Factory's).

Why MiniMind's DPO "does not learn" (loss stuck at 0.693): it averages log-probs over tokens
(dividing the implicit reward by the response length) *and* uses lr 4e-8, so β·h stays ~1e-4 for
the whole run. Here sigmoid DPO sums log-probs as in the paper, and the stage defaults to a
learning rate at which the margin visibly grows (see train_dpo.py).

Batches: `{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", ...}`
(labels -100 outside the final assistant reply; dataset.lm_dataset.DPODataset). Chosen and
rejected run through the model as one [2B, S] batch: one forward instead of two, and the same
kernels for both halves, so policy == reference gives exactly log 2.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer import distributed as dist
from trainer.losses import IGNORE_INDEX, LossFn, add_aux_loss, shift_labels
from trainer.reference import ReferenceLogits, inference

LossType = Literal["sigmoid", "hinge", "ipo", "simpo", "orpo"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "simpo", "orpo")
# β per loss when none is given: 0.1 is the DPO paper's and TRL's default (ORPO's λ too); SimPO's
# β scales a per-token average (a much smaller number than a summed log-prob), hence its paper's 2.0.
DEFAULT_BETA: dict[str, float] = {"sigmoid": 0.1, "hinge": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")

# reference(model, input_ids[2B,S], labels[2B,S], batch) -> summed log-probs [2B] (chosen first)
ReferenceFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class PreferenceSettings:
    """What defines the preference loss (the stage's CLI fills it in)."""

    loss_type: LossType = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0   # sigmoid and SimPO only
    simpo_gamma: float = 1.0       # SimPO's target margin γ (in reward units)
    sft_weight: float = 0.0        # weight of an extra NLL term on the chosen responses

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge", "orpo"):
            raise ValueError(f"label_smoothing has no meaning for the {self.loss_type.upper()} loss")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")

    @property
    def length_normalised(self) -> bool:
        """IPO, SimPO and ORPO compare per-token averages; sigmoid DPO and hinge compare sums."""
        return self.loss_type in ("ipo", "simpo", "orpo")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in ("simpo", "orpo")


# ---------------------------------------------------------------------- log-probs
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p(response), number of response tokens), both [B] float32.

    logits [B, S, V]; labels [B, S] aligned with input_ids (shifted here), `ignore_index` outside
    the response. Computed in fp32 via cross_entropy (fused log-softmax + gather; no [B, S, V]
    log-prob tensor is kept), whatever the autocast dtype of the logits.
    """
    targets = shift_labels(labels, ignore_index)
    response = targets != ignore_index
    # Masked by hand, not with ignore_index: see model.model.causal_lm_loss (torch.compile on AVX2).
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.masked_fill(~response, 0).flatten(),
                          reduction="none").view(targets.shape)
    return -(nll * response).sum(-1), response.sum(-1).float()


def concat_pair(batch: Mapping[str, torch.Tensor], ignore_index: int = IGNORE_INDEX
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen; rejected] input_ids and labels as one [2B, S] batch (right-padded to one length).

    The pad id does not matter: pads sit after every real token (causality hides them) and carry
    label `ignore_index`.
    """
    return pad_cat([batch["chosen_input_ids"], batch["rejected_input_ids"]],
                   [batch["chosen_labels"], batch["rejected_labels"]], ignore_index)


def pad_cat(ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], ignore_index: int = IGNORE_INDEX
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B_i, S_i] token / label batches stacked into one [ΣB_i, max S_i] batch."""
    length = max(t.shape[1] for t in ids)
    ids = [F.pad(t, (0, length - t.shape[1]), value=0) for t in ids]
    labels = [F.pad(t, (0, length - t.shape[1]), value=ignore_index) for t in labels]
    return torch.cat(ids), torch.cat(labels)


# ---------------------------------------------------------------------- losses and metrics
def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                    settings: PreferenceSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards of chosen and rejected [B] (detached).

    Log-probs come in already summed or averaged as the loss wants (`settings.length_normalised`).
    Rewards: β(log π - log ref) for DPO/hinge/IPO, β·avg log π for SimPO and ORPO (no reference).
    """
    s = settings
    beta = s.beta
    if s.loss_type == "orpo":
        log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
        losses = -chosen_logps - beta * F.logsigmoid(log_odds)
        return losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach()
    if s.loss_type == "simpo":
        chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
        logits = chosen_rewards - rejected_rewards - s.simpo_gamma
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"the {s.loss_type} loss needs reference log-probs")
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
        h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
        logits = beta * h
    if s.loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif s.loss_type == "hinge":
        losses = torch.relu(1.0 - logits)
    else:
        eps = s.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012): log(-expm1 x) near 0,
    log1p(-exp x) far below it. ORPO's log(1 - p) from an average log-prob."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means of the implicit rewards, TRL's names (tensors on the device: no host sync)."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean()}


# ---------------------------------------------------------------------- references
def reference_logps(reference: ReferenceLogits) -> ReferenceFn:
    """DPO's reference from a trainer.reference one (`frozen_reference(frozen_copy(model))`, or
    `adapter_reference` with LoRA): the summed log-probs of the responses under its logits."""
    def logps(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch: Mapping) -> torch.Tensor:
        return sequence_logps(reference(model, ids), labels)[0]
    return logps


def precomputed_reference(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch: Mapping
                          ) -> torch.Tensor:
    """Reference log-probs carried by the batch (see `precompute_reference_logps`)."""
    missing = [k for k in REF_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}: wrap the dataset in WithReferenceLogps and the "
                       "collate in collate_with_reference")
    return torch.cat([batch[k].to(ids.device, torch.float32) for k in REF_KEYS])


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, dataset: Dataset, collate_fn: Callable, batch_size: int,
                               env: dist.DistEnv, autocast: Callable[[], Any] = contextlib.nullcontext
                               ) -> torch.Tensor:
    """Summed reference log-probs [N, 2] (chosen, rejected) of every pair, computed once.

    Call before training, with the model holding the reference weights (for LoRA: fresh adapters,
    which are zero, so the model equals its base). Each rank does every world_size-th batch and
    the results are summed across ranks, so all ranks end with the whole table. Use the same
    `autocast` as training so that at step 0 policy and reference agree up to rounding (not to
    the bit: training batches pad to other lengths, which changes the kernels' blocking).
    """
    plain = dist.unwrap(model)
    device = next(plain.parameters()).device
    out = torch.zeros(len(dataset), 2, device=device, dtype=torch.float32)
    starts = range(env.rank * batch_size, len(dataset), batch_size * env.world_size)
    with inference(plain):
        for start in starts:
            idx = list(range(start, min(start + batch_size, len(dataset))))
            batch = collate_fn([dataset[i] for i in idx])
            ids, labels = concat_pair(batch)
            with autocast():
                logps = sequence_logps(plain(input_ids=ids.to(device)).logits, labels.to(device))[0]
            out[idx] = torch.stack(logps.chunk(2), dim=1)
    return dist.all_reduce_sum(out).cpu()


class WithReferenceLogps(Dataset):
    """A DPO dataset whose samples also carry their precomputed reference log-probs."""

    def __init__(self, dataset: Dataset, logps: torch.Tensor) -> None:
        if len(dataset) != logps.shape[0]:
            raise ValueError(f"{len(dataset)} samples but {logps.shape[0]} reference rows")
        self.dataset, self.logps = dataset, logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.dataset[i], REF_KEYS[0]: self.logps[i, 0], REF_KEYS[1]: self.logps[i, 1]}


def _collate_with_reference(samples: Sequence[dict], collate_fn: Callable) -> dict[str, torch.Tensor]:
    rest = [{k: v for k, v in s.items() if k not in REF_KEYS} for s in samples]
    batch = collate_fn(rest)
    batch.update({k: torch.stack([s[k] for s in samples]) for k in REF_KEYS})
    return batch


def collate_with_reference(collate_fn: Callable) -> Callable:
    """`collate_fn` for the token fields plus stacking of the scalar reference log-probs."""
    return functools.partial(_collate_with_reference, collate_fn=collate_fn)   # picklable for workers


# ---------------------------------------------------------------------- the stage's loss_fn
def make_dpo_loss(settings: PreferenceSettings, reference: ReferenceFn | None) -> LossFn:
    """`loss_fn(model, batch) -> (loss, metrics)` for trainer.loop.fit.

    loss = mean preference loss + sft_weight · NLL(chosen tokens) + the policy's MoE aux loss.
    The loop weights a DPO micro-batch by its number of pairs (no `labels` key), so the step's
    loss is the mean over the pairs of the global batch.
    """
    if settings.needs_reference and reference is None:
        raise ValueError(f"the {settings.loss_type} loss needs a reference")

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, labels = concat_pair(batch)
        ref = reference(model, ids, labels, batch) if settings.needs_reference else None
        out = model(input_ids=ids)
        logps, counts = sequence_logps(out.logits, labels)
        counts = counts.clamp(min=1.0)
        if settings.length_normalised:
            logps = logps / counts
            ref = ref / counts if ref is not None else None
        chosen, rejected = logps.chunk(2)
        n_chosen = counts.chunk(2)[0]
        ref_c, ref_r = ref.chunk(2) if ref is not None else (None, None)
        losses, chosen_rewards, rejected_rewards = preference_loss(chosen, rejected, ref_c, ref_r, settings)
        loss = losses.mean()
        metrics: dict[str, Any] = {"pref_loss": loss.detach(),
                                   **reward_metrics(chosen_rewards, rejected_rewards)}
        sum_c = chosen * n_chosen if settings.length_normalised else chosen
        metrics["logps/chosen"] = (sum_c / n_chosen).detach().mean()   # per token, comparable across losses
        if settings.sft_weight > 0:
            # token-level NLL of the chosen responses: all their tokens weigh the same
            nll = -sum_c.sum() / n_chosen.sum()
            loss = loss + settings.sft_weight * nll
            metrics["sft_nll"] = nll.detach()
        return add_aux_loss(loss, out, metrics), metrics

    return loss_fn

