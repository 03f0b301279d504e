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
