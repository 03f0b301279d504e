"""MiniMindLM: sizes, causality, KV cache, GQA, RoPE/YaRN, padding, loss, save/load."""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import MiniMindConfig
from model.model import KVCache, MiniMindLM, rope_inv_freq

# REFERENCE.md's published sizes (millions, 2 decimals).
PUBLISHED = {"minimind2-small": 25.83, "minimind2": 104.03, "minimind2-moe": 145.03,
             "minimind3": 63.91, "minimind3-moe": 198.42}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_minimind(name):
    cfg = MiniMindConfig.from_preset(name)
    assert round(cfg.num_parameters() / 1e6, 2) == PUBLISHED[name]
    if name == "minimind3-moe":
        assert round(cfg.num_parameters(active=True) / 1e6, 2) == 63.94


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "minimind2-small", "demo-moe"])
def test_closed_form_count_equals_module_count(name):
    cfg = MiniMindConfig.from_preset(name)
    model = MiniMindLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_config_json_round_trip_and_unknown_field(tmp_path):
    cfg = MiniMindConfig.from_preset("tiny-moe", dropout=0.1)
    cfg.to_json(tmp_path / "config.json")
    assert MiniMindConfig.from_json(tmp_path / "config.json") == cfg
    (tmp_path / "bad.json").write_text('{"hidden_size": 64, "hiden_layers": 2}')
    with pytest.raises(ValueError, match="hiden_layers"):
        MiniMindConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MiniMindConfig(num_attention_heads=8, num_key_value_heads=3)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_changing_future_tokens_never_changes_earlier_logits(preset):
    model = MiniMindLM(MiniMindConfig.from_preset(preset)).eval()
    ids = torch.randint(0, 6400, (2, 24))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_cached_decoding_equals_full_forward(preset):
    model = MiniMindLM(MiniMindConfig.from_preset(preset, qk_norm=True)).eval()
    ids = torch.randint(0, 6400, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, batch_size=2, max_len=32)
        steps = [model(ids[:, :8], kv_cache=cache).logits]  # prefill
        steps.append(model(ids[:, 8:13], kv_cache=cache).logits)  # a chunk on top of the cache
        for t in range(13, 20):  # then one token at a time
            steps.append(model(ids[:, t:t + 1], kv_cache=cache).logits)
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    model = MiniMindLM(MiniMindConfig.from_preset("tiny")).eval()
    cache = KVCache(model.config, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def naive_attention(attn, x, cos, sin):
    """Plain multi-head attention written out: explicit scores, causal mask, softmax."""
    B, S, _ = x.shape
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, S, H, D)
    k = attn.k_proj(x).view(B, S, G, D)
    v = attn.v_proj(x).view(B, S, G, D)

    def rot(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([t1 * c[..., : D // 2] - t2 * s[..., : D // 2],
                          t2 * c[..., D // 2:] + t1 * s[..., D // 2:]], dim=-1)

    q, k = rot(q), rot(k)
    k = k.repeat_interleave(H // G, dim=2)  # head h uses kv head h // (H/G)
    v = v.repeat_interleave(H // G, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(S, S).triu(1).bool(), float("-inf"))
    out = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(B, S, H * D)
    return attn.o_proj(out)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_equals_naive_multi_head_attention(kv_heads):
    cfg = MiniMindConfig.from_preset("tiny", num_key_value_heads=kv_heads)
    model = MiniMindLM(cfg).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 10, cfg.hidden_size)
    pos = torch.arange(10)
    cos, sin = model.model.rotary(pos, x.dtype)
    got = attn(x, cos, sin, None, True)
    torch.testing.assert_close(got, naive_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-5)


def test_yarn_frequencies_equal_transformers_reference():
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = MiniMindConfig.from_preset("minimind3", yarn_factor=16.0)
    hf = Qwen3Config(hidden_size=768, num_attention_heads=8, head_dim=96,
                     max_position_embeddings=cfg.max_position_embeddings,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                      "original_max_position_embeddings": 2048,
                                      "beta_fast": 32.0, "beta_slow": 1.0,
                                      "attention_factor": 1.0, "truncate": True})
    ref, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), ref.float(), rtol=1e-6, atol=0)
    assert attention_factor == 1.0


def test_yarn_matches_paper_outside_the_ramp():
    """YaRN §3.2: wavelengths much shorter than the original context are kept, much longer ones
    are interpolated by the factor."""
    cfg = MiniMindConfig.from_preset("minimind3", yarn_factor=16.0)
    base = rope_inv_freq(MiniMindConfig.from_preset("minimind3"))
    yarn = rope_inv_freq(cfg)
    rotations = 2048 * base / (2 * math.pi)  # how often each frequency turns in 2048 positions
    keep, interp = rotations > 40, rotations < 0.5
    assert keep.any() and interp.any()
    torch.testing.assert_close(yarn[keep], base[keep])
    torch.testing.assert_close(yarn[interp], base[interp] / 16)


def test_rope_tables_stay_fp32_after_bf16_cast():
    model = MiniMindLM(MiniMindConfig.from_preset("tiny")).to(torch.bfloat16)
    assert model.model.rotary.cos.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_left_padded_batch_equals_unpadded_rows(preset):
    cfg = MiniMindConfig.from_preset(preset, aux_loss_coef=0.0)
    model = MiniMindLM(cfg).eval()
    rows = [torch.randint(3, 6400, (n,)) for n in (9, 5, 1)]
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r):], mask[i, S - len(r):] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        assert torch.isfinite(batched).all()
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(batched[i, S - len(r):], alone, rtol=1e-5, atol=1e-5)


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = MiniMindLM(MiniMindConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 6400, (2, 8))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits
    terms = [F.cross_entropy(logits[b, t], labels[b, t + 1], reduction="sum")
             for b in range(2) for t in range(7) if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.ce_loss, torch.stack(terms).mean())
    assert out.aux_loss.item() == 0.0 and torch.equal(out.loss, out.ce_loss)
    nothing = model(ids, labels=torch.full_like(ids, -100))
    assert nothing.ce_loss.item() == 0.0


def test_logits_to_keep_returns_last_position_only():
    model = MiniMindLM(MiniMindConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 6400, (2, 8))
    full, last = model(ids).logits, model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 6400)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_init_stds_follow_the_documented_rule():
    cfg = MiniMindConfig.from_preset("demo")
    model = MiniMindLM(cfg)
    layer = model.model.layers[0]
    assert abs(layer.self_attn.q_proj.weight.std().item() - 0.02) < 2e-3
    expected = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    assert abs(layer.mlp.down_proj.weight.std().item() - expected) < 1e-3
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 1e-3
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(layer.input_layernorm.weight, torch.ones(cfg.hidden_size))


def test_upstream_minimind_parameter_names():
    names = set(MiniMindLM(MiniMindConfig.from_preset("minimind3-moe", num_hidden_layers=1))
                .state_dict())
    for key in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.3.down_proj.weight"]:
        assert key in names
    assert not any("rotary" in n for n in names)  # RoPE tables are not weights


def test_loss_under_torch_compile_with_masked_labels_matches_a_naive_reference(tmp_path):
    """torch.compile's AVX2 CPU code for cross_entropy's ignore_index reads the -100 index out
    of bounds (torch 2.13: NaN, a wrong loss, or a corrupted heap); causal_lm_loss masks by hand.
    Run in a subprocess held to AVX2 codegen, with its own inductor cache, on any x86 CPU."""
    import shutil
    import subprocess
    import sys
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile (inductor) needs a C++ compiler on CPU; none found")
    code = """
import torch
from model.model import causal_lm_loss
torch.manual_seed(0)
logits, labels = torch.randn(4, 16, 300), torch.randint(0, 300, (4, 16))
for row in range(4):
    labels[row, :row * 3] = -100
logp = torch.log_softmax(logits[:, :-1], -1)
pairs = [(b, t) for b in range(4) for t in range(15) if labels[b, t + 1] != -100]
naive = -sum(logp[b, t, labels[b, t + 1]] for b, t in pairs) / len(pairs)
got = torch.compile(causal_lm_loss)(logits, labels)
print(abs(got.item() - naive.item()))
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 1e-5, proc.stdout
