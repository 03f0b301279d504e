"""Conversion between our model folders and the Hugging Face / upstream MiniMind layouts.

Scope: pure functions that map configs (``MiniMindConfig`` ⇄ HF ``config.json`` dicts) and state
dicts both ways, plus thin file-level wrappers (``export_hf``, ``import_hf``, ``import_hf_to_folder``) used by
``convert/cli.py``, so one module owns every transformers mapping (GGUF's names build on it in
``convert/gguf.py``; upstream MiniMind's ``.pth`` already uses our names: ``convert/minimind.py``). Nothing here imports ``transformers``: the exported folder is plain JSON +
safetensors, and the tests check that transformers loads it and computes the same logits.

Which HF architecture a config becomes (only targets whose maths equals ours exactly):

==========================  ====================  =================================================
our config                  HF class              why
==========================  ====================  =================================================
dense, QK-norm              Qwen3ForCausalLM      per-head RMSNorm on q/k before RoPE, as ours
dense, no QK-norm           LlamaForCausalLM      Qwen3 always has q_norm/k_norm, and an RMSNorm
                                                  with weight 1 still normalises: not an identity
MoE, QK-norm, no shared     Qwen3MoeForCausalLM   softmax → top-k → optional renormalisation
MoE, no QK-norm, no shared  MixtralForCausalLM    Mixtral always renormalises the top-k weights, so
                                                  only ``norm_topk_prob=True`` maps
MoE, no QK-norm, shared     GraniteMoeShared-     softmax over the top-k *logits* equals the
                            ForCausalLM           renormalised top-k probabilities; its shared MLP
                                                  is ungated and added to the routed output; k
                                                  shared experts of size I = one of size k·I
==========================  ====================  =================================================

Refused, with the reason in the error: MoE with shared experts *and* QK-norm (no HF class has
both: Qwen2-MoE / Qwen3-Next scale the shared expert by a learned sigmoid gate that can never be
exactly 1, DeepSeek-V2/V3 use latent attention), and MoE without QK-norm and without top-k
renormalisation (Mixtral and Granite both renormalise).

On disk the expert weights use the per-expert Hub layout that released checkpoints use
(``mlp.experts.E.gate_proj.weight``; Mixtral ``block_sparse_moe.experts.E.w1/w2/w3``), which
transformers 5 fuses into 3-D ``gate_up_proj`` / ``down_proj`` at load time and which older
transformers, vLLM and llama.cpp's converter read directly. Import accepts both layouts.

YaRN maps to ``rope_parameters = {"rope_type": "yarn", ...}`` with ``attention_factor`` written
explicitly (transformers would otherwise default it to 0.1·ln(factor)+1, MiniMind uses 1.0) and
``truncate`` true (our correction range is floored/ceiled, as transformers' default).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.atomic import atomic_path, atomic_write_bytes, new_folder
from common.errors import ModelNotFoundError, UserError
from model import tokenizer
from model.attention import yarn_mscale
from model.config import MiniMindConfig
from model.io import config_bytes, header_bytes, save_pretrained, stable_save_file
from model.model import MiniMindLM
from model.precision import DTYPES, canonical_name


class ConversionError(UserError, ValueError):
    """A config or checkpoint that cannot be converted faithfully; the message says why."""


# model_type → HF class name, for the architectures we export and import.
HF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "granitemoeshared": "GraniteMoeSharedForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_DEEPSEEK = ("deepseek_v2", "deepseek_v3")
_DEFAULT_THETA = {"mixtral": 1e6}  # transformers' per-class default when a config omits it
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Non-parameter entries that some checkpoints carry and that our model recomputes.
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)rotary\.(cos|sin)$")


# --- choosing the target ---------------------------------------------------------------------------

def choose_hf_model_type(config: MiniMindConfig) -> str:
    """The HF ``model_type`` whose maths equals ``config``'s; raises ``ConversionError`` if none."""
    if config.use_mla:
        return _choose_deepseek(config)
    if config.shared_expert_gate:
        if config.qk_norm or config.topk_method != "greedy" or config.routed_scaling_factor != 1:
            raise ConversionError(
                "a gated shared expert maps onto Qwen2-MoE only, which has no QK-norm, greedy "
                "softmax top-k routing and no routed_scaling_factor")
        return "qwen2_moe"
    if config.attention_bias:
        raise ConversionError("q/k/v biases export only as Qwen2-MoE (shared_expert_gate) or "
                              "DeepSeek; no other supported class has them")
    if config.use_moe and (config.topk_method != "greedy" or config.routed_scaling_factor != 1):
        raise ConversionError(f"topk_method {config.topk_method!r} / routed_scaling_factor "
                              f"{config.routed_scaling_factor} without MLA: no transformers class "
                              "has DeepSeek routing with grouped-query attention")
    if config.first_k_dense_replace and not (config.use_moe and config.qk_norm
                                             and config.n_shared_experts == 0):
        raise ConversionError("first_k_dense_replace without MLA maps only onto Qwen3-MoE "
                              "(mlp_only_layers): needs QK-norm and no shared experts")
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.n_shared_experts == 0:
        if config.qk_norm:
            return "qwen3_moe"
        if config.norm_topk_prob:
            return "mixtral"
        raise ConversionError(
            "MoE without QK-norm and with norm_topk_prob=False has no exact transformers target: "
            "Mixtral always renormalises the top-k weights and Qwen3-MoE always applies QK-norm")
    if config.qk_norm:
        raise ConversionError(
            f"MoE with {config.n_shared_experts} shared expert(s) and QK-norm has no exact "
            "transformers target: Qwen3-MoE and Mixtral have no shared expert, Qwen2-MoE/Qwen3-Next "
            "scale theirs by a learned sigmoid gate (never exactly 1), DeepSeek-V2/V3 use latent "
            "attention, and GraniteMoeShared (ungated shared MLP) has no QK-norm")
    if not config.norm_topk_prob:
        raise ConversionError(
            "MoE with shared experts needs norm_topk_prob=True to map onto GraniteMoeShared, whose "
            "router takes a softmax over the top-k logits (= renormalised top-k probabilities)")
    return "granitemoeshared"


def _choose_deepseek(config: MiniMindConfig) -> str:
    """DeepSeek-V3 for sigmoid ``noaux_tc`` routing (or a dense MLA model), DeepSeek-V2 for
    softmax routing; transformers' V2 always uses interleaved RoPE and never renormalises."""
    if config.use_moe and config.n_shared_experts == 0:
        raise ConversionError("DeepSeek-V2/V3 in transformers always have shared experts; this "
                              "MLA model has n_shared_experts=0")
    if config.shared_expert_gate:
        raise ConversionError("DeepSeek has no gated shared expert (that is Qwen2-MoE)")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ConversionError("MLA exports need num_key_value_heads == num_attention_heads")
    if not config.use_moe or config.topk_method == "noaux_tc":
        return "deepseek_v3"
    if not config.rope_interleave or config.norm_topk_prob:
        raise ConversionError(
            f"topk_method {config.topk_method!r} maps onto DeepSeek-V2, whose transformers class "
            "always uses interleaved RoPE (rope_interleave=True) and never renormalises the top-k "
            "weights (norm_topk_prob=False)")
    return "deepseek_v2"


# --- configs ---------------------------------------------------------------------------------------

def _rope_parameters(config: MiniMindConfig) -> dict[str, Any]:
    if config.yarn_factor > 1.0:
        return {"rope_type": "yarn", "rope_theta": config.rope_theta,
                "factor": config.yarn_factor,
                "original_max_position_embeddings": config.yarn_original_max_position_embeddings,
                "beta_fast": config.yarn_beta_fast, "beta_slow": config.yarn_beta_slow,
                # explicit: transformers' default would be 0.1·ln(factor) + 1
                "attention_factor": config.yarn_attention_factor, "truncate": True,
                **({"mscale_all_dim": config.yarn_mscale_all_dim} if config.yarn_mscale_all_dim
                   else {})}
    return {"rope_type": "default", "rope_theta": config.rope_theta}


def hf_config_from_ours(config: MiniMindConfig, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of the HF model that computes what ``config`` computes."""
    model_type = choose_hf_model_type(config)
    if model_type == "llama" and config.hidden_size % config.num_attention_heads:
        raise ConversionError(
            f"LlamaConfig requires hidden_size ({config.hidden_size}) to be a multiple of "
            f"num_attention_heads ({config.num_attention_heads}), even with an explicit head_dim")
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": _rope_parameters(config),
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "use_cache": True,
        "dtype": dtype,
    }
    if model_type == "llama":
        hf.update(mlp_bias=False, pretraining_tp=1)
    elif model_type == "qwen3":
        hf.update(use_sliding_window=False, sliding_window=None,
                  max_window_layers=config.num_hidden_layers,
                  layer_types=["full_attention"] * config.num_hidden_layers)
    elif model_type in _DEEPSEEK:
        dense = config.num_hidden_layers if not config.use_moe else config.first_k_dense_replace
        hf.update(kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank or None,
                  qk_nope_head_dim=config.qk_nope_head_dim,
                  qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
                  head_dim=config.qk_rope_head_dim, first_k_dense_replace=dense,
                  n_routed_experts=config.num_experts, n_shared_experts=config.n_shared_experts,
                  moe_intermediate_size=config.moe_intermediate_size,
                  num_experts_per_tok=config.num_experts_per_tok, n_group=config.n_group,
                  topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
                  routed_scaling_factor=config.routed_scaling_factor,
                  aux_loss_alpha=config.aux_loss_coef, seq_aux=config.aux_loss_kind == "sequence")
        if model_type == "deepseek_v2":
            hf.update(topk_method=config.topk_method)
        else:
            hf.update(topk_method="noaux_tc", rope_interleave=config.rope_interleave)
    else:  # MoE
        hf.update(num_experts_per_tok=config.num_experts_per_tok,
                  router_aux_loss_coef=config.aux_loss_coef, output_router_logits=False)
        if model_type in ("qwen3_moe", "qwen2_moe"):
            hf.update(num_experts=config.num_experts,
                      moe_intermediate_size=config.moe_intermediate_size,
                      norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1,
                      mlp_only_layers=list(range(config.first_k_dense_replace)),
                      use_sliding_window=False, sliding_window=None)
        if model_type == "qwen2_moe":
            hf.update(qkv_bias=config.attention_bias,
                      shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                      max_window_layers=config.num_hidden_layers,
                      layer_types=["full_attention"] * config.num_hidden_layers)
        elif model_type == "mixtral":
            hf.update(num_local_experts=config.num_experts,
                      intermediate_size=config.moe_intermediate_size, sliding_window=None,
                      router_jitter_noise=0.0)
        else:  # granitemoeshared: every multiplier neutral, attention scale = 1/√D explicitly
            hf.update(num_local_experts=config.num_experts,
                      intermediate_size=config.moe_intermediate_size,
                      shared_intermediate_size=config.n_shared_experts * config.moe_intermediate_size,
                      embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
                      attention_multiplier=1.0 / math.sqrt(config.head_dim))
    return hf


def generation_config_from_ours(config: MiniMindConfig) -> dict[str, Any]:
    """``generation_config.json``: only the special ids; sampling defaults stay transformers'."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id}


def _need(ok: bool, source: str, msg: str) -> None:
    if not ok:
        raise ConversionError(f"{source}: {msg}")


def _hf_rope(hf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """Our rope/yarn fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4)."""
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "layer_types" in hf and isinstance(rp.get("full_attention"), dict):  # per-layer-type form
        rp = dict(rp["full_attention"])
    theta = float(rp.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA.get(model_type, 1e4))))
    kind = rp.get("rope_type", rp.get("type", "default"))
    _need(float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) == 1.0,
          source, "partial rotary embeddings are not supported (we rotate the whole head)")
    out: dict[str, Any] = {"rope_theta": theta}
    if kind == "default":
        return out
    _need(kind == "yarn", source, f"rope_type {kind!r} is not supported (only default and yarn)")
    _need(rp.get("truncate", True) is not False, source,
          "YaRN with truncate=false is not supported (our correction range is floored/ceiled)")
    factor = float(rp["factor"])
    original = int(rp.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    attention = rp.get("attention_factor")
    mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
    if attention is None:  # transformers' default, made explicit in our config
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else yarn_mscale(factor))
    if model_type in _DEEPSEEK and mscale_all_dim:  # DeepSeek's attention also rescales softmax
        out["yarn_mscale_all_dim"] = float(mscale_all_dim)
    out.update(yarn_factor=factor, yarn_original_max_position_embeddings=original,
               yarn_beta_fast=float(rp.get("beta_fast") or 32.0),
               yarn_beta_slow=float(rp.get("beta_slow") or 1.0),
               yarn_attention_factor=float(attention))
    return out


def _deepseek_fields(hf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """MLA and DeepSeekMoE fields of a DeepSeek-V2/V3 config (``first_k_dense_replace`` equal to
    the layer count gives a dense model)."""
    heads = int(hf["num_attention_heads"])
    _need(int(hf.get("num_key_value_heads") or heads) == heads, source,
          "MLA with num_key_value_heads != num_attention_heads is not supported")
    _need(not hf.get("n_shared_experts") is None and int(hf["n_shared_experts"]) > 0, source,
          "DeepSeek without shared experts (n_shared_experts 0/null) is not supported")
    _need(int(hf.get("moe_layer_freq", 1)) == 1, source,
          f"moe_layer_freq={hf.get('moe_layer_freq')} is not supported: after "
          "first_k_dense_replace every layer is sparse (as in every released DeepSeek)")
    scoring = "sigmoid" if model_type == "deepseek_v3" else "softmax"
    _need(hf.get("scoring_func", scoring) == scoring, source,
          f"scoring_func {hf.get('scoring_func')!r}: transformers' {model_type} uses {scoring}")
    method = "noaux_tc" if model_type == "deepseek_v3" else hf.get("topk_method") or "greedy"
    _need(method in ("greedy", "group_limited_greedy", "noaux_tc"), source,
          f"topk_method {method!r} is not supported")
    _need(model_type == "deepseek_v3" or not hf.get("norm_topk_prob"), source,
          "DeepSeek-V2 with norm_topk_prob=true: transformers' DeepseekV2 ignores it (never "
          "renormalises) while DeepSeek's own code renormalises; refusing the ambiguity")
    layers, dense = int(hf["num_hidden_layers"]), int(hf.get("first_k_dense_replace") or 0)
    n_group = int(hf.get("n_group") or 1)
    use_moe = dense < layers
    return dict(
        head_dim=int(hf["qk_rope_head_dim"]), num_key_value_heads=heads,
        kv_lora_rank=int(hf["kv_lora_rank"]), q_lora_rank=int(hf.get("q_lora_rank") or 0),
        qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
        v_head_dim=int(hf["v_head_dim"]),
        rope_interleave=bool(hf.get("rope_interleave", True)) if model_type == "deepseek_v3" else True,
        use_moe=use_moe, first_k_dense_replace=dense if use_moe else 0,
        num_experts=int(hf["n_routed_experts"]),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        n_shared_experts=int(hf["n_shared_experts"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        topk_method=method, n_group=n_group if method != "greedy" else 1,
        topk_group=int(hf.get("topk_group") or 1) if method != "greedy" else 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)) and model_type == "deepseek_v3",
        # DeepSeek's sequence-wise balance loss (seq_aux); V3's noaux_tc barely needs one.
        aux_loss_coef=float(hf.get("aux_loss_alpha", 0.001)),
        aux_loss_kind="sequence" if hf.get("seq_aux", True) else "token")


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else default
    return default if value is None else int(value)


def our_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> MiniMindConfig:
    """The ``MiniMindConfig`` equal to an HF config dict; refuses features we do not implement."""
    model_type = hf.get("model_type")
    _need(model_type in HF_ARCHITECTURES, source,
          f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
          f"supported: {sorted(HF_ARCHITECTURES)}")
    _need(not hf.get("quantization_config"), source,
          f"quantized checkpoint ({(hf.get('quantization_config') or {}).get('quant_method')}): "
          "dequantize it to bf16/fp32 first (DeepSeek-V3's release is fp8)")
    _need(hf.get("hidden_act", "silu") == "silu", source,
          f"hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    _need(not hf.get("attention_bias", False), source, "attention biases are not supported")
    _need(model_type != "qwen2_moe" or not hf.get("use_sliding_window", False), source,
          "sliding-window attention is not supported")
    _need(not hf.get("mlp_bias", False), source, "MLP biases are not supported")
    _need(hf.get("pretraining_tp", 1) in (1, None), source, "pretraining_tp > 1 is not supported")
    _need(not hf.get("use_sliding_window", False) and
          (model_type in ("qwen3", "qwen3_moe", "qwen2_moe") or hf.get("sliding_window") is None),
          source,
          "sliding-window attention is not supported")
    heads = int(hf["num_attention_heads"])
    fields: dict[str, Any] = dict(
        hidden_size=int(hf["hidden_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        intermediate_size=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_token_id=_first_id(hf.get("pad_token_id"), 0),
        bos_token_id=_first_id(hf.get("bos_token_id"), 1),
        eos_token_id=_first_id(hf.get("eos_token_id"), 2),
        **_hf_rope(hf, model_type, source))
    if model_type in _DEEPSEEK:
        fields.update(_deepseek_fields(hf, model_type, source))
    elif model_type in ("qwen3_moe", "mixtral", "granitemoeshared", "qwen2_moe"):
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        fields.update(use_moe=True, num_experts=int(experts),
                      num_experts_per_tok=int(hf["num_experts_per_tok"]),
                      aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                      aux_loss_kind="token")  # transformers' balance loss pools the whole batch
    if model_type in ("qwen3_moe", "qwen2_moe"):
        dense = sorted(int(i) for i in hf.get("mlp_only_layers") or [])
        _need(int(hf.get("decoder_sparse_step", 1)) == 1 and dense == list(range(len(dense))),
              source, f"dense layers {dense} / decoder_sparse_step "
              f"{hf.get('decoder_sparse_step')} are not supported: only the first k layers may be "
              "dense (mlp_only_layers = [0, …, k-1], as DeepSeek's first_k_dense_replace)")
        fields.update(moe_intermediate_size=int(hf["moe_intermediate_size"]),
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                      first_k_dense_replace=len(dense))
    if model_type == "qwen2_moe":
        fields.update(attention_bias=bool(hf.get("qkv_bias", True)), shared_expert_gate=True,
                      shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]))
    elif model_type == "mixtral":
        fields.update(moe_intermediate_size=fields["intermediate_size"], norm_topk_prob=True)
    elif model_type == "granitemoeshared":
        d = fields["head_dim"]
        for key, want in (("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
                          ("logits_scaling", 1.0), ("attention_multiplier", 1 / math.sqrt(d))):
            _need(math.isclose(float(hf.get(key, 1.0)), want, rel_tol=1e-6), source,
                  f"{key}={hf.get(key)} is not supported (we need {want:g})")
        size, shared = fields["intermediate_size"], int(hf.get("shared_intermediate_size", 0))
        _need(shared % size == 0, source,
              f"shared_intermediate_size {shared} is not a multiple of the expert size {size}")
        fields.update(moe_intermediate_size=size, n_shared_experts=shared // size,
                      norm_topk_prob=True)
    try:
        return MiniMindConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


# --- state dicts -----------------------------------------------------------------------------------

_LAYER_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")
_MIXTRAL_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}  # Mixtral's Hub expert names


def float32_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def _check_our_keys(config: MiniMindConfig, sd: dict[str, torch.Tensor]) -> None:
    """Exactly our model's keys: a LoRA-wrapped model (``lora_A``/``lora_B``) or a foreign state
    dict would otherwise leak unknown tensors into the export."""
    with torch.device("meta"):  # key names only; no memory, no initialisation cost
        expected = set(MiniMindLM(config).state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    got = set(sd) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if got != expected:
        hint = (" (merge LoRA adapters first: model.lora.merged_model or --lora)"
                if any(".lora_" in k for k in got) else "")
        raise ConversionError(f"state dict does not match the config: missing "
                              f"{_few(sorted(expected - got))}; unexpected "
                              f"{_few(sorted(got - expected))}{hint}")


def hf_state_dict_from_ours(config: MiniMindConfig, sd: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    """Our parameter names → the on-disk Hub names of ``choose_hf_model_type(config)``.

    Dense models, Qwen3-MoE and Qwen2-MoE already share our names; Mixtral renames the MoE block,
    Granite stacks the experts into 3-D tensors, DeepSeek concatenates the shared experts into one
    MLP. A tied ``lm_head`` is left out, as Hub checkpoints do.
    """
    model_type = choose_hf_model_type(config)
    _check_our_keys(config, sd)
    out: dict[str, torch.Tensor] = {}
    shared: dict[int, dict[str, list[torch.Tensor]]] = {}
    routed: dict[int, dict[str, list[torch.Tensor]]] = {}
    for key, value in sd.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        m = _LAYER_MLP.match(key)
        if not m or model_type in ("llama", "qwen3", "qwen3_moe", "qwen2_moe"):
            out[key] = value
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if model_type in _DEEPSEEK:
            e = re.match(r"^shared_experts\.(\d+)\.(gate|up|down)_proj\.weight$", rest)
            if e is None:
                out[key] = value
                continue
            shared.setdefault(layer, {}).setdefault(e.group(2), [None] * config.n_shared_experts
                                                    )[int(e.group(1))] = value
        elif model_type == "mixtral":
            rest = re.sub(r"^experts\.(\d+)\.(gate|up|down)_proj\.",
                          lambda e: f"experts.{e.group(1)}.{_MIXTRAL_NAMES[e.group(2)]}.", rest)
            out[f"model.layers.{layer}.block_sparse_moe.{rest}"] = value
        elif rest == "gate.weight":  # granite
            out[f"model.layers.{layer}.block_sparse_moe.router.layer.weight"] = value
        else:
            e = re.match(r"^(experts|shared_experts)\.(\d+)\.(gate|up|down)_proj\.weight$", rest)
            if e is None:
                raise ConversionError(f"unexpected parameter {key}")
            bucket = routed if e.group(1) == "experts" else shared
            bucket.setdefault(layer, {}).setdefault(e.group(3), [None] * (
                config.num_experts if e.group(1) == "experts" else config.n_shared_experts)
            )[int(e.group(2))] = value
    for layer, w in routed.items():  # [E, 2I, D] (gate rows, then up rows) and [E, D, I]
        prefix = f"model.layers.{layer}.block_sparse_moe."
        out[prefix + "input_linear.weight"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(w["gate"], w["up"])])
        out[prefix + "output_linear.weight"] = torch.stack(w["down"])
    for layer, w in shared.items():
        # Σ_k down_k(silu(gate_k x)·up_k x) = one SwiGLU whose hidden units are all k experts'.
        if model_type in _DEEPSEEK:
            prefix = f"model.layers.{layer}.mlp.shared_experts."
            for proj in ("gate", "up"):
                out[f"{prefix}{proj}_proj.weight"] = torch.cat(w[proj])
            out[prefix + "down_proj.weight"] = torch.cat(w["down"], dim=1)
            continue
        prefix = f"model.layers.{layer}.shared_mlp."
        out[prefix + "input_linear.weight"] = torch.cat([*w["gate"], *w["up"]])
        out[prefix + "output_linear.weight"] = torch.cat(w["down"], dim=1)
    return out


def _split_shared(out: dict, prefix: str, proj: str, value: torch.Tensor, size: int) -> None:
    """One shared MLP of k·I hidden units (HF) → k shared experts of I units (ours): gate/up split
    by rows, down by columns."""
    for k, part in enumerate(value.split(size, dim=1 if proj == "down" else 0)):
        out[f"{prefix}shared_experts.{k}.{proj}_proj.weight"] = part


def hf_tensor_to_ours(config: MiniMindConfig, model_type: str, key: str, value: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """One HF tensor → our tensors (names → fp32 values), independent of every other tensor, so
    a sharded checkpoint converts shard by shard (works on meta tensors for planning).

    Renamed: Mixtral's ``block_sparse_moe.experts.E.w1/w2/w3``; Granite's ``router.layer`` and
    ``input_linear``/``output_linear``; transformers 5's fused ``experts.gate_up_proj`` /
    ``experts.down_proj``; DeepSeek's single ``shared_experts.{gate,up,down}_proj`` (k·I units)
    → our ``shared_experts.N``. Everything else (MLA, Qwen2-MoE's ``shared_expert`` and
    ``shared_expert_gate``, DeepSeek's ``gate.e_score_correction_bias``) already has our name.
    A key that maps to nothing keeps its name for the strict load to report.
    """
    if IGNORED_KEY.search(key):
        return {}
    layer = re.match(r"^model\.layers\.(\d+)\.", key)
    if model_type in _DEEPSEEK and layer and int(layer.group(1)) >= config.num_hidden_layers:
        return {}  # DeepSeek-V3's multi-token-prediction layers: transformers drops them too
    value = (value.to(torch.float32) if value.device.type == "meta"
             else float32_state_dict({"": value})[""])
    m = re.match(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp|shared_mlp)\.(.+)$", key)
    if not m or (m.group(2) == "mlp" and not config.is_moe_layer(int(m.group(1)))):
        return {key: value}
    p = f"model.layers.{m.group(1)}.mlp."
    block, rest = m.group(2), m.group(3)
    out: dict[str, torch.Tensor] = {}
    if rest in ("experts.gate_up_proj", "input_linear.weight") and block != "shared_mlp":
        for e, (gate, up) in enumerate(v.chunk(2, dim=0) for v in value):  # [E, 2I, D]
            out[f"{p}experts.{e}.gate_proj.weight"] = gate
            out[f"{p}experts.{e}.up_proj.weight"] = up
    elif rest in ("experts.down_proj", "output_linear.weight") and block != "shared_mlp":
        for e, down in enumerate(value):  # [E, D, I]
            out[f"{p}experts.{e}.down_proj.weight"] = down
    elif rest in ("gate.weight", "router.weight", "router.layer.weight"):
        out[p + "gate.weight"] = value
    elif block == "shared_mlp" and rest == "input_linear.weight":  # Granite: [gate; up] rows
        gate, up = value.chunk(2, dim=0)
        _split_shared(out, p, "gate", gate, config.moe_intermediate_size)
        _split_shared(out, p, "up", up, config.moe_intermediate_size)
    elif block == "shared_mlp" and rest == "output_linear.weight":
        _split_shared(out, p, "down", value, config.moe_intermediate_size)
    elif (s := re.match(r"^shared_experts\.(gate|up|down)_proj\.weight$", rest)):  # DeepSeek
        _split_shared(out, p, s.group(1), value, config.moe_intermediate_size)
    elif (e := re.match(r"^experts\.(\d+)\.(w1|w2|w3)\.weight$", rest)):  # Mixtral's Hub names
        name = {w: ours for ours, w in _MIXTRAL_NAMES.items()}[e.group(2)]
        out[f"{p}experts.{e.group(1)}.{name}_proj.weight"] = value
    else:
        out[p + rest if block != "shared_mlp" else key] = value
    return out


def our_state_dict_from_hf(config: MiniMindConfig, model_type: str, sd: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
    """HF names (per-expert Hub layout or transformers 5's fused 3-D experts) → ours, in fp32.

    Keys that map to nothing are reported by the strict load that follows, never dropped
    silently; only recomputed RoPE buffers (``rotary_emb.inv_freq``) are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        out.update(hf_tensor_to_ours(config, model_type, key, value))
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # restored from embed_tokens by the loader below
    return {k: v.contiguous() for k, v in out.items()}


def load_into_model(config: MiniMindConfig, sd: dict[str, torch.Tensor], source: str
                    ) -> MiniMindLM:
    """A ``MiniMindLM`` holding ``sd`` (our names), loaded strictly with a readable error."""
    sd = dict(sd)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        head = sd.get("lm_head.weight")
        if head is not None and not torch.equal(head.float(), sd["model.embed_tokens.weight"].float()):
            raise ConversionError(f"{source}: tie_word_embeddings is set but lm_head.weight differs "
                                  "from model.embed_tokens.weight")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model = MiniMindLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{source}: weights do not match the config: "
                              f"missing {_few(missing)}; unexpected {_few(unexpected)}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ConversionError(f"{source}: shape mismatch: {_few(bad)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


def _few(items: list[str], n: int = 8) -> str:
    if not items:
        return "none"
    more = f" … (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


# --- files -----------------------------------------------------------------------------------------

# transformers spells dtypes out (config.json "dtype": "bfloat16"); the table is model.precision's.
_HF_NAMES = ("float32", "bfloat16", "float16")


def find_tokenizer_dir(model_dir: str | Path | None) -> Path:
    """The model folder if it carries a tokenizer, else the shipped default ``model/tokenizer``."""
    if model_dir is not None and all((Path(model_dir) / f).is_file() for f in _TOKENIZER_FILES):
        return Path(model_dir)
    return tokenizer.DEFAULT_DIR


def export_hf(model: MiniMindLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              dtype: str = "float32", max_shard_bytes: int | None = None) -> Path:
    """Writes ``model.safetensors`` + ``config.json`` + ``generation_config.json`` + the tokenizer
    files, loadable offline by ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.

    ``max_shard_bytes`` splits the weights into Hub-style ``model-0000i-of-0000n.safetensors``
    shards (each tensor whole, in state-dict order, each shard converted to ``dtype`` only while
    it is written) plus ``model.safetensors.index.json``, written last."""
    if dtype not in _HF_NAMES:
        raise ConversionError(f"dtype {dtype!r} is not one of {list(_HF_NAMES)}")
    config = model.config
    hf_config = hf_config_from_ours(config, dtype)  # refuses before anything is written
    tok_dir = find_tokenizer_dir(None) if tokenizer_dir is None else Path(tokenizer_dir)
    for f in _TOKENIZER_FILES:
        if not (tok_dir / f).is_file():
            raise ConversionError(f"{tok_dir / f}: tokenizer file not found")
    sd = hf_state_dict_from_ours(config, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    weight_dtype = DTYPES[canonical_name(dtype)]
    with new_folder(out_dir) as out_dir:     # a failed first export leaves no half folder
        _write_hf_weights(sd, out_dir, weight_dtype, max_shard_bytes)
        atomic_write_bytes(out_dir / "config.json", _json_bytes(hf_config))
        atomic_write_bytes(out_dir / "generation_config.json",
                           _json_bytes(generation_config_from_ours(config)))
        for f in _TOKENIZER_FILES:
            with atomic_path(out_dir / f) as tmp:
                shutil.copyfile(tok_dir / f, tmp)
    return out_dir


_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _write_hf_weights(sd: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype,
                      max_shard_bytes: int | None) -> None:
    """One ``model.safetensors``, or shards + index; leftovers of an earlier export with another
    layout are removed afterwards so loaders never pick a stale file."""
    itemsize = torch.finfo(dtype).bits // 8
    groups: list[list[str]] = [[]]
    size = 0
    for key, value in sd.items():
        nbytes = value.numel() * itemsize
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if not max_shard_bytes else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, keys in zip(names, groups):
        shard = {k: sd[k].to(dtype).contiguous() for k in keys}  # this shard's copies only
        with atomic_path(out_dir / name) as tmp:
            stable_save_file(shard, tmp, {"format": "pt"})
        del shard
    index = out_dir / "model.safetensors.index.json"
    if max_shard_bytes:
        total = sum(v.numel() for v in sd.values()) * itemsize
        atomic_write_bytes(index, _json_bytes({
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}))
    stale = [f for f in out_dir.iterdir() if f.name not in names and (
        _SHARD_NAME.match(f.name) or f.name == "model.safetensors"
        or (f == index and not max_shard_bytes))]
    for f in stale:
        f.unlink()


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: one safetensors file, sharded safetensors, or a .bin file."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(hf_dir / shard)))
        return sd
    binary = hf_dir / "pytorch_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ModelNotFoundError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or "
                             "pytorch_model.bin")


def import_hf(hf_dir: str | Path) -> MiniMindLM:
    """Builds our model (fp32) from an HF folder of a supported architecture."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{cfg_path}: not found (is {hf_dir} a Hugging Face model folder?)")
    hf = json.loads(cfg_path.read_text())
    config = our_config_from_hf(hf, str(cfg_path))
    sd = our_state_dict_from_hf(config, hf["model_type"], read_hf_state_dict(hf_dir))
    return load_into_model(config, sd, str(hf_dir))


def _hf_weight_files(hf_dir: Path) -> list[Path] | None:
    """The safetensors files of an HF folder (one, or the shards its index names); None if it has
    only ``pytorch_model.bin``."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelNotFoundError(f"{f}: shard named by {index.name} not found")
        return files
    return None


def _write_streamed(config: MiniMindConfig, model_type: str, files: list[Path], out: Path,
                    source: str) -> None:
    """Our ``model.safetensors`` from HF safetensors files, one input tensor at a time.

    Pass 1 reads only the headers and maps meta tensors (``hf_tensor_to_ours``) to get every
    output name and shape; they are checked against the model the config builds (the strict
    load, without building it). Pass 2 writes the safetensors header for those shapes, then each
    converted tensor at its offset as its shard is read: peak memory is one input shard's pages
    plus one converted tensor, whatever the checkpoint's size. The file equals
    ``save_pretrained``'s: fp32 tensors, a tied ``lm_head`` stored once under its embedding name.
    """
    planned: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                meta = torch.empty(fh.get_slice(key).get_shape(), device="meta")
                for name, t in hf_tensor_to_ours(config, model_type, key, meta).items():
                    planned[name] = tuple(t.shape)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    for alias in tied:
        planned.pop(alias, None)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MiniMindLM(config).state_dict().items()
                    if k not in tied}
    missing, unexpected = sorted(set(expected) - set(planned)), sorted(set(planned) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{source}: weights do not match the config: missing "
                              f"{_few(missing)}; unexpected {_few(unexpected)}")
    bad = [f"{k} {planned[k]} != {v}" for k, v in expected.items() if planned[k] != v]
    if bad:
        raise ConversionError(f"{source}: shape mismatch: {_few(bad)}")
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "tied": json.dumps(tied)}}
    offset = 0
    for name in sorted(planned):   # safetensors' own order for fp32: the same bytes as save_pretrained
        end = offset + 4 * math.prod(planned[name])
        header[name] = {"dtype": "F32", "shape": list(planned[name]), "data_offsets": [offset, end]}
        offset = end
    head = header_bytes(header)
    start = len(head)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh_out:
        fh_out.write(head)
        fh_out.truncate(start + offset)
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    for name, t in hf_tensor_to_ours(config, model_type, key,
                                                     fh.get_tensor(key)).items():
                        if name in header:
                            fh_out.seek(start + header[name]["data_offsets"][0])
                            fh_out.write(t.contiguous().numpy().data)


def import_hf_to_folder(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """An HF folder → our model folder; copies the tokenizer files when the folder has them.

    Safetensors checkpoints, single or sharded, are converted tensor by tensor
    (``_write_streamed``): a 16 GB DeepSeek-V2-Lite never sits in memory whole.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    files = _hf_weight_files(hf_dir) if hf_dir.is_dir() else None
    if files is None:  # pytorch_model.bin (or an error naming what is missing)
        save_pretrained(import_hf(hf_dir), out_dir)
    else:
        cfg_path = hf_dir / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(f"{cfg_path}: not found (is {hf_dir} a Hugging Face model "
                                     "folder?)")
        hf = json.loads(cfg_path.read_text())
        config = our_config_from_hf(hf, str(cfg_path))
        with new_folder(out_dir):
            _write_streamed(config, hf["model_type"], files, out_dir / "model.safetensors", str(hf_dir))
            atomic_write_bytes(out_dir / "config.json", config_bytes(config))
    for f in _TOKENIZER_FILES:
        if (Path(hf_dir) / f).is_file():
            with atomic_path(Path(out_dir) / f) as tmp:
                shutil.copyfile(Path(hf_dir) / f, tmp)
    return Path(out_dir)
