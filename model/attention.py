"""The attention variants of MiniMindLM and what they share: RMSNorm, RoPE (+YaRN), and

- ``Attention``: grouped-query attention (MiniMind, Llama, Qwen2/3; QK-norm and q/k/v biases
  optional);
- ``MLAttention``: DeepSeek-V2/V3 multi-head latent attention. Keys and values are expanded from a
  per-token latent (``kv_lora_rank`` wide) by ``kv_b_proj``; a single ``qk_rope_head_dim`` rope key
  is shared by all heads. The KV cache stores only the latent and the rope key; decoding attends
  in latent space (weight absorption) when that is cheaper than expanding the cache.

Both take ``(x, cos, sin, attn_mask, is_causal, kv_cache, layer_idx)``: the mask and RoPE tables
are built once per forward by the model (``model.attention_mask_for``) and both call
``kv_cache.update(layer, a, b) -> (a_all, b_all)``. Parameter names are transformers' so weights
load with ``strict=True``.

Shape legend: B batch, S new positions, T all positions (cached + new), H query heads, G key/value
heads, D head_dim, R kv_lora_rank, Dn/Dr/Dv MLA's nope/rope/value head dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniMindConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums of squares lose too much), scale in the input dtype as
        # transformers' Qwen3RMSNorm does, so exported models give the same logits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1·m·ln(s) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(config: MiniMindConfig, device: torch.device | None = None) -> torch.Tensor:
    """RoPE inverse frequencies θ^(-2i/D), with YaRN's per-frequency interpolation if enabled.

    YaRN (Peng et al. 2023, §3.2): frequencies whose wavelength fits many times into the original
    context keep their value, those that fit less than once are divided by the factor, and a
    linear ramp between dimensions ``low`` and ``high`` blends the two.
    """
    dim, base = config.rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    if config.yarn_factor > 1.0:
        orig = config.yarn_original_max_position_embeddings

        def correction_dim(n_rotations: float) -> float:
            return dim * math.log(orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(config.yarn_beta_fast)), 0)
        high = min(math.ceil(correction_dim(config.yarn_beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float64) - low)
                / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq * (1 - ramp) + inv_freq / config.yarn_factor * ramp
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once and kept in fp32."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self._build(torch.device("cpu"))

    def _build(self, device: torch.device) -> None:
        inv_freq = rope_inv_freq(self.config, device)
        t = torch.arange(self.config.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # half-rotation convention (MiniMind, Qwen3)
        scale = self.config.yarn_attention_factor
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the tables; rebuild them in fp32 on the new device.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self._build(self.cos.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return self.cos[position_ids].to(dtype), self.sin[position_ids].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, heads, D]; cos/sin: [S, D] or [B, S, D]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, …) → (x0, x2, …, x1, x3, …): DeepSeek's adjacent rope pairs become the
    (i, i + D/2) pairs ``apply_rope`` rotates. Query and key get the same permutation, so q·k is
    DeepSeek's (transformers' ``apply_rotary_pos_emb_interleave`` does the same)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class Attention(nn.Module):
    """Grouped-query attention."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        h, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache=None, layer_idx=0):
        B, S, _ = x.shape
        q_BSHD = self.q_norm(self.q_proj(x).view(B, S, self.n_heads, self.head_dim))
        k_BSGD = self.k_norm(self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim))
        v_BSGD = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        q = apply_rope(q_BSHD, cos, sin).transpose(1, 2)
        k = apply_rope(k_BSGD, cos, sin).transpose(1, 2)
        v = v_BSGD.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k.to(kv_cache.k.dtype), v.to(kv_cache.v.dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        # enable_gqa lets SDPA broadcast the G key/value heads over H query heads without
        # materialising repeated copies (MiniMind's repeat_kv).
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_heads != self.n_kv_heads)
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return F.dropout(self.o_proj(out), self.dropout, self.training)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434).

    q = q_b_proj(RMSNorm(q_a_proj(x))) (or q_proj(x)), split per head into [Dn nope | Dr rope];
    kv_a_proj_with_mqa(x) = [latent R | rope key Dr]; the latent is RMS-normalised and cached with
    the rotated rope key; kv_b_proj expands the cached latents into per-head [Dn key | Dv value].
    Softmax scale: 1/√(Dn+Dr), times DeepSeek's YaRN mscale² when ``yarn_mscale_all_dim`` is set.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        h, H, eps = config.hidden_size, config.num_attention_heads, config.rms_norm_eps
        self.n_heads, self.dropout = H, config.dropout
        self.nope, self.rope, self.v_dim = (config.qk_nope_head_dim, config.qk_rope_head_dim,
                                            config.v_head_dim)
        self.rank, self.interleave = config.kv_lora_rank, config.rope_interleave
        qk = self.nope + self.rope
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, h, bias=False)
        self.scale = qk ** -0.5 * yarn_mscale(config.yarn_factor, config.yarn_mscale_all_dim) ** 2

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(deinterleave(x) if self.interleave else x, cos, sin)

    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache=None, layer_idx=0):
        B, S, _ = x.shape
        H = self.n_heads
        q = (self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj")
             else self.q_proj(x))
        q_nope, q_rot = q.view(B, S, H, self.nope + self.rope).split([self.nope, self.rope], -1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent_B1SR = self.kv_a_layernorm(latent).unsqueeze(1)
        k_rot_B1SDr = self._rope(k_rot.unsqueeze(2), cos, sin).transpose(1, 2)
        q_BHSD = torch.cat([q_nope, self._rope(q_rot, cos, sin)], dim=-1).transpose(1, 2)
        if kv_cache is not None:  # the cache holds the latent and the rope key, never K/V
            latent_B1SR, k_rot_B1SDr = kv_cache.update(
                layer_idx, latent_B1SR.to(kv_cache.k.dtype), k_rot_B1SDr.to(kv_cache.v.dtype))
            latent_B1SR, k_rot_B1SDr = latent_B1SR.to(q.dtype), k_rot_B1SDr.to(q.dtype)
        T = latent_B1SR.shape[2]
        if self._absorb(S, T):
            out = self._absorbed(q_BHSD, latent_B1SR, k_rot_B1SDr, attn_mask, is_causal)
        else:
            kv = self.kv_b_proj(latent_B1SR.squeeze(1)).view(B, T, H, self.nope + self.v_dim)
            k_nope, v = kv.transpose(1, 2).split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_rot_B1SDr.expand(B, H, T, self.rope)], dim=-1)
            out = F.scaled_dot_product_attention(
                q_BHSD, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, S, H * self.v_dim)
        return F.dropout(self.o_proj(out), self.dropout, self.training)

    def _absorb(self, S: int, T: int) -> bool:
        """Attend in latent space when it costs fewer multiply-adds than expanding all T cached
        latents (decoding: S ≪ T). Only for a plain ``kv_b_proj`` outside training: a LoRA or
        quantised wrapper's effective weight is not ``.weight``."""
        if self.training or type(self.kv_b_proj) is not nn.Linear:
            return False
        R, Dn, Dr, Dv = self.rank, self.nope, self.rope, self.v_dim
        expanded = T * R * (Dn + Dv) + S * T * (Dn + Dr + Dv)
        absorbed = S * R * (Dn + Dv) + S * T * (2 * R + Dr)
        return absorbed < expanded

    def _absorbed(self, q_BHSD, latent_B1TR, k_rot_B1TDr, attn_mask, is_causal):
        """DeepSeek-V2 §2.1.3's weight absorption: q_nope·(W_UK·c) = (W_UKᵀ·q_nope)·c, and
        Σ p·(W_UV·c) = W_UV·(Σ p·c), so all heads attend to the shared [latent | rope key] of
        width R + Dr as one key/value head and only the S outputs are expanded. Same maths as the
        expanded path (the decode test compares both with the full forward)."""
        W = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        W_UK, W_UV = W.split([self.nope, self.v_dim], dim=1)  # [H, Dn, R], [H, Dv, R]
        q_nope, q_rot = q_BHSD.split([self.nope, self.rope], dim=-1)
        B, H, S, _ = q_BHSD.shape
        T = latent_B1TR.shape[2]
        q = torch.cat([torch.einsum("bhsn,hnr->bhsr", q_nope, W_UK), q_rot], dim=-1)
        k = torch.cat([latent_B1TR, k_rot_B1TDr], dim=-1)
        # One key/value head for all: fold the heads into the query axis, so SDPA never copies
        # the shared latents H times (its enable_gqa CPU path does).
        if is_causal:
            attn_mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)
        if attn_mask is not None:
            attn_mask = attn_mask.broadcast_to(B, H, S, T).reshape(B, 1, H * S, T)
        out = F.scaled_dot_product_attention(q.reshape(B, 1, H * S, -1), k, latent_B1TR,
                                             attn_mask=attn_mask, scale=self.scale)
        return torch.einsum("bhsr,hvr->bhsv", out.view(B, H, S, self.rank), W_UV)
