"""A batching decode engine: one background thread decodes all pending requests together.

Why a single thread: the model and its KV cache are not thread-safe, and on one device one batched
forward per step beats N interleaved single-row forwards (decode is memory-bound: a step over 16
rows costs little more than a step over one). Requests are submitted from any thread (the HTTP
server's event loop); each gets its own event sink, so streaming clients see their tokens as soon
as the step that made them ends.

Scheduling is *static batching*: the thread takes up to ``max_batch_size`` pending requests,
waits ``batch_wait_s`` for companions (requests from concurrent clients arrive a few ms apart),
and runs ``model.generate.generate_tokens`` over them. Rows count positions from their own first
token, so every request gets exactly the tokens it would get alone (greedy, or sampling with a
seed). Requests arriving meanwhile wait for the next batch: ``generate_tokens`` owns a KV cache
sized for its batch, and splicing rows into it mid-flight would mean a second decode loop beside
the committed one. A row that finishes early stops producing events at once; the batch ends when
its last row does.

Cancellation: ``RequestHandle.cancel()`` (the server calls it when a client disconnects) is read
by ``should_stop`` after the next step, so a cancelled row stops costing sampling and events
within one step and the batch ends early when every row is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence, Union

import torch

from model.generate import SamplingParams, TextStream, generate_tokens
from model.model import MiniMindLM

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


Event = Union[TextDelta, Finished, Failed]
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
    batches: int = 0
    max_batch_size: int = 0  # the largest batch ever decoded: > 1 proves batching happened
    tokens_generated: int = 0
    last_cancelled_tokens: int | None = None  # tokens a cancelled request got before it stopped
    batch_sizes: list[int] = field(default_factory=list)  # the most recent batches (capped)


@dataclass
class RequestHandle:
    """What ``Engine.submit`` returns: an id to log and a way to cancel."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stops generation at the next step (idempotent, any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Engine:
    """Owns the model; ``start()`` the thread, ``submit()`` requests, ``shutdown()`` at the end."""

    def __init__(self, model: MiniMindLM, tokenizer, max_batch_size: int = 16,
                 batch_wait_s: float = 0.01, max_pending: int = 256) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_pending = max_pending
        self.context_length: int = model.config.max_position_embeddings
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
               sink: Sink) -> RequestHandle:
        """Queues a request; ``sink`` gets its events on the engine thread (keep it cheap)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds "
                             f"{self.context_length} (prompt plus at least one new token)")
        handle = RequestHandle(request_id, list(prompt_ids), params, sink)
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
            snap.update(pending=len(self._pending), busy=self._busy,
                        max_batch_size_limit=self.max_batch_size)
        return snap

    # -- the decode thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._decode(batch)
            except Exception as e:  # a bad batch must not kill the server
                log.exception("decoding a batch of %d failed", len(batch))
                with self._cond:
                    self._stats.requests_failed += len(batch)
                for h in batch:
                    self._deliver(h, Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self._cond:
                    self._busy = False

    def _next_batch(self) -> list[RequestHandle] | None:
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                # Give concurrent clients a moment to arrive, so they share this batch.
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._pending) < self.max_batch_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closed:
                    return None
                batch, self._pending = (self._pending[:self.max_batch_size],
                                        self._pending[self.max_batch_size:])
                live = []
                for h in batch:  # clients that left while queued never reach the model
                    if h.cancelled:
                        self._stats.requests_cancelled += 1
                        self._stats.last_cancelled_tokens = 0
                    else:
                        live.append(h)
                if live:
                    self._busy = True
                    self._stats.batches += 1
                    self._stats.max_batch_size = max(self._stats.max_batch_size, len(live))
                    self._stats.batch_sizes = (self._stats.batch_sizes + [len(live)])[-64:]
                    return live

    def _decode(self, batch: list[RequestHandle]) -> None:
        params = [h.params for h in batch]
        # Stop token ids (<|im_end|>) end a row but are not text.
        streams = [TextStream(self.tokenizer, p.stop_strings, p.stop_token_ids) for p in params]
        budgets = [min(p.max_new_tokens, self.context_length - len(h.prompt_ids))
                   for h, p in zip(batch, params)]
        produced = [0] * len(batch)
        done = [False] * len(batch)

        def finish(b: int, reason: str) -> None:
            done[b] = True
            h = batch[b]
            if reason == "cancelled":
                with self._cond:
                    self._stats.requests_cancelled += 1
                    self._stats.last_cancelled_tokens = produced[b]
            else:
                rest = streams[b].flush()
                if rest:
                    self._deliver(h, TextDelta(rest))
                with self._cond:
                    self._stats.requests_finished += 1
            self._deliver(h, Finished(reason, len(h.prompt_ids), produced[b]))

        for b, budget in enumerate(budgets):
            if budget <= 0:  # max_tokens=0 never reaches here (validated), but be safe
                finish(b, "length")

        def should_stop(b: int) -> bool:
            return done[b] or batch[b].cancelled or streams[b].stopped

        for step in generate_tokens(self.model, [h.prompt_ids for h in batch], params,
                                    should_stop=should_stop):
            new_tokens = 0
            for b, tok in enumerate(step):
                if tok is None or done[b]:
                    continue
                produced[b] += 1
                new_tokens += 1
                if batch[b].cancelled:
                    finish(b, "cancelled")
                    continue
                if tok in params[b].stop_token_ids:
                    finish(b, "stop")
                    continue
                delta = streams[b].push(tok)
                if delta:
                    self._deliver(batch[b], TextDelta(delta))
                if streams[b].stopped:
                    finish(b, "stop")
                elif produced[b] >= budgets[b]:
                    finish(b, "length")
            with self._cond:
                self._stats.tokens_generated += new_tokens
            if all(done):
                break  # closes the generator: no further forward passes
        for b in range(len(batch)):  # rows generate_tokens ended by itself (should not happen)
            if not done[b]:
                finish(b, "cancelled" if batch[b].cancelled else "length")

    @staticmethod
    def _deliver(handle: RequestHandle, event: Event) -> None:
        try:
            handle.sink(event)
        except Exception:  # a broken sink (closed loop) must not stop the other rows
            log.exception("delivering an event for %s failed", handle.request_id)
