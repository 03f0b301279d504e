"""Text generation over a preallocated KV cache: greedy and sampling, stops, streaming, batching.

Layers, lowest first:
- ``generate_tokens`` is the decoding loop. It takes a batch of prompts (token ids) with one
  ``SamplingParams`` each and yields, per step, the new token of every row still running. By
  default each prompt is prefilled into its own slot of a static cache and decoded by the
  fixed-shape step of ``model/fast_decode.py``; the eager path (left-padded batch through
  ``MiniMindLM.forward``) remains for models that step cannot run (offloaded experts) and as the
  reference. Rows count positions from their own first token, so a prompt in a batch gets
  exactly the tokens it gets alone (greedy; or sampling with the same seed). Its parts are
  public for callers that manage their own cache: ``start_decoding`` (prefill, and the step
  that feeds each chosen token) and ``decode_steps`` (choose, stop, yield, advance); the agent
  rollouts (trainer/agent.py) resume rows on a cache kept across tool calls with them.
- ``TextStream`` turns one row's tokens into text deltas: it never emits half of a multi-byte
  character and holds back text that could be the start of a stop string.
- ``generate`` / ``stream`` are the convenience front ends the CLI, server and evaluation use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from .fast_decode import StaticDecoder, compile_by_default, fast_path_reason
from .model import KVCache, MiniMindLM

if TYPE_CHECKING:  # model/speculative.py builds on this module
    from .speculative import Speculation

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already present (CTRL §4.1)
    seed: int | None = None
    stop_token_ids: Sequence[int] = (2,)  # <|im_end|>
    stop_strings: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (stop token or string) | "length"


def _apply_repetition_penalty(logits_BV, seen_BV, penalty_B1):
    penalised = torch.where(logits_BV > 0, logits_BV / penalty_B1, logits_BV * penalty_B1)
    return torch.where(seen_BV, penalised, logits_BV)


def _filter_top_k_top_p(logits_BV, top_k: list[int], top_p_B1: torch.Tensor,
                        candidates: int = 256):
    """Masks (to -inf) tokens outside each row's top-k and nucleus (smallest set with mass ≥ p).

    The kept tokens are a prefix of the row in descending order, so the row's top ``candidates``
    (``topk``, no sort of the vocabulary) decide it wherever its nucleus closes inside them or
    its top-k is within them; only the other rows (flat distributions) sort the whole
    vocabulary. Why: the sort took ~6 ms at 16 rows of 6400 tokens, a third of a 16-row decode
    step under AVX2 (docs/benchmarks.md, Serving). Either way a row's result depends on the row
    alone, so a request samples the same tokens in any batch."""
    V = logits_BV.shape[-1]
    top_p_B1 = top_p_B1.expand(len(top_k), 1)
    k_B1 = torch.tensor([k if 0 < k < V else V for k in top_k],
                        device=logits_BV.device).unsqueeze(-1)
    K = min(V, max([candidates] + [k for k in top_k if 0 < k < V]))
    vals, idx = logits_BV.topk(K, dim=-1)  # descending
    drop = torch.arange(K, device=logits_BV.device).unsqueeze(0) >= k_B1
    # a row's probabilities: over its top-k tokens, or over the whole vocabulary
    top_k_norm = vals.masked_fill(drop, float("-inf")).logsumexp(-1, keepdim=True)
    norm = torch.where(k_B1 < V, top_k_norm, logits_BV.logsumexp(-1, keepdim=True))
    probs = (vals - norm).exp().masked_fill(drop, 0.0)
    mass_before = probs.cumsum(-1) - probs  # keep a token while the mass before it is < p
    drop |= mass_before >= top_p_B1
    drop[:, 0] = False  # the most likely token always survives
    keep = torch.zeros_like(logits_BV, dtype=torch.bool).scatter(-1, idx, ~drop)
    out = logits_BV.masked_fill(~keep, float("-inf"))
    decided = (k_B1[:, 0] <= K) | (mass_before[:, -1] >= top_p_B1[:, 0])
    if not bool(decided.all()):  # the nucleus is wider than the candidates: sort those rows
        rows = (~decided).nonzero()[:, 0]
        out[rows] = _filter_top_k_top_p(logits_BV[rows], [int(k) for k in k_B1[rows, 0]],
                                        top_p_B1[rows], candidates=V)
    return out


def sampling_distribution(logits_BV, params: list[SamplingParams], seen_BV):
    """``(penalised logits, probs or None)`` of each row: the logits after the repetition
    penalty (greedy rows take their argmax), and, unless every row is greedy, the distribution a
    sampling row draws from (temperature, top-k, top-p). Speculative decoding's acceptance rule
    uses the same distribution, so it keeps exactly what plain sampling samples."""
    logits_BV = logits_BV.float()
    penalty = torch.tensor([p.repetition_penalty for p in params], device=logits_BV.device)
    if (penalty != 1).any():
        logits_BV = _apply_repetition_penalty(logits_BV, seen_BV, penalty.unsqueeze(-1))
    if all(p.temperature == 0 for p in params):
        return logits_BV, None
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=logits_BV.device)
    scaled = logits_BV / temps.unsqueeze(-1)
    # Only rows with a top-k or top-p filter pay for its sort of the vocabulary (at 16 rows of
    # 6400 tokens the sort alone took ~6 ms, as long as a 4-row decode step); a row's result does
    # not depend on which neighbours are filtered.
    V = logits_BV.shape[-1]
    rows = [b for b, p in enumerate(params)
            if p.temperature > 0 and (0 < p.top_k < V or p.top_p < 1)]
    if rows:
        idx = torch.tensor(rows, device=logits_BV.device)
        top_p = torch.tensor([params[b].top_p for b in rows], device=logits_BV.device)
        scaled = scaled.index_copy(0, idx, _filter_top_k_top_p(
            scaled[idx], [params[b].top_k for b in rows], top_p.unsqueeze(-1)))
    return logits_BV, scaled.softmax(-1)


def _choose_tokens(logits_BV, params: list[SamplingParams], seen_BV, generators):
    logits_BV, probs = sampling_distribution(logits_BV, params, seen_BV)
    greedy = logits_BV.argmax(-1)
    if probs is None:
        return greedy
    # One generator per row: a row's random stream does not depend on its batch neighbours.
    sampled = torch.stack([torch.multinomial(probs[b], 1, generator=generators[b])[0]
                           for b in range(len(params))])
    is_greedy = torch.tensor([p.temperature == 0 for p in params], device=logits_BV.device)
    return torch.where(is_greedy, greedy, sampled)


def use_fast_path(model: MiniMindLM, fast: bool | None = None) -> bool:
    """Whether decoding takes the static-cache step (``model/fast_decode.py``): by default
    wherever it is correct; ``fast=True`` insists (an error where it is not), ``False`` refuses.
    The reason for a fallback is logged once per model, so a slow path is never silent."""
    reason = fast_path_reason(model)
    if fast and reason:
        raise ValueError(f"the fast decode path is not available: {reason}")
    if fast is None and reason and getattr(model, "_fast_path_logged", None) != reason:
        log.info("decoding on the eager path: %s", reason)
        model._fast_path_logged = reason
    return reason is None if fast is None else fast


def _eager_steps(model, prompts, longest, steps, device):
    """The reference path: one left-padded batch through ``MiniMindLM.forward`` and its cache."""
    B = len(prompts)
    pad = model.config.pad_token_id
    ids_BS = torch.full((B, longest), pad, dtype=torch.long)
    mask_BS = torch.zeros(B, longest + steps, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BS[b, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask_BS[b, longest - len(p):] = 1
    ids_BS, mask_BS = ids_BS.to(device), mask_BS.to(device)
    padded = bool((mask_BS[:, :longest] == 0).any())
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, longest + steps, dtype=dtype, device=device)
    first = model(ids_BS, attention_mask=mask_BS[:, :longest] if padded else None,
                  kv_cache=cache, logits_to_keep=1).logits[:, -1]

    last = model.config.max_position_embeddings - 1

    def advance(next_B, step):
        mask_BS[:, longest + step] = 1
        if not padded:
            return model(next_B.unsqueeze(-1), kv_cache=cache).logits[:, -1]
        # Each row at its own position. A row that has used its budget is still fed (one
        # batch): near the context's end its position would pass the last one, so it stays there
        # (its outputs are never used; a row still running is always below it).
        pos = (mask_BS[:, :longest + step + 1].sum(-1, keepdim=True) - 1).clamp(max=last)
        return model(next_B.unsqueeze(-1), attention_mask=mask_BS[:, :longest + step + 1],
                     position_ids=pos, kv_cache=cache).logits[:, -1]

    return first, advance


def _static_steps(model, prompts, longest, steps, device, compile):
    """The fast path: the prompts prefilled into their slots (batched), then the fixed-shape step."""
    decoder = StaticDecoder(model, len(prompts), longest + steps,
                            compile=compile_by_default(device) if compile is None else compile)
    first = decoder.prefill_batch([list(p) for p in prompts])
    pos_B = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    last = decoder.max_len - 1

    def advance(next_B, step):
        # As in _eager_steps: a finished row near the context's end stays at the last position.
        return decoder.step(next_B, (pos_B + step).clamp(max=last))

    return first, advance


@torch.inference_mode()
def generate_tokens(model: MiniMindLM, prompts: Sequence[Sequence[int]],
                    params: SamplingParams | Sequence[SamplingParams],
                    should_stop: Callable[[int], bool] | None = None,
                    fast: bool | None = None, compile: bool | None = None,
                    speculation: Speculation | None = None) -> Iterator[list[int | None]]:
    """Yields, after each decoding step, each row's new token id (None once a row has finished,
    and, under speculation, for a row with no token in a step another row's round still fills).

    A row finishes on a stop token (which is yielded, then the row goes quiet), on
    ``max_new_tokens``, or when ``should_stop(row)`` returns True (a stop string seen by the
    caller, a client gone). Stop strings are the caller's business (see ``TextStream``).
    ``fast`` picks the static-cache step (default: wherever correct, see ``use_fast_path``) and
    ``compile`` whether that step is compiled (default: ``compile_by_default``). Both paths give
    the same greedy tokens. ``speculation`` (model/speculative.py: a draft model or prompt
    lookup) verifies several proposed tokens per forward; greedy tokens stay the same and sampling
    keeps its distribution.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    if not prompts:
        return
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    if longest > context:
        raise ValueError(f"prompt of {longest} tokens exceeds the context of {context}")
    budget = [min(p.max_new_tokens, context - len(ids)) for p, ids in zip(params, prompts)]
    steps = max(budget)
    if steps == 0:
        return
    if speculation is not None:
        yield from speculation.tokens(model, prompts, list(params), budget, should_stop, compile)
        return
    first, advance = start_decoding(model, prompts, steps, fast, compile)
    for out, _ in decode_steps(first, advance, prompts, params, budget, should_stop):
        yield out


def start_decoding(model: MiniMindLM, prompts: Sequence[Sequence[int]], steps: int,
                   fast: bool | None = None, compile: bool | None = None
                   ) -> tuple[torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]:
    """``(logits [B, V] after each prompt, advance)``: the prompts prefilled into a cache with room
    for ``steps`` more tokens each; ``advance(tokens_B, step)`` feeds step ``step``'s tokens and
    returns the next logits. The static-cache step where ``use_fast_path`` allows, else eager."""
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    if use_fast_path(model, fast):
        return _static_steps(model, prompts, longest, steps, device, compile)
    return _eager_steps(model, prompts, longest, steps, device)


def decode_steps(logits: torch.Tensor,
                 advance: Callable[[torch.Tensor, int], torch.Tensor],
                 prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 budget: Sequence[int], should_stop: Callable[[int], bool] | None = None
                 ) -> Iterator[tuple[list[int | None], torch.Tensor]]:
    """The decoding loop over any cache: from ``logits`` [B, V] (after each row's history
    ``prompts``, which the repetition penalty sees), choose each row's token, yield ``(tokens,
    logits)`` (None for a finished row; the logits the tokens were chosen from, before penalty
    and temperature: a caller reads the policy's log-probs off them), then ``advance``. A row
    finishes on a stop token, on its ``budget`` of tokens, or on ``should_stop(row)``."""
    B, device = len(prompts), logits.device
    seen_BV = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):  # not the pads: a row must see what it would see alone
        seen_BV[b, torch.tensor(p, dtype=torch.long, device=device)] = True
    generators = [make_generator(p.seed, device) for p in params]
    running = [True] * B
    produced = [0] * B
    stop_ids = [set(p.stop_token_ids) for p in params]
    steps = max(budget)
    for step in range(steps):
        next_B = _choose_tokens(logits, params, seen_BV, generators)
        tokens = next_B.tolist()
        out: list[int | None] = []
        for b in range(B):
            if not running[b]:
                out.append(None)
                continue
            out.append(tokens[b])
            produced[b] += 1
            if tokens[b] in stop_ids[b] or produced[b] >= budget[b]:
                running[b] = False
        yield out, logits
        for b in range(B):
            if running[b] and should_stop is not None and should_stop(b):
                running[b] = False
        if not any(running) or step == steps - 1:
            return
        seen_BV.scatter_(1, next_B.unsqueeze(-1), True)
        logits = advance(next_B, step)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A row's own random stream: its samples do not depend on its batch neighbours."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


class TextStream:
    """Incremental detokenisation of one row: ``push(token_id) -> text delta``.

    The text is what a person reads: control tokens (``tokenizer.decode(ids,
    skip_special_tokens=True)``: ``<|im_end|>``, ``<|reserved_356|>``; the chat markup such as
    ``<think>`` stays) are never part of it. Byte-level BPE splits multi-byte characters across
    tokens; a decode that ends in U+FFFD is an unfinished character, so it is held back until a
    later token completes it (a control token in between does not break it: the bytes on both
    sides join). Text that might begin a stop string is held back too, so a stop string is never
    half-emitted.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), skip_token_ids=()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.skip = set(skip_token_ids)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        if token_id not in self.skip:
            self.ids.append(token_id)
        decoded = self._decode()
        if decoded.endswith("\ufffd"):
            return ""
        self.text = decoded
        for s in self.stop_strings:
            cut = self.text.find(s)
            if cut != -1:
                self.stopped = True
                self.text = self.text[:cut]
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """The held-back rest, when the row has ended."""
        self.text = self._decode().rstrip("\ufffd") if not self.stopped else self.text
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            for s in self.stop_strings:  # hold back a suffix that is a prefix of a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta


def generate(model: MiniMindLM, tokenizer, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams],
             speculation: Speculation | None = None) -> list[Generation]:
    """Batched generation; returns token ids, text (stop strings cut) and the finish reason."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    results = [Generation() for _ in prompts]
    streams = [TextStream(tokenizer, p.stop_strings, p.stop_token_ids) if tokenizer else None
               for p in params]
    for step in generate_tokens(model, prompts, params,
                                should_stop=lambda b: bool(streams[b] and streams[b].stopped),
                                speculation=speculation):
        for b, tok in enumerate(step):
            if tok is None:
                continue
            results[b].token_ids.append(tok)
            if tok in params[b].stop_token_ids:
                results[b].finish_reason = "stop"
            elif streams[b] is not None:
                streams[b].push(tok)
                if streams[b].stopped:
                    results[b].finish_reason = "stop"
    for r, s in zip(results, streams):
        if s is not None:
            s.flush()
            r.text = s.text
    return results


def stream(model: MiniMindLM, tokenizer, prompt: Sequence[int], params: SamplingParams,
           speculation: Speculation | None = None) -> Iterator[str]:
    """Text deltas for one prompt, as they are generated."""
    text = TextStream(tokenizer, params.stop_strings, params.stop_token_ids)
    for step in generate_tokens(model, [prompt], [params], should_stop=lambda b: text.stopped,
                                speculation=speculation):
        if step[0] is not None and step[0] not in params.stop_token_ids:
            delta = text.push(step[0])
            if delta:
                yield delta
    rest = text.flush()
    if rest:
        yield rest
