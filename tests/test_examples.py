"""examples/*.yaml: every file parses through the config class of the script it names, its
dataset names exist in the registry its own data command writes, and two run end to end on a tiny
model (one of them with kt-kernel experts, in a subprocess)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import train_full_sft
import train_pretrain
from dataset import synthetic
from offload.experts import kt_status
from tests.conftest import SHARED_DATA, shared_path
from trainer.config import ConfigError, TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SCRIPTS = {"train_pretrain.py": train_pretrain.PretrainConfig, "train_full_sft.py": train_full_sft.SFTConfig}
# Problems an example may have on a fresh clone: it names data and models made by earlier steps.
NOT_YET_MADE = ("no such file", "no dataset_info.json", "init_from: no such folder")
KT_OK, KT_WHY = kt_status()


pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def header_command(path: Path, label: str) -> str | None:
    """The command after `# <label>:` in the file's header comment, backslash continuations joined."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    for i, line in enumerate(lines):
        if line.startswith(f"{label}:"):
            cmd = line[len(label) + 1:].strip()
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i]
            return cmd
    return None


def target(path: Path) -> tuple[str, type[TrainConfig]]:
    cmd = header_command(path, "Train") or ""
    m = re.match(r"python (train_\w+\.py) --config examples/" + re.escape(path.name) + r"\b", cmd)
    assert m, f"{path.name}: header needs '# Train: python train_X.py --config examples/{path.name}'"
    assert m.group(1) in SCRIPTS, f"{path.name}: no config class known for {m.group(1)}"
    return m.group(1), SCRIPTS[m.group(1)]


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"commonsense_lora.yaml", "commonsense_lora_kt.yaml", "gsm8k_sft.yaml", "gsm8k_lora.yaml",
            "math_lora.yaml", "pretrain_minimind2_small.yaml", "sft_minimind_data.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_validates(path):
    """Every key is an option of its script, with a value of the right type; the only problems
    left are files an earlier step makes; the evaluation command is stated."""
    _, cls = target(path)
    evaluate = header_command(path, "Evaluate") or ""
    assert evaluate.startswith("python eval_model.py --model "), f"{path.name}: no '# Evaluate:' command"
    cfg = parse_config(cls, ["--config", str(path)], validate=False)
    problems = [p for p in cfg._problems() if not any(s in p for s in NOT_YET_MADE)]
    assert problems == [], problems
    # shape and backend checks against the preset (init_from's model does not exist yet)
    expert = dataclasses.replace(cfg, init_from="")._expert_problems()
    kt_ok, kt_why = kt_status(cfg.kt.kt_backend)   # this machine's kt variant is not the YAML's fault
    assert [p for p in expert if kt_ok or kt_why not in p] == [], expert
    if cfg.data_path and not cfg.dataset_dir:
        assert all(p.endswith((".jsonl", ".json")) for p in cfg.data_path)


@pytest.mark.parametrize("path", [p for p in EXAMPLES if header_command(p, "Data (once)")],
                         ids=lambda p: p.name)
def test_example_data_is_what_its_data_command_writes(path, tmp_path):
    """Run the header's converter (on the shared data) and look the YAML's dataset names up in the
    dataset_info.json it writes (or its files up on disk): a renamed entry or output fails here,
    not in a user's run."""
    shared_path()
    cmd = shlex.split(header_command(path, "Data (once)").replace("../shared/data", str(SHARED_DATA)),
                      comments=True)
    assert cmd[:2] == ["python", "-m"] and cmd[2].startswith("tasks.")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=env, check=False, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, cls = target(path)
    cfg = parse_config(cls, ["--config", str(path)], validate=False)
    if cfg.dataset_dir:
        registry = json.loads((tmp_path / cfg.dataset_dir / "dataset_info.json").read_text())
        assert set(cfg.data_path) <= set(registry), sorted(registry)
        files = [tmp_path / cfg.dataset_dir / registry[name]["file_name"] for name in cfg.data_path]
    else:
        files = [tmp_path / name for name in cfg.data_path]
    assert all(f.is_file() and f.stat().st_size > 0 for f in files), files


TINY = ["--no-progress", "--no-plot", "--peak_tflops", "1", "--init_from", "", "--max_steps", "2",
        "--batch_size", "2", "--seq_len", "128", "--eval_batches", "1", "--save_every", "0",
        "--warmup_steps", "0"]


def test_gsm8k_lora_example_runs_end_to_end(tmp_path, monkeypatch):
    """examples/gsm8k_lora.yaml with a tiny fresh model and synthetic data in place of its base
    model and GSM8K files: every other option (LoRA, generation eval, schedule) as written."""
    data = synthetic.write_jsonl(synthetic.sft_conversations(24, seed=0), tmp_path / "sft.jsonl")
    gsm = synthetic.write_jsonl(({"question": p.question, "answer": p.solution}
                                 for p in synthetic.test_set(4, seed=0)), tmp_path / "gsm8k.jsonl")
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "train_full_sft.py", "--config", str(REPO / "examples" / "gsm8k_lora.yaml"), *TINY,
        "--model_preset", "tiny", "--dataset_dir", "", "--data_path", str(data), "--eval_fraction", "0.1",
        "--eval_gen_data", str(gsm), "--eval_gen_samples", "2", "--eval_gen_max_new_tokens", "8",
        "--out_dir", str(out)])
    train_full_sft.main()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_gen_accuracy" in r and "val_loss" in r for r in rows)
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(not KT_OK, reason=f"kt backend unavailable: {KT_WHY}")
def test_commonsense_kt_example_runs_end_to_end(tmp_path):
    """examples/commonsense_lora_kt.yaml on tiny-moe (hidden 64, moe_intermediate 96) with its kt
    keys as written, except one kernel thread; in a subprocess, so a native crash fails only this."""
    data = synthetic.write_jsonl(synthetic.sft_conversations(24, seed=0), tmp_path / "sft.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIMIND_DATA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_full_sft.py"), "--config",
         str(REPO / "examples" / "commonsense_lora_kt.yaml"), *TINY, "--model_preset", "tiny-moe",
         "--kt_num_threads", "1", "--dataset_dir", "", "--data_path", str(data), "--eval_fraction", "0.1",
         "--out_dir", str(tmp_path / "run")],
        env=env, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "routed experts run in kt-kernel" in proc.stdout
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.experts.2.up_proj" in adapter["modules"]


def test_examples_reject_a_typo(tmp_path):
    """The parser the examples go through names an unknown key (so a rotted key cannot pass)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "examples" / "gsm8k_lora.yaml").read_text() + "lora_rnak: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        parse_config(train_full_sft.SFTConfig, ["--config", str(bad)], validate=False)
