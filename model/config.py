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

from .errors import ModelFolderError, ModelNotFoundError, UserError

AuxLossKind = Literal["token", "sequence"]


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
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    initializer_range: float = 0.02
    # --- YaRN context extension (factor 1 = off) ---------------------------------------------
    yarn_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 2048
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attention_factor: float = 1.0  # scales cos/sin; MiniMind uses 1.0
    # --- mixture of experts (ignored unless use_moe) -------------------------------------------
    use_moe: bool = False
    num_experts: int = 4  # routed experts
    num_experts_per_tok: int = 2  # top-k
    n_shared_experts: int = 0  # always-on experts added to the routed output
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    aux_loss_coef: float = 0.1
    aux_loss_kind: AuxLossKind = "sequence"  # "token" = Switch-style over the batch
    moe_intermediate_size: int = 0  # 0 = intermediate_size
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
        if self.use_moe:
            need(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts="
                 f"{self.num_experts}]")

    # --- parameter counts (closed form, no model needed) ------------------------------------------
    def num_parameters(self, active: bool = False) -> int:
        """Total parameters (tied head counted once); ``active`` counts only top-k + shared experts."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        attn += 2 * d if self.qk_norm else 0
        if self.use_moe:
            routed = self.num_experts_per_tok if active else self.num_experts
            mlp = 3 * h * self.moe_intermediate_size * (routed + self.n_shared_experts)
            mlp += h * self.num_experts  # router
        else:
            mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * per_layer + self.vocab_size * h + h + head

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
