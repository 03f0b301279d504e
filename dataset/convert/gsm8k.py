"""Convert GSM8K into SFT conversations (reasoning kept apart from the answer) and eval records.

Scope: ``{"question", "answer"}`` JSONL as released by openai/grade-school-math (train, test,
test_socratic), where ``answer`` is a worked solution with ``<<a*b=c>>`` calculator annotations
and a final ``#### <number>`` line.

Output kinds (``--kind``):
- ``sft`` (default): MiniMind ``{"conversations": [{"role": "user", "content": question},
  {"role": "assistant", "reasoning_content": <worked solution>, "content": "The answer is 18."}]}``.
  Why split: MiniMind's chat template renders ``reasoning_content`` inside ``<think>...</think>``
  and ``content`` after it, so a model trained with thinking on learns to reason first and then
  state one short, machine-checkable line; ``evaluation.gsm8k`` reads "The answer is N"
  directly. The worked solution loses the calculator annotations (they teach a tool format the
  model never gets at inference) and the ``####`` line (the answer is in ``content``).
  ``--inline`` instead puts reasoning and the answer line together in ``content`` for models
  trained without thinking.
- ``alpaca``: ``{"instruction", "input", "output"}`` with the reasoning inline, for LLaMA-Factory.
- ``eval``: ``{"id", "question", "answer", "solution"}`` with the canonical gold number
  (``"1,080"`` -> ``"1080"``) for ``evaluation.gsm8k``.

Reference: Cobbe et al., "Training Verifiers to Solve Math Word Problems", 2021.
Run ``python -m dataset.convert.gsm8k --help``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterator

from dataset.convert._io import DataError, iter_records, require, write_converted
from evaluation.gsm8k import extract_gsm8k_gold

__all__ = ["strip_calculator", "split_solution", "read_gsm8k", "to_sft", "to_alpaca", "to_eval",
           "convert_file", "ANSWER_TEMPLATE"]

ANSWER_TEMPLATE = "The answer is {answer}."
_CALC_RE = re.compile(r"<<[^<>]*>>")


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: ``"$<<9*2=18>>18"`` -> ``"$18"``."""
    return _CALC_RE.sub("", text)


def split_solution(solution: str, where: str = "<solution>", keep_calculator: bool = False
                   ) -> tuple[str, str]:
    """``(reasoning, gold)``: the worked steps before ``####`` and the canonical gold number."""
    idx = solution.rfind("####")
    if idx < 0:
        raise DataError(f"{where}: answer has no '#### <number>' line")
    try:
        gold = extract_gsm8k_gold(solution)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    reasoning = solution[:idx].strip()
    if not keep_calculator:
        reasoning = strip_calculator(reasoning)
    return reasoning, gold


def read_gsm8k(path: str | Path, split: str | None = None, keep_calculator: bool = False
               ) -> Iterator[dict]:
    """Parsed items ``{"id", "question", "reasoning", "answer", "solution"}`` from a GSM8K file."""
    path = Path(path)
    split = split or path.name.split(".")[0]
    for index, (where, obj) in enumerate(iter_records(path)):
        question = require(obj, "question", where)
        solution = require(obj, "answer", where)
        reasoning, gold = split_solution(solution, where, keep_calculator)
        yield {"id": f"gsm8k/{split}/{index}", "question": question.strip(),
               "reasoning": reasoning, "answer": gold, "solution": solution}


def to_sft(item: dict, inline: bool = False) -> dict:
    """MiniMind SFT conversation (see module docstring for why reasoning is separate)."""
    final = ANSWER_TEMPLATE.format(answer=item["answer"])
    assistant: dict = {"role": "assistant"}
    if inline:
        assistant["content"] = f"{item['reasoning']}\n{final}"
    else:
        assistant["reasoning_content"] = item["reasoning"]
        assistant["content"] = final
    return {"conversations": [{"role": "user", "content": item["question"]}, assistant]}


def to_alpaca(item: dict) -> dict:
    """Alpaca row with the reasoning inline (LLaMA-Factory has no reasoning column)."""
    return {"instruction": item["question"], "input": "",
            "output": f"{item['reasoning']}\n{ANSWER_TEMPLATE.format(answer=item['answer'])}"}


def to_eval(item: dict) -> dict:
    """Scoring record: question and canonical gold number (solution kept for error analysis)."""
    return {"id": item["id"], "question": item["question"], "answer": item["answer"],
            "solution": item["solution"]}


def convert_file(src: str | Path, out: str | Path, kind: str = "sft", inline: bool = False,
                 keep_calculator: bool = False, split: str | None = None,
                 dataset_info: str | Path | None = None, name: str | None = None) -> int:
    """Convert one GSM8K file; returns the number of records written."""
    items = read_gsm8k(src, split, keep_calculator)
    stem = Path(src).name.split(".")[0]
    return write_converted(items, out, kind, inline, to_sft=to_sft, to_alpaca=to_alpaca,
                           to_eval=to_eval, dataset_info=dataset_info,
                           registry_name=name or f"gsm8k_{stem}_{kind}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dataset.convert.gsm8k",
        description="Convert GSM8K {question, answer} JSONL into MiniMind SFT conversations "
                    "(assistant reasoning_content = worked solution, content = 'The answer is N.'), "
                    "alpaca rows, or eval records {id, question, answer, solution}.")
    p.add_argument("--src", required=True, help="GSM8K .jsonl file (e.g. ../shared/data/gsm8k/train.jsonl)")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--kind", choices=["sft", "alpaca", "eval"], default="sft",
                   help="sft: MiniMind conversations; alpaca: instruction/input/output; "
                        "eval: scoring records (default: sft)")
    p.add_argument("--inline", action="store_true",
                   help="sft only: put the reasoning and the answer line together in content "
                        "instead of reasoning_content (for models trained without thinking)")
    p.add_argument("--keep-calculator", action="store_true",
                   help="keep the <<a*b=c>> calculator annotations in the reasoning")
    p.add_argument("--split", help="split name used in ids (default: the file stem)")
    p.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json to create or update")
    p.add_argument("--name", help="registry name (default: gsm8k_<stem>_<kind>)")
    args = p.parse_args(argv)
    n = convert_file(args.src, args.out, args.kind, args.inline, args.keep_calculator, args.split,
                     args.dataset_info, args.name)
    print(f"wrote {n} records to {args.out}")


if __name__ == "__main__":
    from model.errors import run_cli
    run_cli(main)
