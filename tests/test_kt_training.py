"""MoE experts in kt-kernel during training: config keys and checks, full SFT and LoRA with use_kt.

Validation cases run in-process (no kernel is built). Every case that runs kt-kernel runs a stage
script in a subprocess: a bad shape kills the process natively (SIGSEGV), which must fail one
test, not the run. They are skipped only when kt_kernel is missing or its CPU variant has no
training kernels (see /work/shared/docs/KT_KERNEL.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from dataset import synthetic
from model.config import MiniMindConfig
from model.io import load_pretrained, save_pretrained
from model.model import MiniMindLM
from offload.experts import kt_status
from train_full_sft import SFTConfig
from trainer.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]
KT_OK, KT_WHY = kt_status()
needs_kt = pytest.mark.skipif(not KT_OK, reason=f"kt backend unavailable: {KT_WHY}")
# One kernel thread and small sizes (multiples of 32): tiny-moe is hidden 64, moe_intermediate 96.
COMMON = ["--no-progress", "--no-plot", "--peak_tflops", "1", "--kt_num_threads", "1",
          "--batch_size", "4", "--seq_len", "128", "--log_every", "3"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """SFT data (16 conversations, so a few steps overfit visibly) and a random tiny-moe base."""
    root = tmp_path_factory.mktemp("kt")
    synthetic.write_jsonl(synthetic.sft_conversations(16, seed=0), root / "sft.jsonl")
    torch.manual_seed(0)
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny-moe")), root / "base")
    return root


def run_script(script: str, work: Path, *args: str) -> list[dict]:
    """Run a stage script in its own process; returns its metrics.jsonl rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIMIND_DATA_CACHE": str(work / "cache")}
    proc = subprocess.run([sys.executable, str(REPO / script), *COMMON, *args], cwd=work, env=env,
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{script} exited with {proc.returncode}\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    out = Path(args[args.index("--out_dir") + 1])
    return [json.loads(line) for line in (work / out / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows if "loss" in r]


# ---------------------------------------------------------------------------------- config
def test_llamafactory_kt_keys_parse_from_yaml(tmp_path):
    f = tmp_path / "kt.yaml"
    f.write_text("use_kt: true\nkt_backend: AMXINT4\nkt_num_threads: 2\nkt_tp_enabled: false\n"
                 "kt_num_gpu_experts: 1\nkt_weight_path: ''\nmodel_preset: tiny-moe\n")
    cfg = parse_config(SFTConfig, ["--config", str(f)], validate=False)
    assert cfg.expert_backend() == "kt"
    opts = cfg.kt_options()
    assert (opts.method, opts.kt_num_threads, opts.kt_num_gpu_experts) == ("AMXINT4_SFT", 2, 1)
    assert opts.kt_weight_path == "" and opts.kt_chunk_tokens == cfg.batch_size * cfg.seq_len
    assert cfg.kt.kt_chunk_tokens == 0          # one KTOptions, one default; 0 = per micro-batch
    assert parse_config(SFTConfig, ["--moe_backend", "kt"], validate=False).expert_backend() == "kt"
    assert SFTConfig().expert_backend() == "torch"
    # the run config written to metrics / checkpoints keeps the flat keys users write
    flat = cfg.to_dict()
    assert flat["kt_backend"] == "AMXINT4" and flat["kt_num_gpu_experts"] == 1 and "kt" not in flat
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({k: v for k, v in flat.items() if k.startswith("kt_")}))
    assert parse_config(SFTConfig, ["--config", str(again)], validate=False).kt == cfg.kt


def test_kt_weight_path_is_an_error_where_kt_does_not_read_it(tmp_path):
    """kt_weight_path is read by AMXINT8 only: with another kt_backend it is a config error,
    not silently ignored (with or without use_kt)."""
    for args in (["--kt_weight_path", str(tmp_path)],
                 ["--use_kt", "--model_preset", "tiny-moe", "--kt_backend", "MXFP4",
                  "--kt_weight_path", str(tmp_path)]):
        with pytest.raises(ConfigError, match="kt_weight_path is read by kt_backend='AMXINT8' only"):
            parse_config(SFTConfig, args)
    with pytest.raises(ConfigError, match="kt_mode 'inference'"):
        parse_config(SFTConfig, ["--use_kt", "--model_preset", "tiny-moe", "--kt_mode", "inference"])


def _bad_moe(tmp_path: Path, **overrides) -> str:
    """A model folder whose config.json has the given shape (no weights needed for validation)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    MiniMindConfig.from_preset("tiny-moe", **overrides).to_json(folder / "config.json")
    return str(folder)


@pytest.mark.parametrize("args, message", [
    (["--use_kt"], "model is dense"),                                      # default preset: tiny
    (["--moe_backend", "cpu", "--model_preset", "tiny"], "model is dense"),
    (["--use_kt", "--moe_backend", "cpu", "--model_preset", "tiny-moe"], "pick one"),
    (["--use_kt", "--model_preset", "tiny-moe", "--kt_backend", "AMXFP8"], "not supported"),
    (["--use_kt", "--model_preset", "tiny-moe", "--kt_num_gpu_experts", "3"], "fewer than"),
    (["--use_kt", "--model_preset", "tiny-moe", "--kt_num_threads", "-1"], "kt_num_threads"),
])
def test_kt_misconfiguration_fails_at_parse_time(args, message):
    """The one validation place (parse_config → validate) names the problem before any work."""
    with pytest.raises(ConfigError, match=message):
        parse_config(SFTConfig, args)


def test_kt_shapes_not_multiple_of_32_fail_before_any_kernel(tmp_path):
    """kt-kernel would crash the process on these shapes; the check reads init_from's config."""
    bad = _bad_moe(tmp_path, moe_intermediate_size=80)
    with pytest.raises(ConfigError, match="moe_intermediate_size=80 is not a multiple of 32"):
        parse_config(SFTConfig, ["--use_kt", "--init_from", bad])
    parse_config(SFTConfig, ["--moe_backend", "cpu", "--init_from", bad])   # fine off kt


def test_kt_unavailable_is_a_config_error(monkeypatch):
    import offload.experts
    monkeypatch.setattr(offload.experts, "kt_status", lambda *a: (False, "kt_kernel is not importable"))
    with pytest.raises(ConfigError, match="use_kt: kt_kernel is not importable"):
        parse_config(SFTConfig, ["--use_kt", "--model_preset", "tiny-moe"])


@pytest.mark.parametrize("switch", [["--use_kt"], ["--moe_backend", "kt"]])
def test_training_on_a_cpu_variant_without_sft_kernels_fails_at_config_time(monkeypatch, switch):
    """kt-kernel's avx2 build (AVX2-only CPUs, CI) has no bf16 training kernels: the config
    check says so in one line naming the variant and the ways forward (any machine: the detected
    variant is faked)."""
    import types
    fake = types.ModuleType("kt_kernel")
    fake.__cpu_variant__ = "avx2"
    monkeypatch.setitem(sys.modules, "kt_kernel", fake)
    with pytest.raises(ConfigError) as info:
        parse_config(SFTConfig, [*switch, "--model_preset", "tiny-moe"])
    lines = [ln for ln in str(info.value).splitlines() if "avx2" in ln]
    assert len(lines) == 1, str(info.value)
    for needle in ("variant 'avx2'", "--moe_backend cpu", "AVX512-BF16 or AMX"):
        assert needle in lines[0], (needle, lines[0])
    parse_config(SFTConfig, ["--moe_backend", "cpu", "--model_preset", "tiny-moe"])  # the way out


# ---------------------------------------------------------------------------------- kt runs
@needs_kt
def test_full_sft_with_kt_trains_all_but_the_routed_experts(work):
    """Full SFT under kt: loss falls; attention, router and shared experts change; the routed
    experts' base weights are bit-for-bit the base (the kernel holds them frozen)."""
    (work / "full_kt.yaml").write_text("use_kt: true\nkt_backend: AMXBF16\nkt_tp_enabled: false\n")
    rows = run_script("train_full_sft.py", work, "--config", "full_kt.yaml", "--init_from", "base",
                      "--data_path", "sft.jsonl", "--out_dir", "full_kt", "--max_steps", "9",
                      "--lr", "3e-3")
    curve = losses(rows)
    assert curve[-1] < curve[0] - 0.2, curve
    base, final = load_pretrained(work / "base"), load_pretrained(work / "full_kt" / "final")
    b, f = base.state_dict(), final.state_dict()
    routed = [k for k in b if ".mlp.experts." in k]
    assert routed and all(torch.equal(b[k], f[k]) for k in routed)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate.weight",
              "model.layers.0.mlp.shared_experts.0.up_proj.weight"):
        assert not torch.equal(b[k], f[k]), k


@needs_kt
def test_lora_with_kt_trains_like_torch_and_its_adapter_merges_on_torch(work):
    """train_lora.py with use_kt: loss falls and tracks the torch backend's run step for step;
    the adapter holds per-expert LoRA and, merged into a torch-backend model (load_for_inference
    --lora), reproduces the validation loss the kt model reported."""
    args = ["--init_from", "base", "--data_path", "sft.jsonl", "--eval_data_path", "sft.jsonl",
            "--eval_batches", "2", "--max_steps", "9", "--lr", "2e-2", "--lora_rank", "8",
            "--lora_alpha", "16", "--lora_target", "all"]
    kt = run_script("train_lora.py", work, *args, "--use_kt", "--out_dir", "lora_kt")
    ref = run_script("train_lora.py", work, *args, "--moe_backend", "torch", "--out_dir", "lora_torch")
    curve = losses(kt)
    assert curve[-1] < curve[0] - 0.1, curve
    # bf16 kernel vs torch bf16 autocast: the same training, up to rounding
    assert losses(ref) == pytest.approx(curve, rel=0.01)

    adapter = work / "lora_kt" / "final"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        b = fh.get_tensor("model.layers.0.mlp.experts.1.gate_proj.lora_B")
    for layer in (0, 1):
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert {f"model.layers.{layer}.mlp.experts.{e}.{proj}.lora_A",
                        f"model.layers.{layer}.mlp.experts.{e}.{proj}.lora_B"} <= keys
    assert b.abs().sum() > 0          # the kernel's gradients reached the expert adapters

    from dataset.lm_dataset import load_files, make_collate
    from inference import load_for_inference
    from trainer import distributed as dist
    from trainer.config import TrainConfig
    from trainer.loop import make_autocast
    from trainer.validation import evaluate
    from trainer.losses import lm_loss
    model, tokenizer = load_for_inference(work / "base", adapter, "cpu", "fp32", moe_backend="torch")
    ds = load_files("sft", [str(work / "sft.jsonl")], tokenizer, 128)
    cfg = TrainConfig(batch_size=4, eval_batches=2, device="cpu")
    env = dist.init_distributed("cpu")
    merged = evaluate(model, {"sft": ds}, lm_loss, cfg, env, make_collate(tokenizer.pad_id),
                      make_autocast("cpu", "bf16"))["val_loss"]
    kt_val = [r["val_loss"] for r in kt if "val_loss" in r][-1]
    assert merged == pytest.approx(kt_val, rel=0.01)
    base_model, _ = load_for_inference(work / "base", None, "cpu", "fp32")
    assert not torch.equal(base_model.state_dict()["model.layers.0.mlp.experts.1.gate_proj.weight"],
                           model.state_dict()["model.layers.0.mlp.experts.1.gate_proj.weight"])


@needs_kt
def test_sft_lora_switch_with_kt_saves_an_adapter(work):
    """train_full_sft.py --finetuning_type lora under kt: the LLaMA-Factory-KT set-up."""
    rows = run_script("train_full_sft.py", work, "--finetuning_type", "lora", "--use_kt",
                      "--init_from", "base", "--data_path", "sft.jsonl", "--out_dir", "sft_lora_kt",
                      "--max_steps", "6", "--lr", "2e-2", "--lora_rank", "4",
                      "--lora_target", "q_proj,gate_proj,up_proj,down_proj")
    curve = losses(rows)
    assert curve[-1] < curve[0], curve
    cfg = json.loads((work / "sft_lora_kt" / "final" / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj" in cfg["modules"]
