"""Convert MATH (Hendrycks) into SFT conversations (reasoning apart from the answer) and eval records.

Scope: ``{"problem", "solution", "answer"?, "level", "type"|"subject", "unique_id"?}`` JSONL (the
merged per-problem files of the full MATH release and the MATH-500 split). When ``answer`` is
missing it is taken from the last ``\\boxed{}`` of the solution.

Output kinds (``--kind``):
- ``sft`` (default): MiniMind ``{"conversations": [{"role": "user", "content": problem},
  {"role": "assistant", "reasoning_content": <solution>, "content": "The answer is $\\boxed{X}$."}]}``.
  The solution keeps its own ``\\boxed{}`` (it is the natural last step); the ``content`` line
  repeats the answer boxed so that ``evaluation.math_answer.extract_boxed`` finds it whether or
  not the thinking part is shown, and the line matches the GSM8K converter's wording.
  ``--inline`` puts solution and answer line together in ``content``.
- ``alpaca``: ``{"instruction", "input", "output"}`` with the reasoning inline (LLaMA-Factory).
- ``eval``: ``{"id", "problem", "answer", "subject", "level" (int or None), "solution"}``.

Reference: Hendrycks et al., "Measuring Mathematical Problem Solving With the MATH Dataset", 2021.
Run ``python -m dataset.convert.math --help``. Always through ``-m``: running this file by path
would put ``dataset/convert/`` on ``sys.path`` and this module would shadow the standard ``math``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterator

from dataset.convert._io import DataError, iter_records, require, write_converted
from evaluation.math_answer import extract_boxed

__all__ = ["parse_level", "read_math", "to_sft", "to_alpaca", "to_eval", "convert_file", "ANSWER_TEMPLATE"]

ANSWER_TEMPLATE = "The answer is $\\boxed{{{answer}}}$."


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
    final = ANSWER_TEMPLATE.format(answer=item["answer"])
    assistant: dict = {"role": "assistant"}
    if inline:
        assistant["content"] = f"{item['solution']}\n{final}"
    else:
        assistant["reasoning_content"] = item["solution"]
        assistant["content"] = final
    return {"conversations": [{"role": "user", "content": item["problem"]}, assistant]}


def to_alpaca(item: dict) -> dict:
    """Alpaca row with the reasoning inline."""
    return {"instruction": item["problem"], "input": "",
            "output": f"{item['solution']}\n{ANSWER_TEMPLATE.format(answer=item['answer'])}"}


def to_eval(item: dict) -> dict:
    """Scoring record for ``evaluation.math_answer``; subject and level feed per-category reports."""
    return {"id": item["id"], "problem": item["problem"], "answer": item["answer"],
            "subject": item["subject"], "level": item["level"], "solution": item["solution"]}


def convert_file(src: str | Path, out: str | Path, kind: str = "sft", inline: bool = False,
                 split: str | None = None, dataset_info: str | Path | None = None,
                 name: str | None = None, skip_empty: bool = True) -> int:
    """Convert one MATH file; returns the number of records written.

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dataset.convert.math",
        description="Convert MATH {problem, solution, answer, level, type} JSONL into MiniMind SFT "
                    "conversations (reasoning_content = solution, content = 'The answer is "
                    "$\\boxed{X}$.'), alpaca rows, or eval records {id, problem, answer, subject, level}.")
    p.add_argument("--src", required=True, help="MATH .jsonl file (e.g. ../shared/data/math/test.jsonl)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--kind", choices=["sft", "alpaca", "eval"], default="sft",
                   help="sft: MiniMind conversations; alpaca: instruction/input/output; "
                        "eval: scoring records (default: sft)")
    p.add_argument("--inline", action="store_true",
                   help="sft only: solution and answer line together in content")
    p.add_argument("--keep-empty", action="store_true",
                   help="keep training items whose boxed answer is empty (dropped by default)")
    p.add_argument("--split", help="split name used in ids when a record has no unique_id")
    p.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json to create or update")
    p.add_argument("--name", help="registry name (default: math_<stem>_<kind>)")
    args = p.parse_args(argv)
    n = convert_file(args.src, args.out, args.kind, args.inline, args.split, args.dataset_info,
                     args.name, skip_empty=not args.keep_empty)
    print(f"wrote {n} records to {args.out}")


if __name__ == "__main__":
    from model.errors import run_cli
    run_cli(main)
