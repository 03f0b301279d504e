"""MiniMindLM: a decoder-only transformer in one file.

config → RMSNorm / RoPE (+YaRN) and attention (model/attention.py: grouped-query or DeepSeek's
multi-head latent attention) → SwiGLU or MoE (model/moe.py) → block → model.

Parameter names follow MiniMind/Qwen3 (``model.layers.N.self_attn.q_proj.weight`` …) and, for MLA
and DeepSeek/Qwen2 MoE, transformers' own, so upstream MiniMind state dicts load with
``strict=True`` and checkpoints map onto transformers' Qwen3(-MoE) / Qwen2-MoE / DeepSeek-V2/V3.
Transforms (LoRA, expert offload, compile, DDP) are applied from outside.

Shape legend: B batch, S new positions, P cached (past) positions, H query heads, G key/value
heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (Attention, MLAttention, RMSNorm, RotaryEmbedding,  # noqa: F401
                        apply_rope, rope_inv_freq)
from .config import MiniMindConfig
from .moe import FeedForward, MoEFeedForward

# Label of a position without loss (prompt, padding): the one definition; datasets and losses import it.
IGNORE_INDEX = -100


def kv_widths(config: MiniMindConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, width) of the two cached tensors per layer: keys and values [G, D] for GQA, the
    latent [1, R] and the shared rope key [1, Dr] for MLA."""
    if config.use_mla:
        return (1, config.kv_lora_rank), (1, config.qk_rope_head_dim)
    return (config.num_key_value_heads, config.head_dim), (config.num_key_value_heads, config.head_dim)


def kv_bytes_per_token(config: MiniMindConfig, dtype: torch.dtype, expanded: bool = False) -> int:
    """Cache bytes one token costs over all layers; ``expanded`` = MLA's K/V as a GQA cache would
    hold them (H heads of Dn+Dr keys and Dv values)."""
    if expanded and config.use_mla:
        per_head = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
        width = config.num_attention_heads * per_head
    else:
        width = sum(g * d for g, d in kv_widths(config))
    return config.num_hidden_layers * width * torch.finfo(dtype).bits // 8


class KVCache:
    """Preallocated cache for all layers: ``k`` [layers, B, G, max_len, D] and ``v`` alike for GQA;
    for MLA ``k`` holds the latents [layers, B, 1, max_len, R] and ``v`` the rope keys
    [layers, B, 1, max_len, Dr] (``kv_widths``).

    ``pos`` counts the cached positions. The model writes each layer's new entries in place
    and advances ``pos`` once per forward, so decoding never reallocates (MiniMind grows its cache
    with ``torch.cat`` every token).
    """

    def __init__(self, config: MiniMindConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        (ga, da), (gb, db) = kv_widths(config)
        L = config.num_hidden_layers
        self.k = torch.zeros((L, batch_size, ga, max_len, da), dtype=dtype, device=device)
        self.v = torch.zeros((L, batch_size, gb, max_len, db), dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Block(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config) if config.use_mla else Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # DeepSeek's first_k_dense_replace layers keep a dense FFN of intermediate_size.
        self.mlp = (MoEFeedForward(config) if config.is_moe_layer(layer_idx)
                    else FeedForward(config.hidden_size, config.intermediate_size))

    # model/fast_decode.py's decode_step is this forward's one deliberate twin (one token per row
    # over a fixed-shape cache, on prepacked weights); tests/test_generate.py holds them equal.
    # A change here is a change there.
    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache, layer_idx, token_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal,
                               kv_cache, layer_idx)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            y, aux = self.mlp(h, token_mask)
        else:
            y, aux = self.mlp(h), None
        return x + y, aux


class Backbone(nn.Module):
    """The ``model.`` prefix of the parameter names: embeddings, blocks, final norm."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # ce_loss + aux_loss
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE load balancing, summed over layers (0 when dense)


def attention_mask_for(attention_mask: torch.Tensor | None, S: int, P: int, device: torch.device,
                       document_ids: torch.Tensor | None = None):
    """Returns (mask, is_causal) for SDPA given the padding mask over all P+S positions.

    Without padding the fast paths apply: ``is_causal`` for a prefill, no mask for one new token,
    a plain causal mask for a chunk appended to a cache.
    With padding a boolean [B, 1, S, P+S] mask combines causality and padding; each query may always
    see itself, so a padded query row is never fully masked (that would give NaN, and the NaN of a
    pad position would leak into real rows through 0·NaN in the value product).
    With ``document_ids`` [B, S] (packed rows: 1, 2, ... per document, 0 for the padding after
    them) the mask is block-diagonal causal: a token sees only the earlier tokens of its own
    document (LLaMA-Factory's neat_packing). Training and prefill only (P = 0).
    """
    if document_ids is not None:
        if P:
            raise ValueError("document_ids (packed rows) cannot be used with a KV cache")
        pos = torch.arange(S, device=device)
        mask = (pos[None, :] <= pos[:, None]) & (document_ids[:, :, None] == document_ids[:, None, :])
        return mask[:, None], False   # the diagonal is always set: no row is fully masked
    if attention_mask is None and (P == 0 or S == 1):
        return None, (P == 0 and S > 1)
    q_pos = torch.arange(P, P + S, device=device).unsqueeze(-1)
    k_pos = torch.arange(P + S, device=device)
    mask = k_pos <= q_pos  # SDPA's is_causal aligns top-left, wrong once P > 0: build it here
    if attention_mask is None:
        return mask, False
    mask = mask & attention_mask[:, None, None, : P + S].bool()
    return mask | (k_pos == q_pos), False


class MiniMindLM(nn.Module):
    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        init_weights(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                document_ids: torch.Tensor | None = None) -> CausalLMOutput:
        """``attention_mask`` [B, P+S] (1 real, 0 pad) is only needed for left padding or a padded
        cache: with right padding, causality already hides the pads from every real token.
        ``labels`` are aligned with ``input_ids``; the shift happens here.
        ``document_ids`` [B, S] marks packed rows (1, 2, ... per document, 0 = padding): attention
        stays inside each document and positions restart at 0 where a document starts, so every
        document is computed exactly as if it were alone in its row. Its labels must not ask the
        last token of one document to predict the first of the next (the SFT dataset masks them)."""
        B, S = input_ids.shape
        P = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            if document_ids is not None:  # each token's distance from the start of its document
                idx = torch.arange(S, device=input_ids.device).expand(B, S)
                starts = F.pad(document_ids[:, 1:] != document_ids[:, :-1], (1, 0), value=True)
                position_ids = idx - torch.where(starts, idx, 0).cummax(-1).values
            elif attention_mask is not None:  # left padding: each row counts from its first token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:P + S]
            else:
                position_ids = torch.arange(P, P + S, device=input_ids.device)
        x = F.dropout(self.model.embed_tokens(input_ids), self.config.dropout, self.training)
        cos, sin = self.model.rotary(position_ids, x.dtype)
        mask, is_causal = attention_mask_for(attention_mask, S, P, x.device, document_ids)
        token_mask = attention_mask[:, P:P + S] if attention_mask is not None else None
        if token_mask is None and document_ids is not None:
            token_mask = document_ids > 0   # the padding after the documents of a packed row
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.model.layers):
            x, aux = layer(x, cos, sin, mask, is_causal, kv_cache, i, token_mask)
            if aux is not None:
                aux_loss = aux_loss + aux
        if kv_cache is not None:
            kv_cache.pos += S
        x = self.model.norm(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        if labels is None:
            return CausalLMOutput(logits=logits, aux_loss=aux_loss)
        ce_loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits, ce_loss + aux_loss, ce_loss, aux_loss)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy of logits[B,S,V] against aligned labels[B,S] (shifted here:
    position t predicts token t+1) over supervised positions (labels != ignore_index).

    The one implementation: the model's forward and trainer/losses.py both use it. Computed in
    fp32 whatever the logits dtype (bf16 log-softmax over a large vocabulary loses digits);
    divides by max(count, 1) so a batch with no supervised token gives 0, not NaN.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    # Masked by hand rather than with cross_entropy's ignore_index: torch.compile's AVX2 CPU code
    # for ignore_index (torch 2.13) reads the -100 index out of bounds (NaN or a corrupted heap).
    supervised = shift_labels != ignore_index
    per_token = F.cross_entropy(shift_logits, shift_labels.masked_fill(~supervised, 0), reduction="none")
    return (per_token * supervised).sum() / supervised.sum().clamp(min=1)


@torch.no_grad()
def init_weights(model: MiniMindLM) -> None:
    """The one place weights are initialised.

    - embeddings (and the tied lm_head), q/k/v, gate/up projections, router: N(0, σ), σ =
      ``initializer_range`` (0.02, as MiniMind/transformers);
    - o_proj and down_proj, which write into the residual stream: N(0, σ/√(2·layers)) (GPT-2 §2.3),
      so the residual variance does not grow with depth;
    - an untied lm_head: N(0, σ); RMSNorm weights: 1; biases and the router's
      ``e_score_correction_bias``: 0.
    """
    std = model.config.initializer_range
    residual_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_residual = name.endswith("o_proj") or name.endswith("down_proj")
            nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
            if module.bias is not None:  # q/k/v biases (attention_bias) start at 0
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
    if model.config.tie_word_embeddings:  # the Linear loop above re-drew the shared tensor
        nn.init.normal_(model.model.embed_tokens.weight, 0.0, std)
