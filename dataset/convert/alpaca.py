"""Alpaca records → MiniMind format (conversation, preference pair or pretraining text).

Scope: one record at a time, following LLaMA-Factory's reading of the format: the user turn is
``instruction`` plus, when non-empty, ``"\\n" + input``; ``system`` is an optional system prompt;
``history`` is a list of earlier ``[user, assistant]`` pairs; ``output`` is the reply. Column
names can be remapped (``columns`` as in a ``dataset_info.json`` entry: prompt, query, response,
system, history, chosen, rejected). Bad records raise ValueError with a location-free message;
readers add ``file:line``.

CLI: ``python -m dataset.convert.alpaca in.json out.jsonl [--skip-bad-records]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dataset.jsonl import validate_conversation, write_records

DEFAULT_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
    "chosen": "chosen",
    "rejected": "rejected",
}


def _columns(columns: dict[str, str] | None) -> dict[str, str]:
    return {**DEFAULT_COLUMNS, **(columns or {})}


def _optional_str(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{column}' must be a string, got {type(value).__name__}")
    return value


def _required_str(record: dict[str, Any], column: str) -> str:
    if column not in record:
        raise ValueError(f"missing field '{column}'")
    return _optional_str(record, column)


def _prompt_messages(record: Any, cols: dict[str, str]) -> list[dict[str, str]]:
    """System, history and the final user turn: everything before the response."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    messages = []
    system = _optional_str(record, cols["system"])
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(cols["history"]) or []
    if not isinstance(history, list):
        raise ValueError(f"field '{cols['history']}' must be a list of [user, assistant] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"history entry {k} must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt, query = _required_str(record, cols["prompt"]), _optional_str(record, cols["query"])
    user = "\n".join(part for part in (prompt, query) if part)
    if not user.strip():
        raise ValueError(f"empty instruction ('{cols['prompt']}' and '{cols['query']}' are both empty)")
    messages.append({"role": "user", "content": user})
    return messages


def alpaca_to_conversation(record: Any, columns: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"instruction", "input", "output", ...}`` → ``{"conversations": [...]}``."""
    cols = _columns(columns)
    messages = _prompt_messages(record, cols)
    response = _required_str(record, cols["response"])
    if not response.strip():
        raise ValueError(f"empty response in field '{cols['response']}'")
    return {"conversations": messages + [{"role": "assistant", "content": response}]}


def alpaca_to_preference(record: Any, columns: dict[str, str] | None = None) -> dict[str, Any]:
    """Ranking data (prompt + ``chosen``/``rejected`` response strings) → ``{"chosen", "rejected"}``."""
    cols = _columns(columns)
    prompt = _prompt_messages(record, cols)
    out = {}
    for side in ("chosen", "rejected"):
        reply = _required_str(record, cols[side])
        out[side] = prompt + [{"role": "assistant", "content": reply}]
    return out


def alpaca_to_text(record: Any, columns: dict[str, str] | None = None) -> dict[str, Any]:
    """Pretraining entries (LLaMA-Factory maps the text column to ``prompt``) → ``{"text"}``."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return {"text": _required_str(record, _columns(columns)["prompt"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert Alpaca JSON/JSONL to MiniMind SFT JSONL.")
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--skip-bad-records", action="store_true")
    args = parser.parse_args(argv)
    validate = lambda r: validate_conversation(alpaca_to_conversation(r))  # noqa: E731
    report = write_records(args.src, args.dst, validate, skip_bad_records=args.skip_bad_records)
    print(f"{args.dst}: {report}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
