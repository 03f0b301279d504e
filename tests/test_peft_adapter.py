"""The adapter train_lora.py writes is a PEFT adapter where PEFT has an exact equivalent:
`PeftModel.from_pretrained` on the transformers export of the base (scripts/convert_model.py)
gives the logits of our merged model (the independent reference is transformers + peft). Expert
adapters, which PEFT cannot express on transformers' fused experts, stay native, said in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_lora
from common.errors import ModelFolderError
from convert import cli as convert_cli
from dataset import synthetic
from inference import load_for_inference
from model.config import MiniMindConfig
from model.io import save_pretrained
from model.lora import ADAPTER_CONFIG_NAME, load_adapter
from model.model import MiniMindLM

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--dtype", "fp32", "--no-progress", "--peak_tflops", "1", "--seq_len", "64",
        "--batch_size", "2", "--log_every", "1", "--lora_rank", "4", "--lr", "5e-2", "--max_steps", "3"]
IDS = torch.randint(3, 6400, (2, 12), generator=torch.Generator().manual_seed(3))


def base_and_data(root: Path, preset: str, **overrides) -> tuple[Path, Path]:
    torch.manual_seed(0)
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset(preset, dropout=0.0, **overrides)), root / "base")
    return root / "base", synthetic.write_jsonl(synthetic.sft_conversations(8, seed=0), root / "sft.jsonl")


def test_cli_adapter_loads_with_peft_on_the_exported_base(tmp_path):
    base, data = base_and_data(tmp_path, "tiny", qk_norm=True)   # exports as Qwen3ForCausalLM
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIMIND_DATA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "train_lora.py", *FAST, "--init_from", str(base),
                           "--data_path", str(data), "--out_dir", str(tmp_path / "lora"),
                           "--use_rslora", "--lora_target", "all"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    adapter = tmp_path / "lora" / "final"
    assert "PEFT format" in proc.stdout, proc.stdout[-2000:]
    config = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base.resolve())

    convert_cli.main(["export", "--model", str(base), "--out", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(IDS).logits
        peft_model = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
        wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
        assert len(wrapped) == 2 * 7                                  # q k v o gate up down, 2 layers
        peft_logits = peft_model(IDS).logits
        ours = load_for_inference(base, adapter, device="cpu", dtype="fp32")[0](IDS).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2             # the adapter trained: not vacuous
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=1e-5)

    # Our loader still checks the base through the fingerprint kept in the file's metadata.
    with pytest.raises(ModelFolderError, match="different base model.*qk_norm"):
        load_adapter(MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0)), adapter)


def test_expert_adapters_stay_native_and_say_why(tmp_path, monkeypatch, capsys):
    base, data = base_and_data(tmp_path, "tiny-moe")
    monkeypatch.setenv("MINIMIND_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["train_lora.py", *FAST, "--init_from", str(base), "--data_path",
                                      str(data), "--out_dir", str(tmp_path / "lora"), "--max_steps", "1"])
    train_lora.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if "adapter saved" in line]
    assert len(lines) == 1 and "native minimind-lora format" in lines[0], lines
    assert "experts" in lines[0] and "no PEFT equivalent" in lines[0], lines
    config = json.loads((tmp_path / "lora" / "final" / ADAPTER_CONFIG_NAME).read_text())
    assert config["format"] == "minimind-lora" and "peft_type" not in config
    assert "model.layers.0.mlp.experts.0.up_proj" in config["modules"]
