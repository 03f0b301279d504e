"""Per-rank training memory, DDP against FSDP, at 1, 2 and 4 CPU processes (gloo).

Scope: for each world size N and each of ``--parallel ddp`` / ``fsdp``, one ``torchrun
--nproc_per_node=N`` launch of this module's worker, which builds the model exactly as the
trainer does (trainer.distributed.shard_model / wrap_model, trainer.optim's AdamW), runs one
training step on random tokens and reports what each rank holds:

- params / grads / optimizer state: bytes of the tensors this rank owns (a DTensor's local
  shard under FSDP; trainer.distributed.local_bytes), counted after the step, so the AdamW
  moments exist. DDP also keeps gradient buckets for its all-reduce (about one more gradient
  copy), not counted here: its figures are a lower bound;
- peak RSS of the process (ru_maxrss; includes the Python/torch runtime and the activations);
- activations kept for backward, with and without ``--activation_checkpointing``: the bytes
  of the distinct tensors autograd saves during the forward (a saved_tensors_hooks count; under
  recompute only each block's input is kept, the rest is rebuilt in backward). Measured in the
  one-process runs (it is per micro-batch and does not depend on N).

Usage: ``python scripts/bench_memory.py [--preset minimind2] [--worlds 1,2,4] [--seq_len 256]
[--batch_size 2] [--json out.json]``. The goal it checks: FSDP's per-rank state ≈ 1/N of DDP's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common.atomic import atomic_write_text

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


def _saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(bytes of the distinct tensors saved for backward during one forward, the loss)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and not isinstance(t, torch.nn.Parameter):
            local = t.to_local() if hasattr(t, "to_local") else t
            key = (local.untyped_storage().data_ptr(), local.dtype)
            seen[key] = max(seen.get(key, 0), local.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for (ptr, _), v in seen.items() if ptr not in params), loss


def worker(args: argparse.Namespace) -> None:
    """One rank: build, shard or wrap, one AdamW step, write this rank's figures as JSON."""
    from model.config import MiniMindConfig
    from model.model import MiniMindLM
    from trainer import distributed as dist
    from trainer.optim import build_optimizer, param_groups

    env = dist.init_distributed("cpu")
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset(args.preset, dropout=0.0))
    if args.recompute:
        dist.apply_activation_checkpointing(model)
    if args.parallel == "fsdp":
        dist.shard_model(model, env, None)
        step_model = model
    else:
        step_model = dist.wrap_model(model, env)
    optimizer = build_optimizer(param_groups(model, None, 0.1), 1e-4, (0.9, 0.95), 1e-8, "cpu")
    gen = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    if env.distributed:      # activations are per micro-batch: measured in one process
        saved, loss = 0, step_model(input_ids=ids, labels=ids).loss
    else:
        saved, loss = _saved_activation_bytes(step_model, ids)
    loss.backward()
    optimizer.step()
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {"rank": env.rank, "params": sum(dist.local_bytes(p) for p in params),
           "grads": sum(dist.local_bytes(p.grad) for p in params),
           "optimizer": sum(dist.local_bytes(t) for t in state),
           "activations": saved, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "numel": sum(p.numel() for p in params)}
    atomic_write_text(Path(args.out, f"rank{env.rank}.json"), json.dumps(out))
    dist.cleanup()


def measure(preset: str, world: int, parallel: str, seq_len: int, batch_size: int,
            recompute: bool = False) -> dict:
    """Launch one world of workers; returns rank 0's figures (every rank holds the same sizes
    up to rounding of the shards) with the largest RSS of the ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "perf.memory", "--worker", "--out", tmp, "--preset", preset, "--parallel", parallel,
               "--seq_len", str(seq_len), "--batch_size", str(batch_size)] + ["--recompute"] * recompute
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    row = dict(ranks[0])
    row["peak_rss"] = max(r["peak_rss"] for r in ranks)
    row["max_state"] = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="minimind2")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    print(f"preset {args.preset}, batch {args.batch_size} x seq {args.seq_len} per rank, fp32 AdamW, CPU/gloo")
    print(f"{'parallel':8} {'N':>2} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} "
          f"{'state MiB':>10} {'vs ddp':>7} {'peak RSS MiB':>13}")
    for world in worlds:
        ddp_state = None
        for parallel in ("ddp", "fsdp"):
            r = measure(args.preset, world, parallel, args.seq_len, args.batch_size)
            state = r["params"] + r["grads"] + r["optimizer"]
            ddp_state = ddp_state or state
            rows.append({"parallel": parallel, "world": world, **r})
            print(f"{parallel:8} {world:>2} {r['params'] / MIB:>11.1f} {r['grads'] / MIB:>10.1f} "
                  f"{r['optimizer'] / MIB:>10.1f} {state / MIB:>10.1f} {state / ddp_state:>7.3f} "
                  f"{r['peak_rss'] / MIB:>13.0f}", flush=True)
    plain = measure(args.preset, 1, "ddp", args.seq_len, args.batch_size)
    ac = measure(args.preset, 1, "ddp", args.seq_len, args.batch_size, recompute=True)
    print(f"activations kept for backward, one micro-batch: plain {plain['activations'] / MIB:.1f} MiB, "
          f"--activation_checkpointing {ac['activations'] / MIB:.1f} MiB "
          f"({ac['activations'] / max(plain['activations'], 1):.3f}x); peak RSS "
          f"{plain['peak_rss'] / MIB:.0f} vs {ac['peak_rss'] / MIB:.0f} MiB")
    rows += [{"parallel": "single", "recompute": False, **plain}, {"parallel": "single", "recompute": True, **ac}]
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
