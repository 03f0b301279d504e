"""CLI: convert MATH (Hendrycks) into SFT conversations, alpaca rows or eval records.

A thin entry point: the format, the records and their registry entry are ``evaluation/math.py``
(MATH's one home, next to its prompt and scorer); this file only parses the command line.
Run ``python -m dataset.convert.math --help``. Always through ``-m``: running this file by path
would put ``dataset/convert/`` on ``sys.path`` and this module would shadow the standard ``math``.
"""
from __future__ import annotations

import argparse

from evaluation.math import convert_file


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
    from common.errors import run_cli
    run_cli(main)
