"""The tool-use loop through our OpenAI server with the official openai client (whole and
streamed tool_calls, role: tool messages back, a final answer), on a token-scripted model; and
the same items through the in-process benchmark give the same rows."""
from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from evaluation.openai_agent import run_openai_agent
from model.tokenizer import Tokenizer
from serving.engine import Engine
from serving.openai_api import create_app
from tests.scripted_model import scripted_model
from tools import default_registry

ITEM = {"id": "mul", "question": "What is 1234 * 5678?", "answer": "7006652", "kind": "multiply",
        "tools": ["calculator"]}
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 * 5678"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_agent_loop_through_the_server(stream):
    tok = Tokenizer.from_dir()
    registry = default_registry(["calculator"])   # a prompt that fits the tiny preset's context
    turns = [tok.encode(CALL) + [tok.eos_id], tok.encode("#### 7006652") + [tok.eos_id]]
    # One prefill per request (the whole prompt in one chunk), so request k gets script k.
    engine = Engine(scripted_model([], tok.eos_id, turns=turns), tok, prefill_chunk=512).start()
    try:
        with TestClient(create_app(engine, "scripted")) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http,
                                   max_retries=0)
            [row] = run_openai_agent(client, "scripted", [ITEM], registry, stream=stream,
                                     temperature=0, max_tokens=64)
    finally:
        engine.shutdown()
    assert row["correct"] and row["turns"] == 2 and row["called"] == ["calculator"]
    assert row["valid_calls"] == 1 and row["right_tool"]
    msgs = json.loads(row["transcript"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    call = msgs[1]["tool_calls"][0]
    assert call["id"].startswith("call_") and msgs[2]["tool_call_id"] == call["id"]
    assert json.loads(call["function"]["arguments"]) == {"expression": "1234 * 5678"}
    assert msgs[2]["content"] == "7006652"
    # The second request's prompt is the template's rendering of the conversation so far: the
    # call and the tool's result went back to the model as the chat template shows them.
    second = tok.apply_chat_template(msgs[:3], tools=registry.schemas(), add_generation_prompt=True)
    assert "<tool_response>\n7006652\n</tool_response>" in second
    assert row["prompt_tokens"][1] == len(tok.encode(second))
    # The in-process benchmark (eval_model.py --bench toolcall) on the same script: same row.
    from evaluation.runner import model_generate_fn
    from model.generate import SamplingParams
    from tasks import toolcall
    fn = model_generate_fn(scripted_model([], tok.eos_id, turns=turns), tok,
                           SamplingParams(max_new_tokens=64))
    render = lambda m, t: tok.apply_chat_template(m, tools=t, add_generation_prompt=True)  # noqa: E731
    [local] = toolcall.run_agent([ITEM], render, fn, batch_size=1, registry=registry)
    keys = ("correct", "extracted", "turns", "called", "valid_calls", "right_tool", "error_kind")
    assert {k: local[k] for k in keys} == {k: row[k] for k in keys}


def test_tool_choice_and_parallel_tool_calls():
    """auto parses calls; none neither lists the tools nor parses (the text comes back as
    content); a named function or "required" is a 400; parallel_tool_calls false keeps only the
    first call of a reply (whole and streamed)."""
    tok = Tokenizer.from_dir()
    tools = default_registry(["calculator"]).schemas()
    two = CALL + "\n" + CALL.replace("1234 * 5678", "2 * 3")
    engine = Engine(scripted_model(tok.encode(two) + [tok.eos_id], tok.eos_id), tok).start()
    msgs = [{"role": "user", "content": ITEM["question"]}]
    try:
        with TestClient(create_app(engine, "scripted")) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http,
                                   max_retries=0)
            ask = lambda **kw: client.chat.completions.create(  # noqa: E731
                model="scripted", messages=msgs, temperature=0, max_tokens=100, **kw)
            auto = ask(tools=tools, tool_choice="auto")
            assert [c.function.arguments for c in auto.choices[0].message.tool_calls] == [
                '{"expression": "1234 * 5678"}', '{"expression": "2 * 3"}']
            assert auto.choices[0].finish_reason == "tool_calls"
            none = ask(tools=tools, tool_choice="none")
            assert none.choices[0].message.tool_calls is None
            assert "<tool_call>" in none.choices[0].message.content
            assert none.usage.prompt_tokens < auto.usage.prompt_tokens  # no tool list rendered
            one = ask(tools=tools, parallel_tool_calls=False)
            assert [c.function.arguments for c in one.choices[0].message.tool_calls] == [
                '{"expression": "1234 * 5678"}']
            streamed = [d for chunk in ask(tools=tools, parallel_tool_calls=False, stream=True)
                        for c in chunk.choices for d in c.delta.tool_calls or []]
            assert [d.function.arguments for d in streamed] == ['{"expression": "1234 * 5678"}']
            named = {"type": "function", "function": {"name": "calculator"}}
            for choice in (named, "required"):
                with pytest.raises(openai.BadRequestError, match="tool_choice"):
                    ask(tools=tools, tool_choice=choice)
    finally:
        engine.shutdown()
