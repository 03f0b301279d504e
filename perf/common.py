"""Helpers the benchmarks share: timing on a noisy machine, and autocast on the CPU.

Scope: only what more than one module of ``perf`` uses; each benchmark keeps its own measuring.
"""

from __future__ import annotations

import contextlib
import time

import torch


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
