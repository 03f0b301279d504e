"""The fast decode step: one token per row over a static, slot-per-row KV cache, on prepacked
weights (CPU) or compiled (CUDA, or when asked). The same step takes S tokens per row, the
verification forward of speculative decoding (model/speculative.py).

Why: at MiniMind widths a decode step is a few dozen small matmuls, and eager PyTorch spends most
of a step dispatching them from Python (the issue measured 15 % of the memory-bandwidth bound at
batch 1 on CPU). ``torch.compile`` of the whole single-token step removes the per-op dispatch,
but only pays off when the step has fixed shapes, so:

- the cache is ``KVCache(config, slots, max_len)`` and every step reads all of it: a row's keys
  beyond its own length are hidden by a mask ``[slots, 1, 1, max_len]`` instead of being sliced
  off (slicing would give a new shape, and a recompile, every token);
- each row (slot) has its own length ``pos_B``: the new key/value is written at ``[b, :, pos_b]``
  with ``index_put_`` and the row's RoPE position is ``pos_b``. Rows are independent, so a row
  can join (prefill into a free slot) or leave between any two steps: the engine's continuous
  batching and ``generate_tokens`` share this one step;
- prefill runs eagerly through ``MiniMindLM.forward``: ``prefill_batch`` takes a batch of prompts
  (right-padded, several rows per forward), ``prefill`` one row into its slot (in chunks when
  asked: the engine), so the prompt's cache is what the eager path computes. ``extend``
  appends a few tokens to each of several slots in one eager ``decode_step`` (the tool turn
  between two replies of an agent rollout, trainer/agent.py).

``decode_step`` is the one deliberate twin in the code base: it re-implements ``Block.forward``
(norm → attention over the static cache → FFN or the MoE's dense all-experts form) because the
block's forward slices its cache and routes tokens with data-dependent shapes, which a fixed-shape
step cannot. ``tests/test_generate.py`` holds the twin equal to the block: greedy and seeded
sampling against the eager path and a no-cache full forward, a grown cache against a full
forward, packed weights against the modules (also after a weight update), and autocast.

The compiled graph is cached per (model, slots, max_len) in ``StaticDecoder.for_model``, so the
server and the evaluation runner pay the compile once. ``fast_path_reason(model)`` says why a
model cannot take this path (offloaded/kt experts run outside PyTorch; a model in training mode;
MLA, whose cache is a latent; MoE with more than 4x as many experts as top-k, where running every
expert per token reads far more weights than routing); callers then fall back to the eager loop
and log the reason.

Inductor's on-disk cache (``/tmp/torchinductor_$USER``) is not keyed on the CPU ISA: code built on
an AVX-512 machine and reused on an AVX2 one (a shared home or CI cache) can crash. Clear it, or
set ``TORCHINDUCTOR_CACHE_DIR`` per machine kind, when switching.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .model import KVCache, MiniMindLM, apply_rope
from .moe import Experts, FeedForward, MoEFeedForward

log = logging.getLogger(__name__)

# The eager fallback everywhere: MINIMIND_FAST_DECODE=0 (a debugging switch, and the way to
# compare both paths from the outside).
ENV_SWITCH = "MINIMIND_FAST_DECODE"
# MoE layers take the static step (every expert on every token) only while E <= this · K.
MAX_DENSE_EXPERT_RATIO = 4


class _SlotView(KVCache):
    """One slot of a static cache seen as a batch-1 ``KVCache``: the eager prefill writes through
    this view straight into the shared buffers."""

    def __init__(self, cache: KVCache, slot: int, pos: int = 0):  # noqa: super() not called
        self.k, self.v = cache.k[:, slot:slot + 1], cache.v[:, slot:slot + 1]
        self.max_len, self.pos = cache.max_len, pos


def fast_path_reason(model: MiniMindLM) -> str | None:
    """None when the static step is correct for this model, else why not (one line)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if model.training:
        return "the model is in training mode (dropout)"
    if model._forward_hooks or model._forward_pre_hooks:
        # decode_step never calls model.forward, so a hook on it (instrumentation, a test's
        # scripted logits) would silently stop running.
        return "the model has forward hooks, which the static step would not run"
    config = model.config
    if config.use_mla:  # decode_step below writes grouped-query K/V, not MLA's latent
        return "multi-head latent attention (the static step implements grouped-query attention)"
    if config.use_moe and config.num_experts > MAX_DENSE_EXPERT_RATIO * config.num_experts_per_tok:
        # The static step runs every expert on every token: at batch 1 it would read E/K times the
        # expert weights the routed path reads (64/6 for DeepSeek-V2-Lite, 128/8 for Qwen3-30B).
        return (f"{config.num_experts} routed experts for top-{config.num_experts_per_tok}: "
                f"running all of them per token would read {config.num_experts} experts' weights "
                f"instead of {config.num_experts_per_tok}")
    for layer in model.model.layers:
        mlp = layer.mlp
        if type(layer.self_attn) is not Attention:
            return f"unknown attention {type(layer.self_attn).__name__}"
        if isinstance(mlp, MoEFeedForward) and type(mlp.experts) is not Experts:
            return f"experts offloaded to {type(mlp.experts).__name__} (run outside PyTorch)"
        if not isinstance(mlp, (MoEFeedForward, FeedForward)):
            return f"unknown feed-forward {type(mlp).__name__}"
    return None


def _moe_all_experts(mlp: MoEFeedForward, h_TD: torch.Tensor) -> torch.Tensor:
    """The MoE layer with every expert run on every token and weighted by its routing weight
    (zero where not routed): fixed shapes, no host sync. At decode sizes (T·K ≥ E) each expert's
    weights are read anyway, so the extra FLOPs cost next to nothing."""
    _, ids_TK, weights_TK = mlp.route(h_TD)
    dense_TE = torch.zeros(h_TD.shape[0], len(mlp.experts), dtype=weights_TK.dtype,
                           device=h_TD.device).scatter(1, ids_TK, weights_TK)
    y = None
    for e, expert in enumerate(mlp.experts):
        term = expert(h_TD) * dense_TE[:, e:e + 1].to(h_TD.dtype)
        y = term if y is None else y + term
    for shared in mlp.shared_experts:
        y = y + shared(h_TD)
    if mlp.config.shared_expert_gate:  # Qwen2-MoE's gated shared expert, as MoEFeedForward.forward
        y = y + torch.sigmoid(mlp.shared_expert_gate(h_TD)) * mlp.shared_expert(h_TD)
    return y


PACK_SWITCH = "MINIMIND_PACKED_DECODE"
# A oneDNN call costs ~13-15 us whatever its size, F.linear ~3-4 us (`scripts/bench.py --only
# pack`): small weights go plain. At 2^17 elements (0.5 MB in fp32) the 1M-parameter quickstart
# model decoded 1.3x faster than all prepacked and minimind2-small (whose every fused weight is
# larger) as fast; 2^19 was 1.4x on the first but lost 6 % at 8 rows on the second.
PACK_MIN_ELEMENTS = 1 << 17


def _packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


class PackedWeights:
    """oneDNN-prepacked copies of the decode step's projections, q/k/v and gate/up fused: the
    CPU step's matmuls. Fused weights under ``PACK_MIN_ELEMENTS`` stay plain (one ``F.linear``):
    at that size oneDNN's fixed cost per call outweighs its faster stream.

    Why: a decode step multiplies 1-16 rows by every weight. For such skinny products ``F.linear``
    reaches MKL's sgemm, which on the 2-core machines here streamed weights at 4-8 GB/s (and worse
    at 8 rows than at 1), while oneDNN's kernel on a weight reordered once into its blocked layout
    (``mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what inductor's CPU freezing
    emits) streamed 10-22 GB/s at 1 and 8 rows. Fusing q/k/v and gate/up halves the calls.

    The copies cost one more set of the projection weights in memory. A weight changed in place
    since it was packed (an optimizer step between GRPO rollouts, ``load_state_dict``) is packed
    again: each entry keeps the version counter, storage and dtype of its sources. Modules that
    are not plain ``nn.Linear`` (LoRA wrappers, hooked ones) are called as they are.
    """

    _for_model: "weakref.WeakKeyDictionary[MiniMindLM, PackedWeights]" = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple] = {}

    @classmethod
    def for_model(cls, model: MiniMindLM) -> "PackedWeights | None":
        """The model's packed weights, or None where packing does not apply: not on CPU, under
        autocast, a dtype other than fp32 (or bf16 where oneDNN runs it natively), or
        ``MINIMIND_PACKED_DECODE=0``."""
        param = next(model.parameters())
        if (os.environ.get(PACK_SWITCH, "1") == "0" or param.device.type != "cpu"
                or not torch.backends.mkldnn.is_available()
                or torch.is_autocast_enabled("cpu")):  # autocast picks each matmul's dtype itself
            return None
        if param.dtype != torch.float32 and not (
                param.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        if model not in cls._for_model:
            cls._for_model[model] = cls()
        return cls._for_model[model]

    def project(self, x: torch.Tensor, *modules: nn.Module) -> list[torch.Tensor]:
        """``[m(x) for m in modules]``, computed as one product over their stacked weights."""
        if x.dtype != modules[0].weight.dtype or not all(_packable(m) for m in modules):
            return [m(x) for m in modules]
        weights = [m.weight for m in modules]
        stamp = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        key = tuple(id(m) for m in modules)
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            with torch.no_grad():
                stacked = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
                bias = None
                if any(m.bias is not None for m in modules):
                    bias = torch.cat([m.bias.detach() if m.bias is not None else
                                      w.new_zeros(w.shape[0]) for m, w in zip(modules, weights)])
                if stacked.numel() >= PACK_MIN_ELEMENTS:
                    stacked = torch.ops.mkldnn._reorder_linear_weight(stacked, 1)
            entry = (stamp, stacked, bias, [w.shape[0] for w in weights])
            self._entries[key] = entry
        _, weight, bias, sizes = entry
        if weight.is_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        else:
            y = F.linear(x, weight, bias)
        return list(y.split(sizes, dim=-1))


def decode_step(model: MiniMindLM, k_cache: torch.Tensor, v_cache: torch.Tensor,
                tokens_B: torch.Tensor, pos_B: torch.Tensor,
                packed: PackedWeights | None = None, attend: int | None = None) -> torch.Tensor:
    """Logits [B, V] of one new token per row; writes its key/value at ``[:, b, :, pos_b]``.

    ``tokens_B`` may also be [B, S]: S consecutive tokens per row at positions ``pos_b ..
    pos_b + S - 1`` (speculative verification, model/speculative.py), each attending to the cache
    and to the row's earlier new tokens; the logits are then [B, S, V]. Positions beyond a row's
    new tokens stay masked, so rejected entries need no clean-up: a later write replaces them.

    The same arithmetic as ``MiniMindLM.forward`` with a cache (checked token for token against
    it in tests/test_generate.py and tests/test_speculative.py), with the cache length a mask, not
    a slice. ``packed`` runs the dense projections on prepacked weights (eager CPU steps); without
    it each module is called (the compiled step, whose compiler picks its own kernels).
    ``attend`` (eager steps) reads only the first ``attend`` cache positions, which must cover
    every row's new tokens: the positions beyond them are masked anyway, and at 16 rows reading
    the whole bucket cost a fifth of the step (docs/benchmarks.md, Serving).
    """

    def project(x, *modules):
        return packed.project(x, *modules) if packed is not None else [m(x) for m in modules]

    single = tokens_B.dim() == 1
    tokens_BS = tokens_B.unsqueeze(1) if single else tokens_B
    B, S = tokens_BS.shape
    T = k_cache.shape[3] if attend is None else attend
    pos_BS = pos_B.unsqueeze(1) + torch.arange(S, device=pos_B.device)
    x = model.model.embed_tokens(tokens_BS)  # [B, S, D]
    cos, sin = model.model.rotary(pos_BS, x.dtype)  # [B, S, Dh]
    mask_B1ST = (torch.arange(T, device=x.device) <= pos_BS.unsqueeze(-1)).view(B, 1, S, T)
    rows = torch.arange(B, device=x.device).unsqueeze(1)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = project(h, attn.q_proj, attn.k_proj, attn.v_proj)
        q = attn.q_norm(q.reshape(B, S, attn.n_heads, attn.head_dim))
        k = attn.k_norm(k.reshape(B, S, attn.n_kv_heads, attn.head_dim))
        v = v.reshape(B, S, attn.n_kv_heads, attn.head_dim)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # [B, H, S, Dh]
        k = apply_rope(k, cos, sin)
        # [B, S, G, Dh] into cache[i, b, :, pos_b + s, :]
        k_cache[i, rows, :, pos_BS] = k.to(k_cache.dtype)
        v_cache[i, rows, :, pos_BS] = v.to(v_cache.dtype)
        k_all, v_all = k_cache[i, :, :, :T].to(q.dtype), v_cache[i, :, :, :T].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask_B1ST, enable_gqa=attn.n_heads != attn.n_kv_heads)
        x = x + project(out.transpose(1, 2).reshape(B, S, attn.n_heads * attn.head_dim),
                        attn.o_proj)[0]
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        if isinstance(mlp, MoEFeedForward):
            x = x + _moe_all_experts(mlp, h.reshape(B * S, -1)).view(B, S, -1)
        elif type(mlp) is FeedForward and not (mlp._forward_hooks or mlp._forward_pre_hooks):
            gate, up = project(h, mlp.gate_proj, mlp.up_proj)
            x = x + project(F.silu(gate) * up, mlp.down_proj)[0]
        else:
            x = x + mlp(h)
    logits = project(model.model.norm(x), model.lm_head)[0]
    return logits[:, 0] if single else logits


def _bucket(n: int, limit: int, floor: int = 256) -> int:
    """The next power of two >= n (at least ``floor``, at most ``limit``): few distinct shapes, so
    few compiled graphs, and a cache never more than twice what it must hold."""
    size = floor
    while size < n:
        size *= 2
    return min(size, limit)


class StaticDecoder:
    """Slots of a static KV cache and the single-token step over them.

    ``prefill(slot, ids)`` fills a slot from its prompt (eager, chunked when asked) and returns the
    logits after the prompt; ``step(tokens_B, pos_B)`` decodes one token for rows ``0..B-1``.
    Callers keep their live rows in the low slots (``move_slot`` packs them), so a step over B
    rows uses the first B slots, rounded up to a power of two when compiled (the spare rows write
    at the last position, which no live or prefilling row has reached).
    """

    _compiled: "weakref.WeakKeyDictionary[MiniMindLM, dict]" = weakref.WeakKeyDictionary()

    def __init__(self, model: MiniMindLM, slots: int, max_len: int, compile: bool = False):
        self.model = model
        self.config = model.config
        self.slots = slots
        self.context = model.config.max_position_embeddings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.compile = compile
        self.cache = KVCache(self.config, slots, _bucket(max_len, self.context), self.dtype,
                             self.device)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def ensure_capacity(self, needed: int) -> None:
        """Grows the cache (to the next power of two) so it holds ``needed`` positions, keeping
        what is cached. Attention reads the whole cache each step, so it starts small."""
        if needed <= self.cache.max_len:
            return
        if needed > self.context:
            raise ValueError(f"{needed} positions exceed the context of {self.context}")
        new = KVCache(self.config, self.slots, _bucket(needed, self.context), self.dtype,
                      self.device)
        old = self.cache.max_len
        new.k[:, :, :, :old] = self.cache.k
        new.v[:, :, :, :old] = self.cache.v
        self.cache = new

    def shrink(self) -> None:
        """Back to the smallest cache (nothing cached is kept): for an idle engine."""
        if self.cache.max_len > _bucket(1, self.context):
            self.cache = KVCache(self.config, self.slots, _bucket(1, self.context), self.dtype,
                                 self.device)

    def prefill(self, slot: int, ids: list[int], start: int = 0,
                all_logits: bool = False) -> torch.Tensor:
        """Runs ``ids`` (positions ``start..``) through the model into ``slot``; logits [V] of the
        last position, or [S, V] of every position with ``all_logits``. ``start > 0`` continues
        an earlier chunk of the same prompt."""
        self.ensure_capacity(start + len(ids))
        view = _SlotView(self.cache, slot, start)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(x, kv_cache=view, logits_to_keep=0 if all_logits else 1).logits[0]
        return logits if all_logits else logits[-1]

    def prefill_batch(self, prompts: list[list[int]], group: int = 16,
                      slots: list[int] | None = None) -> torch.Tensor:
        """Prefills prompt b into slot b (or ``slots[b]``), several rows per forward; logits
        [B, V] after each prompt.

        Rows are right-padded to the longest of their group: under the causal mask a real token
        never sees the pads after it, and a row's own positions start at 0 as alone, so each row's
        cache and logits are what ``prefill`` computes (only its real positions are copied).
        Groups are runs of prompts sorted by length, so the padding (and the logits kept, from the
        group's shortest prompt on) stays small. Each group runs in a scratch cache whose rows are
        then copied to their slots."""
        B = len(prompts)
        slots = list(range(B)) if slots is None else slots
        self.ensure_capacity(max(len(p) for p in prompts))
        logits = [None] * B
        order = sorted(range(B), key=lambda b: len(prompts[b]))
        pad = self.config.pad_token_id
        for g in range(0, B, group):
            rows = order[g:g + group]
            lengths = [len(prompts[r]) for r in rows]
            S = max(lengths)
            ids = torch.full((len(rows), S), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :lengths[i]] = torch.tensor(prompts[r], dtype=torch.long)
            # The group's own cache, then each row copied into its slot (the slots of a sorted
            # group are not contiguous, and the forward writes a contiguous batch).
            scratch = KVCache(self.config, len(rows), S, self.dtype, self.device)
            out = self.model(ids.to(self.device), kv_cache=scratch,
                             logits_to_keep=S - min(lengths) + 1).logits
            for i, r in enumerate(rows):
                self.cache.k[:, slots[r], :, :lengths[i]] = scratch.k[:, i, :, :lengths[i]]
                self.cache.v[:, slots[r], :, :lengths[i]] = scratch.v[:, i, :, :lengths[i]]
                logits[r] = out[i, lengths[i] - S - 1]
        return torch.stack(logits)

    def extend(self, runs: list[list[int]], pos: list[int]) -> torch.Tensor:
        """Appends run b (its tokens at positions ``pos[b]..``) to slot b, for slots 0..B-1, in
        one forward of ``decode_step``; logits [B, V] after each run's last token. For resuming
        rows whose cache is kept (trainer/agent.py: a tool result between two replies).

        Runs are right-padded to the longest: a pad lands beyond its row's last real position, is
        never attended to by the row's real tokens, and the row's next write replaces it. Rows
        where the padded run would pass the end of the cache append alone (``prefill``). Eager:
        the run lengths vary, and each would be a new compiled shape."""
        S = max(len(r) for r in runs)
        self.ensure_capacity(min(max(p + S for p in pos), self.context))
        if all(p + S <= self.cache.max_len for p in pos):
            ids = torch.full((len(runs), S), self.config.pad_token_id, dtype=torch.long)
            for b, r in enumerate(runs):
                ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            B = len(runs)
            out = decode_step(self.model, self.cache.k[:, :B], self.cache.v[:, :B],
                              ids.to(self.device), torch.tensor(pos, device=self.device),
                              PackedWeights.for_model(self.model), attend=max(pos) + S)
            return torch.stack([out[b, len(r) - 1] for b, r in enumerate(runs)])
        return torch.stack([self.prefill(b, r, start=p) for b, (r, p) in enumerate(zip(runs, pos))])

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copies a slot's first ``length`` cached positions to another slot (packing rows)."""
        self.cache.k[:, dst, :, :length] = self.cache.k[:, src, :, :length]
        self.cache.v[:, dst, :, :length] = self.cache.v[:, src, :, :length]

    def step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one new token per live row; row b's token goes to position pos_b.
        Tokens [B, S] give logits [B, S, V] of S consecutive tokens per row (``decode_step``)."""
        B = tokens_B.shape[0]
        S = 1 if tokens_B.dim() == 1 else tokens_B.shape[1]
        # On CPU inductor's code measured 2x slower than eager at eight rows (and, since the eager
        # step runs on prepacked weights, slower at one row too: README, decode figures), so
        # there only single-row steps run compiled, and only when asked.
        if not self.compile or (self.device.type == "cpu" and B > 1):
            # Eager: attention over the used prefix only (a host read of the longest row, free
            # on CPU; on CUDA it would wait for the queue, so there the whole cache is read).
            attend = int(pos_B.max()) + S if self.device.type == "cpu" else None
            return decode_step(self.model, self.cache.k[:, :B], self.cache.v[:, :B], tokens_B,
                               pos_B, PackedWeights.for_model(self.model), attend)
        width = min(_bucket(B, self.slots, floor=1), self.slots)
        if width > B:  # spare rows: a harmless write at the last positions of unused slots
            pad = width - B
            tokens_B = torch.cat([tokens_B, tokens_B.new_zeros((pad,) + tokens_B.shape[1:])])
            pos_B = torch.cat([pos_B, pos_B.new_full((pad,), self.cache.max_len - S)])
        fn = self._compiled_step(width, S)
        return fn(self.model, self.cache.k[:, :width], self.cache.v[:, :width], tokens_B,
                  pos_B)[:B]

    def _compiled_step(self, width: int, S: int = 1):
        graphs = self._compiled.setdefault(self.model, {})
        key = (width, S, self.cache.max_len, self.dtype, self.device)
        if key not in graphs:
            # Dynamo keeps one guarded entry per (model, shape) on decode_step's code object;
            # the default limit (8) would fall back to eager after a few models or buckets.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 64)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 256)
            graphs[key] = torch.compile(decode_step, dynamic=False, fullgraph=True)
            log.info("decode step: compiling for batch %d x %d positions on first use",
                     width, self.cache.max_len)
        return graphs[key]


def compile_by_default(device: torch.device) -> bool:
    """Whether the step is compiled unless the caller says: ``MINIMIND_COMPILE_DECODE`` (1/0)
    when set, else on CUDA only. On CPU the first compile costs 20-50 s per shape (5 s from a
    warm inductor cache) and measured slower than the prepacked eager step, so it is opt-in."""
    flag = os.environ.get("MINIMIND_COMPILE_DECODE")
    if flag is not None:
        return flag == "1"
    return device.type == "cuda"
