"""The continuous-batching engine: requests that join and leave a running batch, chunked
prefill, cache growth and log-probs, each against a plain no-cache forward of the model."""

import threading
import time

import pytest
import torch

from model.config import MiniMindConfig
from model.generate import SamplingParams, generate_tokens
from model.model import MiniMindLM
from serving.engine import Engine, Finished, TokenLogprobs


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def varied_model() -> MiniMindLM:
    torch.manual_seed(5)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny", vocab_size=300))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


@torch.no_grad()
def greedy_reference(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


class Collector:
    """A sink that records events with their arrival time."""

    def __init__(self):
        self.events, self.times, self.done = [], [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        self.times.append(time.perf_counter())
        if isinstance(event, Finished):
            self.done.set()

    def tokens(self):
        return [tok for e in self.events if isinstance(e, TokenLogprobs) and not e.prompt
                for tok, _, _ in e.entries]


@pytest.fixture(scope="module")
def model():
    return varied_model()


def run(engine, prompt, n, **kw):
    sink = Collector()
    engine.submit(f"r{id(sink)}", prompt, SamplingParams(max_new_tokens=n, stop_token_ids=()),
                  sink, logprobs=kw.pop("logprobs", 0), **kw)
    return sink


def test_requests_join_and_leave_a_running_batch(model):
    engine = Engine(model, ByteTokenizer(), max_batch_size=4, prefill_chunk=8).start()
    try:
        first = run(engine, [10, 11, 12], 45)
        while len(first.tokens()) < 5:  # running before the others arrive
            time.sleep(0.001)
        later = [run(engine, list(range(20, 20 + n)), k) for n, k in ((30, 10), (3, 25), (17, 5))]
        for sink in [first] + later:
            assert sink.done.wait(30)
    finally:
        engine.shutdown()
    assert first.tokens() == greedy_reference(model, [10, 11, 12], 45)
    for sink, (n, k) in zip(later, ((30, 10), (3, 25), (17, 5))):
        assert sink.tokens() == greedy_reference(model, list(range(20, 20 + n)), k)
        assert sink.events[-1].finish_reason == "length"
        # they finished while the first request was still decoding: nobody waited for it
        assert sink.times[-1] < first.times[-1]
    stats = engine.stats_snapshot()
    assert stats["max_batch_size"] >= 3 and stats["requests_finished"] == 4


def test_chunked_prefill_and_cache_growth_with_live_rows(model):
    """A 290-token prompt in 7 chunks while another row decodes; the cache grows from 256 to 512
    positions under both."""
    engine = Engine(model, ByteTokenizer(), max_batch_size=2, prefill_chunk=45).start()
    long_prompt = [(7 * i) % 250 + 3 for i in range(290)]
    try:
        a = run(engine, [1, 2, 3, 4], 40)
        while len(a.tokens()) < 2:
            time.sleep(0.001)
        b = run(engine, long_prompt, 12)
        assert a.done.wait(30) and b.done.wait(30)
    finally:
        engine.shutdown()
    assert b.tokens() == greedy_reference(model, long_prompt, 12)
    assert a.tokens() == greedy_reference(model, [1, 2, 3, 4], 40)


def test_prompt_and_token_logprobs_equal_a_plain_forward(model):
    engine = Engine(model, ByteTokenizer(), prefill_chunk=5).start()
    prompt = [65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76]
    try:
        sink = Collector()
        engine.submit("lp", prompt, SamplingParams(max_new_tokens=3, stop_token_ids=()), sink,
                      logprobs=3, prompt_logprobs=3)
        assert sink.done.wait(30)
    finally:
        engine.shutdown()
    prompt_entries = [x for e in sink.events if isinstance(e, TokenLogprobs) and e.prompt
                      for x in e.entries]
    gen_entries = [x for e in sink.events if isinstance(e, TokenLogprobs) and not e.prompt
                   for x in e.entries]
    seq = prompt + [t for t, _, _ in gen_entries]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    assert [t for t, _, _ in prompt_entries] == prompt and prompt_entries[0][1] is None
    for i, (tok, lp, top) in enumerate(prompt_entries[1:] + gen_entries, start=1):
        assert tok == seq[i]
        assert lp == pytest.approx(float(logp[i - 1, tok]), abs=1e-4)
        want = logp[i - 1].topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
    assert [t for t, _, _ in gen_entries] == greedy_reference(model, prompt, 3)


def spy_prefill_batch(engine) -> list[list[int]]:
    """Records the prompt lengths of each batched prefill forward."""
    calls, prefill_batch = [], engine._decoder.prefill_batch

    def spy(prompts, **kw):
        calls.append([len(p) for p in prompts])
        return prefill_batch(prompts, **kw)

    engine._decoder.prefill_batch = spy
    return calls


def start_and_drain(engine, sinks) -> None:
    """Starts an engine whose requests are already queued and waits until each is done."""
    engine.start()
    try:
        for sink in sinks:
            assert sink.done.wait(30)
    finally:
        engine.shutdown()


def test_a_burst_at_an_idle_engine_starts_decoding_together(model):
    """Requests queued while nothing decodes are prefilled in one batched forward (no stream to
    stall, so prefill_chunk does not split them) and decode from the first step on together;
    each gets the tokens it gets alone, greedy and seeded sampling."""
    engine = Engine(model, ByteTokenizer(), max_batch_size=4, prefill_chunk=4)
    calls = spy_prefill_batch(engine)
    prompts = [[10, 11, 12], list(range(20, 37)), [7, 8]]
    params = [SamplingParams(max_new_tokens=12, stop_token_ids=()),
              SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8,
                             repetition_penalty=1.3, seed=3, stop_token_ids=()),
              SamplingParams(max_new_tokens=12, stop_token_ids=())]
    sinks = [Collector() for _ in prompts]
    for i, (p, sp, sink) in enumerate(zip(prompts, params, sinks)):
        engine.submit(f"b{i}", p, sp, sink, logprobs=0)
    start_and_drain(engine, sinks)
    assert calls == [[3, 17, 2]]
    assert engine.stats_snapshot()["batch_sizes"][0] == 3
    for p, sp, sink in zip(prompts, params, sinks):
        alone = [step[0] for step in generate_tokens(model, [p], sp)]
        assert sink.tokens() == alone
    assert sinks[0].tokens() == greedy_reference(model, prompts[0], 12)


def test_after_the_burst_the_chunk_bounds_the_prefill_again(model):
    """Once the burst's rows decode, a prompt that must go in chunks (it asks for prompt
    log-probs) is prefilled prefill_chunk tokens per step, not with the rest of the idle budget."""
    engine = Engine(model, ByteTokenizer(), max_batch_size=4, prefill_chunk=4)
    calls = spy_prefill_batch(engine)
    chunks, prefill = [], engine._decoder.prefill
    engine._decoder.prefill = lambda slot, ids, *a, **kw: chunks.append(len(ids)) or prefill(
        slot, ids, *a, **kw)
    sinks = [run(engine, [5, 6, 7], 6), run(engine, [8, 9, 10], 6),
             run(engine, list(range(30, 40)), 3, prompt_logprobs=1)]
    start_and_drain(engine, sinks)
    assert calls == [[3, 3]] and chunks == [4, 4, 2]
    assert sinks[2].tokens() == greedy_reference(model, list(range(30, 40)), 3)


def test_short_prompts_join_running_streams_in_one_forward_within_the_chunk(model):
    """While a stream decodes, queued prompts are prefilled together up to prefill_chunk tokens
    (padded to the longest) per step, in arrival order; each gets its greedy tokens."""
    engine = Engine(model, ByteTokenizer(), max_batch_size=4, prefill_chunk=8).start()
    calls = spy_prefill_batch(engine)
    prompts = [[30, 31, 32, 33], [40, 41, 42], [50, 51, 52]]
    try:
        first = run(engine, [1, 2, 3], 120)  # still decoding when the others arrive
        while len(first.tokens()) < 3:
            time.sleep(0.001)
        with engine._cond:  # the three arrive together
            later = [run(engine, p, 10) for p in prompts]
        for sink in [first] + later:
            assert sink.done.wait(30)
    finally:
        engine.shutdown()
    assert calls == [[3], [4, 3], [3]]  # 2 x 4 tokens fit the chunk of 8, a third would not
    assert first.tokens() == greedy_reference(model, [1, 2, 3], 120)
    for p, sink in zip(prompts, later):
        assert sink.tokens() == greedy_reference(model, p, 10)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_cancel_stops_a_row_and_the_others_go_on(model, monkeypatch, fast):
    """Also on the eager fallback (static batches through generate_tokens' eager path)."""
    monkeypatch.setenv("MINIMIND_FAST_DECODE", fast)
    engine = Engine(model, ByteTokenizer(), max_batch_size=4).start()
    assert engine.fast == (fast == "1")
    try:
        long = Collector()
        handle = engine.submit("long", [9, 10, 11], SamplingParams(
            max_new_tokens=400, stop_token_ids=()), long, logprobs=0)
        short = run(engine, [5, 6], 30)
        while engine.stats_snapshot()["tokens_generated"] < 3:
            time.sleep(0.001)
        handle.cancel()
        assert long.done.wait(30) and short.done.wait(30)
    finally:
        engine.shutdown()
    assert long.events[-1].finish_reason == "cancelled"
    assert long.events[-1].completion_tokens < 400
    assert short.tokens() == greedy_reference(model, [5, 6], 30)
    assert long.tokens() == greedy_reference(model, [9, 10, 11], len(long.tokens()))


def test_speculative_engine_serves_one_at_a_time_with_the_greedy_tokens(model):
    """A draft model (the target with noise) behind the engine: three concurrent requests get
    the plain greedy tokens, one running at a time, and the stats report the acceptance."""
    from model.speculative import Speculation

    torch.manual_seed(9)
    draft = varied_model()
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.1)
    spec = Speculation(draft_model=draft, draft_tokens=3, draft_p_min=0)
    engine = Engine(model, ByteTokenizer(), max_batch_size=4, speculation=spec).start()
    prompts = [[10, 11, 12], list(range(20, 50)), [7]]
    try:
        sinks = [run(engine, p, 20) for p in prompts]
        for sink in sinks:
            assert sink.done.wait(30)
    finally:
        engine.shutdown()
    for sink, p in zip(sinks, prompts):
        assert sink.tokens() == greedy_reference(model, p, 20)
    stats = engine.stats_snapshot()
    assert stats["max_batch_size"] == 1 and stats["requests_finished"] == 3
    assert 0 < stats["speculation"]["accepted"] < stats["speculation"]["drafted"]
