"""Crash and resume: kill -9 at a fixed point (mid-step, or inside a checkpoint), or a crash inside
a checkpoint write, then
`--resume` must end with weights bit-identical to an uninterrupted run (dropout on, so the RNG
state is part of what must be restored)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "trainer_driver.py"


def driver_cmd(out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(DRIVER), "--out_dir", str(out_dir), "--device", "cpu", "--no-progress", "--no-plot",
            "--peak_tflops", "1", "--max_steps", "10", "--grad_accum", "2", "--save_every", "1",
            "--keep_last", "2", *extra]


def env_one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_one_thread(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out_dir / "final_rank0.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of uninterrupted runs, one per dtype, computed once for the module."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(dtype: str) -> dict[str, torch.Tensor]:
        if dtype not in cache:
            out = tmp_path_factory.mktemp(f"ref_{dtype}")
            run(driver_cmd(out, "--dtype", dtype))
            cache[dtype] = final_weights(out)
        return cache[dtype]
    return get


@pytest.mark.parametrize("dtype, where, step", [
    ("fp32", "kill_at_step", 6),   # mid-step: one micro-batch's gradients accumulated, unsaved
    ("bf16", "kill_in_save", 4),   # inside a checkpoint: optimizer/RNG state gathered, no file yet
])
def test_kill9_then_resume_is_bit_identical(tmp_path, dtype, where, step, reference):
    """The process SIGKILLs itself at a fixed point (no timing race, reproducible): the resume
    starts from step N-1's checkpoint and must end bit-identical to the uninterrupted run."""
    crash = tmp_path / "crash"
    proc = subprocess.run(driver_cmd(crash, "--dtype", dtype, f"--{where}", str(step)),
                          env=env_one_thread(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (crash / "final_rank0.safetensors").exists()
    assert (crash / "checkpoints" / "latest").read_text() == f"step_{step - 1:06d}"
    out = run(driver_cmd(crash, "--dtype", dtype, "--resume"))
    assert f"step_{step - 1:06d}" in out.stdout
    assert "resuming from" in out.stdout
    assert_identical(reference(dtype), final_weights(crash))


def test_crash_inside_checkpoint_write_then_resume(tmp_path, reference):
    crash = tmp_path / "crash"
    proc = subprocess.run(driver_cmd(crash, "--dtype", "fp32", "--crash_save_at", "4",
                                     "--crash_file", "model.safetensors"),
                          capture_output=True, text=True, env=env_one_thread())
    assert proc.returncode == 17, proc.stderr            # died half-way through step 4's weights
    ckpts = crash / "checkpoints"
    assert not (ckpts / "step_000004" / "COMPLETE").exists()
    assert (ckpts / "latest").read_text() == "step_000003"
    out = run(driver_cmd(crash, "--dtype", "fp32", "--resume"))
    assert "skipping step_000004" in out.stdout and "step_000003" in out.stdout
    assert_identical(reference("fp32"), final_weights(crash))
    steps = [line for line in (crash / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 5                               # log_every 2 over 10 steps, no duplicates


# ---------------------------------------------------------------------- LoRA: no base in checkpoints
def _lora_run(work: Path, out: str, *extra: str, kt: bool, monkeypatch) -> str:
    """train_lora.py for 6 steps, saving at 3 and 6: in this process for the torch experts
    (faster), in its own process under kt (a native crash must fail one test, not the run)."""
    args = ["--init_from", str(work / "base"), "--data_path", str(work / "sft.jsonl"),
            "--out_dir", str(work / out), "--device", "cpu", "--no-progress", "--no-plot",
            "--peak_tflops", "1", "--seq_len", "64", "--batch_size", "2", "--max_steps", "6",
            "--save_every", "3", "--lora_rank", "4", "--lr", "1e-2", "--log_every", "3", *extra]
    if not kt:
        import train_lora
        monkeypatch.setattr(sys, "argv", ["train_lora.py", "--dtype", "fp32",
                                          "--lora_dropout", "0.1", *args])  # dropout: RNG restored
        train_lora.main()
        return ""
    args += ["--use_kt", "--kt_num_threads", "1", "--dtype", "bf16",   # kt runs no adapter dropout
             "--lora_target", "q_proj,gate_proj,up_proj,down_proj"]    # expert adapters in the kernel
    env = {**env_one_thread(), "MINIMIND_DATA_CACHE": str(work / "cache")}
    proc = subprocess.run([sys.executable, str(REPO / "train_lora.py"), *args], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _kt_ok() -> tuple[bool, str]:
    from offload.experts import kt_status
    return kt_status()


# kt costs ~15 s here, over this suite's budget: MINIMIND_TEST_KT_RESUME=1 adds it (the kt
# recipes in test_commonsense_recipes.py check that their checkpoints hold the expert adapters).
@pytest.mark.parametrize("kt", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _kt_ok()[0] or not os.environ.get("MINIMIND_TEST_KT_RESUME"),
    reason=f"opt-in (MINIMIND_TEST_KT_RESUME=1); kt: {_kt_ok()[1]}"))], ids=["torch", "kt"])
def test_lora_checkpoint_holds_no_base_and_resumes_bit_identical(tmp_path, kt, monkeypatch,
                                                                 one_thread_private_cache):
    """A LoRA checkpoint is the adapters + optimizer + resume state + a fingerprinted reference
    to the base; resuming it from step 3 ends bit-identical to the uninterrupted 6 steps."""
    from dataset import synthetic
    from model.config import MiniMindConfig
    from model.io import save_pretrained
    from model.model import MiniMindLM
    synthetic.write_jsonl(synthetic.sft_conversations(16, seed=0), tmp_path / "sft.jsonl")
    torch.manual_seed(0)
    base = save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny-moe" if kt else "tiny")),
                           tmp_path / "base")
    _lora_run(tmp_path, "full", kt=kt, monkeypatch=monkeypatch)
    ckpt = tmp_path / "full" / "checkpoints" / "step_000003"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["COMPLETE", "adapter_config.json", "adapter_model.safetensors", "base.json",
                     "trainable.safetensors", "trainer_state.json",
                     "trainer_state.safetensors"]
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    assert size < (base / "model.safetensors").stat().st_size / 2

    _lora_run(tmp_path, "resumed", "--resume", str(ckpt), kt=kt, monkeypatch=monkeypatch)
    resumed = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step_*"))
    assert resumed == ["step_000006"]                     # it started at step 3, not from scratch
    a = safetensors.torch.load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "resumed" / "final" / "adapter_model.safetensors"))
    assert_identical(a, b)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)   # it trained
    if kt:
        assert any(".experts." in k for k in a)


# ---------------------------------------------------------------------- disk full
def drive(monkeypatch, out_dir: Path, *extra: str) -> None:
    """trainer_driver.py behind run_cli, in this process (a subprocess costs seconds to start)."""
    import trainer_driver

    from common.errors import run_cli
    from trainer.checkpoint import FAULT_ENV
    monkeypatch.setenv(FAULT_ENV, "")         # the driver sets it at --crash_save_at
    monkeypatch.setattr(sys, "argv", ["trainer_driver.py", *driver_cmd(out_dir, *extra)[2:]])
    run_cli(trainer_driver.main)


def test_disk_full_inside_a_checkpoint_is_one_line_then_resumes(tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through step 4's weights (test hook): the partial folder goes, the run
    exits 2 with one line (path, error, checkpoint to resume from), and --resume continues to
    the weights of an uninterrupted run."""
    out, ckpts = tmp_path / "full", tmp_path / "full" / "checkpoints"
    with pytest.raises(SystemExit) as stop:
        drive(monkeypatch, out, "--max_steps", "6", "--crash_save_at", "4", "--crash_kind", "enospc",
              "--crash_file", "model.safetensors")
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {ckpts}/step_000004/model.safetensors: cannot write: No space left on device; "
        f"last complete checkpoint: {ckpts}/step_000003 (free space, then rerun with --resume auto)"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000003"]
    drive(monkeypatch, out, "--max_steps", "6", "--resume")
    assert "resuming from " + str(ckpts / "step_000003") in capsys.readouterr().out
    drive(monkeypatch, tmp_path / "uninterrupted", "--max_steps", "6")
    assert_identical(final_weights(tmp_path / "uninterrupted"), final_weights(out))


def test_disk_full_with_debug_keeps_the_traceback(tmp_path, monkeypatch):
    from common.errors import WriteError
    with pytest.raises(WriteError, match="no complete checkpoint to resume from"):
        drive(monkeypatch, tmp_path, "--max_steps", "1", "--crash_save_at", "1",
              "--crash_kind", "enospc", "--debug")
    assert not (tmp_path / "checkpoints" / "step_000001").exists()
