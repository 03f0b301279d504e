"""MATH (Hendrycks), in one place: the release's format, SFT / alpaca / eval records, the prompt,
the scoring entry points and the RL prompt + gold (answer extraction and LaTeX equivalence are
the engine in ``tasks.math_answer``, which knows nothing of files). The shape is the one of every
task module (``tasks/__init__.py``).

Always run through ``-m`` (``python -m tasks.math convert ...``): running this file by path would
put ``tasks/`` on ``sys.path`` and this module would shadow the standard ``math``.

Data: ``{"problem", "solution", "answer"?, "level", "type"|"subject", "unique_id"?}`` JSONL (the
merged per-problem files of the full MATH release and the MATH-500 split). When ``answer`` is
missing it is taken from the last ``\\boxed{}`` of the solution.

Records written by ``convert_file`` (the CLI is ``python -m tasks.math convert``):
- ``sft``: MiniMind ``{"conversations": [{"role": "user", "content": problem},
  {"role": "assistant", "reasoning_content": <solution>, "content": "The answer is $\\boxed{X}$."}]}``.
  The solution keeps its own ``\\boxed{}`` (it is the natural last step); the ``content`` line
  repeats the answer boxed so that ``extract_boxed`` finds it whether or not the thinking part is
  shown, and the line matches GSM8K's wording. ``inline=True`` puts solution and answer line
  together in ``content``.
- ``alpaca``: ``{"instruction", "input", "output"}`` with the reasoning inline (LLaMA-Factory).
- ``eval``: ``{"id", "problem", "answer", "subject", "level" (int or None), "solution"}``.

Prompt: the bare problem as the user turn; few-shot exemplars (``exemplars``) are the
reference solution followed by the boxed answer line.

Reference: Hendrycks et al., "Measuring Mathematical Problem Solving With the MATH Dataset", 2021.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from dataset.convert._io import (DataError, first_field, iter_records, reasoning_alpaca,
                                 reasoning_sft, require, take, write_converted)
from tasks._cli import convert_parser
from tasks.math_answer import extract_boxed, score_math

__all__ = [
    "NAME", "FEWSHOT",
    # data format and records
    "ANSWER_TEMPLATE", "parse_level", "read_math", "to_sft", "to_alpaca", "to_eval",
    "convert_file", "load", "main",
    # prompt
    "question", "exemplars",
    # scoring (implemented in tasks.math_answer)
    "extract_boxed", "score_math", "score", "summarize",
    # RL prompt and gold
    "ANSWER_MARKER", "is_record", "rl_prompt", "gold_of_reply", "correct",
]

NAME = "math"
FEWSHOT = True
ANSWER_TEMPLATE = "The answer is $\\boxed{{{answer}}}$."


# ------------------------------------------------------------------------------------------
# Data format: the release's records, and what we write from them
# ------------------------------------------------------------------------------------------

def parse_level(value: object, where: str) -> int | None:
    """``"Level 3"`` / ``3`` -> 3; ``"Level ?"`` (2 train items) -> None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:Level\s*)?(\d+|\?)\s*", value)
        if m:
            return None if m.group(1) == "?" else int(m.group(1))
    raise DataError(f"{where}: cannot read level {value!r} (expected 'Level N' or an int)")


def read_math(path: str | Path, split: str | None = None) -> Iterator[dict]:
    """Parsed items ``{"id", "problem", "solution", "answer", "subject", "level"}``."""
    path = Path(path)
    split = split or path.name.split(".")[0]
    for index, (where, obj) in enumerate(iter_records(path)):
        problem = require(obj, "problem", where)
        solution = require(obj, "solution", where)
        if "subject" in obj:
            subject = require(obj, "subject", where)
        elif "type" in obj:
            subject = require(obj, "type", where)
        else:
            raise DataError(f"{where}: missing field 'type' (or 'subject')")
        level = parse_level(obj.get("level", "Level ?"), where)
        answer = obj.get("answer")
        if answer is None:
            answer = extract_boxed(solution)
            if answer is None:
                raise DataError(f"{where}: no 'answer' field and no \\boxed{{}} in the solution")
        elif not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer' should be str, got {type(answer).__name__}")
        yield {"id": obj.get("unique_id") or f"math/{split}/{index}", "problem": problem.strip(),
               "solution": solution.strip(), "answer": answer.strip(), "subject": subject,
               "level": level}


def to_sft(item: dict, inline: bool = False) -> dict:
    """MiniMind SFT conversation (see module docstring)."""
    return reasoning_sft(item["problem"], item["solution"], ANSWER_TEMPLATE.format(answer=item["answer"]), inline)


def to_alpaca(item: dict) -> dict:
    """Alpaca row with the reasoning inline."""
    return reasoning_alpaca(item["problem"], item["solution"], ANSWER_TEMPLATE.format(answer=item["answer"]))


def to_eval(item: dict) -> dict:
    """Scoring record; subject and level feed per-category reports."""
    return {"id": item["id"], "problem": item["problem"], "answer": item["answer"],
            "subject": item["subject"], "level": item["level"], "solution": item["solution"]}


def convert_file(src: str | Path, out: str | Path, kind: str = "sft", inline: bool = False,
                 split: str | None = None, dataset_info: str | Path | None = None,
                 name: str | None = None, skip_empty: bool = True) -> int:
    """Convert one MATH file to ``kind`` records (sft | alpaca | eval), registering them in
    ``dataset_info`` when given (name default ``math_<stem>_<kind>``); returns the count.

    ``skip_empty`` drops training items whose answer is empty (two train problems box nothing);
    eval records are always kept so counts match the source.
    """
    items = read_math(src, split)
    if kind != "eval" and skip_empty:
        items = (it for it in items if it["answer"])
    stem = Path(src).name.split(".")[0]
    return write_converted(items, out, kind, inline, to_sft=to_sft, to_alpaca=to_alpaca,
                           to_eval=to_eval, dataset_info=dataset_info,
                           registry_name=name or f"math_{stem}_{kind}")


def load(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items to score, ``{"id", "problem", "answer", "subject", "level", "solution"}``, from MATH /
    MATH-500 records (``answer`` or, failing that, the last ``\\boxed{}`` of ``solution``;
    ``type`` or ``subject``). More lenient than ``read_math``: eval files of other tools work."""
    def records() -> Iterable[dict]:
        for i, (where, obj) in enumerate(iter_records(path)):
            answer = obj.get("answer")
            if answer is None:
                answer = extract_boxed(first_field(obj, where, "solution", "answer"))
                if answer is None:
                    raise DataError(f"{where}: no 'answer' and no \\boxed{{}} in 'solution'")
            level = obj.get("level")
            yield {"id": obj.get("unique_id") or obj.get("id") or f"math/{i}",
                   "problem": first_field(obj, where, "problem"), "answer": str(answer),
                   "subject": obj.get("subject") or obj.get("type"),
                   "level": None if level is None else parse_level(level, where),
                   "solution": obj.get("solution", "")}
    return take(records(), limit)


# ------------------------------------------------------------------------------------------
# Prompt
# ------------------------------------------------------------------------------------------

def question(item: Mapping[str, Any]) -> str:
    """The user turn of an item: the bare problem."""
    return item["problem"]


def exemplars(items: Sequence[dict]) -> list[dict[str, Any]]:
    """Few-shot turns for MATH: the reference solution, then the boxed answer line."""
    turns: list[dict[str, Any]] = []
    for it in items:
        reply = f"{it.get('solution', '')}\n{ANSWER_TEMPLATE.format(answer=it['answer'])}".strip()
        turns += [{"role": "user", "content": it["problem"]},
                  {"role": "assistant", "content": reply}]
    return turns


# ------------------------------------------------------------------------------------------
# Scoring an item for a report
# ------------------------------------------------------------------------------------------

def score(item: Mapping[str, Any], text: str) -> dict:
    """One report row: ``score_math`` of the answer text; category = subject, ``level`` kept."""
    return {"id": item.get("id"), "category": item.get("subject"), "level": item.get("level"),
            **score_math(text, item["answer"])}


def summarize(results: Sequence[dict]) -> dict:
    """``accuracy_by_level``: accuracy per difficulty level (1-5; "None" where unknown)."""
    groups: dict[str, list[bool]] = {}
    for r in results:
        groups.setdefault(str(r.get("level")), []).append(bool(r["correct"]))
    return {"accuracy_by_level": {k: sum(v) / len(v) for k, v in sorted(groups.items())}}


# ------------------------------------------------------------------------------------------
# RL: prompt and gold of a data record, and the reward's verdict
# ------------------------------------------------------------------------------------------

# What "an answer was given" looks like (the marker the training data teaches).
ANSWER_MARKER = re.compile(r"\\boxed\{")


def is_record(obj: Mapping[str, Any]) -> bool:
    """A MATH record: ``problem`` (the gold from ``answer`` or the solution's ``\\boxed{}``)."""
    return "problem" in obj


def rl_prompt(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"messages", "task", "gold"}``: the problem as the user turn, ``answer`` or the last
    ``\\boxed{}`` of ``solution`` as the gold; DataError when there is neither."""
    gold = obj.get("answer") or extract_boxed(str(obj.get("solution", "")))
    if gold is None:
        raise DataError(f"{where}: MATH record without 'answer' or a \\boxed{{}} solution")
    return {"messages": [{"role": "user", "content": obj["problem"]}], "task": NAME, "gold": str(gold)}


def gold_of_reply(text: str) -> str | None:
    """The gold of a worked reply: its last ``\\boxed{}``, or None."""
    return extract_boxed(text)


def correct(text: str, sample: Mapping[str, Any]) -> bool:
    """Whether an answer text is right for an RL sample (``rl_prompt``'s record)."""
    return bool(score_math(text, sample["gold"])["correct"])


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.math convert --src train.jsonl --out math_sft.jsonl [--kind ...]``."""
    parser, p = convert_parser(
        NAME, "Convert MATH {problem, solution, answer, level, type} JSONL into MiniMind SFT "
              "conversations (reasoning_content = solution, content = 'The answer is "
              "$\\boxed{X}$.'), alpaca rows, or eval records {id, problem, answer, subject, level}.",
        "MATH .jsonl file (e.g. ../shared/data/math/test.jsonl)")
    p.add_argument("--inline", action="store_true",
                   help="sft only: solution and answer line together in content")
    p.add_argument("--keep-empty", action="store_true",
                   help="keep training items whose boxed answer is empty (dropped by default)")
    p.add_argument("--split", help="split name used in ids when a record has no unique_id")
    p.add_argument("--name", help="registry name (default: math_<stem>_<kind>)")
    args = parser.parse_args(argv)
    n = convert_file(args.src, args.out, args.kind, args.inline, args.split, args.dataset_info,
                     args.name, skip_empty=not args.keep_empty)
    print(f"wrote {n} records to {args.out}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
