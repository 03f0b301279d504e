r"""Tiny random stand-ins of the MoE families the commonsense recipes fine-tune, saved by
transformers itself (config.json + model.safetensors + our tokenizer), so each recipe in
examples/commonsense_benchmark/ runs end to end on a CPU in seconds.

    python scripts/make_moe_standins.py --out out/standins            # every family
    python scripts/make_moe_standins.py --out out/standins --family qwen3moe
    python scripts/convert_model.py import --hf out/standins/qwen3moe --out out/standins/qwen3moe_ours

Each stand-in keeps what makes its family itself (DeepSeek-V2: latent attention without a
q-LoRA, a leading dense layer, a shared expert, greedy softmax routing; DeepSeek-V3: q-LoRA,
sigmoid scores with the aux-free bias, group-limited top-k, a routed scaling factor; Qwen3-MoE:
QK-norm, top-k renormalisation) at sizes kt-kernel accepts (multiples of 32). The vocabulary is
the shipped tokenizer's (6400), so the recipes' data tokenizes as for our own models.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common.atomic import atomic_path
from common.errors import UserError
from convert.hf import find_tokenizer_dir

# Shared sizes: hidden and expert widths are multiples of 32 (kt-kernel), 2 layers.
_COMMON = dict(vocab_size=6400, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "qwen3moe": ("Qwen3MoeConfig", dict(
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6)),
    "deepseek2": ("DeepseekV2Config", dict(
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0, rope_theta=1e4)),
    "deepseek3": ("DeepseekV3Config", dict(
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_theta=1e4)),
}


def make_standin(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write one tiny random HF checkpoint of `family` (a FAMILIES key) to out_dir."""
    import torch
    import transformers
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok_dir = find_tokenizer_dir(None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(tok_dir / name, tmp)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder; each family goes to <out>/<family>")
    p.add_argument("--family", action="append", choices=list(FAMILIES),
                   help="repeatable; default: every family")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for family in args.family or list(FAMILIES):
        print(f"wrote {make_standin(family, Path(args.out) / family, args.seed)}")
