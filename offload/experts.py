"""Expert offload: run an MoE model's routed experts in CPU memory or in kt-kernel's CPU kernels.

Scope: a transform applied to a finished ``MiniMindLM`` from outside (like ``apply_lora``):
``offload_experts(model, backend)`` swaps every ``mlp.experts`` module for one with the same
contract, ``experts(x_TD, expert_ids_TK, weights_TK) -> y_TD``, and the same children, so
parameter names (``mlp.experts.N.gate_proj.weight``, ``...lora_A``) never change: checkpoints and
LoRA adapters move freely between backends. The router, shared experts and everything else stay
where they are, in PyTorch.

Backends:
- ``torch``: the model's own grouped dispatch (``model.moe.Experts``); undoes an earlier offload.
- ``cpu``: expert weights stay in CPU memory even when the rest of the model moves to a GPU;
  hidden states go to the CPU and back, autograd included. Same maths as ``torch``.
- ``kt``: kt-kernel (KTransformers' CPU MoE kernels). Two kernels, chosen per CPU variant by
  ``kt_mode`` (``auto``: training kernels where the variant ships them for ``kt_backend``, else
  inference kernels):
  * ``sft``: the SFT operator (``KTMoEWrapper(mode="sft")``) inside a ``torch.autograd.Function``.
    Base expert weights are frozen (the kernel holds its own bf16 / int8 / int4 / MXFP4 copy); LoRA
    on the experts' gate/up/down trains through the kernel's backward. Expert LoRA must already be
    applied (``model.lora.apply_lora``) or the experts are run frozen (``*_SkipLoRA``); apply LoRA
    before or after offloading, the kernel is built on first use and rebuilt if the adapters or
    base weights change. Only the ``amx`` / ``avx512_bf16`` builds have the bf16/int8/int4
    classes; ``MXFP4`` (4-bit MXFP4 base, quantised here on load, + LoRA) runs on ``avx2`` too.
  * ``inference``: forward only, bf16 weights, the low-level ``kt_kernel_ext.moe`` classes
    (``AMXBF16_MOE`` on amx / avx512_bf16, ``AVX2BF16_MOE`` on every other build). kt's own
    inference wrapper pins memory and so fails without an NVIDIA driver; these classes do not.
    Unmerged LoRA is folded into the kernel's weights (rebuilt when the adapters change).

kt-kernel footguns guarded here (see ``/work/shared/docs/KT_KERNEL.md``):
- hidden / intermediate sizes that are not multiples of 32 crash the process with no Python
  error: checked in Python before any kernel object exists (``check_kt_config``);
- only the ``amx`` and ``avx512_bf16`` CPU variants ship the bf16/int8/int4 training classes (the
  ``avx2`` build: inference classes and ``MXFP4_SFT_MOE`` only): checked at config time;
- kt keeps raw pointers into every tensor it is given (weights, the expert map, ...): each one is
  held alive by the runner for as long as the kernel object exists;
- a call may carry at most ``chunked_prefill_size`` tokens: larger batches are chunked;
- the kernel keeps raw pointers to (and pre-packs) the LoRA tensors: after every optimizer step
  ``refresh_kt_lora(model)`` copies the fp32 adapters into the kernel's bf16 buffers and calls
  ``update_lora_weights()`` (the trainer registers it as one of fit's ``after_step`` hooks;
  ``register_kt_refresh(optimizer, model)`` hooks it onto ``optimizer.step`` for a hand-written
  loop); as a safety net every forward also compares the adapters' version counters
  and refreshes when they moved, so a forgotten refresh never trains against a stale adapter;
- the kernel's gradient buffers are never exposed as ``.grad`` (aliasing makes gradients
  accumulate across backward calls in C++): they are copied out in fp32 each backward and routed
  to the per-expert ``lora_A`` / ``lora_B`` parameters by autograd;
- one cached forward per layer: a backward whose forward is no longer cached (chunked batches,
  two forwards before one backward) recomputes the forward first;
- ``CPUInfer`` is a process-wide singleton: the first thread configuration wins (warned);
- the kernel's staging buffer is shared by every wrapper in the process and only grows, keyed
  on token count alone: it is dropped when the layer shape changes.

LoRA settings under ``kt``: rank 1–256 (the range checked against the fp32 reference), dropout 0
only (the kernel's dropout mask cannot be reproduced by the torch backend, so an adapter trained
with it would not match), rsLoRA works (the kernel gets ``alpha = scale · rank``). Merged or
disabled adapters (``merge_lora``, ``disable_lora`` for a DPO reference) run the torch maths on
the CPU copy of the weights instead of the kernel.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Literal

import torch
from torch import nn

from model.moe import Experts, MoEFeedForward

Backend = Literal["torch", "cpu", "kt"]
BACKENDS = ("torch", "cpu", "kt")
# LLaMA-Factory-KT's ``kt_backend`` values → kt-kernel SFT method names.
KT_METHODS = {"AMXBF16": "AMXBF16_SFT", "AMXINT8": "AMXINT8_SFT", "AMXINT4": "AMXINT4_SFT",
              "MXFP4": "MXFP4_SFT"}
_AVX512_SFT = frozenset({"amx", "avx512_bf16"})
# The CPU variants of kt-kernel 0.7.2 whose build contains each method's SFT (training) class.
KT_TRAINING_VARIANTS = {"AMXBF16_SFT": _AVX512_SFT, "AMXINT8_SFT": _AVX512_SFT,
                        "AMXINT4_SFT": _AVX512_SFT, "MXFP4_SFT": _AVX512_SFT | {"avx2"}}
# Size granularity per method: other sizes crash bf16 natively; INT4 rejects < 128 at construction.
KT_SIZE_MULTIPLE = {"AMXBF16_SFT": 32, "AMXINT8_SFT": 32, "AMXINT4_SFT": 128, "MXFP4_SFT": 32}
KT_MODES = ("auto", "sft", "inference")
KT_MAX_RANK = 256
KT_INSTALL_HINT = ("pip install --no-deps -r requirements-kt.txt (the plain `pip install "
                   "kt-kernel` pins torch 2.9.1 and pulls CUDA wheels)")
# MXFP4_SFT clamps the SwiGLU inputs at ±limit (GPT-OSS style) and refuses 0 / inf; this large
# finite value leaves plain SiLU·up unchanged (checked against the fp32 reference).
_MXFP4_NO_CLAMP = 1e30
KT_DEFAULT_CHUNK_TOKENS = 2048  # kt_chunk_tokens=0 outside the trainer (which uses its micro-batch)
_PROJS = ("gate_proj", "up_proj", "down_proj")


# --- options ------------------------------------------------------------------------------------

def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class KTOptions:
    """kt settings under the names LLaMA-Factory-KT users write in YAML / on the command line.

    The one set of kt options: the trainer embeds it (``TrainConfig.kt``; its CLI flags and YAML
    keys are these field names, with this help text); the switch itself (``use_kt`` /
    ``moe_backend``) belongs to the caller, not to these options."""

    kt_backend: str = _opt("AMXBF16", "kt expert weights: AMXBF16 | AMXINT4 (quantised on load) | "
                           "AMXINT8 (needs kt_weight_path) | MXFP4 (4-bit MXFP4 base + LoRA; the only "
                           "kt training kernel on AVX2-only CPUs)")
    kt_mode: str = _opt("auto", "kt kernels: auto (training kernels where this CPU's build has "
                        "them) | sft (training) | inference (forward only)")
    kt_num_threads: int = _opt(0, "kt CPU worker threads (0 = every core of this process)")
    kt_tp_enabled: bool = _opt(False, "kt: one thread pool per NUMA node, experts split across them")
    kt_num_gpu_experts: int = _opt(0, "kt: the first N experts of each layer stay in torch")
    kt_weight_path: str = _opt("", "kt: folder of pre-quantised expert weights (.kt files); read "
                               "by kt_backend AMXINT8 only, an error with the others")
    kt_chunk_tokens: int = _opt(0, "kt: tokens per kernel call (0 = the trainer's batch_size * "
                                f"seq_len, one call per micro-batch; else {KT_DEFAULT_CHUNK_TOKENS}); "
                                "a chunked forward is recomputed in backward")

    @property
    def method(self) -> str:
        return KT_METHODS[self.kt_backend.upper()]

    def chunk_tokens(self) -> int:
        """Tokens per kernel call: kt_chunk_tokens, or the default when it is 0."""
        return self.kt_chunk_tokens or KT_DEFAULT_CHUNK_TOKENS

    def threads(self) -> int:
        return self.kt_num_threads or len(os.sched_getaffinity(0))

    def threadpool_count(self) -> int:
        return _numa_nodes() if self.kt_tp_enabled else 1

    def validate(self) -> None:
        """Field-level checks that need no model (sizes are checked in ``check_kt_config``)."""
        if self.kt_backend.upper() not in KT_METHODS:
            raise ValueError(f"kt_backend={self.kt_backend!r} is not supported; choose one of "
                             f"{sorted(KT_METHODS)}")
        if self.kt_mode not in KT_MODES:
            raise ValueError(f"kt_mode={self.kt_mode!r} is not supported; choose one of {KT_MODES}")
        if self.kt_num_threads < 0:
            raise ValueError(f"kt_num_threads={self.kt_num_threads} must be >= 0 (0 = all cores)")
        if self.kt_num_gpu_experts < 0:
            raise ValueError(f"kt_num_gpu_experts={self.kt_num_gpu_experts} must be >= 0")
        if self.kt_chunk_tokens < 0:
            raise ValueError(f"kt_chunk_tokens={self.kt_chunk_tokens} must be >= 0 (0 = default)")
        if self.kt_weight_path and self.method != "AMXINT8_SFT":
            # The other kernels are loaded from the model's own expert weights (so checkpoints,
            # merges and the torch backend agree with what the kernel runs); a file would be
            # silently ignored, or would make the kernel disagree with the model.
            raise ValueError(f"kt_weight_path is read by kt_backend='AMXINT8' only; "
                             f"kt_backend={self.kt_backend!r} loads the model's own expert "
                             "weights: drop kt_weight_path (or use AMXINT8)")
        if self.method == "AMXINT8_SFT":
            # kt-kernel quantises INT8 SFT weights offline only; online conversion raises.
            if not self.kt_weight_path:
                raise ValueError("kt_backend='AMXINT8' needs kt_weight_path (pre-quantised .kt "
                                 "expert files); use AMXBF16 or AMXINT4 to quantise on load")
            if not os.path.isdir(self.kt_weight_path):
                raise ValueError(f"kt_weight_path={self.kt_weight_path!r} is not a directory")


def _numa_nodes() -> int:
    try:
        return max(1, sum(1 for n in os.listdir("/sys/devices/system/node")
                          if n.startswith("node") and n[4:].isdigit()))
    except OSError:
        return 1


# --- availability and validation ---------------------------------------------------------------

def kt_variant() -> str | None:
    """kt-kernel's loaded CPU variant (``amx``, ``avx512_bf16``, ..., ``avx2``), None when missing.

    kt picks it from /proc/cpuinfo; ``KT_KERNEL_CPU_VARIANT=avx2`` (set before the import) loads
    a lower build, which is how the AVX2-only path is exercised on a bigger CPU.
    """
    try:
        import kt_kernel
    except ImportError:
        return None
    return getattr(kt_kernel, "__cpu_variant__", None)


def _no_training_reason(variant: str | None, method: str) -> str:
    """The one line that says why ``method`` cannot train on ``variant`` and what to do instead."""
    mxfp4 = ("; or --kt_backend MXFP4 (4-bit MXFP4 base experts + LoRA, the one training "
             "kernel this build has)") if variant in KT_TRAINING_VARIANTS["MXFP4_SFT"] else ""
    return (f"kt-kernel's CPU variant {variant!r} has no {method} training kernel (it ships in "
            f"{'/'.join(sorted(KT_TRAINING_VARIANTS[method]))} only): train with --moe_backend cpu "
            f"(the PyTorch experts in CPU memory) or on a CPU with AVX512-BF16 or AMX{mxfp4}")


def kt_status(kt_backend: str = "AMXBF16") -> tuple[bool, str]:
    """(usable for training with ``kt_backend``, reason). Importing kt_kernel runs no kernel, so
    this is crash-safe. The reason for an unsupported CPU variant is one line naming the variant
    and the ways forward."""
    try:
        import kt_kernel
    except ImportError as e:
        return False, f"kt_kernel is not importable ({e}); install with: {KT_INSTALL_HINT}"
    variant = kt_variant()
    method = KT_METHODS.get(kt_backend.upper())
    if method is None:
        return False, f"kt_backend={kt_backend!r} is not supported; choose one of {sorted(KT_METHODS)}"
    if variant not in KT_TRAINING_VARIANTS[method]:
        return False, _no_training_reason(variant, method)
    return True, f"kt_kernel {getattr(kt_kernel, '__version__', '?')} variant {variant} ({method})"


def kt_inference_status() -> tuple[bool, str]:
    """(forward-only kt kernels usable, reason): every variant of kt-kernel 0.7.2 ships them."""
    try:
        import kt_kernel
    except ImportError as e:
        return False, f"kt_kernel is not importable ({e}); install with: {KT_INSTALL_HINT}"
    cls = _inference_class_name(kt_variant())
    if not hasattr(kt_kernel.kt_kernel_ext.moe, cls):
        return False, f"kt-kernel's CPU variant {kt_variant()!r} has no {cls} inference class"
    return True, f"kt_kernel {getattr(kt_kernel, '__version__', '?')} variant {kt_variant()} ({cls})"


def _inference_class_name(variant: str | None) -> str:
    # The avx512_base/vnni/vbmi builds also list AMXBF16_MOE, but their CPUs may lack the
    # AVX512-BF16 instructions it is built for: AVX2BF16_MOE (in every build) is the safe one.
    return "AMXBF16_MOE" if variant in _AVX512_SFT else "AVX2BF16_MOE"


def require_kt() -> Any:
    """Imports kt_kernel or raises ImportError with the install hint."""
    try:
        import kt_kernel
    except ImportError as e:
        raise ImportError(f"backend 'kt' needs kt_kernel, which is not importable ({e}). "
                          f"Install with: {KT_INSTALL_HINT}") from e
    return kt_kernel


def kt_mode(options: "KTOptions") -> str:
    """``sft`` or ``inference``: what ``options.kt_mode`` means on this machine's kt build."""
    if options.kt_mode != "auto":
        return options.kt_mode
    return "sft" if kt_status(options.kt_backend)[0] else "inference"


def check_kt_config(hidden_size: int, moe_intermediate_size: int, num_experts: int,
                    num_experts_per_tok: int, options: KTOptions, rank: int | None = None,
                    dropout: float = 0.0, mode: str = "sft") -> None:
    """Every check the kernel would fail natively (crash) or late, as a ValueError naming the field.

    Pure Python: safe to call before kt_kernel is even imported (whether the CPU variant has the
    kernels is ``kt_status``'s job). ``mode="inference"`` checks the forward-only kernels.
    """
    options.validate()
    method = options.method
    if mode == "inference":
        if method != "AMXBF16_SFT":
            raise ValueError(f"backend 'kt' (inference kernels): kt_backend={options.kt_backend!r} "
                             "is not supported there; they run bf16 weights (kt_backend AMXBF16)")
        rank = dropout = None
    multiple = KT_SIZE_MULTIPLE[method]
    for name, value in (("hidden_size", hidden_size), ("moe_intermediate_size",
                                                       moe_intermediate_size)):
        if value % multiple:
            raise ValueError(f"backend 'kt' ({method}): {name}={value} is not a multiple "
                             f"of {multiple}; kt-kernel crashes the process on such shapes")
    tp = options.threadpool_count()
    if moe_intermediate_size % tp or (moe_intermediate_size // tp) % multiple:
        raise ValueError(f"backend 'kt': moe_intermediate_size={moe_intermediate_size} split over "
                         f"{tp} NUMA thread pools (kt_tp_enabled) must give slices that are "
                         f"multiples of {multiple}")
    n_gpu = options.kt_num_gpu_experts
    if num_experts - n_gpu < num_experts_per_tok:
        raise ValueError(f"kt_num_gpu_experts={n_gpu} leaves {num_experts - n_gpu} of "
                         f"{num_experts} experts on the CPU, fewer than num_experts_per_tok="
                         f"{num_experts_per_tok} (the kernel needs at least top-k)")
    if method == "MXFP4_SFT" and mode == "sft":
        if n_gpu:
            raise ValueError("kt_backend='MXFP4' keeps every routed expert on the CPU: "
                             f"kt_num_gpu_experts={n_gpu} must be 0")
        if tp > 2:
            raise ValueError(f"kt_backend='MXFP4' runs 1 or 2 NUMA thread pools, not {tp}")
    if rank is not None and not 1 <= rank <= KT_MAX_RANK:
        raise ValueError(f"backend 'kt': LoRA rank={rank} is unsupported; use 1..{KT_MAX_RANK}")
    if dropout:
        raise ValueError(f"backend 'kt': LoRA dropout={dropout} is unsupported; use 0 (the "
                         "kernel's dropout mask cannot be reproduced by the torch backend)")


# --- MXFP4 (OCP microscaling FP4: E2M1 elements, one power-of-two scale per 32) ----------------

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (codes [N, K/2] uint8, scales [N, K/32] bf16) in kt's MXFP4_SFT layout.

    Per group of 32 along K: scale 2^e with e = floor(log2 max|w|) − 2 (the OCP MX rule; 6 =
    1.5·2², so the largest element lands in [4, 8) and is clipped to 6), elements rounded to the
    nearest E2M1 value (sign bit 3). Element 2j is the low nibble of byte j, 2j+1 the high one
    (the other order gives a 140 % error against the kernel). Scales are UE8M0 codes shifted into
    bf16's exponent, as kt's MXFP4SafeTensorLoader does.
    """
    N, K = w.shape
    g = w.detach().float().reshape(N, K // 32, 32)
    e = (torch.floor(torch.log2(g.abs().amax(-1).clamp_min(2.0 ** -120))) - 2).clamp(-126, 127)
    v = g / torch.exp2(e)[..., None]
    idx = (v.abs().clamp(max=6.0)[..., None] - _E2M1).abs().argmin(-1)
    code = (idx | ((v < 0).to(torch.int64) << 3)).reshape(N, K)
    packed = (code[:, 1::2] << 4 | code[:, 0::2]).to(torch.uint8).contiguous()
    scales = ((e + 127).to(torch.int32) << 7).to(torch.int16).view(torch.bfloat16).contiguous()
    return packed, scales


def mxfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weights the kernel computes with (the inverse of ``mxfp4_quantize``)."""
    N = packed.shape[0]
    code = torch.stack([packed & 0xF, packed >> 4], -1).reshape(N, -1).to(torch.int64)
    val = _E2M1[code & 7] * torch.where(code >= 8, -1.0, 1.0)
    return (val.reshape(N, -1, 32) * scales.float()[..., None]).reshape(N, -1)


# --- shared dispatch helpers ---------------------------------------------------------------------

def _dispatch_range(experts: nn.ModuleList, lo: int, hi: int, x_TD: torch.Tensor,
                    ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                    device: torch.device) -> torch.Tensor:
    """Grouped dispatch of the routing slots whose expert id is in [lo, hi), run on ``device``.

    The selected slots become one-slot "tokens" for ``Experts.forward`` (reused, not copied), and
    their outputs are summed back per token. Returns [T, D] on ``x_TD.device``.
    """
    hit_TK = (ids_TK >= lo) & (ids_TK < hi)
    token_idx, slot_idx = hit_TK.nonzero(as_tuple=True)
    x_S1 = x_TD[token_idx].to(device)
    ids_S1 = (ids_TK[token_idx, slot_idx] - lo).unsqueeze(1).to(device)
    w_S1 = weights_TK[token_idx, slot_idx].unsqueeze(1).to(device)
    y_SD = Experts.forward(nn.ModuleList(list(experts)[lo:hi]), x_S1, ids_S1, w_S1)
    y_TD = torch.zeros(x_TD.shape, dtype=y_SD.dtype, device=x_TD.device)
    return y_TD.index_add(0, token_idx, y_SD.to(x_TD.device))


class _PinnedExperts(Experts):
    """Experts whose children from index ``first_cpu`` on stay in CPU memory.

    ``model.to("cuda")`` would move them with everything else; ``_apply`` lets a dtype change
    through but keeps their device (the probe learns the target dtype from a CPU tensor).
    """

    first_cpu: int = 0

    def _apply(self, fn, recurse=True):
        for i, child in enumerate(self):
            if i < self.first_cpu:
                child._apply(fn, recurse)
                continue
            probe = fn(torch.zeros((), dtype=torch.float32))
            child._apply(lambda t, d=probe.dtype: t.to(dtype=d) if t.is_floating_point() else t,
                         recurse)
        return self


def _adopt(cls: type, experts: nn.ModuleList) -> Any:
    """A new ``cls`` instance holding the very same child modules (names, parameters, LoRA)."""
    new = cls.__new__(cls)
    nn.ModuleList.__init__(new, list(experts))
    return new


class CPUExperts(_PinnedExperts):
    """Backend ``cpu``: the torch grouped dispatch, run in CPU memory; autograd crosses devices."""

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        cpu = torch.device("cpu")
        # .to() is differentiable: gradients flow back to the accelerator unchanged.
        y_TD = super().forward(x_TD.to(cpu), expert_ids_TK.to(cpu), weights_TK.to(cpu))
        return y_TD.to(x_TD.device)


# --- kt ---------------------------------------------------------------------------------------

_CPUINFER_CONFIG: tuple[int, int] | None = None  # kt's process-wide CPUInfer: first config wins
_STAGING_SHAPE: tuple[int, int] | None = None  # (hidden, top-k) of kt's shared staging buffer


class _KTRunner:
    """One kt-kernel SFT wrapper for one layer's CPU experts, plus its LoRA buffers.

    Everything here is bf16 CPU tensors the kernel points at; the fp32 parameters are elsewhere.
    """

    def __init__(self, wrapper: Any, lora: list[torch.Tensor] | None,
                 grads: list[torch.Tensor] | None, chunk: int, hidden: int, top_k: int):
        self.wrapper, self.lora, self.grads = wrapper, lora, grads
        self.chunk, self.hidden, self.top_k = chunk, hidden, top_k
        self.cached: object | None = None  # identity of the forward the kernel holds for backward

    def _staging(self) -> None:
        # kt keeps one staging buffer per process, reused whenever the token count fits, whatever
        # the hidden size: a wrapper of another shape would write past or beside it.
        global _STAGING_SHAPE
        shape = (self.hidden, self.top_k)
        if _STAGING_SHAPE != shape:
            from kt_kernel import KTMoEWrapper
            KTMoEWrapper.clear_sft_buffer_cache()
            _STAGING_SHAPE = shape

    def _chunks(self, T: int) -> list[slice]:
        return [slice(s, min(s + self.chunk, T)) for s in range(0, T, self.chunk)]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                save: bool) -> tuple[torch.Tensor, object | None]:
        self._staging()
        parts = self._chunks(x.shape[0])
        # Only a single-chunk forward can stay cached for backward (one cache per layer).
        keep = save and len(parts) == 1
        ys = [self.wrapper.forward(x[s], ids[s], w[s], save_for_backward=keep) for s in parts]
        token = object() if keep else None
        self.cached = token
        return torch.cat(ys) if len(ys) > 1 else ys[0], token

    def backward(self, grad_y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                 token: object | None):
        self._staging()
        gx, gw = [], []
        lora_grads = None
        for s in self._chunks(x.shape[0]):
            if token is None or self.cached is not token:
                # The kernel's cache holds another forward (chunking, or a second forward of this
                # layer before this backward): recompute this chunk's forward first.
                self.wrapper.forward(x[s], ids[s], w[s], save_for_backward=True)
            self.cached = None
            g_x, g_w = self.wrapper.backward(grad_y[s].contiguous())
            gx.append(g_x)
            gw.append(g_w)
            if self.grads is not None:
                # The kernel overwrites its grad buffers every backward (zeroing unrouted
                # experts): copy them out now; summing in fp32 makes chunking exact.
                now = [g.float() for g in self.grads]
                lora_grads = now if lora_grads is None else [a + b for a, b in
                                                            zip(lora_grads, now)]
        return torch.cat(gx), torch.cat(gw), lora_grads


class _KTInferenceRunner:
    """One layer's forward-only kt kernel (``AMXBF16_MOE`` / ``AVX2BF16_MOE``) built directly on
    ``kt_kernel_ext.moe``: kt's ``KTMoEWrapper(mode="inference")`` allocates pinned (CUDA host)
    buffers and fails without an NVIDIA driver. Every tensor whose pointer the kernel got is kept
    in ``self.keep`` (a freed expert map crashed the load with SIGSEGV)."""

    def __init__(self, kt_kernel: Any, weights: list[torch.Tensor], top_k: int, hidden: int,
                 inter: int, chunk: int, threads: int, pools: int, layer_idx: int):
        from kt_kernel.experts_base import _MoEBase  # the CPUInfer singleton kt's wrappers share
        ext = kt_kernel.kt_kernel_ext
        n = len(weights[0])  # weights: [gate, up, down], each a list over experts
        self.cpu_infer = _MoEBase._get_cpu_infer(threads, pools)
        self.top_k, self.hidden, self.chunk = top_k, hidden, chunk
        mask = torch.zeros(n, dtype=torch.bool)  # kt's "expert is on the GPU" flags: none are
        expert_map = torch.arange(n, dtype=torch.int64)
        cfg = ext.moe.MOEConfig(n, top_k, hidden, inter, mask.data_ptr())
        cfg.layer_idx, cfg.pool, cfg.max_len = layer_idx, self.cpu_infer.backend_, chunk
        # [NUMA pool][expert] pointers; bf16 has no scales (0 = nullptr), as kt's own BF16 path.
        cfg.gate_projs, cfg.up_projs, cfg.down_projs = ([[t.data_ptr() for t in w]] for w in weights)
        cfg.gate_scales = cfg.up_scales = cfg.down_scales = [[0] * n]
        self.class_name = _inference_class_name(kt_kernel.__cpu_variant__)
        self.moe = getattr(ext.moe, self.class_name)(cfg)
        self.keep = [weights, mask, expert_map, cfg]
        self.cpu_infer.submit(self.moe.load_weights_task(expert_map.data_ptr()))
        self.cpu_infer.sync()

    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H] bf16, ids [T, K] int64 (−1 = skip), w [T, K] fp32, all contiguous CPU."""
        y = torch.zeros(x.shape, dtype=torch.bfloat16)
        for s in range(0, x.shape[0], self.chunk):
            e = min(s + self.chunk, x.shape[0])
            bsz = torch.tensor([e - s], dtype=torch.int32)
            self.cpu_infer.submit(self.moe.forward_task(
                bsz.data_ptr(), self.top_k, ids[s:e].data_ptr(), w[s:e].data_ptr(),
                x[s:e].data_ptr(), y[s:e].data_ptr(), False))
            self.cpu_infer.sync()
        return y


class _KTExpertsFunction(torch.autograd.Function):
    """y = kt(x, ids, w; LoRA). Inputs after ``w`` are the LoRA parameters, in ``runner.lora``'s
    per-projection order, flattened expert-major: they only route gradients (the kernel reads its
    own bf16 copies, kept current by ``refresh``)."""

    @staticmethod
    def forward(ctx, runner: _KTRunner, x_cpu: torch.Tensor, ids_cpu: torch.Tensor,
                w_cpu: torch.Tensor, *lora_params: torch.Tensor) -> torch.Tensor:
        y, token = runner.forward(x_cpu, ids_cpu, w_cpu, save=True)
        ctx.runner, ctx.token, ctx.n_lora = runner, token, len(lora_params)
        ctx.save_for_backward(x_cpu, ids_cpu, w_cpu)
        ctx.lora_meta = [(p.dtype, p.device) for p in lora_params]
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, ids, w = ctx.saved_tensors
        grad_x, grad_w, lora_grads = ctx.runner.backward(grad_y.to(torch.bfloat16), x, ids, w,
                                                         ctx.token)
        ctx.token = None
        out: list[torch.Tensor | None] = [None, grad_x.to(x.dtype), None, grad_w.to(w.dtype)]
        if ctx.n_lora:
            # lora_grads: 6 tensors [E_cpu, ...]; parameters are ordered (proj, A/B) then expert.
            per_param = [g[e] for g in lora_grads for e in range(g.shape[0])]
            out += [None if not ctx.needs_input_grad[4 + i] else g.to(dt).to(dev)
                    for i, (g, (dt, dev)) in enumerate(zip(per_param, ctx.lora_meta))]
        return tuple(out)


def _expert_lora(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter] | None:
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    return (a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else None


class KTExperts(_PinnedExperts):
    """Backend ``kt``. Children (and so names) are the original experts; experts
    ``[kt_num_gpu_experts, E)`` run in kt-kernel, the first ``kt_num_gpu_experts`` in torch on
    their own device."""

    def __init__(self, *args, **kwargs):  # built only through ``_adopt``
        raise TypeError("use offload_experts(model, 'kt')")

    def setup(self, config, options: KTOptions, layer_idx: int) -> "KTExperts":
        self.options, self.layer_idx = options, layer_idx
        self.hidden, self.inter = config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.first_cpu = options.kt_num_gpu_experts
        self.mode = kt_mode(options)  # "sft" | "inference", fixed for this module's life
        self._runner: _KTRunner | _KTInferenceRunner | None = None
        self._built_for: tuple | None = None
        self._lora_versions: tuple | None = None
        for child in list(self)[self.first_cpu:]:
            for proj in _PROJS:
                # The kernel holds a frozen copy: a base gradient would silently never apply.
                getattr(child, proj).weight.requires_grad_(False)
        return self

    def __getstate__(self) -> dict:
        # The kernel object (and the CPUInfer singleton behind it) cannot be copied or pickled:
        # a deepcopy (a DPO reference model) or torch.save gets the modules, and the copy builds
        # its own kernel on first use.
        state = self.__dict__.copy()
        state["_runner"] = state["_built_for"] = None
        return state

    # -- the kernel's view of the children -------------------------------------------------------
    def _cpu_children(self) -> list[nn.Module]:
        return list(self)[self.first_cpu:]

    def _lora_pairs(self) -> list[list[tuple[nn.Parameter, nn.Parameter] | None]]:
        """[proj][expert] → (A, B) or None, for the kernel's experts."""
        return [[_expert_lora(getattr(c, proj)) for c in self._cpu_children()] for proj in _PROJS]

    def lora_settings(self) -> tuple[int, float] | None:
        """(rank, scale) shared by every adapted CPU expert projection, or None if none is."""
        found: set[tuple[int, float]] = set()
        for c in self._cpu_children():
            for proj in _PROJS:
                m = getattr(c, proj)
                if _expert_lora(m) is None:
                    continue
                found.add((m.lora_A.shape[0], float(getattr(m, "scale", 1.0))))
                drop = getattr(m, "lora_dropout", None)
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    check_kt_config(self.hidden, self.inter, len(self), self.top_k, self.options,
                                    dropout=drop.p)
        if len(found) > 1:
            raise ValueError(f"backend 'kt' layer {self.layer_idx}: expert LoRA (rank, scale) must "
                             f"be the same on every expert projection, found {sorted(found)}")
        return found.pop() if found else None

    def _signature(self) -> tuple:
        """What the kernel object was built from: the LoRA layout and the base weight versions."""
        base = tuple(getattr(c, p).weight._version for c in self._cpu_children() for p in _PROJS)
        layout = tuple(pair is None for row in self._lora_pairs() for pair in row)
        if self.mode == "inference":  # adapters are folded into the kernel's weights
            flags = tuple((getattr(getattr(c, p), "merged", False),
                           getattr(getattr(c, p), "disabled", False))
                          for c in self._cpu_children() for p in _PROJS)
            return layout, base, flags, self._lora_version()
        return self.lora_settings(), layout, base

    def _lora_version(self) -> tuple:
        return tuple(t._version for row in self._lora_pairs() for pair in row if pair
                     for t in pair)

    # -- building and refreshing -------------------------------------------------------------
    def build(self) -> None:
        """Creates the kernel object and loads the frozen weights. Validates everything first."""
        global _CPUINFER_CONFIG
        opts = self.options
        if self.mode == "inference":
            return self._build_inference()
        settings = self.lora_settings()
        rank, scale = settings if settings else (8, 1.0)  # SkipLoRA still wants a positive rank
        check_kt_config(self.hidden, self.inter, len(self), self.top_k, opts,
                        rank=rank if settings else None)
        kt_kernel = require_kt()
        mxfp4 = opts.method == "MXFP4_SFT"
        if mxfp4 and not settings:
            # MXFP4_SFT has no SkipLoRA form: a rank-1 adapter of zeros adds exactly nothing.
            rank, scale = 1, 1.0
        method = opts.method if settings or mxfp4 else opts.method + "_SkipLoRA"
        ok, reason = kt_status(opts.kt_backend)
        if not ok:
            raise RuntimeError(f"backend 'kt' (training kernels, kt_mode={opts.kt_mode!r}): {reason}")
        threads, pools = opts.threads(), opts.threadpool_count()
        if _CPUINFER_CONFIG is None:
            _CPUINFER_CONFIG = (threads, pools)
        elif _CPUINFER_CONFIG != (threads, pools):
            warnings.warn(f"kt CPUInfer already runs {_CPUINFER_CONFIG[0]} threads in "
                          f"{_CPUINFER_CONFIG[1]} pool(s) (a process-wide singleton); "
                          f"kt_num_threads={threads} / kt_tp_enabled are ignored", stacklevel=3)
        n_cpu = len(self) - self.first_cpu
        self._runner = None  # drop the old C++ object before allocating a new one
        wrapper = kt_kernel.KTMoEWrapper(
            self.layer_idx, num_experts=n_cpu, num_experts_per_tok=self.top_k,
            hidden_size=self.hidden, moe_intermediate_size=self.inter, gpu_experts_mask=None,
            cpuinfer_threads=threads, threadpool_count=pools,
            weight_path=opts.kt_weight_path or "", chunked_prefill_size=opts.chunk_tokens(),
            method=method, mode="sft", lora_rank=rank,
            # The kernel scales by alpha / rank: this gives LoRALinear's scale, rsLoRA included.
            lora_alpha=scale * rank, lora_dropout=0.0,
            **(dict(group_size=32, zero_point=False, swiglu_limit=_MXFP4_NO_CLAMP) if mxfp4 else {}))
        children = self._cpu_children()
        self._expert_map = torch.arange(n_cpu, dtype=torch.int64)  # kt keeps this pointer
        if mxfp4:
            data: dict[str, list[torch.Tensor]] = {}
            for key, proj in zip(("gate", "up", "down"), _PROJS):
                pairs = [mxfp4_quantize(getattr(c, proj).weight) for c in children]
                data[key], data[key + "_scale"] = [p[0] for p in pairs], [p[1] for p in pairs]
            wrapper.load_mxfp4_weights(data, self._expert_map)
        elif opts.method == "AMXINT8_SFT":
            # Pre-quantised files hold all E experts; physical slot i is logical expert N + i.
            wrapper.load_weights(torch.arange(self.first_cpu, len(self), dtype=torch.int64))
        else:
            stacked = [torch.stack([getattr(c, p).weight.detach().to("cpu", torch.bfloat16)
                                    for c in children]).contiguous() for p in _PROJS]
            wrapper.load_weights_from_tensors(*stacked, self._expert_map)
        lora = grads = None
        if settings or mxfp4:
            shapes = [((rank, self.hidden), (self.inter, rank)), ((rank, self.hidden),
                      (self.inter, rank)), ((rank, self.inter), (self.hidden, rank))]
            lora = [torch.zeros(n_cpu, *shape, dtype=torch.bfloat16)
                    for proj_shapes in shapes for shape in proj_shapes]
            grads = [torch.zeros_like(t) for t in lora]
            self._runner = _KTRunner(wrapper, lora, grads, opts.chunk_tokens(), self.hidden,
                                     self.top_k)
            self._copy_lora()
            wrapper.init_lora_weights(*lora, *grads)
        else:
            self._runner = _KTRunner(wrapper, None, None, opts.chunk_tokens(), self.hidden,
                                     self.top_k)
        self._built_for = self._signature()
        self._lora_versions = self._lora_version()

    @torch.no_grad()
    def _effective_weight(self, m: nn.Module) -> torch.Tensor:
        """What ``m`` computes, as one bf16 matrix: W, plus s·B@A for a live (unmerged, enabled)
        adapter, summed in fp32 so it is rounded once."""
        w = m.weight.detach().to("cpu", torch.float32)
        if _expert_lora(m) is not None and not (getattr(m, "merged", False)
                                                or getattr(m, "disabled", False)):
            w = w + m.delta_weight().to("cpu")
        return w.to(torch.bfloat16).contiguous()

    def _build_inference(self) -> None:
        global _CPUINFER_CONFIG
        opts = self.options
        check_kt_config(self.hidden, self.inter, len(self), self.top_k, opts, mode="inference")
        kt_kernel = require_kt()
        threads, pools = opts.threads(), opts.threadpool_count()
        _CPUINFER_CONFIG = _CPUINFER_CONFIG or (threads, pools)
        self._runner = None
        weights = [[self._effective_weight(getattr(c, p)) for c in self._cpu_children()]
                   for p in _PROJS]
        self._runner = _KTInferenceRunner(kt_kernel, weights, self.top_k, self.hidden, self.inter,
                                          opts.chunk_tokens(), threads, pools, self.layer_idx)
        self._built_for = self._signature()
        self._lora_versions = self._lora_version()

    @torch.no_grad()
    def _copy_lora(self) -> None:
        """fp32 parameters → the kernel's bf16 buffers, in place (pointers stay valid)."""
        buffers = iter(self._runner.lora)
        for row in self._lora_pairs():
            buf_a, buf_b = next(buffers), next(buffers)
            for e, pair in enumerate(row):
                if pair is None:  # an expert projection without LoRA adds zero
                    buf_a[e].zero_()
                    buf_b[e].zero_()
                else:
                    buf_a[e].copy_(pair[0])
                    buf_b[e].copy_(pair[1])

    def refresh_lora(self) -> bool:
        """Pushes the current adapters into the kernel; False when there is no kernel yet."""
        if self._runner is None or getattr(self._runner, "lora", None) is None:
            return False
        self._copy_lora()
        # The kernel pre-packs B/A matrices; without this call edits are not seen.
        self._runner.wrapper.update_lora_weights()
        self._lora_versions = self._lora_version()
        return True

    def _ready(self) -> _KTRunner:
        if self._runner is None or self._built_for != self._signature():
            self.build()
        elif self._lora_versions != self._lora_version():
            self.refresh_lora()  # safety net for a trainer that did not call refresh_kt_lora
        return self._runner

    # -- forward ----------------------------------------------------------------------------
    def _torch_path(self) -> bool:
        """Merged or disabled adapters: the kernel cannot express them, torch can."""
        for c in self._cpu_children():
            for proj in _PROJS:
                m = getattr(c, proj)
                if _expert_lora(m) is not None and (getattr(m, "merged", False)
                                                    or getattr(m, "disabled", False)):
                    return True
        return False

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        n_gpu, E = self.first_cpu, len(self)
        cpu = torch.device("cpu")
        y_TD = None
        if n_gpu:
            y_TD = _dispatch_range(self, 0, n_gpu, x_TD, expert_ids_TK, weights_TK, x_TD.device)
        if self.mode == "inference":
            y_cpu = self._kt_inference_forward(x_TD, expert_ids_TK, weights_TK)
        elif self._torch_path():
            y_cpu = _dispatch_range(self, n_gpu, E, x_TD, expert_ids_TK, weights_TK, cpu)
        else:
            y_cpu = self._kt_forward(x_TD, expert_ids_TK, weights_TK)
        y_cpu = y_cpu.to(x_TD.device)
        return y_cpu if y_TD is None else y_TD + y_cpu.to(y_TD.dtype)

    def _kt_inference_forward(self, x_TD, expert_ids_TK, weights_TK) -> torch.Tensor:
        lora = [t for row in self._lora_pairs() for pair in row if pair for t in pair]
        if torch.is_grad_enabled() and (x_TD.requires_grad or weights_TK.requires_grad
                                        or any(t.requires_grad for t in lora)):
            raise RuntimeError(
                f"backend 'kt' layer {self.layer_idx} runs kt-kernel's forward-only kernel "
                f"({_inference_class_name(kt_variant())}, kt_mode={self.options.kt_mode!r}, CPU "
                f"variant {kt_variant()!r}): no gradients. Wrap inference in torch.no_grad(); to "
                f"train: {kt_status(self.options.kt_backend)[1]}")
        runner = self._ready()
        cpu = torch.device("cpu")
        ids = expert_ids_TK.to(cpu, torch.int64)
        ids = torch.where(ids >= self.first_cpu, ids - self.first_cpu, -1).contiguous()
        x = x_TD.detach().to(cpu, torch.bfloat16).contiguous()
        w = weights_TK.detach().to(cpu, torch.float32).contiguous()
        return runner.forward(x, ids, w).to(x_TD.dtype)

    def _kt_forward(self, x_TD, expert_ids_TK, weights_TK) -> torch.Tensor:
        runner = self._ready()
        cpu = torch.device("cpu")
        ids = expert_ids_TK.to(cpu, torch.int64)
        # GPU experts' slots become id -1, which the kernel skips (output and gradient 0).
        ids = torch.where(ids >= self.first_cpu, ids - self.first_cpu, -1).contiguous()
        # Differentiable moves: x and the routing weights get their gradients back on device.
        x = x_TD.to(cpu, torch.bfloat16).contiguous()
        w = weights_TK.to(cpu, torch.float32).contiguous()
        params: list[torch.Tensor] = []
        if runner.lora is not None:
            # Order = the kernel's buffers (gate A, gate B, up A, ... ) then expert; a projection
            # without LoRA gets a constant zero placeholder so positions stay aligned.
            params = [pair[ab] if pair else torch.zeros(()) for row in self._lora_pairs()
                      for ab in range(2) for pair in row]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                  or any(p.requires_grad for p in params))
        if not needs_grad:
            return runner.forward(x, ids, w, save=False)[0].to(x_TD.dtype)
        return _KTExpertsFunction.apply(runner, x, ids, w, *params).to(x_TD.dtype)


# --- the transform -------------------------------------------------------------------------------

def _moe_layers(model: nn.Module) -> Iterator[tuple[str, MoEFeedForward]]:
    for name, m in model.named_modules():
        if isinstance(m, MoEFeedForward):
            yield name, m


def offload_experts(model: nn.Module, backend: Backend = "torch",
                    options: KTOptions | None = None, **kt_options: Any) -> nn.Module:
    """Puts every MoE layer's routed experts on ``backend``; returns the same model.

    ``kt_options`` are ``KTOptions`` fields (``kt_backend="AMXINT4"``, ``kt_num_threads=2`` ...),
    overriding ``options``. All checks run before the model changes or any kernel is built; the
    kt kernels themselves are built on the first forward (so LoRA may be applied afterwards).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown expert backend {backend!r}; choose one of {BACKENDS}")
    layers = list(_moe_layers(model))
    if not layers:
        raise ValueError("offload_experts: the model has no MoE layers (config.use_moe is false)")
    known = {f.name for f in fields(KTOptions)}
    unknown = sorted(set(kt_options) - known)
    if unknown:
        raise TypeError(f"offload_experts: unknown kt option(s) {unknown}; known: {sorted(known)}")
    if kt_options and backend != "kt":
        raise ValueError(f"kt options {sorted(kt_options)} given for backend {backend!r}")
    opts = KTOptions(**{**(vars(options) if options else {}), **kt_options})
    if backend == "kt":
        cfg = layers[0][1].config
        opts.validate()
        require_kt()  # a missing kt_kernel fails here, not mid-forward
        mode = kt_mode(opts)
        check_kt_config(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                        cfg.num_experts_per_tok, opts, mode=mode)
        if mode == "sft" and not kt_status(opts.kt_backend)[0]:
            raise RuntimeError(f"backend 'kt' (kt_mode='sft'): {kt_status(opts.kt_backend)[1]}")

    for layer_idx, (_, moe) in enumerate(layers):
        old = moe.experts
        if backend == "torch":
            new = _adopt(Experts, old)
        elif backend == "cpu":
            new = _adopt(CPUExperts, old)
        else:
            new = _adopt(KTExperts, old).setup(moe.config, opts, layer_idx)
        moe.experts = new
        # Where the routed experts must live: CPU memory for every kernel-side expert.
        if isinstance(new, _PinnedExperts):
            for child in list(new)[new.first_cpu:]:
                child.to("cpu")
    return model


def kt_experts(model: nn.Module) -> list[KTExperts]:
    return [m for m in model.modules() if isinstance(m, KTExperts)]


def refresh_kt_lora(model: nn.Module) -> int:
    """Call after every ``optimizer.step()``: pushes the updated expert LoRA into the kernels.

    Returns the number of layers refreshed (0 for a model without kt experts, so the trainer may
    call it unconditionally).
    """
    return sum(m.refresh_lora() for m in kt_experts(model))


def register_kt_refresh(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Runs ``refresh_kt_lora(model)`` after each ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: refresh_kt_lora(model))
