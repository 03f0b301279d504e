"""DDP under torchrun (gloo, CPU): ranks end identical and match one process on the same global
batch; a checkpoint from 2 processes resumes in 1 process at the same sample position."""
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "trainer_driver.py"
COMMON = ["--device", "cpu", "--dtype", "fp32", "--no-progress", "--no-plot", "--peak_tflops", "1", "--dropout", "0",
          "--batch_size", "4", "--max_steps", "6", "--save_every", "3", "--log_every", "3"]


def run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def weights(out_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out_dir / f"final_rank{rank}.safetensors"))


def assert_close(a: dict, b: dict, tol: float) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


def test_two_processes_match_one(tmp_path):
    ddp, single, resumed = tmp_path / "ddp", tmp_path / "single", tmp_path / "resumed"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(DRIVER), "--out_dir", str(ddp), "--grad_accum", "1", *COMMON])
    run([sys.executable, str(DRIVER), "--out_dir", str(single), "--grad_accum", "2", *COMMON])
    r0, r1, one = weights(ddp, 0), weights(ddp, 1), weights(single)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged on {k}"
    assert_close(r0, one, 1e-6)          # same samples per step; only summation order differs

    # resume the 2-process checkpoint of step 3 in one process (global batch 8 kept via accum 2)
    out = run([sys.executable, str(DRIVER), "--out_dir", str(resumed), "--grad_accum", "2", *COMMON,
               "--resume", str(ddp / "checkpoints" / "step_000003")])
    assert "resuming from" in out
    assert_close(weights(resumed), one, 1e-6)


def test_grad_sync_skips_allreduce_except_last_micro_step(tmp_path, monkeypatch):
    """In-process world of one: DDP's all-reduce runs only where grad_sync(sync=True)."""
    import torch.distributed as tdist
    from trainer import distributed as dist

    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        calls = []

        def hook(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        model.register_comm_hook(None, hook)
        for i in range(3):
            with dist.grad_sync(model, sync=i == 2):
                model(torch.randn(2, 4)).sum().backward()
            assert len(calls) == (1 if i == 2 else 0)
    finally:
        dist.cleanup()
