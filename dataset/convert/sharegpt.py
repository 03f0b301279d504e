"""ShareGPT records → MiniMind format (conversation or preference pair).

Scope: one record at a time, following LLaMA-Factory's reading of the format. A record holds a
list of turns ``{"from": tag, "value": text}``; tags map to roles: ``human`` → user, ``gpt`` →
assistant, ``system`` → system, ``function_call`` → an assistant turn whose value is the JSON tool
call (``{"name", "arguments"}`` or a list of them), ``observation`` → tool. Tag and column names
are remappable exactly like a ``dataset_info.json`` entry (``tags``: role_tag, content_tag,
user_tag, assistant_tag, observation_tag, function_tag, system_tag; ``columns``: messages, system,
tools, chosen, rejected) — so OpenAI-style ``{"role", "content"}`` lists work too. Preference
records (``ranking: true``) hold the prompt turns plus one ``chosen`` and one ``rejected`` turn.
OpenAI tool conversations (LLaMA-Factory's ``role``/``content`` tags) work as they are: an
assistant turn's ``tool_calls`` (OpenAI ``{"type": "function", "function": {...}}`` entries, or
plain ``{"name", "arguments"}``) are kept, its ``content`` may then be null, and with
``role_tag: "role"`` a ``"tool"`` turn is a tool result unless the tags give "tool" another role.
Bad records raise ValueError with a location-free message; readers add ``file:line``.

CLI: ``python -m dataset.convert.sharegpt in.json out.jsonl [--skip-bad-records]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dataset.jsonl import validate_conversation, write_records

DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
DEFAULT_COLUMNS = {
    "messages": "conversations",
    "system": "system",
    "tools": "tools",
    "chosen": "chosen",
    "rejected": "rejected",
}


def _tool_calls(value: str, i: int) -> list[Any]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"turn {i}: function_call value is not valid JSON ({e.msg})") from None
    return calls if isinstance(calls, list) else [calls]


def sharegpt_turns_to_messages(turns: Any, tags: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """ShareGPT turns → MiniMind messages (roles system/user/assistant/tool)."""
    tags = {**DEFAULT_TAGS, **(tags or {})}
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "function_call",
        tags["system_tag"]: "system",
    }
    if tags["role_tag"] == "role":  # OpenAI messages: their tool results have role "tool"
        roles.setdefault("tool", "tool")
    if not isinstance(turns, list):
        raise ValueError(f"turns must be a list, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} must be an object")
        tag, value = turn.get(tags["role_tag"]), turn.get(tags["content_tag"])
        if tag not in roles:
            raise ValueError(f"turn {i}: unknown role {tag!r} (expected one of {', '.join(map(str, roles))})")
        calls = turn.get("tool_calls")
        if calls and roles[tag] == "assistant":
            if isinstance(calls, str):
                calls = _tool_calls(calls, i)
            messages.append({"role": "assistant", "content": value or "", "tool_calls": calls})
            continue
        if not isinstance(value, str):
            raise ValueError(f"turn {i}: '{tags['content_tag']}' must be a string")
        if roles[tag] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(value, i)})
        else:
            messages.append({"role": roles[tag], "content": value})
    return messages


def _columns(columns: dict[str, str] | None) -> dict[str, str]:
    return {**DEFAULT_COLUMNS, **(columns or {})}


def _with_system(
    record: dict[str, Any], messages: list[dict[str, Any]], cols: dict[str, str]
) -> list[dict[str, Any]]:
    system = record.get(cols["system"])
    if system and not (messages and messages[0]["role"] == "system"):
        if not isinstance(system, str):
            raise ValueError(f"field '{cols['system']}' must be a string")
        return [{"role": "system", "content": system}] + messages
    return messages


def _tools(record: dict[str, Any], cols: dict[str, str]) -> Any:
    tools = record.get(cols["tools"])
    return tools if tools not in ("", "[]", []) else None


def _record(record: Any, cols: dict[str, str]) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if cols["messages"] not in record:
        raise ValueError(f"missing field '{cols['messages']}'")
    return record


def sharegpt_to_conversation(
    record: Any, columns: dict[str, str] | None = None, tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """``{"conversations": [{"from", "value"}], "system"?, "tools"?}`` → MiniMind SFT record."""
    cols = _columns(columns)
    record = _record(record, cols)
    messages = _with_system(record, sharegpt_turns_to_messages(record[cols["messages"]], tags), cols)
    return {"conversations": messages, "tools": _tools(record, cols)}


def sharegpt_to_preference(
    record: Any, columns: dict[str, str] | None = None, tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Prompt turns + one ``chosen`` and one ``rejected`` turn → ``{"chosen", "rejected"}``."""
    cols = _columns(columns)
    record = _record(record, cols)
    prompt = _with_system(record, sharegpt_turns_to_messages(record[cols["messages"]], tags), cols)
    out: dict[str, Any] = {"tools": _tools(record, cols)}
    for side in ("chosen", "rejected"):
        if cols[side] not in record:
            raise ValueError(f"missing field '{cols[side]}'")
        reply = record[cols[side]]
        reply = sharegpt_turns_to_messages(reply if isinstance(reply, list) else [reply], tags)
        out[side] = prompt + reply
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert ShareGPT JSON/JSONL to MiniMind SFT JSONL.")
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--skip-bad-records", action="store_true")
    args = parser.parse_args(argv)
    validate = lambda r: validate_conversation(sharegpt_to_conversation(r))  # noqa: E731
    report = write_records(args.src, args.dst, validate, skip_bad_records=args.skip_bad_records)
    print(f"{args.dst}: {report}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
