"""The one dtype table, and what ``--dtype auto`` means on the machine a process runs on.

``auto`` picks bf16 where the hardware runs it natively, fp16 on a GPU without bf16 (training adds
a GradScaler), and fp32 otherwise:

- CUDA: bf16 if ``torch.cuda.is_bf16_supported()``, else fp16.
- CPU: bf16 only if the CPU has AVX512-BF16 or AMX *and* a short matmul probe confirms that
  PyTorch's kernels use it. Why both: on an AVX2-only CPU a bf16 matmul is emulated and runs ~40x
  slower than fp32, so bf16 autocast there is a trap; and a capable CPU can still be held to AVX2
  (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, an old library), which only the
  probe sees.
- anything else (mps): fp32.

An explicit dtype always wins. The choice and its reason come back as one line for the log, e.g.
``dtype auto -> fp32: this CPU has no native bf16 (AVX2)``. The probe runs once per process.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The spellings transformers and torch use, accepted wherever a dtype name is.
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
DTYPE_CHOICES = ("auto", *DTYPES)


def canonical_name(name: str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` / ``auto`` for any accepted spelling; ValueError otherwise."""
    key = _ALIASES.get(name, name)
    if key not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_CHOICES)}")
    return key


@dataclass(frozen=True)
class Precision:
    """A resolved dtype: its name, the torch dtype, and why it was chosen."""

    name: str  # fp32 | bf16 | fp16
    requested: str  # what the user asked for (auto or an explicit name)
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def describe(self) -> str:
        return f"dtype {self.requested} -> {self.name}: {self.reason}"


def _cpu_flags() -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo; None where there is no such file (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    """Best time of an n x n matmul on one thread. Why one: on a busy machine a multi-threaded
    fp32 matmul (~0.3 ms) can wait a whole scheduler slice at its OpenMP barrier in every rep,
    which measured emulated bf16 (29-39x slower on one thread) as 1.2-1.5x *faster* (AVX2 held
    on an AVX-512 CPU, 2 threads, load 4). Per-core speed is what the choice is about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up: first-call dispatch and oneDNN kernel creation are not the steady state
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(threads)


@functools.cache
def cpu_bf16_support() -> tuple[bool, str]:
    """(native, reason) for bf16 on this CPU with this PyTorch build; measured once per process."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if flags is not None and not flags & {"avx512_bf16", "amx_bf16"}:
        return False, f"this CPU has no native bf16 ({capability})"
    # bf16 must beat fp32 outright: native AVX512-BF16/AMX runs it 1.5-7x faster than fp32 at
    # this size, emulation runs it 10-80x slower, so the margin is wide either way.
    ratio = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
    isa = "AMX" if flags and "amx_bf16" in flags else "AVX512-BF16"
    if ratio < 1.0:
        return False, (f"bf16 matmul measured {1 / ratio:.0f}x slower than fp32 here "
                       f"(PyTorch CPU capability {capability})")
    return True, f"this CPU runs bf16 natively ({isa}; bf16 matmul {ratio:.1f}x fp32)"


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """The dtype to compute in on `device` for a requested name (``auto`` or explicit)."""
    requested = canonical_name(requested)
    device = torch.device(device)
    if requested != "auto":
        return Precision(requested, requested, "set explicitly")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp16", "auto", f"{torch.cuda.get_device_name(device)} has no bf16 "
                                         "(training uses a GradScaler)")
    if device.type == "cpu":
        native, reason = cpu_bf16_support()
        return Precision("bf16" if native else "fp32", "auto", reason)
    return Precision("fp32", "auto", f"no reduced-precision default on {device.type}")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
