"""CLI: convert the eight commonsense-reasoning sets into SFT data, alpaca rows or uniform
multiple-choice eval records (one file, or a whole LLM-Adapters tree).

A thin entry point: the source layouts, the records and their registry entries are
``evaluation/commonsense.py`` (the sets' one home, next to their prompt and scorers); this file
only parses the command line. Run ``python -m dataset.convert.commonsense --help``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.commonsense import KINDS, TASKS, convert_file, convert_tree


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dataset.convert.commonsense",
        description="Convert ARC-C/ARC-E/BoolQ/HellaSwag/OBQA/PIQA/SIQA/WinoGrande into MiniMind SFT "
                    "conversations, alpaca rows, or uniform multiple-choice eval records. With a "
                    "directory as --src (an LLM-Adapters tree), converts every <dataset>/<split>.json "
                    "into --out/<dataset>_<split>_{sft,eval}.jsonl plus dataset_info.json.")
    p.add_argument("--src", required=True, help="input file (.json/.jsonl, optionally .gz) or an "
                   "LLM-Adapters directory")
    p.add_argument("--out", required=True, help="output .jsonl file (or directory when --src is one)")
    p.add_argument("--kind", choices=sorted(KINDS), default="sft",
                   help="sft: MiniMind conversations; alpaca: instruction/input/output; "
                        "eval: uniform multiple-choice records (default: sft)")
    p.add_argument("--dataset", help=f"one of {', '.join(TASKS)} (default: inferred from the path)")
    p.add_argument("--split", help="split name used in record ids (default: from the file name)")
    p.add_argument("--src-format", choices=["auto", "llm_adapters", "mosaic", "original"],
                   default="auto", help="input layout (default: detected from the first record)")
    p.add_argument("--labels", help="PIQA only: the line-aligned *-labels.lst file")
    p.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json to create or update")
    p.add_argument("--name", help="registry name in dataset_info.json (default: <dataset>_<split>_<kind>)")
    args = p.parse_args(argv)
    src = Path(args.src)
    if src.is_dir():
        counts = convert_tree(src, args.out)
        for fname, n in counts.items():
            print(f"{n:7d}  {Path(args.out) / fname}")
        return
    n = convert_file(src, args.out, args.kind, args.dataset, args.split, args.src_format,
                     args.labels, args.dataset_info, args.name)
    print(f"wrote {n} records to {args.out}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
