"""CLI: convert GSM8K into SFT conversations, alpaca rows or eval records.

A thin entry point: the format, the records and their registry entry are ``evaluation/gsm8k.py``
(GSM8K's one home, next to its prompt and scorer); this file only parses the command line.
Run ``python -m dataset.convert.gsm8k --help``.
"""
from __future__ import annotations

import argparse

from evaluation.gsm8k import convert_file


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
    from common.errors import run_cli
    run_cli(main)
