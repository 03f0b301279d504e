"""GGUF export (convert/gguf.py): the file's tensors and hyperparameters are what llama.cpp's
architecture expects, read back with the ``gguf`` package's own reader.

Loading the file in llama.cpp itself needs the compiled llama-cpp-python, so that check is
``scripts/check_gguf_llamacpp.py``, kept out of the suite.
"""

from __future__ import annotations

import pytest
import torch

from convert.cli import main as cli
from convert.gguf import export_gguf, rope_halves_to_interleaved
from convert.hf import ConversionError
from model.config import MiniMindConfig
from model.io import save_pretrained
from model.model import MiniMindLM
from model.tokenizer import Tokenizer

MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96)


def tiny(**overrides) -> MiniMindLM:
    torch.manual_seed(0)
    return MiniMindLM(MiniMindConfig.from_preset("tiny", **overrides)).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()

def _interleaved_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's ``llama`` RoPE: rotate adjacent pairs (2i, 2i+1). x: [S, D]."""
    d = x.shape[-1]
    ang = pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)
    a, b = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_rope_permutation_makes_interleaved_scores_equal():
    from model.model import apply_rope
    torch.manual_seed(0)
    heads, d, d_in, S, theta = 2, 8, 16, 5, 1e4
    wq, wk, x = torch.randn(heads * d, d_in), torch.randn(heads * d, d_in), torch.randn(S, d_in)
    pos = torch.arange(S)
    ang = pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)
    emb = torch.cat([ang, ang], -1)
    q = apply_rope((x @ wq.T).view(1, S, heads, d), emb.cos(), emb.sin())[0]
    k = apply_rope((x @ wk.T).view(1, S, heads, d), emb.cos(), emb.sin())[0]
    qp = (x @ rope_halves_to_interleaved(wq, heads).T).view(S, heads, d)
    kp = (x @ rope_halves_to_interleaved(wk, heads).T).view(S, heads, d)
    for h in range(heads):
        ours = q[:, h] @ k[:, h].T
        theirs = _interleaved_rope(qp[:, h], pos, theta) @ _interleaved_rope(kp[:, h], pos, theta).T
        assert max_diff(ours, theirs) < 1e-4


@pytest.mark.parametrize("qk_norm", [False, True])
def test_gguf_export_reads_back(tmp_path, qk_norm):
    gguf = pytest.importorskip("gguf")
    model = tiny(qk_norm=qk_norm, tie_word_embeddings=not qk_norm)
    path = tmp_path / "m.gguf"
    cli(["gguf", "--model", str(save_pretrained(model, tmp_path / "m")), "--out", str(path)])
    r = gguf.GGUFReader(str(path))

    def field(name):
        f = r.fields[name]
        return f.contents()

    arch = "qwen3" if qk_norm else "llama"
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == 2 and field(f"{arch}.attention.head_count_kv") == 2
    assert field(f"{arch}.rope.freq_base") == 1e6
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "qwen2"
    tok = Tokenizer.from_dir()
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 6400 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field("tokenizer.ggml.token_type")[:4] == [3, 3, 3, 4]
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert field("tokenizer.chat_template") == tok.chat_template
    tensors = {t.name: t for t in r.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
         "ffn_up", "ffn_down"] + (["attn_q_norm", "attn_k_norm"] if qk_norm else [])}
    expected |= set() if not qk_norm else {"output.weight"}
    assert set(tensors) == expected
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    want = q if qk_norm else rope_halves_to_interleaved(q, 4)  # llama arch: interleaved rows
    got = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy()).reshape(want.shape)
    assert torch.equal(got, want)
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [192, 64]  # ggml order: (in, out)


def _arch_tensor_names(arch: str, n_layers: int) -> set[str]:
    """Every tensor name llama.cpp's architecture knows, from the gguf package's own tables."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
    (key,) = [k for k, v in MODEL_ARCH_NAMES.items() if v == arch]
    return {TENSOR_NAMES[t].format(bid=i) + ".weight"
            for t in MODEL_TENSORS[key] for i in range(n_layers)}


@pytest.mark.parametrize("qk_norm, arch", [(True, "qwen3moe"), (False, "llama")])
def test_moe_export_stacks_experts_as_llama_cpp_expects(tmp_path, qk_norm, arch):
    gguf = pytest.importorskip("gguf")
    model = tiny(**MOE, qk_norm=qk_norm)
    r = gguf.GGUFReader(str(export_gguf(model, tmp_path / "m.gguf")))

    def field(name):
        return r.fields[name].contents()

    assert field("general.architecture") == arch
    assert (field(f"{arch}.expert_count"), field(f"{arch}.expert_used_count"),
            field(f"{arch}.expert_feed_forward_length")) == (4, 2, 96)
    # llama.cpp's llama arch sizes Mixtral experts by feed_forward_length (it has no dense FFN)
    assert field(f"{arch}.feed_forward_length") == (192 if arch == "qwen3moe" else 96)
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) <= _arch_tensor_names(arch, 2)      # names llama.cpp's arch declares
    moe = {f"blk.{i}.{n}.weight" for i in range(2)
           for n in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    assert moe <= set(tensors) and not any("ffn_gate.weight" in n for n in tensors)
    # ggml lists dims innermost first: [D, I, E] for gate/up, [I, D, E] for down, [D, E] router
    assert list(tensors["blk.1.ffn_up_exps.weight"].shape) == [64, 96, 4]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [96, 64, 4]
    assert list(tensors["blk.1.ffn_gate_inp.weight"].shape) == [64, 4]
    layer = model.model.layers[1].mlp
    for e in range(4):   # expert e of the stack is our expert e, value for value
        got = torch.from_numpy(tensors["blk.1.ffn_down_exps.weight"].data[e].copy())
        assert torch.equal(got, layer.experts[e].down_proj.weight.detach())
    router = torch.from_numpy(tensors["blk.1.ffn_gate_inp.weight"].data.copy())
    assert torch.equal(router, layer.gate.weight.detach())


def test_moe_export_in_float16_keeps_the_router_float32(tmp_path):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(export_gguf(tiny(**MOE, qk_norm=True), tmp_path / "m.gguf",
                                        outtype="f16")))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


MLA = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
           num_key_value_heads=4, first_k_dense_replace=1, n_shared_experts=2)
FAMILIES = {  # name → (overrides of "tiny", llama.cpp arch, hparams it must carry)
    "deepseek_v3": (dict(MLA, q_lora_rank=24, topk_method="noaux_tc", n_group=2, topk_group=1,
                         routed_scaling_factor=2.5), "deepseek2",
                    {"attention.head_count_kv": 1, "attention.key_length": 40,
                     "attention.value_length": 32, "attention.key_length_mla": 24,
                     "attention.value_length_mla": 16, "rope.dimension_count": 8,
                     "attention.q_lora_rank": 24, "attention.kv_lora_rank": 32,
                     "leading_dense_block_count": 1, "expert_shared_count": 2,
                     "expert_weights_scale": 2.5, "expert_weights_norm": True,
                     "expert_gating_func": 2, "expert_group_count": 2,
                     "expert_group_used_count": 1}),
    "deepseek_v2_lite": (dict(MLA, norm_topk_prob=False), "deepseek2",
                         {"attention.q_lora_rank": 0, "expert_gating_func": 1,
                          "expert_weights_norm": False, "expert_weights_scale": 1.0}),
    "qwen2_moe": (dict(MOE, moe_intermediate_size=32, shared_expert_gate=True,
                       shared_expert_intermediate_size=48, attention_bias=True,
                       norm_topk_prob=False), "qwen2moe",
                  {"expert_shared_feed_forward_length": 48, "attention.head_count_kv": 2}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_deepseek_and_qwen2_moe_exports_are_what_llama_cpp_loads(tmp_path, name):
    """Names from llama.cpp's tables, its hparams (MLA as MQA over the latent), kv_b split into
    the absorbed k_b/v_b pair, shared experts concatenated into one, biases kept."""
    gguf = pytest.importorskip("gguf")
    overrides, arch, hparams = FAMILIES[name]
    model = tiny(**overrides)
    with torch.no_grad():   # non-zero biases, so a dropped one shows
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_()
    r = gguf.GGUFReader(str(export_gguf(model, tmp_path / "m.gguf")))
    assert r.fields["general.architecture"].contents() == arch
    for key, want in hparams.items():
        assert r.fields[f"{arch}.{key}"].contents() == pytest.approx(want), key
    t = {x.name: torch.from_numpy(x.data.copy()) for x in r.tensors}
    assert {n.rsplit(".", 1)[0] for n in t} <= {n.rsplit(".", 1)[0]
                                                for n in _arch_tensor_names(arch, 2)}
    sd = model.state_dict()
    if arch == "deepseek2":
        assert "blk.0.ffn_gate.weight" in t and "blk.0.ffn_gate_inp.weight" not in t  # dense lead
        kv_b = sd["model.layers.1.self_attn.kv_b_proj.weight"]               # [H·(16+16), 32]
        for h in range(4):
            rows = kv_b[h * 32:(h + 1) * 32]
            assert torch.equal(t["blk.1.attn_k_b.weight"][h], rows[:16].T)   # [r, nope]
            assert torch.equal(t["blk.1.attn_v_b.weight"][h], rows[16:])     # [v, r]
        down = t["blk.1.ffn_down_shexp.weight"]                              # two experts' sum
        assert torch.equal(down, torch.cat([sd[f"model.layers.1.mlp.shared_experts.{e}.down_proj"
                                               ".weight"] for e in range(2)], dim=1))
        bias = "model.layers.1.mlp.gate.e_score_correction_bias"
        assert ("blk.1.exp_probs_b.bias" in t) == (bias in sd)
        if bias in sd:
            assert torch.equal(t["blk.1.exp_probs_b.bias"], sd[bias])
    else:
        assert torch.equal(t["blk.0.attn_q.bias"], sd["model.layers.0.self_attn.q_proj.bias"])
        assert torch.equal(t["blk.0.ffn_gate_inp_shexp.weight"],
                           sd["model.layers.0.mlp.shared_expert_gate.weight"][0])
        assert "output.weight" in t             # llama.cpp's qwen2moe has no tied-output fallback


@pytest.mark.parametrize("overrides, match", [
    (dict(n_shared_experts=1), "shared experts"),
    (dict(norm_topk_prob=False), "renormalise"),
    (dict(yarn_factor=4.0, yarn_original_max_position_embeddings=128), "YaRN"),
    (dict(MLA, topk_method="group_limited_greedy", n_group=2, topk_group=1), "top-2 sum"),
    (dict(MLA, rope_interleave=False), "half-rotation"),
    (dict(MLA, use_moe=False), "dense MLA"),
    (dict(first_k_dense_replace=1), "deepseek2 only"),
    (dict(MOE, shared_expert_gate=True, shared_expert_intermediate_size=48), "never renormalises"),
])
def test_unfaithful_gguf_exports_are_refused(tmp_path, overrides, match):
    with pytest.raises(ConversionError, match=match):
        export_gguf(tiny(**{**MOE, **overrides}), tmp_path / "x.gguf")


# ---- quantized exports -------------------------------------------------------------------------

def _naive_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's reference Q8_0 (ggml-quants.c), block by block along each row: d = max|x| / 127,
    q = round(x / d) (halves away from zero), d stored as fp16; → (dequantized, d per value)."""
    out, scale = torch.empty_like(w), torch.empty_like(w)
    for row in range(w.shape[0]):
        for b in range(0, w.shape[1], 32):
            x = w[row, b:b + 32].double()
            d = float(x.abs().max()) / 127
            y = x / d if d else torch.zeros_like(x)
            q = torch.sign(y) * torch.floor(y.abs() + 0.5)
            d16 = float(torch.tensor(d).half())
            out[row, b:b + 32], scale[row, b:b + 32] = (q * d16).float(), d
    return out, scale


def _naive_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's reference Q4_0: m = the value of largest magnitude (signed), d = m / -8,
    q = min(15, floor(x / d + 8.5)) in 0..15, value (q - 8) · fp16(d)."""
    out, scale = torch.empty_like(w), torch.empty_like(w)
    for row in range(w.shape[0]):
        for b in range(0, w.shape[1], 32):
            x = w[row, b:b + 32].double()
            d = float(x[x.abs().argmax()]) / -8
            q = torch.clamp(torch.floor(x / d + 8.5), 0, 15) if d else torch.full_like(x, 8)
            d16 = float(torch.tensor(d).half())
            out[row, b:b + 32], scale[row, b:b + 32] = ((q - 8) * d16).float(), abs(d)
    return out, scale


def _read_dequantized(path) -> dict[str, tuple[object, torch.Tensor]]:
    """name → (ggml type, values as torch [out, in]), dequantized by the gguf package's reader."""
    import gguf
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, torch.from_numpy(
        gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()) for t in r.tensors}


@pytest.mark.parametrize("outtype, naive, max_step", [("q8_0", _naive_q8_0, 0.57),
                                                      ("q4_0", _naive_q4_0, 1.01)])
def test_quantized_export_matches_a_naive_block_quantizer(tmp_path, outtype, naive, max_step):
    """Every quantized matrix equals ggml's reference quantizer written out here block by block,
    and stays within its step of our weight (q8_0: half a step plus fp16's rounding of d; q4_0:
    a whole step, where the clamp at 15 cuts the value opposite the block's extreme); the
    norms are exact float32; rows that are not whole 32-value blocks fall back to f16; at 4 bits
    the (tied) output matrix is Q8_0, as llama-quantize keeps it at 6-8 bits."""
    gguf = pytest.importorskip("gguf")
    model = tiny(intermediate_size=200)      # ffn_down's rows are 200 long: not whole blocks
    got = _read_dequantized(export_gguf(model, tmp_path / "m.gguf", outtype=outtype))
    T = gguf.GGMLQuantizationType
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    layer = "model.layers.1."
    cases = {"blk.1.attn_q.weight": (sd[layer + "self_attn.q_proj.weight"], T[outtype.upper()]),
             "blk.1.ffn_up.weight": (sd[layer + "mlp.up_proj.weight"], T[outtype.upper()]),
             "token_embd.weight": (sd["model.embed_tokens.weight"][:40],
                                   T.Q8_0)}   # tied: the output matrix
    for name, (want, qtype) in cases.items():
        kind, values = got[name]
        assert kind == qtype, name
        rows = want.shape[0]
        if name == "blk.1.attn_q.weight":   # the llama arch permutes q's rows for its RoPE
            want = rope_halves_to_interleaved(want, 4)
        ref, d = (_naive_q8_0 if kind == T.Q8_0 else naive)(want)
        assert torch.equal(values[:rows], ref), name
        assert ((values[:rows] - want).abs() <= max_step * d + 1e-12).all(), name
    kind, values = got["blk.1.ffn_down.weight"]
    assert kind == T.F16 and max_diff(values, sd[layer + "mlp.down_proj.weight"]) < 1e-3
    kind, values = got["blk.1.attn_norm.weight"]
    assert kind == T.F32 and torch.equal(values, sd[layer + "input_layernorm.weight"])


def test_q4_0_keeps_an_untied_output_at_q8_0_and_the_embedding_at_q4_0(tmp_path):
    gguf = pytest.importorskip("gguf")
    got = _read_dequantized(export_gguf(tiny(tie_word_embeddings=False, **MOE),
                                        tmp_path / "m.gguf", outtype="q4_0"))
    T = gguf.GGMLQuantizationType
    assert got["output.weight"][0] == T.Q8_0 and got["token_embd.weight"][0] == T.Q4_0
    assert got["blk.0.ffn_up_exps.weight"][0] == T.Q4_0        # experts [E, I, D]: rows of D
    assert got["blk.0.ffn_gate_inp.weight"][0] == T.F32        # the router is never quantized


def test_bad_outtype_is_one_line_and_k_quants_need_llama_cpp(tmp_path):
    folder = save_pretrained(tiny(), tmp_path / "m")
    with pytest.raises(ConversionError, match="'q9' is not one of"):
        cli(["gguf", "--model", str(folder), "--out", str(tmp_path / "x.gguf"), "--outtype", "q9"])
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(ConversionError, match="pip install llama-cpp-python"):
            export_gguf(tiny(), tmp_path / "k.gguf", outtype="q4_k_m")
        return
    gguf = pytest.importorskip("gguf")
    got = _read_dequantized(export_gguf(tiny(), tmp_path / "k.gguf", outtype="q4_k_m"))
    # llama.cpp's choices for rows of 64 (not whole 256-value K blocks): its own fallbacks
    assert got["blk.0.attn_norm.weight"][0] == gguf.GGMLQuantizationType.F32
    assert {got[n][0] for n in got if n.endswith(("attn_q.weight", "ffn_up.weight"))} - {
        gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16} != set()
    w = tiny().model.layers[0].mlp.up_proj.weight.detach()
    assert max_diff(got["blk.0.ffn_up.weight"][1], w) < 0.25 * w.abs().max()
