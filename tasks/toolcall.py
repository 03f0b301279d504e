"""Tool use, in one place: the benchmark's items, the multi-turn agent loop (generate, parse
``<tool_call>``, execute, append ``role: tool``, resume), scoring and the tool-use metrics. The
shape is the one of every task module (``tasks/__init__.py``), plus ``run_agent``, which the
evaluation runner calls instead of single-turn generation (``AGENT = True``).

Data: ``{"id", "question", "answer", "kind", "tools"}`` JSONL, where ``tools`` names the tools a
solution calls (empty: a distractor that needs none) and ``kind`` is the report's category.
``python -m dataset.synthetic`` writes held-out items as ``tool_test.jsonl``;
``python -m tasks.toolcall convert --src tool_sft.jsonl --out items.jsonl --kind eval`` makes items
from MiniMind tool conversations (``{"conversations", "tools"}``, e.g. what the ShareGPT/OpenAI
converter writes).

The loop (``run_agent``): every item starts as the user turn, with the tool list
(``tools.default_registry().schemas()``) in the system turn as the chat template renders it.
Each turn, the unfinished conversations are rendered and generated as one batch; a reply with
``<tool_call>`` blocks is appended as generated (its text, token for token what the model wrote),
each call is executed (``ToolRegistry.run``: a bad call is an ``Error: ...`` result the model
reads) and its result appended as a ``role: tool`` turn; a reply without calls is the answer. A
conversation stops at ``max_turns`` model turns or a reply cut by the token budget.

Metrics, per item and in total (``summarize``):
- accuracy: the answer after the last ``####`` (else the last number or word) against the gold;
  integers exactly, other numbers within a relative 1e-8 (the tools print 10
  significant digits; one digit fewer still passes);
- valid-call rate: calls that parsed, named a known tool and had schema-valid arguments, over
  all calls;
- right-tool rate: items that need tools whose calls named exactly the needed tools (as a set);
- unnecessary-call rate: distractors (no tool needed) on which the model called any tool;
- turns used: model turns per item (a two-call chain needs three).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dataset.convert._io import DataError, iter_records, require, take, write_jsonl
from dataset.jsonl import validate_conversation
from tasks._cli import convert_parser
from tools import ToolRegistry, default_registry, parse_tool_calls

__all__ = ["NAME", "FEWSHOT", "AGENT", "MAX_TURNS", "convert_file", "load", "main", "question",
           "extract_answer", "answer_correct", "score", "summarize", "Episode",
           "episode_row", "run_episodes", "run_agent", "ANSWER_MARKER", "is_record", "rl_prompt",
           "gold_of_reply", "correct"]

NAME = "toolcall"
FEWSHOT = False
AGENT = True
MAX_TURNS = 4

Message = dict[str, Any]


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

def _item_of_conversation(rec: Mapping[str, Any], i: int) -> dict | None:
    """An item from a solved tool conversation: first user turn, called tools, final answer."""
    msgs = rec["conversations"]
    users = [m for m in msgs if m["role"] == "user"]
    final = msgs[-1]
    if not users or final["role"] != "assistant" or final.get("tool_calls"):
        return None
    names = [c["name"] for m in msgs for c in m.get("tool_calls") or []]
    gold = extract_answer(final["content"])
    if gold is None:
        return None
    return {"id": f"{NAME}/{i}", "question": users[0]["content"], "answer": gold,
            "kind": "tool" if names else "none", "tools": list(dict.fromkeys(names))}


def convert_file(src: str | Path, out: str | Path, kind: str = "eval") -> int:
    """Tool conversations (one per record) → eval items; returns how many were written.
    A conversation without a final answer is skipped."""
    if kind != "eval":
        raise DataError(f"{NAME}: only --kind eval is supported (the SFT data is "
                        "`python -m dataset.synthetic`'s tool_sft.jsonl, or any tool conversations)")
    items = []
    for where, obj in iter_records(src):
        try:
            rec = validate_conversation(obj)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        item = _item_of_conversation(rec, len(items))
        if item is not None:
            items.append(item)
    return write_jsonl(out, items)


def load(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items to score, ``{"id", "question", "answer", "kind", "tools"}``."""
    def records() -> Iterable[dict]:
        for i, (where, obj) in enumerate(iter_records(path)):
            names = require(obj, "tools", where, list)
            if not all(isinstance(n, str) for n in names):
                raise DataError(f"{where}: 'tools' must be a list of tool names")
            yield {"id": obj.get("id", f"{NAME}/{i}"), "question": require(obj, "question", where),
                   "answer": str(require(obj, "answer", where, (str, int, float))),
                   "kind": obj.get("kind", "tool" if names else "none"), "tools": names}
    return take(records(), limit)


def question(item: Mapping[str, Any]) -> str:
    """The user turn: the bare question."""
    return item["question"]


# ------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z .'-]*[A-Za-z]|[A-Za-z]")


def extract_answer(text: str) -> str | None:
    """The text after the last ``####`` (its first line), else the last number, else None."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        return tail[0].strip().rstrip(".") if tail and tail[0].strip() else None
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answer_correct(pred: str | None, gold: str) -> bool:
    """Integers exactly, other numbers within a relative 1e-8; words case-insensitively."""
    if pred is None:
        return False
    p, g = _number(pred), _number(gold)
    if g is not None:
        if p is None:
            return False
        if g.denominator == 1 and "." not in gold:  # an exact product: every digit counts
            return p == g
        return abs(p - g) <= abs(g) * Fraction(1, 10 ** 8)
    return pred.strip().lower() == gold.strip().lower()


# ------------------------------------------------------------------------------------------
# The agent loop
# ------------------------------------------------------------------------------------------

@dataclass
class Episode:
    """One conversation through the loop: its messages (the prompt's, then the model's turns
    and the tool results), the calls made (``{"name", "arguments", "valid", "error_kind"}``),
    model turns used, the last reply and how it ended."""

    messages: list[Message]
    calls: list[dict] = field(default_factory=list)
    turns: int = 0
    final: str = ""
    finish_reason: str = "stop"
    n_tokens: int = 0
    done: bool = False


# ``generate(prompts) -> completions``: a completion is a str or has ``text``, and optionally
# ``finish_reason`` ("stop" | "length") and ``n_tokens`` (evaluation.runner.Completion does).
GenerateFn = Callable[[Sequence[str]], Sequence[Any]]
RenderFn = Callable[[list[Message]], str]


def run_episodes(conversations: Sequence[list[Message]], render: RenderFn, generate: GenerateFn,
                 registry: ToolRegistry | None = None, max_turns: int = MAX_TURNS,
                 batch_size: int = 8) -> list[Episode]:
    """Run every conversation to its answer (or ``max_turns`` model turns): each turn renders the
    unfinished ones, generates them in batches, executes the calls and appends the results."""
    registry = registry or default_registry()
    episodes = [Episode([dict(m) for m in msgs]) for msgs in conversations]
    for turn in range(max_turns):
        live = [e for e in episodes if not e.done]
        for b in range(0, len(live), max(1, batch_size)):
            chunk = live[b:b + max(1, batch_size)]
            outs = list(generate([render(e.messages) for e in chunk]))
            if len(outs) != len(chunk):
                raise ValueError(f"generate returned {len(outs)} completions for {len(chunk)}")
            for e, out in zip(chunk, outs):
                _step(e, out, registry, last_turn=turn == max_turns - 1)
    return episodes


def _step(e: Episode, out: Any, registry: ToolRegistry, last_turn: bool) -> None:
    text = out if isinstance(out, str) else out.text
    e.turns += 1
    e.n_tokens += getattr(out, "n_tokens", 0)
    e.finish_reason = getattr(out, "finish_reason", "stop")
    e.final = text
    # The reply goes back as generated, so the next turn conditions on the model's own tokens.
    e.messages.append({"role": "assistant", "content": text})
    _, calls = parse_tool_calls(text.rsplit("</think>", 1)[-1])
    for call in calls:
        result = registry.run(call)
        e.calls.append({"name": call.name, "arguments": call.arguments, "valid": result.valid_call,
                        "error_kind": result.error_kind})
        e.messages.append({"role": "tool", "content": result.content})
    e.done = not calls or last_turn or e.finish_reason == "length"


def run_agent(items: Sequence[dict], render: Callable[[list[Message], list[dict]], str],
              generate: GenerateFn, batch_size: int = 8, max_turns: int = MAX_TURNS,
              registry: ToolRegistry | None = None, exemplars: Sequence[Message] = (),
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Score ``items`` through the agent loop; one report row per item, in input order.

    ``render(messages, tools)`` is the chat template with the generation prompt (the runner
    passes the tokenizer's); every item is offered every tool of ``registry``.
    """
    registry = registry or default_registry()
    schemas = registry.schemas()
    convs = [list(exemplars) + [{"role": "user", "content": question(it)}] for it in items]
    episodes = run_episodes(convs, lambda msgs: render(msgs, schemas), generate, registry,
                            max_turns, batch_size)
    rows = [episode_row(it, e, render(conv, schemas)) for it, e, conv in zip(items, episodes, convs)]
    if log:
        s = summarize(rows)
        log(f"{len(rows)} items, accuracy {sum(r['correct'] for r in rows) / max(len(rows), 1):.3f}, "
            f"valid calls {s['valid_call_rate']}, mean turns {s['mean_turns']:.2f}")
    return rows


def episode_row(item: Mapping[str, Any], e: Episode, prompt: str) -> dict:
    """The report row of one finished episode: the answer's score plus the tool-use fields."""
    answer = e.final.rsplit("</think>", 1)[-1]
    unanswered = bool(parse_tool_calls(answer)[1])  # out of turns while still calling tools
    row = score(item, "" if unanswered else answer)
    names = [c["name"] for c in e.calls]
    needs = list(item.get("tools") or [])
    truncated = e.finish_reason == "length"
    if not row["correct"]:
        row["error_kind"] = ("truncated" if truncated else "out_of_turns" if unanswered
                             else row["error_kind"])
    return {**row, "prompt": prompt, "prediction": e.final, "n_generated_tokens": e.n_tokens,
            "finish_reason": e.finish_reason, "truncated": truncated, "turns": e.turns,
            "n_calls": len(e.calls), "valid_calls": sum(c["valid"] for c in e.calls),
            "called": names, "needs": needs,
            "right_tool": (set(n for n in names if n) == set(needs)) if needs else None,
            "unnecessary_call": bool(names) if not needs else None,
            "transcript": json.dumps(e.messages, ensure_ascii=False)}


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------

def score(item: Mapping[str, Any], text: str) -> dict:
    """One report row for the final answer text (the loop adds the tool-use fields)."""
    pred = extract_answer(text)
    ok = answer_correct(pred, item["answer"])
    return {"id": item.get("id"), "category": item.get("kind"), "extracted": pred,
            "gold": item["answer"], "correct": ok,
            "error_kind": None if ok else ("no_answer" if pred is None else "wrong_answer")}


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def summarize(results: Sequence[dict]) -> dict:
    """The tool-use metrics over the rows of ``run_agent`` (None where nothing was counted)."""
    tool_items = [r for r in results if r.get("needs")]
    plain = [r for r in results if "needs" in r and not r["needs"]]
    calls = sum(r.get("n_calls", 0) for r in results)
    return {
        "valid_call_rate": _rate(sum(r.get("valid_calls", 0) for r in results), calls),
        "right_tool_rate": _rate(sum(bool(r["right_tool"]) for r in tool_items), len(tool_items)),
        "unnecessary_call_rate": _rate(sum(bool(r["unnecessary_call"]) for r in plain), len(plain)),
        "accuracy_tool_items": _rate(sum(r["correct"] for r in tool_items), len(tool_items)),
        "accuracy_no_tool_items": _rate(sum(r["correct"] for r in plain), len(plain)),
        "mean_turns": sum(r.get("turns", 0) for r in results) / max(len(results), 1),
        "calls": calls,
    }


# ------------------------------------------------------------------------------------------
# RL: prompt and gold of a data record, and the reward's verdict
# ------------------------------------------------------------------------------------------

ANSWER_MARKER = re.compile(r"####\s*\S+")


def is_record(obj: Mapping[str, Any]) -> bool:
    """A tool-use item: ``question``, ``answer`` and a ``tools`` list of names."""
    return "question" in obj and "answer" in obj and isinstance(obj.get("tools"), list)


def rl_prompt(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"messages", "task", "gold", "tools"}``: the question as the user turn."""
    return {"messages": [{"role": "user", "content": obj["question"]}], "task": NAME,
            "gold": str(obj["answer"]), "tools": list(obj["tools"])}


def gold_of_reply(text: str) -> str | None:
    """None: a single reply does not say whether it came from a tool conversation (records of
    this task are recognised by ``is_record``, not by their replies)."""
    return None


def correct(text: str, sample: Mapping[str, Any]) -> bool:
    """Whether a final answer text is right for an RL sample (``rl_prompt``'s record)."""
    return answer_correct(extract_answer(text), sample["gold"])


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.toolcall convert --src tool_sft.jsonl --out items.jsonl --kind eval``."""
    parser, _ = convert_parser(
        NAME, "Make benchmark items {id, question, answer, kind, tools} from solved tool "
              "conversations (the first user turn, the tools called, the answer after ####).",
        "JSONL/JSON of tool conversations", eval_help="benchmark items (the only kind here)")
    args = parser.parse_args(argv)
    if args.dataset_info:
        raise DataError("--dataset-info: benchmark items are not training data")
    n = convert_file(args.src, args.out, args.kind)
    print(f"wrote {n} items to {args.out}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
