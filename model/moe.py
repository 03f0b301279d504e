"""SwiGLU feed-forward and the mixture-of-experts layer (router + experts).

Shape legend: T tokens (batch × sequence, flattened), D hidden, E routed experts, K experts per
token, I expert FFN size.

The router (softmax or DeepSeek-V3 sigmoid scores, plain or group-limited top-k, optional
renormalisation and scaling, load-balancing loss: ``route``) always runs in PyTorch where the rest
of the model runs. The experts are a separate module with one contract,
``experts(x_TD, expert_ids_TK, weights_TK) -> y_TD``, so a backend that keeps them elsewhere (CPU
memory, kt-kernel) replaces ``mlp.experts`` from outside without touching this file.

``Experts`` (the default, "torch" backend) sorts the T·K routing slots by expert and runs each
expert once on its contiguous slice: one host sync per layer (the slice sizes) instead of
MiniMind's ~3 per expert. ``naive_experts_forward`` keeps MiniMind's per-expert masking loop as the
reference the tests and the benchmark compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniMindConfig


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """Routed experts with sorted (grouped) dispatch. Names: ``experts.{e}.{gate,up,down}_proj``."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(FeedForward(config.hidden_size, config.moe_intermediate_size)
                         for _ in range(config.num_experts))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        T, K = expert_ids_TK.shape
        flat_ids = expert_ids_TK.reshape(-1)
        order = flat_ids.argsort(stable=True)  # routing slots grouped by expert
        token_of_slot = order // K
        # The only host sync of the layer: slice sizes must be Python ints to split.
        counts = torch.bincount(flat_ids, minlength=len(self)).tolist()
        x_sorted = x_TD[token_of_slot]
        # Every expert runs, even on an empty slice: it then gets an all-zero gradient, so DDP sees
        # each parameter used every step without MiniMind's `0 * sum(p)` trick.
        y_sorted = torch.cat([expert(chunk) for expert, chunk in zip(self, x_sorted.split(counts))])
        y_sorted = y_sorted * weights_TK.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        y_TD = torch.zeros(T, x_TD.shape[-1], dtype=y_sorted.dtype, device=x_TD.device)
        return y_TD.index_add_(0, token_of_slot, y_sorted)


def naive_experts_forward(experts: nn.ModuleList, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                          weights_TK: torch.Tensor) -> torch.Tensor:
    """Reference dispatch in MiniMind's style: mask, gather and scatter once per expert."""
    y_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(experts):
        hit_TK = expert_ids_TK == e
        token_idx = hit_TK.any(dim=-1).nonzero().flatten()
        if token_idx.numel() == 0:
            continue
        weight = (weights_TK * hit_TK).sum(-1)[token_idx].unsqueeze(-1)
        y_TD.index_add_(0, token_idx, (expert(x_TD[token_idx]) * weight).to(y_TD.dtype))
    return y_TD


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, batch_size: int,
                      coef: float, kind: str, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """aux = coef · E · Σ_e f_e · P_e  (Switch Transformer eq. 4, generalised to top-k).

    f_e is the share of the T·K routing slots sent to expert e and P_e the mean router probability
    of e, so a perfectly balanced router scores exactly ``coef``. ``kind="token"`` pools the whole
    batch; ``kind="sequence"`` computes the loss per sequence and averages (DeepSeek's sequence-wise
    balance loss, MiniMind2's ``seq_aux``). Padded tokens (``token_mask`` 0) are left out.
    """
    T, E = probs_TE.shape
    K = expert_ids_TK.shape[1]
    slots_BSE = F.one_hot(expert_ids_TK, E).sum(1).view(batch_size, -1, E).float()
    probs_BSE = probs_TE.view(batch_size, -1, E).float()
    if token_mask is None:
        mask_BS1 = probs_BSE.new_ones(batch_size, probs_BSE.shape[1], 1)
    else:
        mask_BS1 = token_mask.reshape(batch_size, -1, 1).to(probs_BSE.dtype)
    dims = (0, 1) if kind == "token" else (1,)
    n_tokens = mask_BS1.sum(dims).clamp(min=1)
    f = (slots_BSE * mask_BS1).sum(dims) / (K * n_tokens)
    p = (probs_BSE * mask_BS1).sum(dims) / n_tokens
    return coef * E * (f * p).sum(-1).mean()


def route(config: MiniMindConfig, logits_TE: torch.Tensor, score_bias_E: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores_TE, ids_TK, weights_TK) from router logits, by ``config.topk_method``:

    - greedy: softmax, top-k;
    - group_limited_greedy (DeepSeek-V2): softmax; the experts are split into ``n_group`` groups
      scored by their best expert; top-k among the ``topk_group`` best groups;
    - noaux_tc (DeepSeek-V3 §2.1.2): sigmoid scores; choice by score + correction bias, groups
      scored by the sum of their two best biased scores; weights = the unbiased scores.

    Then optional renormalisation of the k weights (``norm_topk_prob``) and the
    ``routed_scaling_factor``. ``scores_TE`` (fp32) feed the load-balancing loss.
    """
    K, E, G = config.num_experts_per_tok, config.num_experts, config.n_group
    logits_TE = logits_TE.float()
    scores_TE = logits_TE.sigmoid() if config.topk_method == "noaux_tc" else logits_TE.softmax(-1)
    choice_TE = scores_TE if score_bias_E is None else scores_TE + score_bias_E.float()
    if config.topk_method == "greedy" or G == 1:
        masked_TE = choice_TE
    else:
        grouped_TGe = choice_TE.view(-1, G, E // G)
        group_score_TG = (grouped_TGe.max(-1).values if config.topk_method == "group_limited_greedy"
                          else grouped_TGe.topk(2, dim=-1).values.sum(-1))
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(
            1, group_score_TG.topk(config.topk_group, dim=-1).indices, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        # V2 zeroes the dropped groups' (positive) probabilities, V3 sets them to -inf; both only
        # differ when k exceeds the kept experts, which validate() refuses.
        masked_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    ids_TK = masked_TE.topk(K, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if config.norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return scores_TE, ids_TK, weights_TK * config.routed_scaling_factor


class MoEFeedForward(nn.Module):
    """Router → top-k experts, plus shared experts: ``shared_experts.N`` (MiniMind, DeepSeek: added
    as they are) or Qwen2-MoE's ``shared_expert`` scaled by ``sigmoid(shared_expert_gate(x))``.
    Returns ``(y, aux_loss)``."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        if config.topk_method == "noaux_tc":
            # DeepSeek-V3's bias shifts which experts are chosen, not their weights. A persistent
            # buffer, as in transformers (``mlp.gate.e_score_correction_bias``): DeepSeek updates
            # it by a load rule, not by gradient, and fine-tuning keeps it fixed.
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.experts = Experts(config)
        self.shared_experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.n_shared_experts))
        if config.shared_expert_gate:
            self.shared_expert = FeedForward(config.hidden_size,
                                             config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router scores (fp32), top-k expert ids and their routing weights."""
        return route(self.config, self.gate(x_TD),
                     getattr(self.gate, "e_score_correction_bias", None))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x.shape
        x_TD = x.reshape(-1, D)
        scores_TE, ids_TK, weights_TK = self.route(x_TD)
        y_TD = self.experts(x_TD, ids_TK, weights_TK).to(x.dtype)
        for shared in self.shared_experts:
            y_TD = y_TD + shared(x_TD)
        if self.config.shared_expert_gate:
            y_TD = y_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        if self.config.aux_loss_coef > 0:
            # Sigmoid scores are normalised per token first (DeepSeek-V3's sequence-wise loss).
            probs_TE = (scores_TE / scores_TE.sum(-1, keepdim=True)
                        if self.config.topk_method == "noaux_tc" else scores_TE)
            aux = load_balance_loss(probs_TE, ids_TK, B, self.config.aux_loss_coef,
                                    self.config.aux_loss_kind, token_mask)
        else:
            aux = scores_TE.new_zeros(())
        return y_TD.view(B, S, D), aux
