"""Model configuration: one typed dataclass, named presets, JSON round-trip.

Derived sizes (head_dim, FFN sizes) are filled in ``__post_init__`` so a saved config.json always
holds concrete numbers and a checkpoint folder never needs sizes passed on the command line.
The presets reproduce MiniMind's published models exactly (parameter counts are tested).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.errors import ModelFolderError, ModelNotFoundError, UserError

AuxLossKind = Literal["token", "sequence"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


class UnknownPresetError(UserError, ValueError):
    """A preset name that is not in PRESETS (the message lists the known ones)."""


@dataclass
class MiniMindConfig:
    # --- transformer -----------------------------------------------------------------------
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    intermediate_size: int = 0  # 0 = MiniMind v2 rule: 8/3 * hidden rounded up to a multiple of 64
    vocab_size: int = 6400
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    qk_norm: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2 / Qwen2-MoE); o_proj never has one
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    initializer_range: float = 0.02
    # --- YaRN context extension (factor 1 = off) ---------------------------------------------
    yarn_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 2048
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float = 1.0  # scales cos/sin; MiniMind uses 1.0
    # DeepSeek's YaRN: MLA's softmax scale is multiplied by (0.1·m·ln(yarn_factor) + 1)², m this.
    yarn_mscale_all_dim: float = 0.0
    # --- multi-head latent attention (DeepSeek-V2/V3; kv_lora_rank 0 = grouped-query attention) ----
    kv_lora_rank: int = 0  # the cached latent's width
    q_lora_rank: int = 0  # 0 = one q_proj; else q_a_proj → q_a_layernorm → q_b_proj
    qk_nope_head_dim: int = 0  # per-head query/key part without RoPE
    qk_rope_head_dim: int = 0  # per-head query part with RoPE; its key part is shared by all heads
    v_head_dim: int = 0
    rope_interleave: bool = True  # DeepSeek rotates adjacent pairs (2i, 2i+1) of the rope dims
    # --- mixture of experts (ignored unless use_moe) -------------------------------------------
    use_moe: bool = False
    num_experts: int = 4  # routed experts
    num_experts_per_tok: int = 2  # top-k
    n_shared_experts: int = 0  # always-on experts added to the routed output
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    aux_loss_coef: float = 0.1
    aux_loss_kind: AuxLossKind = "sequence"  # "token" = Switch-style over the batch
    moe_intermediate_size: int = 0  # 0 = intermediate_size
    first_k_dense_replace: int = 0  # the first k layers keep a dense FFN (DeepSeek)
    # "greedy": softmax → top-k; "group_limited_greedy" (DeepSeek-V2): softmax, then top-k among the
    # topk_group groups (of n_group) with the highest expert score; "noaux_tc" (DeepSeek-V3): sigmoid
    # scores, choice by score + e_score_correction_bias among the groups with the best top-2 sums.
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routing weights (after renormalisation)
    # Qwen2-MoE: one shared expert of its own size, scaled by sigmoid(shared_expert_gate(x)).
    shared_expert_gate: bool = False
    shared_expert_intermediate_size: int = 0
    # --- special token ids (MiniMind's tokenizer) -------------------------------------------------
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        if self.moe_intermediate_size == 0:
            self.moe_intermediate_size = self.intermediate_size
        self.validate()

    @property
    def use_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_head_dim(self) -> int:
        """Width RoPE rotates: the whole head, or MLA's qk_rope_head_dim."""
        return self.qk_rope_head_dim if self.use_mla else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.use_moe and layer >= self.first_k_dense_replace

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"MiniMindConfig: {msg}")

        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE")
        need(self.yarn_factor >= 1.0, f"yarn_factor ({self.yarn_factor}) must be >= 1")
        need(0.0 <= self.dropout < 1.0, f"dropout ({self.dropout}) must be in [0, 1)")
        need(self.aux_loss_kind in ("token", "sequence"),
             f"aux_loss_kind must be 'token' or 'sequence', got {self.aux_loss_kind!r}")
        if self.use_mla:
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                 f"MLA needs an even qk_rope_head_dim > 0, got {self.qk_rope_head_dim}")
            need(self.qk_nope_head_dim >= 0 and self.v_head_dim > 0,
                 f"MLA needs qk_nope_head_dim >= 0 and v_head_dim > 0, got {self.qk_nope_head_dim} "
                 f"and {self.v_head_dim}")
            need(not (self.qk_norm or self.attention_bias),
                 "MLA has no qk_norm or attention_bias (DeepSeek-V2/V3 have neither)")
        else:
            need(self.yarn_mscale_all_dim == 0, "yarn_mscale_all_dim only applies to MLA "
                 "(kv_lora_rank > 0)")
        if self.use_moe:
            need(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts="
                 f"{self.num_experts}]")
            need(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
                 f"topk_method must be greedy, group_limited_greedy or noaux_tc, got "
                 f"{self.topk_method!r}")
            need(self.n_group >= 1 and self.num_experts % self.n_group == 0
                 and 1 <= self.topk_group <= self.n_group,
                 f"n_group ({self.n_group}) must divide num_experts ({self.num_experts}) and "
                 f"topk_group ({self.topk_group}) be in [1, n_group]")
            need(self.topk_group * (self.num_experts // self.n_group) >= self.num_experts_per_tok,
                 f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts "
                 f"hold fewer than num_experts_per_tok={self.num_experts_per_tok}")
            need(self.topk_method != "noaux_tc" or self.num_experts // self.n_group >= 2,
                 "noaux_tc scores each group by its top-2 experts: groups need >= 2 experts")
            need(not self.shared_expert_gate or (self.n_shared_experts == 0
                                                 and self.shared_expert_intermediate_size > 0),
                 "shared_expert_gate (Qwen2-MoE) uses its own shared_expert_intermediate_size > 0 "
                 "instead of n_shared_experts, which must be 0")

    # --- parameter counts (closed form, no model needed) ------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """Total parameters (tied head counted once); ``active`` counts only top-k + shared experts."""
        h, d, H = self.hidden_size, self.head_dim, self.num_attention_heads
        if self.use_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk
                 if self.q_lora_rank else h * H * qk)
            attn = (q + h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                    + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
                    + H * self.v_head_dim * h)
        else:
            attn = h * d * (2 * H + 2 * self.num_key_value_heads)
            attn += 2 * d if self.qk_norm else 0
            attn += (H + 2 * self.num_key_value_heads) * d if self.attention_bias else 0
        dense = 3 * h * self.intermediate_size
        routed = self.num_experts_per_tok if active else self.num_experts
        sparse = 3 * h * self.moe_intermediate_size * (routed + self.n_shared_experts)
        sparse += h * self.num_experts  # router
        if self.shared_expert_gate:
            sparse += 3 * h * self.shared_expert_intermediate_size + h
        n_sparse = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        mlp = n_sparse * sparse + (self.num_hidden_layers - n_sparse) * dense
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * (attn + 2 * h) + mlp + self.vocab_size * h + h + head

    # --- presets and JSON ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MiniMindConfig":
        if name not in PRESETS:
            raise UnknownPresetError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "MiniMindConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelFolderError(f"{source}: unknown model config field(s) {unknown}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "MiniMindConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelNotFoundError(f"{path}: model config not found") from None
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"{path}:{e.lineno}: invalid JSON in model config: {e.msg}") from None
        return cls.from_dict(data, source=str(path))


_V3 = dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
           head_dim=96, intermediate_size=2432, qk_norm=True, rms_norm_eps=1e-6)

PRESETS: dict[str, dict] = {
    # MiniMind2 family (v2 era: FFN = 8/3·hidden rounded up to 64, no QK-norm).
    "minimind2-small": dict(hidden_size=512, num_hidden_layers=8),
    "minimind2": dict(hidden_size=768, num_hidden_layers=16),
    "minimind2-moe": dict(hidden_size=640, num_hidden_layers=8, use_moe=True, num_experts=4,
                          num_experts_per_tok=2, n_shared_experts=1, aux_loss_coef=0.1,
                          aux_loss_kind="sequence"),
    # MiniMind3 family (FFN = ceil(hidden·π/64)·64, QK-norm, head_dim 96).
    "minimind3": dict(_V3),
    "minimind3-moe": dict(_V3, use_moe=True, num_experts=4, num_experts_per_tok=1,
                          n_shared_experts=0, aux_loss_coef=5e-4, aux_loss_kind="token"),
    # Small presets for tests and the CPU quickstart; sizes are multiples of 32 so kt-kernel accepts
    # them.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, max_position_embeddings=512),
    "tiny-moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=192, max_position_embeddings=512,
                     use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                     moe_intermediate_size=96, aux_loss_coef=0.01),
    # DeepSeek-V3 in miniature: MLA (latent 32 + rope key 16 cached per token), a dense first layer,
    # sigmoid routing over 2 groups with a shared expert.
    "tiny-mla-moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=192, max_position_embeddings=512,
                         kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                         v_head_dim=16, use_moe=True, num_experts=4, num_experts_per_tok=2,
                         n_shared_experts=1, moe_intermediate_size=96, first_k_dense_replace=1,
                         topk_method="noaux_tc", n_group=2, topk_group=1,
                         routed_scaling_factor=2.5, aux_loss_coef=1e-3),
    "demo": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=704, max_position_embeddings=1024),
    "demo-small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=352, max_position_embeddings=1024),
    "demo-mini": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3,
                      num_key_value_heads=1, intermediate_size=256, max_position_embeddings=1024),
    "demo-moe": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, intermediate_size=704, max_position_embeddings=1024,
                     use_moe=True, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=704,
                     aux_loss_coef=0.01, aux_loss_kind="token"),
}
