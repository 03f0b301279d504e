"""Generation: greedy vs a no-cache reference, batching, sampling, stops, streaming."""

import math
import os

import pytest
import torch

from model.config import MiniMindConfig
from model.generate import (SamplingParams, TextStream, _apply_repetition_penalty,
                            _filter_top_k_top_p, generate, generate_tokens,
                            sampling_distribution, stream)
from model.model import MiniMindLM


class ByteTokenizer:
    """Independent stand-in: token i < 256 is byte i; decoding is UTF-8 with replacement."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MiniMindConfig.from_preset("tiny", vocab_size=300)
    return MiniMindLM(cfg).eval()


def greedy_reference(model, prompt, n):
    """No cache, no padding: re-run the whole sequence and take the argmax each step."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_equals_no_cache_reference(model):
    prompt = [5, 17, 42, 99, 3]
    got = generate(model, None, [prompt], SamplingParams(max_new_tokens=12, stop_token_ids=()))
    assert got[0].token_ids == greedy_reference(model, prompt, 12)
    assert got[0].finish_reason == "length"


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_batched_left_padded_equals_one_at_a_time(preset):
    torch.manual_seed(1)
    model = MiniMindLM(MiniMindConfig.from_preset(preset, vocab_size=300, aux_loss_coef=0)).eval()
    prompts = [[7, 8, 9, 10, 11, 12, 13], [200], [31, 32, 33]]
    params = SamplingParams(max_new_tokens=10, stop_token_ids=())
    batched = generate(model, None, prompts, params)
    for prompt, out in zip(prompts, batched):
        assert out.token_ids == generate(model, None, [prompt], params)[0].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    p = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=123,
                       stop_token_ids=())
    a = generate(model, None, [[1, 2, 3]], p)[0].token_ids
    b = generate(model, None, [[1, 2, 3]], p)[0].token_ids
    assert a == b
    other = SamplingParams(max_new_tokens=15, temperature=1.0, seed=7, stop_token_ids=())
    batched = generate(model, None, [[9, 9, 9, 9, 9], [1, 2, 3]], [other, p])
    assert batched[1].token_ids == a
    c = generate(model, None, [[1, 2, 3]], SamplingParams(
        max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=124, stop_token_ids=()))
    assert c[0].token_ids != a


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    greedy = generate(model, None, [[4, 5]], SamplingParams(max_new_tokens=8, stop_token_ids=()))
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(model, None, [[4, 5]], SamplingParams(
            max_new_tokens=8, temperature=2.0, seed=0, stop_token_ids=(), **kw))
        assert sampled[0].token_ids == greedy[0].token_ids


def test_filters_against_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    k2 = _filter_top_k_top_p(logits, [2], torch.tensor([[1.0]]))
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.486, 0.179, 0.108, 0.066, 0.024
    p = float(probs[0] + probs[1]) - 1e-4  # nucleus needs the two best tokens
    nucleus = _filter_top_k_top_p(logits, [0], torch.tensor([[p]]))
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    pen = _apply_repetition_penalty(torch.tensor([[2.0, -2.0, 3.0]]),
                                    torch.tensor([[True, True, False]]), torch.tensor([[2.0]]))
    assert pen.tolist() == [[1.0, -4.0, 3.0]]


def test_candidate_filter_equals_a_naive_nucleus_per_row():
    """Peaked rows (nucleus inside the 8 candidates) and flat ones (sorted whole), with and
    without top-k: the kept set of each row is the naive one (float64, token by token), in a
    batch and alone."""
    torch.manual_seed(3)
    V = 50
    logits = torch.randn(6, V) * torch.tensor([[8.0], [8.0], [0.1], [0.1], [3.0], [8.0]])
    top_k, top_p = [0, 5, 0, 20, 0, 0], [0.9, 0.8, 0.7, 0.9, 0.5, 0.99]

    def naive(row, k, p):
        order = sorted(range(V), key=lambda i: -float(row[i]))[:k or V]
        z = sum(math.exp(float(row[i])) for i in order)
        kept, mass = [], 0.0
        for i in order:
            if kept and mass >= p:
                break
            kept.append(i)
            mass += math.exp(float(row[i])) / z
        return set(kept)

    batch = _filter_top_k_top_p(logits, top_k, torch.tensor(top_p).unsqueeze(-1), candidates=8)
    for b in range(6):
        alone = _filter_top_k_top_p(logits[b:b + 1], top_k[b:b + 1], torch.tensor([[top_p[b]]]),
                                    candidates=8)
        want = naive(logits[b], top_k[b], top_p[b])
        assert set(torch.isfinite(batch[b]).nonzero()[:, 0].tolist()) == want
        assert torch.equal(alone[0], batch[b])
    assert len(naive(logits[0], 0, 0.9)) <= 8 < len(naive(logits[2], 0, 0.7))  # both paths ran


def test_sampling_distribution_filters_only_the_rows_that_ask():
    """A mixed batch: the top-p row's distribution is its nucleus renormalised (hand computed),
    the temperature-only row's is the plain softmax, the greedy row's is not filtered either."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(3, 1)
    probs = logits[0].softmax(-1)
    p = float(probs[0] + probs[1]) - 1e-4
    params = [SamplingParams(temperature=1.0, top_p=p), SamplingParams(temperature=0.5),
              SamplingParams()]
    _, dist = sampling_distribution(logits, params, torch.zeros(3, 5, dtype=torch.bool))
    two = probs[:2] / probs[:2].sum()
    assert torch.allclose(dist[0], torch.cat([two, torch.zeros(3)]))
    assert torch.allclose(dist[1], (logits[1] / 0.5).softmax(-1))
    assert torch.allclose(dist[2], probs)


def test_max_new_tokens_always_honoured_and_stop_token(model):
    free = generate(model, None, [[1, 2]], SamplingParams(max_new_tokens=6, stop_token_ids=()))
    assert len(free[0].token_ids) == 6
    stop_on = free[0].token_ids[2]
    stopped = generate(model, None, [[1, 2]], SamplingParams(max_new_tokens=6,
                                                            stop_token_ids=(stop_on,)))
    first = free[0].token_ids.index(stop_on)
    assert stopped[0].token_ids == free[0].token_ids[:first + 1]
    assert stopped[0].finish_reason == "stop"
    assert generate(model, None, [[1]], SamplingParams(max_new_tokens=0))[0].token_ids == []


def test_context_limit_is_honoured(model):
    ctx = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the context"):
        list(generate_tokens(model, [[1] * (ctx + 1)], SamplingParams()))
    out = generate(model, None, [[1] * (ctx - 3)], SamplingParams(max_new_tokens=50,
                                                                   stop_token_ids=()))
    assert len(out[0].token_ids) == 3
    # In a batch with a short row that decodes on, the long row stops at the context while the
    # batch goes on past where its positions would end; both rows get their tokens alone.
    model = varied_model("tiny")
    rows, params = [[5] * 10, [6] * (ctx - 12)], SamplingParams(max_new_tokens=40, stop_token_ids=())
    for fast in (True, False):
        out = [[t for t in col if t is not None] for col in
               zip(*generate_tokens(model, rows, params, fast=fast))]
        assert [len(o) for o in out] == [40, 12]
        assert out == [greedy_reference(model, r, len(o)) for r, o in zip(rows, out)]


def test_text_stream_never_splits_characters_and_hides_stop_strings():
    tok = ByteTokenizer()
    text = "ab 中文 🙂 done STOP tail"
    s = TextStream(tok, stop_strings=["STOP"])
    deltas = [s.push(i) for i in tok.encode(text)]
    deltas.append(s.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "ab 中文 🙂 done "
    assert s.stopped
    assert not any("S" in d for d in deltas)  # the stop string never leaks, not even its start


def test_stream_and_generate_agree_with_stop_strings(model):
    tok = ByteTokenizer()
    params = SamplingParams(max_new_tokens=20, stop_token_ids=())
    full = generate(model, tok, [[65, 66]], params)[0]
    assert full.text == tok.decode(full.token_ids).rstrip("\ufffd")
    streamed = "".join(stream(model, tok, [65, 66], params))
    assert streamed == full.text
    assert len(full.text) >= 3  # the seeded model writes some text; cut it at a piece of itself
    stop = full.text[1:3]
    cut = generate(model, tok, [[65, 66]], SamplingParams(max_new_tokens=20, stop_token_ids=(),
                                                           stop_strings=[stop]))[0]
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"


# -- the fast path: the static-cache step of model/fast_decode.py --------------------------------

# Qwen2-MoE in miniature: q/k/v biases and a sigmoid-gated shared expert of its own size.
QWEN2_MOE_LIKE = dict(attention_bias=True, n_shared_experts=0, shared_expert_gate=True,
                      shared_expert_intermediate_size=96)


def varied_model(preset: str, **overrides) -> MiniMindLM:
    """Weights at std 0.2: the default init is so flat that greedy repeats one token, which
    would make "same tokens" vacuous; these give each prompt its own sequence."""
    torch.manual_seed(3)
    model = MiniMindLM(MiniMindConfig.from_preset(preset, vocab_size=300, aux_loss_coef=0,
                                                  **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(params=["plain", "prepacked"])
def pack_all(request, monkeypatch):
    """Both kinds of CPU projection in the static step: at test sizes every weight is under
    ``PACK_MIN_ELEMENTS`` (plain ``F.linear``); "prepacked" lowers it to 0 (oneDNN for all)."""
    if request.param == "prepacked":
        monkeypatch.setattr("model.fast_decode.PACK_MIN_ELEMENTS", 0)
    return request.param == "prepacked"


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiny-moe", {}),
                                              ("tiny-moe", QWEN2_MOE_LIKE)])
def test_fast_path_greedy_equals_eager_and_no_cache_reference(preset, overrides, pack_all):
    model = varied_model(preset, **overrides)
    from model.fast_decode import fast_path_reason
    assert fast_path_reason(model) is None
    prompts = [[7, 8, 9, 10, 11, 12, 13], [200], [31, 32, 33]]
    params = SamplingParams(max_new_tokens=10, stop_token_ids=())
    fast = generate_tokens(model, prompts, params, fast=True, compile=False)
    eager = generate_tokens(model, prompts, params, fast=False)
    fast_rows, eager_rows = list(zip(*fast)), list(zip(*eager))
    assert fast_rows == eager_rows
    for prompt, row in zip(prompts, fast_rows):
        assert list(row) == greedy_reference(model, prompt, 10)
    assert len(set(fast_rows[0])) > 3  # the sequences are not one repeated token


def test_fast_path_seeded_sampling_matches_eager():
    model = varied_model("tiny")
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=s,
                             repetition_penalty=1.3, stop_token_ids=()) for s in (1, 2)]
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44]]
    fast = list(generate_tokens(model, prompts, params, fast=True, compile=False))
    assert fast == list(generate_tokens(model, prompts, params, fast=False))


def test_decode_step_over_a_grown_cache_equals_a_full_forward():
    """Rows at different lengths in one step, after the cache grew past its first size: each
    row's logits equal a plain forward over its whole sequence (no cache at all)."""
    from model.fast_decode import StaticDecoder

    model = varied_model("tiny")
    seqs = [list(range(3, 3 + n)) for n in (250, 40, 5)]
    dec = StaticDecoder(model, slots=3, max_len=1)
    assert dec.max_len == 256
    with torch.no_grad():
        for slot, s in enumerate(seqs):
            dec.prefill(slot, s[:-1])
        dec.ensure_capacity(300)
        assert dec.max_len == 512
        got = dec.step(torch.tensor([s[-1] for s in seqs]),
                       torch.tensor([len(s) - 1 for s in seqs]))
        for b, s in enumerate(seqs):
            want = model(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


def test_extend_appends_ragged_runs_as_a_full_forward():
    """StaticDecoder.extend (a tool turn appended to kept caches): ragged runs on rows at
    different lengths, one of them near the end of the context: first with a run too long for
    that row's padding to fit (each row appended alone), then in one padded forward. Each row's
    logits after its run and at its next decode step equal a plain forward over its sequence."""
    from model.fast_decode import StaticDecoder

    model = varied_model("tiny")
    context = model.config.max_position_embeddings
    heads = [[3 + i % 290 for i in range(n)] for n in (40, 7, context - 8)]
    for runs in ([[5, 6, 7], [8] * 12, [9]], [[5, 6, 7], [8] * 5, [9]]):
        dec = StaticDecoder(model, slots=3, max_len=1)
        with torch.no_grad():
            dec.prefill_batch(heads)
            got = dec.extend(runs, [len(h) for h in heads])
            seqs = [h + r for h, r in zip(heads, runs)]
            step = dec.step(torch.tensor([4, 4, 4]), torch.tensor([len(s) for s in seqs]))
            for b, s in enumerate(seqs):
                want = model(torch.tensor([s + [4]])).logits[0, -2:]
                torch.testing.assert_close(got[b], want[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(step[b], want[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_batched_prefill_fills_each_slot_as_alone(preset):
    """Five prompts of mixed lengths in groups of two (sorted, so a group's slots are not
    neighbours): every slot's cached keys/values and its last logits equal a batch-1 forward of
    that prompt alone, and nothing is written past a prompt's length."""
    from model.fast_decode import StaticDecoder
    from model.model import KVCache

    model = varied_model(preset)
    prompts = [list(range(10, 10 + n)) for n in (9, 2, 30, 5, 17)]
    dec = StaticDecoder(model, slots=5, max_len=64)
    with torch.no_grad():
        logits = dec.prefill_batch(prompts, group=2)
        for b, p in enumerate(prompts):
            alone = KVCache(model.config, 1, len(p))
            want = model(torch.tensor([p]), kv_cache=alone).logits[0, -1]
            torch.testing.assert_close(logits[b], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dec.cache.k[:, b, :, :len(p)], alone.k[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dec.cache.v[:, b, :, :len(p)], alone.v[:, 0], rtol=1e-5, atol=1e-5)
            assert not dec.cache.k[:, b, :, len(p):].any()


def test_packed_weights_match_the_modules_and_follow_weight_updates(pack_all):
    """The prepacked projections give each module's own output (q/k/v fused, with biases), and
    a weight changed in place after packing (an optimizer step, as between GRPO rollouts) is
    packed again rather than served stale; a LoRA-wrapped module is called as it is. Weights
    under ``PACK_MIN_ELEMENTS`` stay plain tensors, the others become oneDNN's."""
    from model.fast_decode import PackedWeights
    from model.lora import apply_lora

    model = varied_model("tiny-moe", **QWEN2_MOE_LIKE)   # q/k/v biases
    packed = PackedWeights.for_model(model)
    if packed is None:
        pytest.skip("oneDNN prepacking is not available in this torch build")
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 1, model.config.hidden_size)
    with torch.no_grad():
        got = packed.project(x, attn.q_proj, attn.k_proj, attn.v_proj)
        for y, m in zip(got, (attn.q_proj, attn.k_proj, attn.v_proj)):
            torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
        assert [e[1].is_mkldnn for e in packed._entries.values()] == [pack_all]
        before = packed.project(x, attn.q_proj)[0]
    attn.q_proj.weight.grad = torch.ones_like(attn.q_proj.weight)
    torch.optim.SGD([attn.q_proj.weight], lr=1.0).step()
    with torch.no_grad():
        after = packed.project(x, attn.q_proj)[0]
        torch.testing.assert_close(after, attn.q_proj(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after, before, atol=1e-2)

    lora_model = varied_model("tiny")
    apply_lora(lora_model, ["q_proj"], rank=4, alpha=8)
    q = lora_model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 1, lora_model.config.hidden_size)
    with torch.no_grad():
        q.lora_B.normal_(0.0, 0.5)   # a non-zero adapter, which a plain packed weight would miss
        y = PackedWeights.for_model(lora_model).project(x, q)[0]
        torch.testing.assert_close(y, q(x))
        assert not torch.allclose(y, torch.nn.functional.linear(x, q.weight), atol=1e-3)


def test_fast_path_under_autocast_matches_eager():
    """GRPO rolls out inside the trainer's bf16 autocast: the step then leaves the matmul dtypes to
    autocast (prepacked fp32 weights cannot take its bf16 activations) and gives the eager path's
    tokens."""
    model = varied_model("tiny")
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = list(generate_tokens(model, prompts, params, fast=True, compile=False))
        assert fast == list(generate_tokens(model, prompts, params, fast=False))


@pytest.mark.parametrize("preset,overrides,reason", [
    ("tiny-mla-moe", {}, "latent attention"),
    ("tiny-moe", dict(num_experts=16, num_experts_per_tok=2), "16 routed experts for top-2")])
def test_models_the_static_step_does_not_fit_decode_eagerly(preset, overrides, reason):
    """MLA caches a latent, not K/V; with many more experts than top-k, running every expert
    per token would read far more weights than routing does: both decode on the eager path and
    still give the no-cache reference's tokens."""
    from model.fast_decode import fast_path_reason
    model = varied_model(preset, **overrides)
    assert reason in fast_path_reason(model)
    prompts = [[7, 8, 9, 10], [200, 3]]
    rows = list(zip(*generate_tokens(model, prompts, SamplingParams(max_new_tokens=6,
                                                                    stop_token_ids=()))))
    for prompt, row in zip(prompts, rows):
        assert list(row) == greedy_reference(model, prompt, 6)


def test_fast_path_falls_back_where_it_is_not_correct():
    from model.fast_decode import fast_path_reason
    from model.generate import use_fast_path
    from offload.experts import offload_experts

    model = varied_model("tiny-moe")
    assert fast_path_reason(model) is None
    hook = model.register_forward_hook(lambda module, args, out: out)
    assert "forward hooks" in fast_path_reason(model)  # decode_step would skip them
    hook.remove()
    assert fast_path_reason(model) is None
    model.train()
    assert "training" in fast_path_reason(model)
    model.eval()
    offload_experts(model, backend="cpu")
    assert "offloaded" in fast_path_reason(model)
    assert not use_fast_path(model)
    with pytest.raises(ValueError, match="not available"):
        list(generate_tokens(model, [[1, 2]], SamplingParams(max_new_tokens=2), fast=True))
    assert len(generate(model, None, [[1, 2]], SamplingParams(
        max_new_tokens=3, stop_token_ids=()))[0].token_ids) == 3


@pytest.mark.skipif(os.environ.get("MINIMIND_TEST_COMPILE") != "1",
                    reason="torch.compile of the step takes 15-50 s on 2 CPU cores; "
                           "MINIMIND_TEST_COMPILE=1 runs it")
def test_compiled_step_gives_the_eager_tokens():
    """One row (compiled on CPU too) and three (compiled on CUDA, padded to a width of 4)."""
    model = varied_model("tiny")
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    for prompts in ([[7, 8, 9, 10]], [[7, 8, 9, 10], [200, 3], [31, 32, 33]]):
        compiled = list(generate_tokens(model, prompts, params, fast=True, compile=True))
        assert compiled == list(generate_tokens(model, prompts, params, fast=False))
