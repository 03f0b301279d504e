"""A continuous-batching decode engine: one background thread decodes all running requests.

Why a single thread: the model and its KV cache are not thread-safe, and on one device one batched
forward per step beats N interleaved single-row forwards (decode is memory-bound: a step over 16
rows costs little more than a step over one). Requests are submitted from any thread (the HTTP
server's event loop); each gets its own event sink, so streaming clients see their tokens as soon
as the step that made them ends.

Scheduling is *continuous batching* at token granularity over ``model.fast_decode``'s static
cache, one slot per request: a request joins the running batch as soon as its prompt is in the
cache and leaves it the step it finishes, so nobody waits for a batch to drain. Between two
decode steps at most ``prefill_chunk`` prompt tokens are prefilled (the rest of one prompt, then
the next queued ones), so a long new prompt delays the running streams by at most one chunk's
forward per token (the benchmark reports that stall). While no stream decodes there is no stall
to bound, and up to ``idle_prefill`` tokens are prefilled before the first step: a burst of
requests arriving at an idle engine starts decoding together instead of joining one chunk a step
(which cost the 16-client benchmark a third of its time under AVX2: docs/benchmarks.md, Serving).
Queued prompts that fit the budget whole are prefilled together in one batched forward
(``StaticDecoder.prefill_batch``); a longer one, or one asking for prompt log-probs, is prefilled
chunk by chunk as the one partly prefilled row. Rows keep their own positions (no padding in
the cache), so every request gets exactly the tokens it would get alone (greedy, or sampling
with a seed). Models the static step cannot run (offloaded experts) are served one request at a
time through ``generate_tokens``' eager path.

Speculative decoding (``speculation``: a draft model or prompt lookup, model/speculative.py) serves
requests one at a time, each through ``generate_tokens``' speculative path. Why batch 1: it pays
where a step is bound by reading the weights, which is batch-1 decoding; a batch of 16 rows
already reads them once for 16 tokens, and verifying 1 + k tokens per row would multiply the
compute of a step that is no longer bandwidth-bound. Under load, continuous batching without
speculation serves more tokens per second; with one client at a time, speculation answers faster.

Cancellation: ``RequestHandle.cancel()`` (the server calls it when a client disconnects) is read
before the next step, so a cancelled row stops costing compute and events within one step.

Log-probabilities (for ``/v1/completions``): a request may ask for the log-prob (and top-N) of
each prompt token (``prompt_logprobs``, computed from the prefill's logits) and of each generated
token (``logprobs``, from the raw model distribution before temperature/top-p); they arrive as
``TokenLogprobs`` events before the text they belong to.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence, Union

import torch

from model.fast_decode import StaticDecoder, compile_by_default
from model.generate import (SamplingParams, TextStream, _choose_tokens, generate_tokens,
                            make_generator, use_fast_path)
from model.model import MiniMindLM
from model.speculative import Speculation

log = logging.getLogger(__name__)


# -- events delivered to a request's sink ---------------------------------------------------------

@dataclass
class TextDelta:
    """New text for the request (stop strings already cut, never half a character)."""

    text: str


@dataclass
class Finished:
    """The request is done; no event follows."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """Decoding raised; no event follows."""

    message: str


@dataclass
class TokenLogprobs:
    """(token id, log-prob or None, [(token id, log-prob)] top-N) per token, in order; for the
    prompt (``prompt=True``, the first token's log-prob is None) or for generated tokens."""

    entries: list[tuple]
    prompt: bool = False


Event = Union[TextDelta, TokenLogprobs, Finished, Failed]
Sink = Callable[[Event], None]


class EngineOverloaded(RuntimeError):
    """Too many requests waiting; the caller should answer 503."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


@dataclass
class EngineStats:
    """Counters (read them with ``Engine.stats_snapshot()``; written only under the lock)."""

    requests_submitted: int = 0
    requests_finished: int = 0  # finished normally ("stop" or "length")
    requests_cancelled: int = 0  # the client went away (before or while decoding)
    requests_failed: int = 0
    batches: int = 0  # decode steps (a step advances every running row by one token)
    max_batch_size: int = 0  # the most rows in one step: > 1 proves batching happened
    tokens_generated: int = 0
    last_cancelled_tokens: int | None = None  # tokens a cancelled request got before it stopped
    batch_sizes: list[int] = field(default_factory=list)  # rows of the most recent steps (capped)
    # Where the engine thread's time goes (seconds, static step only): prompt forwards, decode
    # step forwards, choosing tokens (penalty, filters, draws), and the per-row host work after
    # it (text, events to the sinks).
    prefill_s: float = 0.0
    step_s: float = 0.0
    sample_s: float = 0.0
    host_s: float = 0.0


@dataclass
class RequestHandle:
    """What ``Engine.submit`` returns: an id to log and a way to cancel."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stops generation at the next step (idempotent, any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Row:
    """A request in the running batch (its slot is its index in ``Engine._rows``)."""

    handle: RequestHandle
    stream: TextStream
    budget: int  # tokens it may still generate: max_new_tokens capped by the context
    generator: torch.Generator
    seen: torch.Tensor  # [V] bool, for the repetition penalty
    prefilled: int = 0  # prompt tokens in the cache
    produced: int = 0
    next_token: int | None = None  # sampled and delivered, not yet fed to the model

    @property
    def length(self) -> int:  # cached positions
        return self.prefilled + max(self.produced - 1, 0)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.handle.prompt_ids)


def _logprob_entries(logits_SV: torch.Tensor, chosen: list[int], top_n: int) -> list[tuple]:
    """(token, logprob, [(token, logprob) top-N]) per position, from raw logits."""
    logp = logits_SV.float().log_softmax(-1)
    picked = logp.gather(-1, torch.tensor(chosen, device=logp.device).unsqueeze(-1))[:, 0]
    tops = logp.topk(top_n, dim=-1) if top_n > 0 else None
    out = []
    for i, tok in enumerate(chosen):
        top = (list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None
               else [])
        out.append((tok, float(picked[i]), top))
    return out


class Engine:
    """Owns the model; ``start()`` the thread, ``submit()`` requests, ``shutdown()`` at the end."""

    def __init__(self, model: MiniMindLM, tokenizer, max_batch_size: int = 16,
                 batch_wait_s: float = 0.0, max_pending: int = 256, prefill_chunk: int = 128,
                 compile: bool | None = None, speculation: Speculation | None = None,
                 idle_prefill: int = 2048) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s  # kept for callers; continuous batching needs no wait
        self.max_pending = max_pending
        self.prefill_chunk = prefill_chunk
        self.idle_prefill = idle_prefill  # prompt tokens before the first step of an idle engine
        self.context_length: int = model.config.max_position_embeddings
        self.fast = use_fast_path(model)
        self.speculation = speculation
        self.compile = compile
        if speculation is not None:
            speculation.check(model)
        self._decoder = None
        if self.fast and speculation is None:
            device = next(model.parameters()).device
            self._decoder = StaticDecoder(
                model, max_batch_size, 1,
                compile=compile_by_default(device) if compile is None else compile)
        self._rows: list[_Row] = []  # decoding rows first, then at most one prefilling row
        self._pending: list[RequestHandle] = []
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancels everything still queued or running and joins the thread."""
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for h in pending:
            h.cancel()
            self._deliver(h, Finished("cancelled", len(h.prompt_ids), 0))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
               sink: Sink, logprobs: int | None = None,
               prompt_logprobs: int | None = None) -> RequestHandle:
        """Queues a request; ``sink`` gets its events on the engine thread (keep it cheap).

        ``logprobs`` / ``prompt_logprobs``: None = none, N >= 0 = each token's log-prob plus the
        top N alternatives, for the generated / the prompt tokens."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) > self.context_length or (
                len(prompt_ids) == self.context_length and params.max_new_tokens > 0
                and prompt_logprobs is None):
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds "
                             f"{self.context_length} (prompt plus at least one new token)")
        handle = RequestHandle(request_id, list(prompt_ids), params, sink, logprobs,
                               prompt_logprobs)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shut down")
            if len(self._pending) >= self.max_pending:
                raise EngineOverloaded(f"{len(self._pending)} requests already waiting")
            self._pending.append(handle)
            self._stats.requests_submitted += 1
            self._cond.notify_all()
        return handle

    def is_alive(self) -> bool:
        """False once the decode thread has exited (shut down, or crashed)."""
        return self._thread.is_alive()

    def stats_snapshot(self) -> dict:
        """A JSON-ready copy of the counters plus the queue state."""
        with self._cond:
            snap = asdict(self._stats)
            snap.update(pending=len(self._pending), busy=self._busy, running=len(self._rows),
                        max_batch_size_limit=self.max_batch_size, fast_path=self.fast,
                        compiled=bool(self._decoder and self._decoder.compile))
            if self.speculation is not None:
                st = self.speculation.stats
                snap["speculation"] = {"acceptance_rate": st.acceptance_rate,
                                       "tokens_per_forward": st.tokens_per_forward,
                                       "drafted": st.drafted, "accepted": st.accepted}
        return snap

    # -- the decode thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._admit():
                return
            try:
                with torch.inference_mode():
                    if self._decoder is not None:
                        self._prefill()
                        self._decode_step()
                    else:
                        self._eager_batch()
            except Exception as e:  # a bad step must not kill the server
                log.exception("decoding failed")
                rows, self._rows = self._rows, []
                with self._cond:
                    self._stats.requests_failed += len(rows)
                for row in rows:
                    self._deliver(row.handle, Failed(f"generation failed: {type(e).__name__}: {e}"))

    def _admit(self) -> bool:
        """Waits while there is nothing to do (the static step's rows are taken from the queue by
        ``_prefill``; the eager fallback's batch here). False once the engine is closed."""
        with self._cond:
            while True:
                if self._closed:
                    self._busy = False
                    rows, self._rows = self._rows, []
                    break
                self._drop_cancelled()
                if self._decoder is None and not self._rows:  # a static batch (speculation: one)
                    size = 1 if self.speculation is not None else self.max_batch_size
                    batch, self._pending = self._pending[:size], self._pending[size:]
                    self._rows = [self._new_row(h) for h in batch]
                if self._rows or self._pending:
                    self._busy = True
                    return True
                self._busy = False
                if self._decoder is not None:
                    self._decoder.shrink()  # idle: give the cache memory back
                self._cond.wait()
        for row in rows:
            self._finish(row, "cancelled")
        return False

    def _drop_cancelled(self) -> None:
        """Clients that left while queued never reach the model (call under the lock)."""
        kept = []
        for h in self._pending:
            if h.cancelled:
                self._stats.requests_cancelled += 1
                self._stats.last_cancelled_tokens = 0
            else:
                kept.append(h)
        self._pending = kept

    def _take(self, budget: int) -> tuple[list[RequestHandle], bool]:
        """From the head of the queue, into free slots: the requests whose whole prompts fit
        ``budget`` tokens together (padded to the longest: one batched forward), else the first
        one alone to prefill in chunks (``True``); ``[]`` when none can start."""
        with self._cond:
            self._drop_cancelled()
            free = self.max_batch_size - len(self._rows)
            taken, width = [], 0
            for h in self._pending[:free]:
                n = len(h.prompt_ids)
                whole = h.prompt_logprobs is None and (
                    min(h.params.max_new_tokens, self.context_length - n) > 0)
                if not whole or (len(taken) + 1) * max(width, n) > budget:
                    break
                taken.append(h)
                width = max(width, n)
            chunked = not taken and free > 0 and bool(self._pending)
            if chunked:
                taken = self._pending[:1]
            self._pending = self._pending[len(taken):]
        return taken, chunked

    def _prefill(self) -> None:
        """The prompt tokens prefilled before the next decode step: at most ``prefill_chunk``
        while streams decode (their stall), else up to ``idle_prefill`` (and then at most
        ``prefill_chunk`` more once rows decode). Whole prompts that fit go through one batched
        forward; the rest of a partly prefilled prompt goes first."""
        budget = max(self.prefill_chunk, self.idle_prefill)
        while True:
            if any(not r.prefilling for r in self._rows):
                budget = min(budget, self.prefill_chunk)
            if budget <= 0:
                return
            if self._rows and self._rows[-1].prefilling:
                budget -= self._prefill_chunk(budget)
                continue
            handles, chunked = self._take(budget)
            if not handles:
                return
            if chunked:
                self._rows.append(self._new_row(handles[0]))
                continue
            rows = [self._new_row(h) for h in handles]
            slots = list(range(len(self._rows), len(self._rows) + len(rows)))
            self._rows += rows
            prompts = [h.prompt_ids for h in handles]
            self._decoder.ensure_capacity(max(map(len, prompts)) + 1)
            t0 = time.perf_counter()
            logits = self._decoder.prefill_batch(prompts, slots=slots)
            self._count(prefill_s=time.perf_counter() - t0)
            for row in rows:
                row.prefilled = len(row.handle.prompt_ids)
            self._accept(slots, logits)
            budget -= len(prompts) * max(map(len, prompts))

    def _new_row(self, h: RequestHandle) -> _Row:
        p = h.params
        device = next(self.model.parameters()).device
        seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(h.prompt_ids, device=device)] = True
        budget = min(p.max_new_tokens, self.context_length - len(h.prompt_ids))
        return _Row(h, TextStream(self.tokenizer, p.stop_strings, p.stop_token_ids), budget,
                    make_generator(p.seed, device), seen)

    def _prefill_chunk(self, budget: int) -> int:
        """Up to ``budget`` tokens of the prompt of the row being prefilled (the last row; the
        number done is returned, 0 if it was cancelled); on its last chunk the row samples its
        first token and joins the decode batch."""
        slot = len(self._rows) - 1
        row = self._rows[slot]
        prompt = row.handle.prompt_ids
        if row.handle.cancelled:
            self._remove(slot, "cancelled")
            return 0
        start = row.prefilled
        chunk = prompt[start:start + budget]
        self._decoder.ensure_capacity(start + len(chunk) + 1)
        want = row.handle.prompt_logprobs
        t0 = time.perf_counter()
        logits = self._decoder.prefill(slot, chunk, start, all_logits=want is not None)
        self._count(prefill_s=time.perf_counter() - t0)
        row.prefilled += len(chunk)
        if want is not None:
            # position t predicts token t+1; the first prompt token has no log-prob (null)
            targets = prompt[start + 1:start + len(chunk) + 1]
            entries = _logprob_entries(logits[:len(targets)], targets, want)
            if start == 0:
                entries.insert(0, (prompt[0], None, []))
            self._deliver(row.handle, TokenLogprobs(entries, prompt=True))
            logits = logits[-1]
        if row.prefilling:
            return len(chunk)
        if row.budget <= 0:
            self._remove(slot, "length")
        else:
            self._accept(slot, logits.unsqueeze(0))
        return len(chunk)

    def _decode_step(self) -> None:
        n = sum(1 for r in self._rows if not r.prefilling)
        for i in reversed(range(n)):  # leave before paying for another forward
            if self._rows[i].handle.cancelled:
                self._remove(i, "cancelled")
        n = sum(1 for r in self._rows if not r.prefilling)
        if n == 0:
            return
        rows = self._rows[:n]
        device = rows[0].seen.device
        self._decoder.ensure_capacity(max(r.length for r in rows) + 1)
        tokens = torch.tensor([r.next_token for r in rows], device=device)
        pos = torch.tensor([r.length for r in rows], device=device)
        t0 = time.perf_counter()
        logits = self._decoder.step(tokens, pos)
        with self._cond:
            self._stats.step_s += time.perf_counter() - t0
            self._stats.batches += 1
            self._stats.max_batch_size = max(self._stats.max_batch_size, n)
            self._stats.batch_sizes = (self._stats.batch_sizes + [n])[-64:]
        self._accept(list(range(n)), logits)

    def _accept(self, slots: int | list[int], logits_BV: torch.Tensor) -> None:
        """Samples the next token of each row in ``slots`` and delivers it; rows that finish
        leave the batch."""
        slots = [slots] if isinstance(slots, int) else slots
        rows = [self._rows[s] for s in slots]
        params = [r.handle.params for r in rows]
        t0 = time.perf_counter()
        seen = torch.stack([r.seen for r in rows])
        tokens = _choose_tokens(logits_BV, params, seen, [r.generator for r in rows]).tolist()
        t1 = time.perf_counter()
        finished = []
        for i, (row, tok) in enumerate(zip(rows, tokens)):
            row.seen[tok] = True
            row.produced += 1
            row.next_token = tok
            if row.handle.logprobs is not None:
                self._deliver(row.handle, TokenLogprobs(
                    _logprob_entries(logits_BV[i:i + 1], [tok], row.handle.logprobs)))
            reason = None
            if tok in row.handle.params.stop_token_ids:
                reason = "stop"
            else:
                delta = row.stream.push(tok)
                if delta:
                    self._deliver(row.handle, TextDelta(delta))
                if row.stream.stopped:
                    reason = "stop"
                elif row.produced >= row.budget:
                    reason = "length"
            if reason:
                finished.append((slots[i], reason))
        with self._cond:
            self._stats.tokens_generated += len(rows)
            self._stats.sample_s += t1 - t0
            self._stats.host_s += time.perf_counter() - t1
        for slot, reason in sorted(finished, reverse=True):  # highest first: slots stay valid
            self._remove(slot, reason)

    def _count(self, **seconds: float) -> None:
        with self._cond:
            for name, s in seconds.items():
                setattr(self._stats, name, getattr(self._stats, name) + s)

    def _remove(self, slot: int, reason: str) -> None:
        """Ends a row and packs the others into the low slots with at most two cache copies:
        the last decoding row takes the free slot, the prefilling row (if any) moves down one.
        Callers removing several rows go highest slot first, so their other slots stay valid."""
        rows = self._rows
        row = rows[slot]
        last = sum(1 for r in rows if not r.prefilling) - 1
        if not row.prefilling and slot != last:
            rows[slot] = rows[last]
            self._decoder.move_slot(last, slot, rows[slot].length)
            slot = last
        rows.pop(slot)
        if slot < len(rows):  # the prefilling row sat right behind the decoding rows
            self._decoder.move_slot(slot + 1, slot, rows[slot].length)
        self._finish(row, reason)

    def _finish(self, row: _Row, reason: str) -> None:
        h = row.handle
        if reason == "cancelled":
            with self._cond:
                self._stats.requests_cancelled += 1
                self._stats.last_cancelled_tokens = row.produced
        else:
            rest = row.stream.flush()
            if rest:
                self._deliver(h, TextDelta(rest))
            with self._cond:
                self._stats.requests_finished += 1
        self._deliver(h, Finished(reason, len(h.prompt_ids), row.produced))

    def _eager_batch(self) -> None:
        """The fallback for models the static step cannot run (offloaded experts): the admitted
        requests decoded together through ``generate_tokens``' eager path (static batching: the
        batch runs until its last row ends). Under speculation: one request through its
        speculative path."""
        rows, self._rows = self._rows, []
        live = [r for r in rows if r.budget > 0 or r.handle.prompt_logprobs is not None]
        for r in rows:
            if r not in live:
                self._finish(r, "length")
        if not live:
            return
        for r in live:
            if r.handle.prompt_logprobs is not None:
                ids = r.handle.prompt_ids
                logits = self.model(torch.tensor([ids], device=r.seen.device)).logits[0]
                entries = [(ids[0], None, [])] + _logprob_entries(logits[:-1], ids[1:],
                                                                  r.handle.prompt_logprobs)
                self._deliver(r.handle, TokenLogprobs(entries, prompt=True))
        reason = {id(r): None if r.budget > 0 else "length" for r in live}
        generated: dict[int, list[int]] = {id(r): [] for r in live}
        for r in [r for r in live if r.budget <= 0]:
            live.remove(r)
            self._finish(r, "length")
        if not live:
            return

        def should_stop(b: int) -> bool:
            return live[b].handle.cancelled or reason[id(live[b])] is not None

        with self._cond:
            self._stats.batches += 1
            self._stats.max_batch_size = max(self._stats.max_batch_size, len(live))
            self._stats.batch_sizes = (self._stats.batch_sizes + [len(live)])[-64:]
        how = ({"speculation": self.speculation, "compile": self.compile}
               if self.speculation is not None else {"fast": False})
        steps = generate_tokens(self.model, [r.handle.prompt_ids for r in live],
                                [r.handle.params for r in live], should_stop, **how)
        for step in steps:
            for row, tok in zip(live, step):
                if tok is None or reason[id(row)] is not None:
                    continue
                row.produced += 1
                generated[id(row)].append(tok)
                with self._cond:
                    self._stats.tokens_generated += 1
                if row.handle.cancelled:
                    reason[id(row)] = "cancelled"
                elif tok in row.handle.params.stop_token_ids:
                    reason[id(row)] = "stop"
                else:
                    delta = row.stream.push(tok)
                    if delta:
                        self._deliver(row.handle, TextDelta(delta))
                    if row.stream.stopped:
                        reason[id(row)] = "stop"
                    elif row.produced >= row.budget:
                        reason[id(row)] = "length"
            if all(v is not None for v in reason.values()):
                break
        steps.close()
        for row in live:
            gen = generated[id(row)]
            if row.handle.logprobs is not None and gen:
                # generate_tokens does not hand out logits; one forward over the finished
                # sequence gives the same raw log-probs
                ids = row.handle.prompt_ids + gen
                logits = self.model(torch.tensor([ids], device=row.seen.device)).logits[0]
                start = len(row.handle.prompt_ids) - 1
                self._deliver(row.handle, TokenLogprobs(_logprob_entries(
                    logits[start:start + len(gen)], gen, row.handle.logprobs)))
            self._finish(row, reason[id(row)] or ("cancelled" if row.handle.cancelled
                                                   else "length"))

    @staticmethod
    def _deliver(handle: RequestHandle, event: Event) -> None:
        try:
            handle.sink(event)
        except Exception:  # a broken sink (closed loop) must not stop the other rows
            log.exception("delivering an event for %s failed", handle.request_id)
