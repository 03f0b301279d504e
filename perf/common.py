"""Helpers the benchmarks share: timing on a noisy machine, autocast on the CPU, and running the
stage scripts the comparisons (preference, rl, agent) are made of.

Scope: only what more than one module of ``perf`` uses; each benchmark keeps its own measuring.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def best_time(fn, repeat: int, warmup: int = 1) -> float:
    """Minimum wall time of ``repeat`` calls: the least disturbed run on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def autocast(dtype: torch.dtype):
    """Mixed precision on the CPU in ``dtype``; fp32 runs as it is."""
    return (contextlib.nullcontext() if dtype == torch.float32
            else torch.autocast("cpu", dtype=dtype))


def run_stage(*args: str) -> float:
    """A stage script (from the repo root, this Python); its wall time in seconds."""
    print("$ " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def with_tokenizer(folder: Path, tokenizer: Path) -> Path:
    """A model folder made self-contained with the tokenizer files (eval_model.py reads them)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer / name, folder / name)
    return folder
