"""Assistant-output parsing (think blocks, tool calls) and the OpenAI responses built on it."""

import asyncio
import itertools
import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from model.tokenizer import Tokenizer
from serving.chat import AssistantParser, parse_assistant_output, parse_tool_call
from serving.engine import Finished, TextDelta
from serving.openai_api import build_prompt
from serving.replies import Reply
from serving.schema import ChatCompletionRequest


def ids():
    """Deterministic tool-call ids, so two parses of the same text compare equal."""
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def strip_ids(calls):
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


# -- think blocks --------------------------------------------------------------------------------

def test_thinking_prompt_output_splits_at_close_tag():
    # With thinking on, the prompt ends in "<think>\n": the reply starts inside the block.
    out = parse_assistant_output("Add 2 and 3.\nThat is 5.\n</think>\n\nThe answer is 5.",
                                 thinking=True)
    assert out.reasoning_content == "Add 2 and 3.\nThat is 5."
    assert out.content == "The answer is 5."
    assert out.tool_calls == []


def test_model_opening_think_itself_is_reasoning():
    out = parse_assistant_output("\n<think>\nhmm\n</think>\n\nhello")
    assert (out.reasoning_content, out.content) == ("hmm", "hello")


def test_think_tag_later_in_content_is_just_text():
    out = parse_assistant_output("I like <think> tags")
    assert out.reasoning_content is None and out.content == "I like <think> tags"


def test_unfinished_reasoning_stays_reasoning():
    out = parse_assistant_output("still thinking about it", thinking=True)
    assert out.reasoning_content == "still thinking about it" and out.content == ""


def test_plain_reply_keeps_inner_whitespace():
    out = parse_assistant_output("line one\n\n  line two  \n")
    assert out.content == "line one\n\n  line two" and out.reasoning_content is None


# -- tool calls ----------------------------------------------------------------------------------

def test_single_tool_call_becomes_openai_tool_call():
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>')
    out = parse_assistant_output(text, parse_tools=True, id_factory=ids())
    assert out.content == ""
    assert out.tool_calls == [{"id": "call_0", "type": "function",
                               "function": {"name": "get_weather",
                                            "arguments": '{"city": "北京"}'}}]
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"city": "北京"}


def test_content_reasoning_and_two_calls():
    text = ("weigh options\n</think>\n\nLet me check.\n"
            '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": 2}"}\n</tool_call>')
    out = parse_assistant_output(text, thinking=True, parse_tools=True, id_factory=ids())
    assert out.reasoning_content == "weigh options"
    assert out.content == "Let me check."
    assert strip_ids(out.tool_calls) == [call("a", {"x": 1}), call("b", {"y": 2})]
    assert [c["id"] for c in out.tool_calls] == ["call_0", "call_1"]


def test_default_ids_are_unique_openai_style():
    text = '<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "f"}</tool_call>'
    out = parse_assistant_output(text, parse_tools=True)
    a, b = (c["id"] for c in out.tool_calls)
    assert a != b and a.startswith("call_") and len(a) == 29
    assert out.tool_calls[0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("body", ['{"name": "f", "arguments": {"x": 1}',  # broken JSON
                                  '{"arguments": {}}',  # no name
                                  '["f"]',  # not an object
                                  '{"name": "f", "arguments": 3}'])  # arguments neither
def test_invalid_tool_call_is_returned_as_content(body):
    text = f"ok <tool_call>{body}</tool_call>"
    out = parse_assistant_output(text, parse_tools=True)
    assert out.tool_calls == [] and out.content == text


def test_unterminated_tool_call_is_content():
    text = 'sure\n<tool_call>\n{"name": "f", "argu'
    out = parse_assistant_output(text, parse_tools=True)
    assert out.tool_calls == [] and out.content == text


def test_tool_tags_are_text_when_no_tools_were_declared():
    text = '<tool_call>{"name": "f"}</tool_call>'
    assert parse_assistant_output(text, parse_tools=False).content == text


def test_parse_tool_call_accepts_parameters_alias():
    got = parse_tool_call('{"name": "f", "parameters": {"a": [1, 2]}}', "call_x")
    assert got["function"] == {"name": "f", "arguments": '{"a": [1, 2]}'}


# -- streaming = whole ---------------------------------------------------------------------------

TEXTS = [
    ("reason a\n\nreason b\n</think>\n\nAnswer <b>x</b> 😀 end\n", True),
    ("<think>\nr\n</think>\n\nc1\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"<\"}}\n"
     "</tool_call>\ntrailing words", False),
    ("text with < and </ and <tool and <think later", False),
    ("<tool_call>{bad json}</tool_call> after", False),
    ("   \n\n", False),
    ("", True),
]


@pytest.mark.parametrize("text,thinking", TEXTS)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_incremental_parse_concatenates_to_whole_parse(text, thinking, piece):
    whole = parse_assistant_output(text, thinking=thinking, parse_tools=True, id_factory=ids())
    parser = AssistantParser(thinking=thinking, parse_tools=True, id_factory=ids())
    events = []
    for i in range(0, len(text), piece):
        events += parser.push(text[i:i + piece])
    events += parser.finish()
    reasoning = "".join(v for k, v in events if k == "reasoning")
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "tool_call"]
    assert (reasoning or None) == whole.reasoning_content
    assert content == whole.content
    assert calls == whole.tool_calls
    assert all(v for k, v in events if k != "tool_call")  # no empty deltas


def test_partial_tag_is_held_back_until_decided():
    p = AssistantParser(thinking=True)
    assert p.push("abc</th") == [("reasoning", "abc")]
    assert p.push("ink>\n\nhi") == [("content", "hi")]
    q = AssistantParser(parse_tools=True)
    assert q.push("x <tool_") == [("content", "x")]  # " <tool_" held (space: segment edge)
    assert q.push("calling") == [("content", " <tool_calling")]


# -- OpenAI response shapes (no model: events are fed by hand) -----------------------------------

def make_request(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return ChatCompletionRequest.model_validate(body)


TOOL_TEXT = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>')


def feed(pieces, finished):
    q = asyncio.Queue()
    for p in pieces:
        q.put_nowait(TextDelta(p))
    q.put_nowait(finished)
    return q


class NoopHandle:
    cancelled = False

    def cancel(self):
        self.cancelled = True


def test_sse_chunks_follow_the_openai_schema_for_tool_calls():
    req = make_request(stream=True, stream_options={"include_usage": True},
                       tools=[{"type": "function", "function": {"name": "get_weather"}}])
    reply = Reply("chatcmpl-1", "m", req)
    pieces = [TOOL_TEXT[i:i + 5] for i in range(0, len(TOOL_TEXT), 5)]
    handle = NoopHandle()

    async def run():
        parser = AssistantParser(parse_tools=True)
        return [c async for c in reply.sse(feed(pieces, Finished("stop", 10, 20)), handle, parser)]

    raw = asyncio.run(run())
    assert raw[-1] == "data: [DONE]\n\n" and all(c.startswith("data: ") for c in raw)
    chunks = [ChatCompletionChunk.model_validate(json.loads(c[6:])) for c in raw[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Checking."
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 30
    assert handle.cancelled  # the finally-cancel is harmless after completion


def test_whole_completion_schema_with_reasoning_and_tool_calls():
    req = make_request(enable_thinking=True,
                       tools=[{"type": "function", "function": {"name": "get_weather"}}])
    reply = Reply("chatcmpl-2", "m", req)

    class Connected:  # a client that never hangs up
        async def receive(self):
            await asyncio.Event().wait()

    async def run():
        parser = AssistantParser(thinking=True, parse_tools=True)
        outcome = asyncio.get_running_loop().create_future()
        outcome.set_result(Finished("stop", 4, 6))
        return await reply.whole(outcome, ["plan\n</think>\n\n", TOOL_TEXT], NoopHandle(),
                                 parser, Connected())

    resp = asyncio.run(run())
    body = json.loads(resp.body)
    parsed = ChatCompletion.model_validate(body)
    msg = body["choices"][0]["message"]
    assert msg["reasoning_content"] == "plan" and msg["content"] == "Checking."
    assert parsed.choices[0].finish_reason == "tool_calls"
    assert parsed.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_length_finish_is_not_turned_into_tool_calls():
    req = make_request(tools=[{"type": "function", "function": {"name": "f"}}])
    out = parse_assistant_output('<tool_call>{"name": "f"}</tool_call>', parse_tools=True)
    assert Reply("x", "m", req).finish_reason(Finished("length", 1, 1), out) == "length"


def test_prompt_flags_reach_the_chat_template():
    tok = Tokenizer.from_dir()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    plain_ids, _ = build_prompt(make_request(), tok, 512)
    think_ids, _ = build_prompt(make_request(chat_template_kwargs={"enable_thinking": True}),
                                tok, 512)
    tool_ids, params = build_prompt(make_request(tools=tools, temperature=0.5, stop="x"), tok, 512)
    none_ids, _ = build_prompt(make_request(tools=tools, tool_choice="none"), tok, 512)
    assert tok.decode(think_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(plain_ids).endswith("<think>\n\n</think>\n\n")
    assert "get_weather" in tok.decode(tool_ids) and none_ids == plain_ids
    assert params.temperature == 0.5 and list(params.stop_strings) == ["x"]
    assert params.max_new_tokens == 512 - len(tool_ids)  # default: the rest of the context


# -- what the server sends: whole characters, no control tokens ----------------------------------

def test_sse_stream_sends_whole_characters_and_no_control_tokens():
    from fastapi.testclient import TestClient

    from serving.engine import Engine
    from serving.openai_api import create_app
    from tests.scripted_model import SPLIT_TEXT, scripted_model, split_script

    tok = Tokenizer.from_dir()
    engine = Engine(scripted_model(split_script(tok)), tok, batch_wait_s=0.0).start()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "max_tokens": 32}
    try:
        with TestClient(create_app(engine, "m")) as http:
            raw = http.post("/v1/chat/completions", json={**body, "stream": True}).text
            whole = http.post("/v1/chat/completions", json=body).json()
    finally:
        engine.shutdown()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, events[:-1])]
    assert all("\ufffd" not in d and "<|" not in d for d in deltas), deltas
    assert "".join(deltas) == SPLIT_TEXT and "🙂" in deltas
    assert whole["choices"][0]["message"]["content"] == SPLIT_TEXT
