"""The tool-use benchmark through an OpenAI-compatible server, driven by the official `openai`
client: the same items, tools and scoring as `eval_model.py --bench toolcall`
(tasks/toolcall.py), but every turn is a chat-completions request.

Scope: `run_openai_agent` — for each item, send the question with `tools` (the registry's
schemas); when the reply holds `tool_calls` (whole, or assembled from streamed deltas), run each
through `tools.ToolRegistry` (arguments arrive as a JSON string; one that does not parse is a
`parse` error result), append the assistant message with its `tool_calls` and one `role: tool`
message per call (`tool_call_id` set), and ask again; a reply without calls is the answer. Rows
are `tasks.toolcall.episode_row`'s, plus each request's `prompt_tokens` (the server's usage),
so the two paths' reports compare item by item (`python -m evaluation.compare`).
scripts/check_toolcall_openai.py runs it against scripts/serve_openai_api.py's server.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from tasks import toolcall
from tools import ToolCall, ToolRegistry, default_registry

__all__ = ["run_openai_agent"]


def _reply(client: Any, model: str, messages: list[dict], tools: list[dict], stream: bool,
           **kw: Any) -> tuple[str, list[dict], str, int]:
    """(content, tool_calls as dicts, finish_reason, prompt tokens) of one request."""
    if not stream:
        resp = client.chat.completions.create(model=model, messages=messages, tools=tools, **kw)
        msg, choice = resp.choices[0].message, resp.choices[0]
        calls = [c.model_dump() for c in msg.tool_calls or []]
        return msg.content or "", calls, choice.finish_reason, resp.usage.prompt_tokens
    content, calls, finish, prompt_tokens = [], {}, "stop", 0
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=tools,
                                                stream=True, stream_options={"include_usage": True},
                                                **kw):
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
        for choice in chunk.choices:
            delta = choice.delta
            content.append(delta.content or "")
            for d in delta.tool_calls or []:  # OpenAI's deltas: pieces keyed by index
                call = calls.setdefault(d.index, {"id": "", "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
                call["id"] += d.id or ""
                if d.function is not None:
                    call["function"]["name"] += d.function.name or ""
                    call["function"]["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return "".join(content), [calls[i] for i in sorted(calls)], finish, prompt_tokens


def _parsed(call: dict) -> ToolCall:
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"] or "{}")
    except json.JSONDecodeError as e:
        return ToolCall(None, None, fn["arguments"], f"the arguments are not valid JSON ({e.msg})")
    if not isinstance(args, dict):
        return ToolCall(fn["name"], None, fn["arguments"], "the tool call's arguments must be an object")
    return ToolCall(fn["name"], args, fn["arguments"])


def run_openai_agent(client: Any, model: str, items: Sequence[dict],
                     registry: ToolRegistry | None = None, max_turns: int = toolcall.MAX_TURNS,
                     stream: bool = False, **request: Any) -> list[dict]:
    """One report row per item (see the module doc); ``request`` goes into every request
    (``temperature``, ``max_tokens``, ``tool_choice``, ...)."""
    registry = registry or default_registry()
    tools = registry.schemas()
    rows = []
    for item in items:
        e = toolcall.Episode([{"role": "user", "content": toolcall.question(item)}])
        usage = []
        for turn in range(max_turns):
            content, calls, finish, n_prompt = _reply(client, model, e.messages, tools, stream,
                                                      **request)
            usage.append(n_prompt)
            e.turns, e.finish_reason = e.turns + 1, "length" if finish == "length" else "stop"
            e.final = "" if calls else content   # still calling at the last turn: no answer
            if not calls:
                e.messages.append({"role": "assistant", "content": content})
                break
            e.messages.append({"role": "assistant", "content": content or None, "tool_calls": calls})
            for call in calls:
                parsed = _parsed(call)
                result = registry.run(parsed)
                e.calls.append({"name": parsed.name or call["function"]["name"],
                                "arguments": parsed.arguments, "valid": result.valid_call,
                                "error_kind": result.error_kind})
                e.messages.append({"role": "tool", "tool_call_id": call["id"],
                                   "content": result.content})
        rows.append({**toolcall.episode_row(item, e, toolcall.question(item)),
                     "prompt_tokens": usage})
    return rows
