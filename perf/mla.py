"""One MLA decode step from the latent cache: latent-space attention (weight absorption) vs
expanding every cached latent into keys and values, side by side in one run.

Scope: one ``MLAttention`` layer with DeepSeek-V2-Lite's sizes (hidden 2048, 16 heads,
kv_lora_rank 512, rope 64, nope 128, value 128), fp32, batch 1, T cached tokens, one new token.
Prints ms per step (best of 3 × 10 steps) and the ratio; the outputs must agree.

Usage: ``python scripts/bench_mla.py [--cached 256 2048]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from model.attention import MLAttention, RotaryEmbedding
from model.config import MiniMindConfig
from model.model import KVCache

LITE = dict(hidden_size=2048, num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=16,
            kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
            vocab_size=64, max_position_embeddings=8192)


@torch.no_grad()
def step_ms(att: MLAttention, rot: RotaryEmbedding, cache: KVCache, T: int, absorb: bool):
    att._absorb = lambda S, T_: absorb  # instance override of the cost rule, this run only
    x = torch.randn(1, 1, att.o_proj.out_features, generator=torch.Generator().manual_seed(1))
    cos, sin = rot(torch.tensor([T]), torch.float32)
    best, out = float("inf"), None
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(10):
            cache.pos = T  # re-decode the same position: the cache never grows
            out = att(x, cos, sin, None, False, cache, 0)
        best = min(best, (time.perf_counter() - start) / 10)
    del att._absorb
    return best * 1e3, out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cached", type=int, nargs="+", default=[256, 2048])
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = MiniMindConfig(**LITE)
    att, rot = MLAttention(cfg).eval(), RotaryEmbedding(cfg)
    print(f"{'cached':>7} {'absorbed ms':>12} {'expanded ms':>12} {'speed-up':>9} {'max |Δ|':>9}")
    for T in args.cached:
        cache = KVCache(cfg, 1, T + 1)
        cos, sin = rot(torch.arange(T), torch.float32)
        att(torch.randn(1, T, cfg.hidden_size) * 0.5, cos, sin, None, True, cache, 0)  # prefill
        (a_ms, a), (e_ms, e) = (step_ms(att, rot, cache, T, absorb) for absorb in (True, False))
        print(f"{T:>7} {a_ms:>12.2f} {e_ms:>12.2f} {e_ms / a_ms:>8.1f}x {(a - e).abs().max():>9.1e}")
