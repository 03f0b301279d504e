"""Multi-head latent attention (model/attention.py MLAttention) and its latent KV cache.

Parity with transformers' DeepSeek-V2/V3 attention is checked model-wide in test_hf_convert.py;
here: decoding from the latent cache equals the full forward, the cache holds latents (sizes by
hand against the expanded K/V), the YaRN softmax scale equals DeepSeek's formula, LoRA's
``all_attention`` reaches every MLA projection, and a DeepSeek-V3-style model (dense first layer,
sigmoid group routing, shared expert) runs its routed experts on the cpu and kt backends.
``python tests/test_mla.py kt`` is the kt check's own process (a kt-kernel crash kills only it).
"""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import MiniMindConfig
from model.lora import apply_lora, lora_parameters, resolve_lora_targets
from model.model import KVCache, MiniMindLM, kv_bytes_per_token
from offload.experts import kt_status, offload_experts

KT_OK, KT_WHY = kt_status()


def mla_model(**overrides) -> MiniMindLM:
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny-mla-moe", **overrides)).eval()
    with torch.no_grad():  # norms away from 1 so a skipped latent/q norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(q_lora_rank=0, rope_interleave=False, yarn_factor=4.0, yarn_mscale_all_dim=0.707,
         yarn_original_max_position_embeddings=64),
], ids=["q_lora+interleave", "q_proj+yarn"])
@torch.no_grad()
def test_decoding_from_the_latent_cache_equals_the_full_forward(overrides):
    model = mla_model(**overrides)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    full = model(ids).logits
    cache = KVCache(model.config, batch_size=2, max_len=16)
    steps = [model(ids[:, :6], kv_cache=cache).logits]
    steps += [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # Left padding through the cache: row 0 padded by 3 gives its unpadded logits.
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    cache = KVCache(model.config, batch_size=2, max_len=16)
    model(ids[:, :8], attention_mask=mask[:, :8], kv_cache=cache)
    last = model(ids[:, 8:9], attention_mask=mask[:, :9], kv_cache=cache).logits[0, -1]
    torch.testing.assert_close(last, model(ids[:1, 3:9]).logits[0, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_latent_space_attention_equals_the_expanded_keys_and_values(monkeypatch):
    """Weight absorption (chosen for decoding by cost) against expanding every cached latent, on
    a prefill (is_causal), a chunk appended to the cache (explicit mask) and one padded token."""
    from model.attention import MLAttention
    model = mla_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    runs = {}
    for absorb in (True, False):
        monkeypatch.setattr(MLAttention, "_absorb", lambda self, S, T, a=absorb: a)
        cache = KVCache(model.config, batch_size=2, max_len=9)
        runs[absorb] = [model(ids[:, :5], kv_cache=cache).logits,
                        model(ids[:, 5:8], kv_cache=cache).logits,
                        model(ids[:, 8:], attention_mask=mask, kv_cache=cache).logits]
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_cache_holds_latent_and_rope_key_not_expanded_kv():
    cfg = MiniMindConfig.from_preset("tiny-mla-moe")
    cache = KVCache(cfg, batch_size=3, max_len=20)
    assert cache.k.shape == (cfg.num_hidden_layers, 3, 1, 20, cfg.kv_lora_rank)
    assert cache.v.shape == (cfg.num_hidden_layers, 3, 1, 20, cfg.qk_rope_head_dim)
    # Per token and layer: R + Dr numbers cached vs H·(Dn + Dr) keys + H·Dv values expanded.
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 2 * (32 + 16) * 2
    assert kv_bytes_per_token(cfg, torch.bfloat16, expanded=True) == 2 * 4 * (16 + 16 + 16) * 2
    # DeepSeek-V2-Lite's sizes (27 layers, 16 heads, R 512, Dr 64, Dn = Dv = 128): 8.9x smaller.
    lite = MiniMindConfig(hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                          num_key_value_heads=16, kv_lora_rank=512, qk_rope_head_dim=64,
                          qk_nope_head_dim=128, v_head_dim=128, vocab_size=64)
    latent, expanded = (kv_bytes_per_token(lite, torch.bfloat16, e) for e in (False, True))
    assert (latent, expanded) == (27 * 576 * 2, 27 * 16 * (192 + 128) * 2)
    print(f"\nDeepSeek-V2-Lite bf16 KV cache per token: latent {latent} B vs expanded "
          f"{expanded} B ({expanded / latent:.1f}x)")


def test_yarn_softmax_scale_is_deepseeks_mscale_squared():
    model = mla_model(yarn_factor=40.0, yarn_mscale_all_dim=1.0,
                      yarn_original_max_position_embeddings=64)
    mscale = 0.1 * 1.0 * math.log(40.0) + 1.0  # DeepSeek-V2 yarn_get_mscale(40, 1)
    assert model.model.layers[0].self_attn.scale == pytest.approx((16 + 16) ** -0.5 * mscale ** 2)
    assert mla_model().model.layers[0].self_attn.scale == pytest.approx(32 ** -0.5)


def test_all_attention_lora_covers_every_mla_projection():
    model = mla_model()
    names = resolve_lora_targets(model, "all_attention")
    leaves = {n.rsplit(".", 1)[1] for n in names}
    assert leaves == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert len(names) == 5 * model.config.num_hidden_layers
    everything = resolve_lora_targets(model, "all")
    assert "model.layers.1.mlp.experts.3.down_proj" in everything
    assert "model.layers.1.mlp.shared_experts.0.up_proj" in everything
    assert "model.layers.1.mlp.gate" not in everything
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        base = model(ids).logits
        apply_lora(model, "all", rank=4, alpha=8)
        torch.testing.assert_close(model(ids).logits, base)  # B = 0: step 0 is the base model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def lora_model_pair(backend: str, **kt) -> dict:
    """LoRA (non-zero B) on everything of tiny-mla-moe; routed experts on ``backend`` vs torch:
    relative error of the logits and of the expert / other LoRA gradients of one backward."""
    model = mla_model()
    apply_lora(model, "all", rank=8, alpha=16)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(model)
    offload_experts(model, backend, **kt)
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    out, grads = {}, {}
    for tag, m in (("got", model), ("ref", ref)):
        result = m(ids, labels=ids)
        result.loss.backward()
        out[tag] = result.logits
        for n, p in m.named_parameters():
            if p.grad is not None:
                grads.setdefault((tag, ".experts." in n), []).append(p.grad.flatten())
    return {"y": rel(out["got"], out["ref"]),
            "grad_experts": rel(torch.cat(grads["got", True]), torch.cat(grads["ref", True])),
            "grad_other": rel(torch.cat(grads["got", False]), torch.cat(grads["ref", False]))}


def test_cpu_backend_runs_the_routed_experts_exactly():
    err = lora_model_pair("cpu")
    assert max(err.values()) < 1e-6, err


@pytest.mark.skipif(not KT_OK, reason=f"kt backend unavailable: {KT_WHY}")
def test_kt_backend_meets_the_precision_bars():
    proc = subprocess.run([sys.executable, __file__, "kt"], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KT_RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-3000:]
    err = json.loads(lines[-1].removeprefix("KT_RESULT "))
    assert err["y"] < 0.05 and err["grad_experts"] < 0.10 and err["grad_other"] < 0.10, err


if __name__ == "__main__" and sys.argv[1:] == ["kt"]:
    torch.set_num_threads(1)
    result = lora_model_pair("kt", kt_num_threads=1)
    sys.stdout.flush()
    print("KT_RESULT " + json.dumps(result), flush=True)
