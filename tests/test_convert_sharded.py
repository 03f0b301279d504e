"""Sharded checkpoints (convert/hf.py ``import_hf_to_folder`` / ``export_hf``).

A transformers checkpoint saved in many shards imports, tensor by tensor, to exactly the folder
the in-memory path writes from the single-file checkpoint; exports split into Hub-style shards
that transformers loads. The peak-memory measurement on a multi-GB checkpoint is
scripts/bench_convert.py (not in the suite).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers builds the checkpoints")
from transformers import AutoModelForCausalLM  # noqa: E402

from common.errors import ModelNotFoundError  # noqa: E402
from convert.cli import main as cli  # noqa: E402
from convert.hf import export_hf, import_hf, import_hf_to_folder  # noqa: E402
from model.io import load_pretrained, load_state_dict_file, save_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    """DeepSeek-V2-shaped: MLA, a dense first layer, routed + 2 shared experts (split on import)."""
    torch.manual_seed(0)
    cfg = transformers.DeepseekV2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def weights(folder) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    return load_state_dict_file(folder / "model.safetensors"), meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_import_equals_the_single_file_import(tmp_path, hf_model, dtype):
    hf = hf_model.to(dtype)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) >= 4 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    import_hf_to_folder(tmp_path / "many", tmp_path / "ours_many")
    save_pretrained(import_hf(tmp_path / "one"), tmp_path / "ours_one")  # the in-memory path
    (a, meta_a), (b, meta_b) = weights(tmp_path / "ours_many"), weights(tmp_path / "ours_one")
    assert set(a) == set(b) and meta_a == meta_b
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in b)
    for name in ("model.safetensors", "config.json"):   # byte-stable: the two paths, one file
        assert (tmp_path / "ours_many" / name).read_bytes() == (tmp_path / "ours_one" / name).read_bytes()
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "ours_many")(ids).logits,
                                   hf.float()(ids).logits, rtol=0, atol=1e-4)


def test_sharded_export_loads_in_transformers_and_replaces_stale_files(tmp_path, hf_model):
    hf_model.float().save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "ours")
    cli(["export", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "out"),
         "--max_shard_size", "30KB"])
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == sorted(p.name for p in (tmp_path / "out").glob("model-*"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=1e-4)
    export_hf(ours, tmp_path / "out")  # one file now: the shards and the index must go
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]


def test_a_shard_missing_from_the_index_is_named(tmp_path, hf_model):
    hf_model.float().save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    victim = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelNotFoundError, match=victim.name):
        import_hf_to_folder(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours" / "model.safetensors").exists()



def test_deepseek_v3_mtp_layers_are_dropped_as_transformers_does(tmp_path):
    """DeepSeek-V3 ships its multi-token-prediction block as layer ``num_hidden_layers``."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd["model.layers.1.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    import_hf_to_folder(tmp_path / "hf", tmp_path / "ours")
    assert not any(k.startswith("model.layers.1.") for k in weights(tmp_path / "ours")[0])


def test_streamed_import_is_strict_before_writing(tmp_path, hf_model):
    """An unknown tensor or a wrong shape is named, and no weights file is left behind."""
    from safetensors.torch import load_file, save_file

    from convert.hf import ConversionError
    hf_model.float().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(path))
    save_file({**sd, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ConversionError, match="unexpected .*self_attn.extra.weight"):
        import_hf_to_folder(tmp_path / "hf", tmp_path / "ours")
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 16)
    save_file(sd, str(path))
    with pytest.raises(ConversionError, match=r"kv_b_proj.weight \(3, 16\)"):
        import_hf_to_folder(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours" / "model.safetensors").exists()
