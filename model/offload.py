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
- ``kt``: kt-kernel's SFT operator (KTransformers' CPU MoE kernels, ``KTMoEWrapper(mode="sft")``)
  inside a ``torch.autograd.Function``. Base expert weights are frozen (the kernel holds its own
  bf16 / int8 / int4 copy); LoRA on the experts' gate/up/down trains through the kernel's
  backward. Expert LoRA must already be applied (``model.lora.apply_lora``) or the experts are
  run frozen (``*_SkipLoRA``); apply LoRA before or after offloading, the kernel is built on first
  use and rebuilt if the adapters or base weights change.

kt-kernel footguns guarded here (see ``/work/shared/docs/KT_KERNEL.md``):
- hidden / intermediate sizes that are not multiples of 32 crash the process with no Python
  error: checked in Python before any kernel object exists (``check_kt_config``);
- only the ``amx`` and ``avx512_bf16`` CPU variants ship the training classes;
- a call may carry at most ``chunked_prefill_size`` tokens: larger batches are chunked;
- the kernel keeps raw pointers to (and pre-packs) the LoRA tensors: after every optimizer step
  ``refresh_kt_lora(model)`` copies the fp32 adapters into the kernel's bf16 buffers and calls
  ``update_lora_weights()``. ``register_kt_refresh(optimizer, model)`` hooks that onto
  ``optimizer.step``; as a safety net every forward also compares the adapters' version counters
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
from dataclasses import dataclass, fields
from typing import Any, Iterator, Literal

import torch
from torch import nn

from .moe import Experts, MoEFeedForward

Backend = Literal["torch", "cpu", "kt"]
BACKENDS = ("torch", "cpu", "kt")
# LLaMA-Factory-KT's ``kt_backend`` values → kt-kernel SFT method names.
KT_METHODS = {"AMXBF16": "AMXBF16_SFT", "AMXINT8": "AMXINT8_SFT", "AMXINT4": "AMXINT4_SFT"}
# Only these CPU variants of kt-kernel contain the SFT (training) classes.
KT_TRAINING_VARIANTS = frozenset({"amx", "avx512_bf16"})
# Size granularity per method: other sizes crash bf16 natively; INT4 rejects < 128 at construction.
KT_SIZE_MULTIPLE = {"AMXBF16_SFT": 32, "AMXINT8_SFT": 32, "AMXINT4_SFT": 128}
KT_MAX_RANK = 256
KT_INSTALL_HINT = ("pip install --no-deps kt-kernel==0.7.2 numpy safetensors gguf packaging "
                   "(the plain `pip install kt-kernel` pins torch 2.9.1 and pulls CUDA wheels)")
_PROJS = ("gate_proj", "up_proj", "down_proj")


# --- options ------------------------------------------------------------------------------------

@dataclass
class KTOptions:
    """kt settings under the names LLaMA-Factory-KT users write in YAML / on the command line."""

    use_kt: bool = False  # the trainer's switch: offload_experts(model, "kt") when true
    kt_backend: str = "AMXBF16"  # AMXBF16 | AMXINT8 (needs kt_weight_path) | AMXINT4
    kt_num_threads: int = 0  # CPU worker threads; 0 = every core of this process
    kt_tp_enabled: bool = False  # one thread pool per NUMA node, experts split across them
    kt_num_gpu_experts: int = 0  # the first N experts of each layer stay with torch (accelerator)
    kt_weight_path: str | None = None  # folder of pre-quantised expert weights (.kt files)
    kt_chunk_tokens: int = 2048  # tokens per kernel call (chunked_prefill_size); more are chunked

    @property
    def method(self) -> str:
        return KT_METHODS[self.kt_backend.upper()]

    def threads(self) -> int:
        return self.kt_num_threads or len(os.sched_getaffinity(0))

    def threadpool_count(self) -> int:
        return _numa_nodes() if self.kt_tp_enabled else 1

    def validate(self) -> None:
        """Field-level checks that need no model (sizes are checked in ``check_kt_config``)."""
        if self.kt_backend.upper() not in KT_METHODS:
            raise ValueError(f"kt_backend={self.kt_backend!r} is not supported; choose one of "
                             f"{sorted(KT_METHODS)}")
        if self.kt_num_threads < 0:
            raise ValueError(f"kt_num_threads={self.kt_num_threads} must be >= 0 (0 = all cores)")
        if self.kt_num_gpu_experts < 0:
            raise ValueError(f"kt_num_gpu_experts={self.kt_num_gpu_experts} must be >= 0")
        if self.kt_chunk_tokens < 1:
            raise ValueError(f"kt_chunk_tokens={self.kt_chunk_tokens} must be >= 1")
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

def kt_status() -> tuple[bool, str]:
    """(usable for training, reason). Importing kt_kernel runs no kernel, so this is crash-safe."""
    try:
        import kt_kernel
    except ImportError as e:
        return False, f"kt_kernel is not importable ({e}); install with: {KT_INSTALL_HINT}"
    variant = getattr(kt_kernel, "__cpu_variant__", None)
    if variant not in KT_TRAINING_VARIANTS:
        return False, (f"kt_kernel CPU variant {variant!r} has no training (SFT) kernels; they "
                       f"ship only in {sorted(KT_TRAINING_VARIANTS)} (a CPU with AVX512-BF16 or AMX)")
    return True, f"kt_kernel {getattr(kt_kernel, '__version__', '?')} variant {variant}"


def require_kt() -> Any:
    """Imports kt_kernel or raises ImportError (missing) / RuntimeError (no training kernels)."""
    try:
        import kt_kernel
    except ImportError as e:
        raise ImportError(f"backend 'kt' needs kt_kernel, which is not importable ({e}). "
                          f"Install with: {KT_INSTALL_HINT}") from e
    ok, reason = kt_status()
    if not ok:
        raise RuntimeError(f"backend 'kt': {reason}")
    return kt_kernel


def check_kt_config(hidden_size: int, moe_intermediate_size: int, num_experts: int,
                    num_experts_per_tok: int, options: KTOptions, rank: int | None = None,
                    dropout: float = 0.0) -> None:
    """Every check the kernel would fail natively (crash) or late, as a ValueError naming the field.

    Pure Python: safe to call before kt_kernel is even imported.
    """
    options.validate()
    multiple = KT_SIZE_MULTIPLE[options.method]
    for name, value in (("hidden_size", hidden_size), ("moe_intermediate_size",
                                                       moe_intermediate_size)):
        if value % multiple:
            raise ValueError(f"backend 'kt' ({options.method}): {name}={value} is not a multiple "
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
    if rank is not None and not 1 <= rank <= KT_MAX_RANK:
        raise ValueError(f"backend 'kt': LoRA rank={rank} is unsupported; use 1..{KT_MAX_RANK}")
    if dropout:
        raise ValueError(f"backend 'kt': LoRA dropout={dropout} is unsupported; use 0 (the "
                         "kernel's dropout mask cannot be reproduced by the torch backend)")


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
        self._runner: _KTRunner | None = None
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
        return self.lora_settings(), layout, base

    def _lora_version(self) -> tuple:
        return tuple(t._version for row in self._lora_pairs() for pair in row if pair
                     for t in pair)

    # -- building and refreshing -------------------------------------------------------------
    def build(self) -> None:
        """Creates the kernel object and loads the frozen weights. Validates everything first."""
        global _CPUINFER_CONFIG
        opts = self.options
        settings = self.lora_settings()
        rank, scale = settings if settings else (8, 1.0)  # SkipLoRA still wants a positive rank
        check_kt_config(self.hidden, self.inter, len(self), self.top_k, opts,
                        rank=rank if settings else None)
        kt_kernel = require_kt()
        method = opts.method if settings else opts.method + "_SkipLoRA"
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
            weight_path=opts.kt_weight_path or "", chunked_prefill_size=opts.kt_chunk_tokens,
            method=method, mode="sft", lora_rank=rank,
            # The kernel scales by alpha / rank: this gives LoRALinear's scale, rsLoRA included.
            lora_alpha=scale * rank, lora_dropout=0.0)
        children = self._cpu_children()
        if opts.method == "AMXINT8_SFT":
            # Pre-quantised files hold all E experts; physical slot i is logical expert N + i.
            wrapper.load_weights(torch.arange(self.first_cpu, len(self), dtype=torch.int64))
        else:
            stacked = [torch.stack([getattr(c, p).weight.detach().to("cpu", torch.bfloat16)
                                    for c in children]).contiguous() for p in _PROJS]
            wrapper.load_weights_from_tensors(*stacked, torch.arange(n_cpu, dtype=torch.int64))
        lora = grads = None
        if settings:
            shapes = [((rank, self.hidden), (self.inter, rank)), ((rank, self.hidden),
                      (self.inter, rank)), ((rank, self.inter), (self.hidden, rank))]
            lora = [torch.zeros(n_cpu, *shape, dtype=torch.bfloat16)
                    for proj_shapes in shapes for shape in proj_shapes]
            grads = [torch.zeros_like(t) for t in lora]
            self._runner = _KTRunner(wrapper, lora, grads, opts.kt_chunk_tokens, self.hidden,
                                     self.top_k)
            self._copy_lora()
            wrapper.init_lora_weights(*lora, *grads)
        else:
            self._runner = _KTRunner(wrapper, None, None, opts.kt_chunk_tokens, self.hidden,
                                     self.top_k)
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
        if self._runner is None or self._runner.lora is None:
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
        if self._torch_path():
            y_cpu = _dispatch_range(self, n_gpu, E, x_TD, expert_ids_TK, weights_TK, cpu)
        else:
            y_cpu = self._kt_forward(x_TD, expert_ids_TK, weights_TK)
        y_cpu = y_cpu.to(x_TD.device)
        return y_cpu if y_TD is None else y_TD + y_cpu.to(y_TD.dtype)

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
        check_kt_config(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                        cfg.num_experts_per_tok, opts)
        require_kt()  # a missing or training-less kt_kernel fails here, not mid-forward

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
