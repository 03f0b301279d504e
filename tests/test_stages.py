"""train_lora.py, train_dpo.py, train_distillation.py and scripts/generate_sft_data.py end to end
on the tiny preset: in-process runs (fast), and each training script once under torchrun (gloo)."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_distillation
import train_dpo
import train_full_sft
import train_lora
from dataset import generate_sft, synthetic
from dataset.lm_dataset import load_files
from model.config import MiniMindConfig
from model.generate import Generation
from model.io import load_pretrained, save_pretrained
from model.lora import disable_lora, load_adapter
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from trainer import stage
from trainer.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--dtype", "fp32", "--no-progress", "--peak_tflops", "1", "--seq_len", "96",
        "--batch_size", "2", "--log_every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model (and a tiny MoE teacher) plus SFT and DPO data."""
    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0)), root / "base")
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny-moe", dropout=0.0)), root / "teacher")
    synthetic.write_jsonl(synthetic.sft_conversations(16, seed=0), root / "sft.jsonl")
    synthetic.write_jsonl(synthetic.dpo_pairs(16, seed=0), root / "dpo.jsonl")
    return {"base": root / "base", "teacher": root / "teacher", "sft": root / "sft.jsonl",
            "dpo": root / "dpo.jsonl"}


def run_script(module, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, *FAST, *args])
    module.main()


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- LoRA
def test_lora_adapter_loads_on_base_and_changes_outputs(files, tmp_path, monkeypatch):
    base_file = files["base"] / "model.safetensors"
    before = sha(base_file)
    out = tmp_path / "lora"
    run_script(train_lora, monkeypatch, "--init_from", str(files["base"]), "--data_path", str(files["sft"]),
               "--out_dir", str(out), "--lora_rank", "4", "--lr", "1e-2", "--max_steps", "3",
               "--save_every", "3", "--merge_on_save")
    assert sha(base_file) == before                                   # the base is never written
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(files["base"].resolve())                                  # PEFT's format (dense base)
    ckpt = out / "checkpoints" / "step_000003"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "COMPLETE").exists()

    ids = torch.randint(3, 6400, (2, 12))
    model = load_pretrained(files["base"]).eval()
    base_logits = model(ids).logits
    load_adapter(model, final)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)        # the adapter does something
    plain = load_pretrained(files["base"]).state_dict()
    for key, value in model.state_dict().items():                     # base weights untouched
        if "lora_" not in key:
            assert torch.equal(value, plain[key]), key
    with disable_lora(model):
        assert torch.equal(model(ids).logits, base_logits)
    merged = load_pretrained(out / "final_merged").eval()
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_lora_reads_llamafactory_yaml_keys(files, tmp_path):
    yaml_file = tmp_path / "lora.yaml"
    yaml_file.write_text(f"init_from: {files['base']}\nlora_rank: 4\nlora_alpha: 8\nlora_dropout: 0.05\n"
                         "lora_target: q_proj,v_proj\nuse_rslora: true\n")
    cfg = parse_config(train_lora.LoRATrainConfig, ["--config", str(yaml_file), "--lora_rank", "2"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora) == (2, 8.0, 0.05, True)
    model = stage.build_model(cfg, Tokenizer.from_dir(None))   # finished: base weights + adapters
    trainable = stage.fit_args(model, cfg)["trainable"]
    base = load_pretrained(files["base"])
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert model.lora_config.scale == pytest.approx(8 / math.sqrt(2))
    assert {m.rsplit(".", 1)[1] for m in model.lora_config.modules} == {"q_proj", "v_proj"}
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="LoRA trains adapters on a base model"):
        parse_config(train_lora.LoRATrainConfig, ["--device", "cpu"])   # the config's own check
    with pytest.raises(ConfigError, match="unknown option 'lora_rnak'"):
        yaml_file.write_text("lora_rnak: 4\n")
        parse_config(train_lora.LoRATrainConfig, ["--config", str(yaml_file)])


# ---------------------------------------------------------------------- DPO
def test_dpo_defaults_resolve_per_setup():
    full = parse_config(train_dpo.DPOConfig, ["--no-progress"], validate=False)
    lora = parse_config(train_dpo.DPOConfig, ["--finetuning_type", "lora"], validate=False)
    simpo = parse_config(train_dpo.DPOConfig, ["--loss", "simpo"], validate=False)
    assert (full.lr, full.beta, lora.lr, simpo.beta) == (5e-6, 0.1, 5e-5, 2.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        parse_config(train_dpo.DPOConfig, ["--loss", "ipo", "--label_smoothing", "0.1", "--device", "cpu"])


@pytest.mark.parametrize("variant", [[], ["--finetuning_type", "lora", "--lora_rank", "4"], ["--precompute_ref"],
                                     ["--loss", "simpo"]],
                         ids=["frozen_copy", "lora", "precomputed", "simpo"])
def test_dpo_stage_runs_and_logs_rewards(files, tmp_path, monkeypatch, variant):
    out = tmp_path / "dpo"
    run_script(train_dpo, monkeypatch, "--init_from", str(files["base"]), "--data_path", str(files["dpo"]),
               "--out_dir", str(out), "--max_steps", "2", "--lr", "1e-3", *variant)
    rows = [r for r in metrics(out) if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(rows[0])
    if "simpo" not in variant:   # step 1 is computed before any update: policy == reference
        assert rows[0]["pref_loss"] == pytest.approx(math.log(2), abs=1e-5)
    weights = "adapter_model.safetensors" if "lora" in variant else "model.safetensors"
    assert (out / "final" / weights).exists()


@pytest.mark.parametrize("module, config", [(train_full_sft, "SFTConfig"), (train_dpo, "DPOConfig")])
def test_finetuning_type_is_one_switch_for_sft_and_dpo(module, config):
    cls = getattr(module, config)
    assert not parse_config(cls, ["--device", "cpu"]).use_lora
    assert parse_config(cls, ["--device", "cpu", "--finetuning_type", "lora"]).use_lora
    with pytest.raises(ConfigError, match="LoRA training needs lora_rank >= 1"):
        parse_config(cls, ["--device", "cpu", "--finetuning_type", "lora", "--lora_rank", "0"])


# ---------------------------------------------------------------------- distillation
def test_distillation_stage_with_moe_teacher(files, tmp_path, monkeypatch):
    out = tmp_path / "kd"
    run_script(train_distillation, monkeypatch, "--teacher_path", str(files["teacher"]),
               "--init_from", str(files["base"]), "--data_path", str(files["sft"]), "--out_dir", str(out),
               "--max_steps", "2", "--lr", "1e-3", "--alpha", "0.3", "--temperature", "2")
    rows = [r for r in metrics(out) if "loss" in r]
    assert "kl" in rows[0] and "ce_loss" in rows[0] and (out / "final" / "model.safetensors").exists()


def test_distillation_refuses_a_teacher_with_another_vocabulary(files, tmp_path, monkeypatch):
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny", vocab_size=6656)), tmp_path / "t")
    with pytest.raises(ConfigError, match="vocabulary .6656 tokens. differs from the student's .6400."):
        run_script(train_distillation, monkeypatch, "--teacher_path", str(tmp_path / "t"),
                   "--data_path", str(files["sft"]), "--out_dir", str(tmp_path / "kd"), "--max_steps", "1")


# ---------------------------------------------------------------------- black-box distillation data
def test_generate_sft_data_then_train_student(files, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2 + 3?"},
        {"instruction": "Add the numbers", "input": "1 and 2"},
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "old answer"}]}]) + "\n")
    answers = iter([Generation([], "5", "stop"), Generation([], "3", "stop"),
                    Generation([], "cut off", "length"), Generation([], "bad <|im_start|>", "stop")])
    fake = lambda model, tok, ids, params: [next(answers) for _ in ids]   # noqa: E731
    monkeypatch.setattr(generate_sft, "generate", fake)
    out = tmp_path / "gen" / "sft.jsonl"
    counts = generate_sft.main(["--teacher", str(files["base"]), "--prompts", str(prompts), "--out",
                                str(out), "--device", "cpu", "--batch_size", "2"])
    assert counts == {"prompts": 3, "generated": 3, "kept": 2, "truncated": 1, "rejected": 1}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["conversations"] == [{"role": "user", "content": "What is 2 + 3?"},
                                           {"role": "assistant", "content": "5"}]
    assert records[1]["conversations"][0]["content"] == "Add the numbers\n\n1 and 2"
    assert len(load_files("sft", out, Tokenizer.from_dir(), 64, use_cache=False)) == 2
    run_script(train_full_sft, monkeypatch, "--data_path", str(out), "--out_dir", str(tmp_path / "student"),
               "--init_from", str(files["base"]), "--max_steps", "1")
    assert (tmp_path / "student" / "final" / "model.safetensors").exists()

    monkeypatch.undo()   # the real teacher: a random tiny model, so keep whatever it says
    counts = generate_sft.main(["--teacher", str(files["base"]), "--prompts", str(prompts), "--out",
                                str(out), "--device", "cpu", "--max_new_tokens", "4",
                                "--num_samples", "2", "--keep_truncated"])
    assert counts["generated"] == 6 and counts["kept"] + counts["rejected"] == 6
    with pytest.raises(Exception, match=r"prompts.jsonl:2: .*no prompt"):
        prompts.write_text('{"question": "ok"}\n{"answer": 1}\n')
        generate_sft.main(["--teacher", str(files["base"]), "--prompts", str(prompts),
                           "--out", str(out)])


# ---------------------------------------------------------------------- torchrun (2 processes, gloo)
TORCHRUN_CASES = {
    "lora": (train_lora, ["--data_path", "sft", "--init_from", "base", "--lora_rank", "4"]),
    "dpo": (train_dpo, ["--data_path", "dpo", "--init_from", "base", "--finetuning_type", "lora",
                      "--lora_rank", "4", "--precompute_ref"]),
    "distillation": (train_distillation, ["--data_path", "sft", "--teacher_path", "teacher"]),
}


@pytest.mark.parametrize("name", sorted(TORCHRUN_CASES))
def test_script_under_torchrun(files, tmp_path, name):
    module, args = TORCHRUN_CASES[name]
    args = [str(files[a]) if a in files else a for a in args]
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           module.__file__, *FAST, "--out_dir", str(out), "--max_steps", "2", "--lr", "1e-3", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    if name == "dpo":   # the reference table was sharded over both ranks and summed back
        assert rows[0]["pref_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "final").is_dir()
