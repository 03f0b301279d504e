"""SwiGLU feed-forward and the mixture-of-experts layer (router + experts).

Shape legend: T tokens (batch × sequence, flattened), D hidden, E routed experts, K experts per
token, I expert FFN size.

The router (softmax, top-k, optional renormalisation, load-balancing loss) always runs in PyTorch
where the rest of the model runs. The experts are a separate module with one contract,
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


class MoEFeedForward(nn.Module):
    """Softmax router → top-k experts (+ shared experts). Returns ``(y, aux_loss)``."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config)
        self.shared_experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.n_shared_experts))

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (fp32), top-k expert ids and their routing weights."""
        probs_TE = self.gate(x_TD).float().softmax(dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.config.num_experts_per_tok, dim=-1)
        if self.config.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return probs_TE, ids_TK, weights_TK

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x.shape
        x_TD = x.reshape(-1, D)
        probs_TE, ids_TK, weights_TK = self.route(x_TD)
        y_TD = self.experts(x_TD, ids_TK, weights_TK).to(x.dtype)
        for shared in self.shared_experts:
            y_TD = y_TD + shared(x_TD)
        if self.config.aux_loss_coef > 0:
            aux = load_balance_loss(probs_TE, ids_TK, B, self.config.aux_loss_coef,
                                    self.config.aux_loss_kind, token_mask)
        else:
            aux = probs_TE.new_zeros(())
        return y_TD.view(B, S, D), aux
