"""Peak memory of importing a sharded Hugging Face checkpoint, as a ratio to its size.

Scope: writes a synthetic DeepSeek-V2-shaped checkpoint (MLA, a dense first layer, routed and
shared experts; random bf16 tensors) as Hub-style shards ``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``, then converts it in a fresh child process and reports the
child's peak resident memory (``VmHWM``, which counts the shard pages safetensors maps in) over
the checkpoint's size, and the same above a child that only imports the converter:

- ``streamed``: ``import_hf_to_folder`` (the converter's path: tensor by tensor, the output
  written as it goes);
- ``in-memory`` (``--compare``): ``import_hf`` + ``save_pretrained``, the whole state dict and
  model in fp32 at once (what the converter did before, and what most converters do).

Usage: ``python scripts/bench_convert.py [--size_gb 2.5] [--shard_mb 500] [--compare]
[--dir /tmp/bench_convert]``. The folder is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# DeepSeek-V2-Lite's attention and expert shapes, with fewer experts so a few GB hold many layers.
HIDDEN, HEADS, KV_RANK, ROPE, NOPE, V, FFN, MOE_FFN, EXPERTS, SHARED = (
    2048, 16, 512, 64, 128, 128, 10944, 1408, 16, 2)


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    shapes = {
        p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HEADS * (NOPE + ROPE), HIDDEN),
        p + "self_attn.kv_a_proj_with_mqa.weight": (KV_RANK + ROPE, HIDDEN),
        p + "self_attn.kv_a_layernorm.weight": (KV_RANK,),
        p + "self_attn.kv_b_proj.weight": (HEADS * (NOPE + V), KV_RANK),
        p + "self_attn.o_proj.weight": (HIDDEN, HEADS * V),
    }
    if i == 0:
        return shapes | {p + f"mlp.{n}_proj.weight": s for n, s in (
            ("gate", (FFN, HIDDEN)), ("up", (FFN, HIDDEN)), ("down", (HIDDEN, FFN)))}
    shapes[p + "mlp.gate.weight"] = (EXPERTS, HIDDEN)
    for e in range(EXPERTS):
        for n, s in (("gate", (MOE_FFN, HIDDEN)), ("up", (MOE_FFN, HIDDEN)),
                     ("down", (HIDDEN, MOE_FFN))):
            shapes[p + f"mlp.experts.{e}.{n}_proj.weight"] = s
    for n, s in (("gate", (SHARED * MOE_FFN, HIDDEN)), ("up", (SHARED * MOE_FFN, HIDDEN)),
                 ("down", (HIDDEN, SHARED * MOE_FFN))):
        shapes[p + f"mlp.shared_experts.{n}_proj.weight"] = s
    return shapes


def write_checkpoint(folder: Path, size_gb: float, shard_mb: int) -> int:
    """Shards of random bf16 tensors, layer after layer until ``size_gb``; returns the bytes."""
    vocab = 32000
    per_layer = sum(torch.Size(s).numel() for s in layer_shapes(1).values()) * 2
    layers = max(2, round((size_gb * 1e9 - 2 * vocab * HIDDEN * 2) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(layers):
        shapes |= layer_shapes(i)
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab, HIDDEN)}
    groups, size = [[]], 0
    for name, s in shapes.items():
        nbytes = torch.Size(s).numel() * 2
        if groups[-1] and size + nbytes > shard_mb * 1e6:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map |= dict.fromkeys(names, fname)
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "moe_intermediate_size": MOE_FFN, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "kv_lora_rank": KV_RANK,
        "q_lora_rank": None, "qk_rope_head_dim": ROPE, "qk_nope_head_dim": NOPE,
        "v_head_dim": V, "n_routed_experts": EXPERTS, "n_shared_experts": SHARED,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "topk_method": "greedy",
        "routed_scaling_factor": 1.0, "norm_topk_prob": False, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False,
        "bos_token_id": 100000, "eos_token_id": 100001}))
    print(f"checkpoint: {layers} layers, {len(groups)} shards, {total / 1e9:.2f} GB bf16")
    return total


CHILD = {
    "baseline": "import convert.hf",  # interpreter + torch + safetensors, nothing converted
    "streamed": "from convert.hf import import_hf_to_folder as f; f({src!r}, {out!r})",
    "in-memory": ("from convert.hf import import_hf; from model.io import save_pretrained; "
                  "save_pretrained(import_hf({src!r}), {out!r})"),
}


def measure(path: str, src: Path, out: Path) -> tuple[float, float]:
    """(peak RSS bytes, seconds) of one conversion in a fresh interpreter."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from this (large) parent.
    code = (CHILD[path].format(src=str(src), out=str(out)) + "; print([l.split()[1] for l in "
            "open('/proc/self/status') if l.startswith('VmHWM')][0])")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) * 1024, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size_gb", type=float, default=2.5)
    ap.add_argument("--shard_mb", type=int, default=500)
    ap.add_argument("--compare", action="store_true", help="also run the in-memory path")
    ap.add_argument("--dir", default="/tmp/bench_convert")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    try:
        size = write_checkpoint(root / "hf", args.size_gb, args.shard_mb)
        print(f"{'path':<10} {'peak RSS GB':>12} {'/ checkpoint':>13} {'above baseline':>15} "
              f"{'/ checkpoint':>13} {'seconds':>8}")
        base = 0
        for path in ["baseline", "streamed"] + (["in-memory"] if args.compare else []):
            peak, secs = measure(path, root / "hf", root / path)
            base = base or peak
            print(f"{path:<10} {peak / 1e9:>12.3f} {peak / size:>13.3f} {(peak - base) / 1e9:>15.3f} "
                  f"{(peak - base) / size:>13.3f} {secs:>8.1f}")
            shutil.rmtree(root / path, ignore_errors=True)
        largest = max(p.stat().st_size for p in (root / "hf").glob("model-*"))
        print(f"(largest shard {largest / 1e9:.2f} GB)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
