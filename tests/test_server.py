"""The OpenAI-compatible server, end to end: a real uvicorn on 127.0.0.1 and the official client.

The model is the tiny preset with weights drawn at std 0.2 (the default init is so flat that
greedy decoding repeats one newline for every prompt, which would make "equals the reference"
vacuous); with these weights each prompt gets its own token sequence.
"""

import json
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from inference import load_for_inference
from model.config import MiniMindConfig
from model.generate import SamplingParams, generate
from model.io import load_pretrained, save_pretrained
from model.model import MiniMindLM
from serving.chat import parse_assistant_output
from serving.engine import Engine
from serving.openai_api import create_app, stop_token_ids

MODEL_NAME = "tiny-test"


def tiny_model() -> MiniMindLM:
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    engine: Engine
    app: object
    reference_model: MiniMindLM
    tokenizer: object

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=30, **kw)

    def prompt_ids(self, messages, **kw) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kw)
        return self.tokenizer.encode(text)

    def reference(self, messages, thinking=False, **params):
        """Our own ``generate`` on the same prompt, parsed like the server parses."""
        ids = self.prompt_ids(messages, enable_thinking=thinking)
        params.setdefault("temperature", 0.0)
        gen = generate(self.reference_model, self.tokenizer, [ids],
                       SamplingParams(stop_token_ids=stop_token_ids(self.tokenizer), **params))[0]
        return gen, parse_assistant_output(gen.text, thinking=thinking), len(ids)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()["engine"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(tiny_model(), folder)
    engine = Engine(*load_for_inference(folder, device="cpu", dtype="fp32"),
                    max_batch_size=16, batch_wait_s=0.02).start()
    app = create_app(engine, MODEL_NAME)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield Server(f"http://127.0.0.1:{port}", engine, app, load_pretrained(folder).eval(),
                 engine.tokenizer)
    uv.should_exit = True
    thread.join(10)
    engine.shutdown()


def user(text):
    return [{"role": "user", "content": text}]


# -- basics --------------------------------------------------------------------------------------

def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_non_streaming_greedy_equals_generate(server):
    msgs = user("What is 2 + 3?")
    gen, expected, n_prompt = server.reference(msgs, max_new_tokens=24)
    resp = server.client().chat.completions.create(model=MODEL_NAME, messages=msgs,
                                                   temperature=0, max_tokens=24)
    choice = resp.choices[0]
    assert expected.content  # the comparison is not vacuous
    assert choice.message.content == expected.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == gen.finish_reason
    assert resp.object == "chat.completion" and resp.model == MODEL_NAME
    assert resp.id.startswith("chatcmpl-")
    assert resp.usage.prompt_tokens == n_prompt
    assert resp.usage.completion_tokens == len(gen.token_ids)
    assert resp.usage.total_tokens == n_prompt + len(gen.token_ids)


def test_streaming_greedy_equals_generate(server):
    msgs = [{"role": "system", "content": "You are terse."}] + user("Name a colour.")
    gen, expected, n_prompt = server.reference(msgs, max_new_tokens=20)
    stream = server.client().chat.completions.create(
        model=MODEL_NAME, messages=msgs, temperature=0, max_completion_tokens=20, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert expected.content and text == expected.content
    finals = [c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason]
    assert finals == [gen.finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(gen.token_ids)
    assert chunks[-1].usage.prompt_tokens == n_prompt


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL_NAME, "messages": user("hello"), "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in payloads[-1]  # only with stream_options.include_usage


def test_stream_defaults_to_false(server):
    body = {"model": MODEL_NAME, "messages": user("hello"), "max_tokens": 3}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_stop_string_and_seeded_sampling(server):
    msgs = user("Tell me a story")
    gen, _, _ = server.reference(msgs, max_new_tokens=30)
    stop = gen.text.strip()[4:6]  # a piece that occurs in the greedy text
    assert stop.strip()
    ref_stop, expected, _ = server.reference(msgs, max_new_tokens=30, stop_strings=[stop])
    client = server.client()
    resp = client.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=0,
                                          max_tokens=30, stop=[stop, "never-seen"])
    assert resp.choices[0].message.content == expected.content
    assert resp.choices[0].finish_reason == "stop" and stop not in expected.content

    sample = dict(model=MODEL_NAME, messages=msgs, temperature=0.9, top_p=0.9, max_tokens=16,
                  seed=1234)
    a = client.chat.completions.create(**sample).choices[0].message.content
    b = client.chat.completions.create(**sample).choices[0].message.content
    _, ref, _ = server.reference(msgs, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    assert a == b == ref.content


def test_thinking_flag_yields_reasoning_content(server):
    msgs = user("Think first: 7 * 6?")
    gen, expected, n_prompt = server.reference(msgs, thinking=True, max_new_tokens=12)
    resp = server.client().chat.completions.create(
        model=MODEL_NAME, messages=msgs, temperature=0, max_tokens=12,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = resp.choices[0].message
    assert resp.usage.prompt_tokens == n_prompt  # the prompt ends inside <think>
    # A random model never closes the block: all of its text is reasoning.
    assert expected.reasoning_content
    assert msg.model_extra["reasoning_content"] == expected.reasoning_content
    assert msg.content == expected.content


def test_tools_are_rendered_into_the_prompt(server):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = user("Weather in Paris?")
    with_tools = server.client().chat.completions.create(model=MODEL_NAME, messages=msgs,
                                                         tools=tools, max_tokens=2)
    without = server.client().chat.completions.create(model=MODEL_NAME, messages=msgs,
                                                      max_tokens=2)
    expected = len(server.tokenizer.encode(server.tokenizer.apply_chat_template(
        msgs, tools=tools, add_generation_prompt=True)))
    assert with_tools.usage.prompt_tokens == expected > without.usage.prompt_tokens


# -- validation ----------------------------------------------------------------------------------

def _ok(**kw):
    body = {"model": MODEL_NAME, "messages": user("hi"), "max_tokens": 2}
    body.update(kw)
    return body


def _without(key):
    body = _ok()
    del body[key]
    return body


MALFORMED = [
    ("not json", b"{this is not json", 400),
    ("truncated json", b'{"model": "tiny-test", "messages": [', 400),
    ("empty body", b"", 400),
    ("array body", b"[1, 2]", 400),
    ("string body", b'"hello"', 400),
    ("invalid utf-8", b'{"model": "\xff\xfe"}', 400),
    ("no messages", _without("messages"), 400),
    ("no model", _without("model"), 400),
    ("messages not a list", _ok(messages="hi"), 400),
    ("messages empty", _ok(messages=[]), 400),
    ("message not an object", _ok(messages=["hi"]), 400),
    ("unknown role", _ok(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("missing role", _ok(messages=[{"content": "hi"}]), 400),
    ("content is a number", _ok(messages=[{"role": "user", "content": 5}]), 400),
    ("user without content", _ok(messages=[{"role": "user"}]), 400),
    ("image content part", _ok(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400),
    ("temperature string", _ok(temperature="hot"), 400),
    ("temperature negative", _ok(temperature=-0.1), 400),
    ("temperature too big", _ok(temperature=2.5), 400),
    ("top_p above one", _ok(top_p=1.5), 400),
    ("top_p negative", _ok(top_p=-0.5), 400),
    ("max_tokens zero", _ok(max_tokens=0), 400),
    ("max_tokens negative", _ok(max_tokens=-5), 400),
    ("max_tokens float", _ok(max_tokens=1.5), 400),
    ("max_tokens bool", _ok(max_tokens=True), 400),
    ("max_completion_tokens string", _ok(max_completion_tokens="10"), 400),
    ("n is two", _ok(n=2), 400),
    ("stop is a number", _ok(stop=7), 400),
    ("stop list of numbers", _ok(stop=[1, 2]), 400),
    ("five stop strings", _ok(stop=["a", "b", "c", "d", "e"]), 400),
    ("empty stop string", _ok(stop=[""]), 400),
    ("stream not bool", _ok(stream="yes"), 400),
    ("stream_options without stream", _ok(stream_options={"include_usage": True}), 400),
    ("seed string", _ok(seed="42"), 400),
    ("seed too large", _ok(seed=2 ** 70), 400),
    ("tools not a list", _ok(tools={"type": "function"}), 400),
    ("tool without name", _ok(tools=[{"type": "function", "function": {}}]), 400),
    ("tool_choice required", _ok(tool_choice="required"), 400),
    ("top_logprobs without logprobs", _ok(top_logprobs=2), 400),
    ("top_logprobs over 20", _ok(logprobs=True, top_logprobs=21), 400),
    ("presence penalty", _ok(presence_penalty=1.0), 400),
    ("enable_thinking not bool", _ok(enable_thinking="yes"), 400),
    ("chat_template_kwargs bad", _ok(chat_template_kwargs={"enable_thinking": "on"}), 400),
    ("repetition_penalty zero", _ok(repetition_penalty=0), 400),
    ("prompt longer than context", _ok(messages=user("word " * 2000)), 400),
    ("unknown model", _ok(model="gpt-4o"), 404),
]


def test_malformed_requests_get_openai_errors_and_server_survives(server):
    assert len(MALFORMED) >= 30
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for name, body, status in MALFORMED:
            if isinstance(body, bytes):
                r = http.post("/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"})
            else:
                r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"], name
            assert isinstance(err["type"], str) and {"param", "code"} <= err.keys(), name
        # Wrong paths and methods answer in the same shape.
        for method, path, status in [("GET", "/v1/chat/completions", 405),
                                     ("POST", "/v1/nothing", 404), ("GET", "/v1/models/x", 404)]:
            r = http.request(method, path)
            assert r.status_code == status and "message" in r.json()["error"]
        long = http.post("/v1/chat/completions", json=_ok(messages=user("word " * 2000))).json()
        assert long["error"]["code"] == "context_length_exceeded"
        assert http.post("/v1/chat/completions", json=_ok(model="x")).json()["error"]["code"] \
            == "model_not_found"
        assert http.get("/health").json()["status"] == "ok"
        assert http.post("/v1/chat/completions", json=_ok()).status_code == 200



def test_deeply_nested_body_is_a_400_not_a_500(server):
    depth = 100_000   # far past Python's recursion limit; 200 kB, well under --max-request-bytes
    body = b'{"model": "tiny-test", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:500]
        err = r.json()["error"]
        assert "nested too deeply" in err["message"] and err["type"] == "invalid_request_error"
        assert {"param", "code"} <= err.keys()
        assert http.post("/v1/chat/completions", json=_ok()).status_code == 200   # still serving

def test_api_key_is_enforced(server):
    # A second app over the same engine, with a key (TestClient: no second port needed).
    with TestClient(create_app(server.engine, MODEL_NAME, api_key="s3cret")) as http:
        assert http.get("/v1/models").status_code == 401
        bad = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/chat/completions", json=_ok()).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code \
            == 200
        assert http.get("/health").status_code == 200  # liveness probes need no key


def test_request_body_limit_is_a_413_declared_or_not(server):
    """--max-request-bytes: a larger body is refused by its Content-Length, or, sent chunked
    without one, once it has read past the limit; the server keeps serving."""
    small = json.dumps(_ok()).encode()
    big = json.dumps(_ok(messages=user("x" * 3000))).encode()
    with TestClient(create_app(server.engine, MODEL_NAME, max_request_bytes=2048)) as http:
        assert len(small) < 2048 < len(big)
        declared = http.post("/v1/chat/completions", content=big,
                             headers={"content-type": "application/json"})
        chunked = http.post("/v1/chat/completions", content=iter([big[:1000], big[1000:]]),
                            headers={"content-type": "application/json"})
        for r in (declared, chunked):
            assert r.status_code == 413 and "larger than 2048 bytes" in r.json()["error"]["message"]
        assert "content-length" not in chunked.request.headers
        assert http.post("/v1/chat/completions", content=small,
                         headers={"content-type": "application/json"}).status_code == 200


def test_output_is_bounded_by_the_context_whatever_max_tokens_asks(server):
    """A prompt leaving 4 tokens of context and max_tokens 10**6: at most 4 tokens come back."""
    context = server.engine.context_length
    n = next(n for n in range(context, 0, -1)
             if len(server.prompt_ids(user("a " * n))) <= context - 4)
    room = context - len(server.prompt_ids(user("a " * n)))
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=user("a " * n),
                                                max_tokens=10**6, temperature=0)
    assert 4 <= room < 12 and r.usage.completion_tokens <= room
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= context


def test_the_server_listens_on_loopback_unless_told_otherwise():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "serve_openai_api", Path(__file__).resolve().parents[1] / "scripts" / "serve_openai_api.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_args(["--model", "m"]).host == "127.0.0.1"
    assert script.parse_args(["--model", "m", "--host", "0.0.0.0"]).host == "0.0.0.0"
    assert script.parse_args(["--model", "m"]).api_key is None


# -- concurrency and cancellation ----------------------------------------------------------------

def test_sixteen_concurrent_clients_are_batched_and_correct(server):
    jobs = []
    for i in range(16):
        msgs = user(f"Question number {i}: " + "why? " * (i % 5))  # different prompt lengths
        sampling = dict(temperature=0.8, top_p=0.95, seed=100 + i) if i % 4 == 3 else \
            dict(temperature=0.0)
        stream = i % 2 == 1
        _, expected, _ = server.reference(msgs, max_new_tokens=12, **sampling)
        jobs.append((msgs, sampling, stream, expected.content))
    before = server.stats()
    barrier = threading.Barrier(16)
    results: list = [None] * 16

    def worker(i: int) -> None:
        msgs, sampling, stream, _ = jobs[i]
        client = server.client()
        barrier.wait()
        try:
            if stream:
                chunks = client.chat.completions.create(model=MODEL_NAME, messages=msgs,
                                                        max_tokens=12, stream=True, **sampling)
                results[i] = "".join(c.choices[0].delta.content or "" for c in chunks)
            else:
                resp = client.chat.completions.create(model=MODEL_NAME, messages=msgs,
                                                      max_tokens=12, **sampling)
                results[i] = resp.choices[0].message.content
        except Exception as e:  # reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, (_, _, _, expected) in enumerate(jobs):
        assert results[i] == expected, f"client {i}: {results[i]!r} != {expected!r}"
    after = server.stats()
    # Continuous batching: a "batch" is one decode step over every running row. 16 × 12 tokens
    # one row at a time would take ~16 × 11 steps; shared steps take far fewer.
    steps = after["batches"] - before["batches"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    assert tokens <= 16 * 12 and steps < tokens / 3, (steps, tokens)
    assert after["max_batch_size"] > 1


def _wait_for_cancel(server, before: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.stats()
        if stats["requests_cancelled"] > before and not stats["busy"]:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"no cancellation recorded: {server.stats()}")


def test_disconnecting_stream_stops_generation(server):
    msgs = user("Keep talking for a long time")
    budget = 480
    gen, _, _ = server.reference(msgs, max_new_tokens=budget)
    assert gen.finish_reason == "length"  # so only a cancel can end it early
    before = server.stats()
    body = {"model": MODEL_NAME, "messages": msgs, "max_tokens": budget, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # the role chunk and a little content
        assert got[0].startswith("data: ")
    # leaving the block closed the connection mid-stream
    stats = _wait_for_cancel(server, before["requests_cancelled"])
    assert stats["requests_finished"] == before["requests_finished"]
    assert 0 < stats["last_cancelled_tokens"] < budget
    assert stats["tokens_generated"] - before["tokens_generated"] < budget


def test_abandoned_non_streaming_request_is_cancelled(server):
    before = server.stats()
    body = json.dumps({"model": MODEL_NAME, "messages": user("Write a very long essay"),
                       "max_tokens": 480, "temperature": 0}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    # A raw socket, so the test decides when the client hangs up: once the request is in.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while server.stats()["requests_submitted"] == before["requests_submitted"]:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    stats = _wait_for_cancel(server, before["requests_cancelled"])
    assert stats["requests_finished"] == before["requests_finished"]
    assert stats["last_cancelled_tokens"] < 480
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


def test_lora_flag_loads_and_merges_the_adapter(tmp_path):
    """``--lora`` goes through ``load_for_inference``: the merged model computes what the adapted
    one does, and differs from the base (the adapter is not silently dropped)."""
    from model.lora import apply_lora, save_adapter

    base = tiny_model()
    save_pretrained(base, tmp_path / "base")
    adapted = load_pretrained(tmp_path / "base")
    apply_lora(adapted, "all", rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)  # B starts at zero; make the adapter do something
    save_adapter(adapted, tmp_path / "lora", base_model=tmp_path / "base")
    merged, _ = load_for_inference(tmp_path / "base", tmp_path / "lora", "cpu", "fp32")
    ids = torch.tensor([[1, 5, 42, 7, 300]])
    with torch.no_grad():
        want = adapted.eval()(ids).logits
        got = merged(ids).logits
        plain = base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_chat_logprobs_equal_a_plain_forward_whole_and_streamed(server):
    """choices[0].logprobs.content: one entry per generated token but the stop token, each with
    its bytes and log-prob checked against log_softmax of a plain forward over prompt + reply;
    the streamed chunks carry the same entries, in order."""
    messages = [{"role": "user", "content": "Tell me a story"}]
    gen, _, n_prompt = server.reference(messages, max_new_tokens=10)
    tokens = [t for t in gen.token_ids if t not in stop_token_ids(server.tokenizer)]
    seq = server.prompt_ids(messages) + tokens
    with torch.no_grad():
        ref = torch.log_softmax(server.reference_model(torch.tensor([seq])).logits[0].double(), -1)
    client = server.client()
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                           temperature=0, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == len(tokens) > 0
    for i, (entry, tid) in enumerate(zip(content, tokens)):
        row = ref[n_prompt - 1 + i]
        assert bytes(entry.bytes) == server.tokenizer.token_bytes(tid)
        assert entry.logprob == pytest.approx(float(row[tid]), abs=1e-4)
        assert len(entry.top_logprobs) == 3
        best = row.topk(3).values.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best, abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy
    # the raw text of the tokens (control tokens included; the reply's text leaves them out)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == \
        server.tokenizer.decode(tokens)
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                              temperature=0, logprobs=True, stream=True)
    entries = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for e in chunk.choices[0].logprobs.content]
    assert [(e.bytes, e.logprob) for e in entries] == [(e.bytes, e.logprob) for e in content]
    assert all(e.top_logprobs == [] for e in entries)   # top_logprobs unset: none per token
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None


# -- /v1/completions ------------------------------------------------------------------------------

def test_completions_echo_logprobs_equal_a_plain_forward(server):
    """What lm-eval's local-completions sends to score a continuation: echo + logprobs, token-id
    prompts in a batch; the log-probs are checked against log_softmax of a plain forward."""
    tok = server.tokenizer
    prompts = [tok.encode("The capital of France is Paris"), tok.encode("2 + 2 = 4")]
    resp = server.client().completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=1,
                                              echo=True, logprobs=2, temperature=0)
    assert len(resp.choices) == 2
    for choice, ids in zip(sorted(resp.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        new_token = tok.encode(choice.text[len(tok.decode(ids)):])  # the one generated token
        seq = ids + new_token[:1]
        with torch.no_grad():
            ref = torch.log_softmax(server.reference_model(torch.tensor([seq])).logits[0]
                                    .double(), -1)
        for i in range(1, len(seq)):
            assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, seq[i]]), abs=1e-4)
            best = int(ref[i - 1].argmax())
            assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1, best]),
                                                                     abs=1e-4)
        assert "".join(lp.tokens).startswith(tok.decode(ids[:3]))
        assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_completions_text_stream_and_errors(server):
    client = server.client()
    ids = server.tokenizer.encode("Once upon a time")
    want = generate(server.reference_model, server.tokenizer, [ids], SamplingParams(
        max_new_tokens=8, stop_token_ids=stop_token_ids(server.tokenizer)))[0]
    whole = client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                      max_tokens=8, temperature=0)
    assert whole.choices[0].text == want.text and whole.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                         max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text
    scored = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True,
                                       logprobs=0)
    assert scored.choices[0].text == server.tokenizer.decode(ids)
    assert scored.usage.completion_tokens == 0
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for body, needle in (({"prompt": []}, "prompt"),
                             ({"prompt": [[1, 10 ** 6]]}, "token ids"),
                             ({"prompt": "x", "stream": True, "echo": True}, "stream"),
                             ({"prompt": "x", "logprobs": 50}, "logprobs")):
            r = http.post("/v1/completions", json={"model": MODEL_NAME, **body})
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
