"""LoRA: maths vs a hand formula and vs PEFT, targeting, frozen base, save/load, merge, export."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from convert.peft import save_peft_adapter
from model.config import MiniMindConfig
from model.io import load_pretrained
from model.lora import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoRALinear, apply_lora,
                        disable_lora, export_merged, load_adapter, lora_parameters, lora_state_dict,
                        merge_lora, merged_state_dict, save_adapter, unmerge_lora)
from model.model import MiniMindLM

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def make(preset: str, seed: int = 0, **overrides) -> MiniMindLM:
    torch.manual_seed(seed)
    return MiniMindLM(MiniMindConfig.from_preset(preset, **overrides)).eval()


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero, which would make most checks vacuous: give every adapter a real delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 6400, (2, 10), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_equals_hand_formula_with_dropout(use_rslora):
    base = nn.Linear(16, 24, bias=True)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5, use_rslora=use_rslora).train()
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    randomize_adapters(layer)
    x = torch.randn(3, 16)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    x_drop = F.dropout(x, 0.5, training=True)  # same RNG draw as the layer's dropout
    scale = 8 / math.sqrt(4) if use_rslora else 8 / 4
    expected = x @ base.weight.T + base.bias + scale * (x_drop @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(y, expected)
    # Kaiming-uniform(a=√5) bound on a fresh A: 1/√fan_in; B starts at zero.
    fresh = LoRALinear(nn.Linear(16, 24), rank=4, alpha=8)
    assert fresh.lora_A.abs().max() <= 1 / math.sqrt(16) and not fresh.lora_B.any()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_step0_equals_base_and_base_keys_unchanged(preset):
    model = make(preset)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = logits(model, IDS)
    names = apply_lora(model, "all", rank=4, alpha=8, dropout=0.1)
    assert not any(m.training for m in model.modules())  # new Dropouts follow the eval() model
    assert torch.equal(logits(model, IDS), base_out)
    sd = model.state_dict()
    assert set(sd) == set(base_sd) | {f"{n}.lora_{x}" for n in names for x in "AB"}
    # Base weights still load strictly into the adapted model; only the adapter keys are missing.
    result = model.load_state_dict(base_sd, strict=False)
    assert not result.unexpected_keys and all(k.endswith(("lora_A", "lora_B"))
                                              for k in result.missing_keys)


def test_gradients_reach_only_adapters():
    model = make("tiny-moe").train()
    apply_lora(model, "all", rank=4, alpha=8)
    ids = IDS.clone()
    model(ids, labels=ids).loss.backward()
    lora_names = set()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            lora_names.add(name)
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name
    assert {id(p) for p in lora_parameters(model)} == {id(p) for n, p in model.named_parameters()
                                                       if n in lora_names}
    # B = 0 makes dL/dA zero at step 0, but B itself must learn.
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_merged_equals_unmerged_and_unmerge_restores(preset):
    model = make(preset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, "all", rank=4, alpha=16, use_rslora=preset == "tiny")
    randomize_adapters(model)
    unmerged = logits(model, IDS)
    assert not torch.allclose(unmerged, logits(make(preset), IDS))  # the adapters do something
    merge_lora(model)
    torch.testing.assert_close(logits(model, IDS), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, IDS), unmerged, atol=1e-6, rtol=1e-6)


def test_merge_in_bf16_keeps_dtype():
    model = make("tiny").to(torch.bfloat16)
    apply_lora(model, "q_proj", rank=2, alpha=4)
    randomize_adapters(model)
    merge_lora(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.merged


def test_unmatched_target_raises_and_leaves_model_untouched():
    model = make("tiny-moe")
    with pytest.raises(ValueError, match=r"'qq_proj'.*available.*q_proj"):
        apply_lora(model, "q_proj,qq_proj", rank=4, alpha=8)
    with pytest.raises(ValueError, match=r"'gate'.*MoE router"):  # the router is never adapted
        apply_lora(model, ["gate"], rank=4, alpha=8)
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, "lm_head", rank=4, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, "all", rank=0, alpha=8)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_apply_twice_raises():
    model = make("tiny")
    apply_lora(model, "q_proj", rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, "v_proj", rank=2, alpha=2)


def test_all_attention_leaves_mlp_and_experts_untouched():
    model = make("tiny-moe")
    names = apply_lora(model, "all_attention", rank=4, alpha=8)
    assert len(names) == 4 * model.config.num_hidden_layers
    assert all(n.rsplit(".", 1)[1] in ATTN for n in names)
    for name, m in model.named_modules():
        if ".mlp" in name and isinstance(m, nn.Linear):
            assert type(m) is nn.Linear, name


def test_all_on_moe_covers_experts_and_shared_but_not_router_or_head():
    model = make("tiny-moe")
    cfg = model.config
    names = set(apply_lora(model, "all", rank=4, alpha=8))
    per_layer = 4 + 3 * (cfg.num_experts + cfg.n_shared_experts)
    assert len(names) == cfg.num_hidden_layers * per_layer
    for i in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            assert f"model.layers.{i}.mlp.experts.{e}.gate_proj" in names
        assert f"model.layers.{i}.mlp.shared_experts.0.down_proj" in names
        assert f"model.layers.{i}.mlp.gate" not in names
    assert "lm_head" not in names
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].mlp.gate) is nn.Linear
    # Explicit leaf names reach experts too; dotted suffixes narrow down.
    model2 = make("tiny-moe")
    picked = apply_lora(model2, ["down_proj", "layers.1.mlp.experts.2.up_proj"], rank=2, alpha=2)
    assert sum(".experts." in n for n in picked) == cfg.num_hidden_layers * cfg.num_experts + 1


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_save_load_round_trip(tmp_path, preset):
    model = make(preset)
    apply_lora(model, "all", rank=4, alpha=8, dropout=0.05, use_rslora=True)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad", base_model="out/base")
    tensors = load_file(tmp_path / "ad" / ADAPTER_WEIGHTS_NAME)
    assert set(tensors) == set(lora_state_dict(model))
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG_NAME).read_text())
    assert (cfg["rank"], cfg["alpha"], cfg["dropout"], cfg["use_rslora"]) == (4, 8.0, 0.05, True)
    assert cfg["targets"] == ["all"] and cfg["modules"] == model.lora_config.modules
    assert cfg["base_model"]["name_or_path"] == "out/base"
    assert cfg["base_model"]["config"] == model.config.to_dict()

    fresh = make(preset)  # same seed: the same base weights
    settings = load_adapter(fresh, tmp_path / "ad")
    assert settings.modules == model.lora_config.modules
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    assert all(p.requires_grad == n.endswith(("lora_A", "lora_B"))
               for n, p in fresh.named_parameters())
    # Loading again into the already adapted model (resume) just refills the tensors.
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_load_onto_different_config_fails_clearly(tmp_path):
    model = make("tiny")
    apply_lora(model, "all_attention", rank=4, alpha=8)
    save_adapter(model, tmp_path / "ad")
    other = make("tiny", intermediate_size=256)
    with pytest.raises(ValueError, match=r"adapter_config\.json.*intermediate_size: adapter 192 vs "
                                         r"model 256"):
        load_adapter(other, tmp_path / "ad")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    # Runtime-only fields (dropout) do not block loading.
    load_adapter(make("tiny", dropout=0.1), tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        load_adapter(make("tiny"), tmp_path / "nowhere")


def test_adapter_saved_before_newer_config_fields_still_loads(tmp_path):
    """An adapter written before a config field existed (its stored config lacks the field, so its
    fingerprint differs) loads when every field it has matches and the missing one is at its
    default; a missing field whose model value is not the default is still a different base."""
    model = make("tiny")
    apply_lora(model, "all_attention", rank=4, alpha=8)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad")
    path = tmp_path / "ad" / ADAPTER_CONFIG_NAME
    raw = json.loads(path.read_text())
    del raw["base_model"]["config"]["kv_lora_rank"]  # a field MLA added later
    raw["base_model"]["config_sha256"] = "0" * 64
    path.write_text(json.dumps(raw))
    fresh = make("tiny")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    with pytest.raises(ValueError, match=r"kv_lora_rank: adapter 0 vs model 16"):
        load_adapter(make("tiny", kv_lora_rank=16, q_lora_rank=0, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=8), tmp_path / "ad")


def test_load_errors_name_file_and_key(tmp_path):
    model = make("tiny")
    apply_lora(model, "q_proj,v_proj", rank=4, alpha=8)
    save_adapter(model, tmp_path / "ad")
    weights = tmp_path / "ad" / ADAPTER_WEIGHTS_NAME
    tensors = load_file(weights)
    key = "model.layers.1.self_attn.v_proj.lora_B"
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors.*missing.*{key}"):
        load_adapter(make("tiny"), tmp_path / "ad")
    tensors[key] = torch.zeros(tensors[key].shape[0], 2)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: {key} has shape \(32, 2\)"):
        load_adapter(make("tiny"), tmp_path / "ad")


def test_disable_lora_gives_base_output():
    model = make("tiny-moe")
    base_out = logits(model, IDS)
    apply_lora(model, "all", rank=4, alpha=8)
    randomize_adapters(model)
    adapted = logits(model, IDS)
    with disable_lora(model):
        assert torch.equal(logits(model, IDS), base_out)
        with disable_lora(model):  # nesting restores the outer state, not "enabled"
            pass
        assert torch.equal(logits(model, IDS), base_out)
    assert torch.equal(logits(model, IDS), adapted)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with disable_lora(model):
            pass
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with disable_lora(make("tiny")):
            pass


def test_module_with_adapters_but_no_protocol_is_refused():
    class Half(nn.Module):  # e.g. an expert backend that forgot the switches
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Parameter(torch.zeros(2, 4))
            self.lora_B = nn.Parameter(torch.zeros(4, 2))

    model = make("tiny")
    model.model.layers[0].mlp.extra = Half()
    with pytest.raises(TypeError, match=r"layers\.0\.mlp\.extra.*protocol"):
        with disable_lora(model):
            pass


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_export_merged_loads_with_load_pretrained(tmp_path, preset):
    model = make(preset)
    apply_lora(model, "all", rank=4, alpha=8)
    randomize_adapters(model)
    adapted = logits(model, IDS)
    export_merged(model, tmp_path / "merged")
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))  # untouched
    plain = load_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, IDS), adapted, atol=1e-5, rtol=1e-5)
    merge_lora(model)  # merged_state_dict of a merged model does not add the delta twice
    for k, v in merged_state_dict(model).items():
        torch.testing.assert_close(plain.state_dict()[k], v, atol=0, rtol=0)


def test_peft_format_refuses_expert_adapters(tmp_path):
    model = make("tiny-moe")
    apply_lora(model, "all", rank=2, alpha=2)
    with pytest.raises(ValueError, match="experts.*no PEFT equivalent"):
        save_peft_adapter(model, tmp_path / "peft")
    save_peft_adapter(make_attention_only(), tmp_path / "ok")


def make_attention_only() -> MiniMindLM:
    model = make("tiny-moe")
    apply_lora(model, "all_attention", rank=2, alpha=2)
    return model


def qwen3_from(model: MiniMindLM):
    """transformers' Qwen3ForCausalLM holding the same weights (dense MiniMind maps 1:1)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = model.config
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=True, attention_bias=False)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("targets,use_rslora", [("all", False), ("q_proj,v_proj,up_proj", True)])
def test_matches_peft_on_transformers_qwen3(tmp_path, targets, use_rslora):
    peft = pytest.importorskip("peft")
    model = make("tiny", qk_norm=True)
    hf = qwen3_from(model)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits(model, IDS), atol=1e-5, rtol=1e-5)
    names = apply_lora(model, targets, rank=4, alpha=8, use_rslora=use_rslora)
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "peft", base_model="tiny-base")
    cfg = json.loads((tmp_path / "peft" / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is use_rslora

    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if isinstance(m, peft.tuners.lora.Linear))
    assert wrapped == sorted(names)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, logits(model, IDS), atol=1e-5, rtol=1e-5)

    # And back: our loader reads the PEFT file, base fingerprint included.
    fresh = make("tiny", qk_norm=True)
    load_adapter(fresh, tmp_path / "peft")
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    with pytest.raises(ValueError, match="qk_norm"):
        load_adapter(make("tiny"), tmp_path / "peft")
