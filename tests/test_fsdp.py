"""FSDP2 (--parallel fsdp) on 2 gloo processes against one plain process, activation
checkpointing against plain backward, and sharded (DCP) checkpoints resumed at another world size.

The reference is one process training the plain, unsharded model on the same global batch
(FSDP in one process shards nothing: trainer.distributed.shard_model). Each spawned run checks
several things at once (multi-process starts are the slow part): accumulation (grad_accum 2 per
rank = 4 in one process), clipping (grad_clip far below the gradient norm, so every step clips),
activation checkpointing under FSDP, validation with uneven batches per rank, and the checkpoint
written at step 2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from common.errors import UserError
from model.config import MiniMindConfig
from model.model import MiniMindLM
from trainer import distributed as dist
from trainer.adapters import LoRAOptions
from trainer.config import TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
DRIVER = [str(REPO / "tests" / "trainer_driver.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ["--device", "cpu", "--dtype", "fp32", "--no-progress", "--no-plot", "--peak_tflops", "1",
          "--batch_size", "2", "--max_steps", "4", "--save_every", "2", "--log_every", "1",
          "--grad_clip", "0.05", "--num_samples", "32", "--dropout", "0"]
TOL = 1e-5


def run(cmd: list[str], *runs: tuple[Path, tuple[str, ...]]) -> None:
    """The driver's runs [(out_dir, flags), ...] one after the other in the same process(es)."""
    argv: list[str] = []
    for out, args in runs:
        argv += ["--then"] * bool(argv) + ["--out_dir", str(out), *COMMON, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*cmd, *DRIVER, *argv], capture_output=True, text=True, env=env, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


ONE = ("--grad_accum", "4", "--parallel", "fsdp")     # one process: accumulation 4 = 2 ranks x 2
TWO = ("--grad_accum", "2", "--parallel", "fsdp")
MOE_LORA = ("--model_preset", "tiny-moe", "--lora_rank", "4", "--lora_init_seed", "7")


def losses(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def assert_same_run(a: Path, b: Path, first_step: int = 1) -> None:
    """Loss step for step (and the clipped-from norm), then every final weight, within TOL;
    both ranks of a 2-process run hold the same gathered weights."""
    la, lb = losses(a), losses(b)
    la = [r for r in la if r[0] >= first_step]
    lb = [r for r in lb if r[0] >= first_step]
    assert [r[0] for r in la] == [r[0] for r in lb] == list(range(first_step, 5))
    for (s, loss_a, gn_a), (_, loss_b, gn_b) in zip(la, lb):
        assert abs(loss_a - loss_b) < TOL, (s, loss_a, loss_b)
        assert gn_a > 2 * 0.05 and abs(gn_a - gn_b) < 1e-4 * gn_a, (s, gn_a, gn_b)   # clipped
    wa = safetensors.torch.load_file(str(a / "final_rank0.safetensors"))
    wb = safetensors.torch.load_file(str(b / "final_rank0.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=TOL, rtol=0, msg=k)
    if (b / "final_rank1.safetensors").exists():
        w1 = safetensors.torch.load_file(str(b / "final_rank1.safetensors"))
        assert all(torch.equal(w1[k], wb[k]) for k in wb)


def test_fsdp_matches_one_process_and_resumes_across_world_sizes(tmp_path):
    """Dense (with activation checkpointing under FSDP) and MoE + LoRA (on every linear layer,
    experts included; random B so A and B both move from step 1; blocks kept gathered between
    forward and backward): 2 FSDP processes equal one
    plain process step for step. Then the sharded checkpoint of step 2 resumes 2 -> 1 and the
    one-process checkpoint 1 -> 2, and both continued runs equal the uninterrupted one."""
    one, two, moe1, moe2 = (tmp_path / n for n in ("one", "two", "moe_one", "moe_two"))
    ckpt2, ckpt1 = (d / "checkpoints" / "step_000002" for d in (two, one))
    # 3 validation batches: rank 0 runs 2, rank 1 one real and one padding forward
    val = ("--eval_rows", "6", "--eval_batches", "3")
    run([sys.executable], (one, ONE + val), (moe1, ONE + MOE_LORA))
    run(TORCHRUN, (two, TWO + val + ("--activation_checkpointing",)), (moe2, TWO + MOE_LORA + ("--no-reshard_after_forward",)),
        (tmp_path / "one_to_two", TWO + ("--resume", str(ckpt1))))
    run([sys.executable], (tmp_path / "two_to_one", ONE + ("--resume", str(ckpt2))))
    assert_same_run(one, two)
    val_one, val_two = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (one, two))
    assert abs(val_one["val_loss"] - val_two["val_loss"]) < TOL, (val_one, val_two)
    assert_same_run(moe1, moe2)
    assert_same_run(one, tmp_path / "two_to_one", first_step=3)
    assert_same_run(one, tmp_path / "one_to_two", first_step=3)

    manifest = json.loads((ckpt2 / "COMPLETE").read_text())["files"]
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= manifest.keys()
    assert not (ckpt2 / "model.safetensors").exists()      # the weights are in the shards only
    # LoRA: the frozen base did not move (it equals a fresh model of the same seed)
    final = safetensors.torch.load_file(str(moe2 / "final_rank0.safetensors"))
    torch.manual_seed(1337)
    init = MiniMindLM(MiniMindConfig.from_preset("tiny-moe", dropout=0.0)).state_dict()
    frozen = [k for k in final if "lora_" not in k and k in init]
    assert len(frozen) > 10 and all(torch.equal(final[k], init[k]) for k in frozen)


def test_activation_checkpointing_gives_the_plain_gradients():
    """Per-block recompute, dropout on (its masks must be replayed), dense and MoE: gradients
    equal plain backward's; names and state dict unchanged; eval/no-grad forwards plain."""
    for preset in ("tiny", "tiny-moe"):
        grads = []
        for recompute in (False, True):
            torch.manual_seed(0)
            model = MiniMindLM(MiniMindConfig.from_preset(preset, dropout=0.2))
            names = list(model.state_dict())
            if recompute:
                dist.apply_activation_checkpointing(model)
                assert list(model.state_dict()) == names
            ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
            torch.manual_seed(5)
            model(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "fp16"], "sharded GradScaler"),
    (["--use_kt"], "kt-kernel holds its own"),
    (["--eval_gen_data", __file__], "generates on the main process"),
    (["--merge_on_save"], "merge afterwards"),
])
def test_fsdp_refuses_what_it_cannot_shard(flags, message):
    with pytest.raises(UserError, match=message):
        parse_config(LoRAOptions, ["--parallel", "fsdp", "--device", "cpu", "--model_preset",
                                   "tiny-moe", *flags])
    parse_config(TrainConfig, ["--parallel", "fsdp", "--device", "cpu", "--dtype", "fp32"])


def test_sharded_checkpoint_crash_keeps_previous_and_ddp_resumes_it(tmp_path, monkeypatch):
    """In one process (--parallel fsdp writes the sharded format there too): a save that fails
    after the shards are on disk (disk full at trainer_state) leaves no folder that looks
    complete, and --resume auto takes the previous checkpoint; a --parallel ddp run resumes that
    sharded checkpoint and ends where an uninterrupted run does."""
    from tests.trainer_driver import RandomRows
    from trainer import checkpoint as ck
    from trainer.loop import fit
    from trainer.losses import lm_loss
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(ck.FAULT_ENV, "")     # on_save arms it; unset again after the test

    def train(out: Path, parallel: str, fail_at: int = 0, **kw) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0))
        cfg = TrainConfig(out_dir=str(out), device="cpu", dtype="fp32", batch_size=2, seq_len=16,
                          max_steps=4, save_every=2, log_every=1, progress=False, plot=False,
                          peak_tflops=1.0, parallel=parallel, **kw)

        def on_save(m, step):      # called before the shards are written
            if step == fail_at:
                os.environ[ck.FAULT_ENV] = f"enospc:{ck.STATE_NAMES[1]}"
            return None
        fit(model, RandomRows(16, 16, model.config.vocab_size), lm_loss, cfg, on_save=on_save)
        return {k: v.clone() for k, v in model.state_dict().items()}

    full = train(tmp_path / "full", "fsdp")
    with pytest.raises(UserError, match="No space left"):
        train(tmp_path / "run", "fsdp", fail_at=4)     # step 4's save fails after its shards
    os.environ[ck.FAULT_ENV] = ""
    step2, step4 = (tmp_path / "run" / "checkpoints" / f"step_00000{i}" for i in (2, 4))
    assert ck.list_checkpoints(tmp_path / "run") == [step2] and ck.is_sharded_checkpoint(step2)
    resumed = train(tmp_path / "run", "ddp", resume="auto")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=TOL, rtol=0, msg=k)


def test_fsdp_grad_sync_reduces_only_on_the_last_micro_step(tmp_path):
    """In-process world of one (gloo): under grad_sync(sync=False) FSDP keeps the unsharded
    gradients to itself (no reduce-scatter: the sharded .grad stays None); the synced micro-step
    reduces the sum of all of them, which equals one backward over both batches."""
    import torch.distributed as tdist
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0,
                             world_size=1)
    try:
        torch.manual_seed(0)
        model = MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0))
        plain = MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0))
        plain.load_state_dict(model.state_dict())
        with pytest.MonkeyPatch.context() as mp:   # shard_model shards only when "distributed"
            mp.setattr(dist.DistEnv, "distributed", property(lambda self: True))
            dist.shard_model(model, dist.DistEnv(), None)
        assert dist.is_sharded(model)
        batches = [torch.randint(3, 6400, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        for i, ids in enumerate(batches):
            with dist.grad_sync(model, sync=i == 1):
                model(input_ids=ids, labels=ids).loss.backward()
            synced = [p.grad is not None for p in model.parameters()]
            assert all(synced) if i == 1 else not any(synced)
            plain(input_ids=ids, labels=ids).loss.backward()
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-6, rtol=1e-5, msg=name)
    finally:
        dist.cleanup()
