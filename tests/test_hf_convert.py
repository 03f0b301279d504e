"""Conversion to and from transformers / upstream MiniMind (convert/hf.py).

Parity is checked against transformers itself (built offline from configs, never downloaded):
fp32 logits must agree to max |Δ| < 1e-4 and greedy decoding must pick the same tokens.
Norm weights are perturbed away from 1 so a dropped or misplaced RMSNorm (QK-norm above all) shows.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from model.config import MiniMindConfig  # noqa: E402
from convert.hf import (ConversionError, choose_hf_model_type, export_hf,  # noqa: E402
                        hf_config_from_ours, import_hf, our_config_from_hf,
                        our_state_dict_from_hf)
from convert.minimind import load_minimind_pth  # noqa: E402
from model.io import load_pretrained, save_pretrained  # noqa: E402
from model.model import MiniMindLM  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from convert.cli import main as cli  # noqa: E402

TOL = 1e-4
MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96)
CASES = {  # name → (overrides of the "tiny" preset, expected transformers class)
    "llama": (dict(), "LlamaForCausalLM"),
    "llama-untied": (dict(tie_word_embeddings=False), "LlamaForCausalLM"),
    "llama-head_dim": (dict(head_dim=24), "LlamaForCausalLM"),
    "qwen3": (dict(qk_norm=True, head_dim=24), "Qwen3ForCausalLM"),
    "qwen3_moe": (dict(MOE, qk_norm=True, norm_topk_prob=False), "Qwen3MoeForCausalLM"),
    "mixtral": (dict(MOE), "MixtralForCausalLM"),
    "granite": (dict(MOE, n_shared_experts=2), "GraniteMoeSharedForCausalLM"),
}


def perturb_norms(model: torch.nn.Module, scale: float = 0.2) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * scale)


def tiny(**overrides) -> MiniMindLM:
    model = MiniMindLM(MiniMindConfig.from_preset("tiny", **overrides)).eval()
    perturb_norms(model)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def our_greedy(model: MiniMindLM, ids: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Independent of model/generate.py: recompute the whole prefix each step, stop at eos."""
    out = ids[0].tolist()
    for _ in range(steps):
        nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out


def load_hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --- export ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_export_logits_match_transformers(tmp_path, name):
    overrides, cls = CASES[name]
    model = tiny(**overrides)
    export_hf(model, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == cls
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        diff = max_diff(model(ids).logits, hf(ids).logits)
    assert diff < TOL, f"{name}: max |Δlogit| = {diff:.2e}"
    # and back: import of our own export is exact
    with torch.no_grad():
        assert max_diff(model(ids).logits, import_hf(tmp_path)(ids).logits) == 0.0


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe", "granite"])
def test_greedy_tokens_match_transformers_generate(tmp_path, name):
    model = tiny(**CASES[name][0])
    export_hf(model, tmp_path)
    hf = load_hf(tmp_path)
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    ours = our_greedy(model, ids, 12, model.config.eos_token_id)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12)[0].tolist()
    assert ours == theirs


def test_export_files_and_tokenizer(tmp_path):
    model = tiny()
    export_hf(model, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    hf_tok, ours = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_dir()
    text = "Tom has 12 apples. <think>\nhm\n</think> 你好"
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (ours.eos_id, ours.pad_id)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs, add_generation_prompt=True)


def test_bfloat16_export(tmp_path):
    from safetensors import safe_open
    export_hf(tiny(qk_norm=True), tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in f.keys()  # tied: Hub checkpoints leave it out


def test_yarn_maps_to_rope_parameters_and_matches_past_original_context(tmp_path):
    model = tiny(qk_norm=True, yarn_factor=4.0, yarn_original_max_position_embeddings=64,
                 max_position_embeddings=256, yarn_attention_factor=1.0)
    rp = hf_config_from_ours(model.config)["rope_parameters"]
    assert rp == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                  "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                  "attention_factor": 1.0, "truncate": True}
    assert hf_config_from_ours(tiny().config)["rope_parameters"] == {"rope_type": "default",
                                                                     "rope_theta": 1e6}
    export_hf(model, tmp_path)
    hf = load_hf(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (1, 250))  # positions up to 4x the original
    with torch.no_grad():
        assert max_diff(model(ids).logits, hf(ids).logits) < TOL
    assert our_config_from_hf(json.loads((tmp_path / "config.json").read_text())) == model.config


def test_export_merges_lora_via_cli(tmp_path):
    from model.lora import apply_lora, save_adapter
    model = tiny(qk_norm=True)
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, "all", rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero; make the adapter change the output
    save_adapter(model, tmp_path / "adapter")
    cli(["export", "--model", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter"),
         "--out", str(tmp_path / "hf")])
    hf = load_hf(tmp_path / "hf")
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours, base = model.eval()(ids).logits, load_pretrained(tmp_path / "base")(ids).logits
        assert max_diff(ours, base) > 1e-2  # the adapter matters ...
        assert max_diff(ours, hf(ids).logits) < TOL  # ... and was merged into the export


# --- import ------------------------------------------------------------------------------------

def _hf_configs() -> dict:
    from transformers import (GraniteMoeSharedConfig, LlamaConfig, MixtralConfig, Qwen3Config,
                              Qwen3MoeConfig)
    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": LlamaConfig(**common, intermediate_size=160,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        "qwen3": Qwen3Config(**common, intermediate_size=160, head_dim=32,
                             tie_word_embeddings=True),
        "qwen3_moe": Qwen3MoeConfig(**common, intermediate_size=160, moe_intermediate_size=48,
                                    num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        "mixtral": MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                                 num_experts_per_tok=2),
        "granitemoeshared": GraniteMoeSharedConfig(
            **common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=96, attention_multiplier=16 ** -0.5),
    }


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_moe", "mixtral",
                                        "granitemoeshared"])
def test_import_transformers_model_gives_same_logits(tmp_path, model_type):
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(_hf_configs()[model_type]).float().eval()
    perturb_norms(hf)
    hf.save_pretrained(tmp_path)  # the Hub layout transformers writes
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        ref = hf(ids).logits
        assert max_diff(import_hf(tmp_path)(ids).logits, ref) < TOL
        # transformers 5's in-memory layout (fused 3-D experts) maps too
        config = our_config_from_hf(hf.config.to_dict())
        ours = MiniMindLM(config).eval()
        sd = our_state_dict_from_hf(config, model_type, hf.state_dict())
        if config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        ours.load_state_dict(sd, strict=True)
        assert max_diff(ours(ids).logits, ref) < TOL
    cli(["import", "--hf", str(tmp_path), "--out", str(tmp_path / "ours")])
    with torch.no_grad():
        assert max_diff(load_pretrained(tmp_path / "ours")(ids).logits, ref) < TOL


# --- upstream MiniMind .pth ----------------------------------------------------------------------

@pytest.mark.parametrize("source", ["preset", "config"])
def test_minimind_pth_round_trip_fp16(tmp_path, source):
    model = MiniMindLM(MiniMindConfig.from_preset("tiny-moe")).eval()
    perturb_norms(model)
    # Upstream saves half-precision state dicts, tied head included, sometimes from a DDP wrapper.
    torch.save({f"module.{k}": v.half() for k, v in model.state_dict().items()},
               tmp_path / "moe.pth")
    if source == "preset":
        sizes = ["--preset", "tiny-moe"]
    else:
        model.config.to_json(tmp_path / "config.json")
        sizes = ["--config", str(tmp_path / "config.json")]
    cli(["import-minimind", "--pth", str(tmp_path / "moe.pth"), "--out", str(tmp_path / "out"),
         *sizes])
    loaded = load_pretrained(tmp_path / "out").state_dict()
    for k, v in model.state_dict().items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v.half().float()), k


def test_minimind_pth_strict_errors_name_the_keys(tmp_path):
    model = tiny()
    sd = dict(model.state_dict())
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"missing \[model\.layers\.1\.mlp\.up_proj\.weight\]"
                                              r".*unexpected \[model\.layers\.0\.mlp\.extra"):
        load_minimind_pth(tmp_path / "bad.pth", model.config)
    # a preset of the wrong size: shapes are reported, not a bare torch error
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    with pytest.raises(ConversionError, match="shape mismatch"):
        load_minimind_pth(tmp_path / "ok.pth", MiniMindConfig.from_preset("tiny", hidden_size=128))


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(MOE, qk_norm=True, n_shared_experts=1), "shared expert.*QK-norm"),
    (dict(MOE, norm_topk_prob=False), "norm_topk_prob=False"),
    (dict(MOE, n_shared_experts=1, norm_topk_prob=False), "norm_topk_prob=True"),
    (dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16), "multiple of"),
])
def test_unfaithful_exports_are_refused(tmp_path, overrides, match):
    model = tiny(**overrides)
    with pytest.raises(ConversionError, match=match):
        export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_lora_wrapped_model_is_refused_unmerged(tmp_path):
    from model.lora import apply_lora
    model = tiny()
    apply_lora(model, "all", rank=2, alpha=4)
    with pytest.raises(ConversionError, match="merge LoRA adapters first"):
        export_hf(model, tmp_path)


def test_cli_reports_errors_without_traceback(tmp_path, capsys, monkeypatch):
    from common.errors import run_cli
    save_pretrained(tiny(**MOE, norm_topk_prob=False), tmp_path / "m")
    monkeypatch.delenv("MINIMIND_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["convert_model.py", "export", "--model", str(tmp_path / "m"),
                                     "--out", str(tmp_path / "hf")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli)
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[load]")]
    assert exit_info.value.code == 2 and len(lines) == 1, lines     # one line, no traceback
    assert lines[0].startswith("error: ") and "norm_topk_prob" in lines[0]


def test_minimind3_moe_maps_and_minimind2_moe_goes_to_granite():
    assert choose_hf_model_type(MiniMindConfig.from_preset("minimind3")) == "qwen3"
    assert choose_hf_model_type(MiniMindConfig.from_preset("minimind2")) == "llama"
    assert choose_hf_model_type(MiniMindConfig.from_preset("minimind3-moe")) == "qwen3_moe"
    assert choose_hf_model_type(MiniMindConfig.from_preset("minimind2-moe")) == "granitemoeshared"


@pytest.mark.parametrize("change, match", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported model_type 'gpt2'"),
    (dict(attention_bias=True), "attention biases"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_type 'llama3'"),
    (dict(model_type="qwen3_moe", mlp_only_layers=[1], num_experts=4, num_experts_per_tok=2,
          moe_intermediate_size=32), "mlp_only_layers"),
])
def test_unsupported_hf_configs_are_refused(change, match):
    hf = hf_config_from_ours(tiny().config)
    with pytest.raises(ConversionError, match=match):
        our_config_from_hf({**hf, **change})


def test_granite_with_non_neutral_multipliers_is_refused(tmp_path):
    cfg = _hf_configs()["granitemoeshared"]
    cfg.attention_multiplier = 1.0  # Granite's default; our attention always scales by 1/√D
    with pytest.raises(ConversionError, match="attention_multiplier"):
        our_config_from_hf(cfg.to_dict())


# --- DeepSeek-V2 / DeepSeek-V3 / Qwen2-MoE: checkpoints made by transformers ------------------------

_SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=256)
_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2)
FAMILIES = {  # name → (transformers config class, its fields)
    # V3 as released: q_lora, sigmoid noaux_tc over groups, YaRN with DeepSeek's mscale
    "deepseek_v3": ("DeepseekV3Config", dict(
        _SMALL, **_MLA, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 32,
            "beta_slow": 1, "original_max_position_embeddings": 16, "mscale": 1.0,
            "mscale_all_dim": 0.707})),
    # V2-Lite's shape: no q_lora, 2 shared experts; group-limited greedy and a scaling factor
    "deepseek_v2": ("DeepseekV2Config", dict(
        _SMALL, **_MLA, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.5)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        _SMALL, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0])),
}


def hf_family(name: str, path) -> torch.nn.Module:
    """A transformers model of ``name`` with random weights (norms, biases and DeepSeek-V3's
    correction bias too), saved to ``path``."""
    config_cls, fields = FAMILIES[name]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**fields)).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
        for bname, b in hf.named_buffers():
            if "e_score_correction_bias" in bname:
                b.copy_(torch.randn_like(b) * 0.1)
    hf.save_pretrained(path)
    return hf


def routed_experts(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's chosen expert ids (sorted per token) during ``model(ids)``."""
    found: list[torch.Tensor] = []

    def hook(_module, _args, out):  # transformers' routers: (logits, weights, indices)
        found.append(out[2].sort(-1).values)

    def ours_hook(module, args, _out):
        found.append(module.route(args[0].reshape(-1, args[0].shape[-1]))[1].sort(-1).values)

    handles = [m.register_forward_hook(ours_hook if hasattr(m, "route") else hook)
               for n, m in model.named_modules()
               if n.endswith(".mlp") and hasattr(m, "route") or n.endswith("mlp.gate")
               and not isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return found


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_import_export_match_transformers(tmp_path, name):
    hf = hf_family(name, tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    ids = torch.randint(0, 160, (2, 24))  # 24 > YaRN's original 16 positions
    with torch.no_grad():
        ref = hf(ids).logits
        assert max_diff(ours(ids).logits, ref) < TOL
    chosen = routed_experts(ours, ids)
    assert len(chosen) == 2 and all(torch.equal(a, b)
                                    for a, b in zip(chosen, routed_experts(hf, ids)))
    export_hf(ours, tmp_path / "out")
    back = load_hf(tmp_path / "out")
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        assert max_diff(back(ids).logits, ref) < TOL
    prompt = ids[:1, :7]
    theirs = back.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=8)[0].tolist()
    assert our_greedy(ours, prompt, 8, ours.config.eos_token_id) == theirs


def test_family_refusals_name_the_reason():
    hf = hf_config_from_ours(MiniMindLM(MiniMindConfig.from_preset("tiny-mla-moe")).config)
    assert hf["model_type"] == "deepseek_v3" and hf["head_dim"] == 8 * 2
    with pytest.raises(ConversionError, match="norm_topk_prob"):
        our_config_from_hf({**hf, "model_type": "deepseek_v2", "topk_method": "greedy",
                            "norm_topk_prob": True})
    with pytest.raises(ConversionError, match="num_key_value_heads"):
        our_config_from_hf({**hf, "num_key_value_heads": 2})
    with pytest.raises(ConversionError, match="moe_layer_freq"):
        our_config_from_hf({**hf, "moe_layer_freq": 2})
    with pytest.raises(ConversionError, match="fp8"):
        our_config_from_hf({**hf, "quantization_config": {"quant_method": "fp8"}})
    # DeepSeek-V2-Lite's own rope_scaling (transformers 4 form): YaRN ×40, mscale 0.707 twice.
    lite = our_config_from_hf({**hf, "rope_parameters": None, "rope_theta": 1e4,
                               "max_position_embeddings": 1024, "rope_scaling": {
                                   "type": "yarn", "factor": 40, "mscale": 0.707,
                                   "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                                   "original_max_position_embeddings": 64}})
    assert (lite.yarn_factor, lite.yarn_attention_factor, lite.yarn_mscale_all_dim) == (
        40.0, 1.0, 0.707)
    with pytest.raises(ConversionError, match="always have shared experts"):
        choose_hf_model_type(MiniMindConfig.from_preset("tiny-mla-moe", n_shared_experts=0))
    with pytest.raises(ConversionError, match="interleaved RoPE"):
        choose_hf_model_type(MiniMindConfig.from_preset(
            "tiny-mla-moe", topk_method="greedy", rope_interleave=False, norm_topk_prob=False))


def test_gguf_cli_refuses_mla_instead_of_writing_a_broken_file(tmp_path):
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny-mla-moe", use_moe=False)),
                    tmp_path / "m")
    with pytest.raises(ConversionError, match="MLA"):  # run_cli prints it as one line, exit 2
        cli(["gguf", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf")])
    assert not (tmp_path / "m.gguf").exists()
