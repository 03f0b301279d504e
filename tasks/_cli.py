"""The command line every task module shares: ``python -m tasks.<name> convert ...``.

Scope: the parser and the options common to the three converters (source, output, record kind,
LLaMA-Factory registry); each task adds its own options and calls its ``convert_file``.
"""
from __future__ import annotations

import argparse


def convert_parser(name: str, description: str, src_help: str,
                   out_help: str = "output .jsonl file",
                   eval_help: str = "scoring records") -> tuple[argparse.ArgumentParser,
                                                                argparse.ArgumentParser]:
    """(the task's parser, its ``convert`` subcommand's parser with the common options)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}",
                                     description=f"The {name} benchmark's data.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", description=description,
                             help="convert the source release into SFT, alpaca or eval records")
    convert.add_argument("--src", required=True, help=src_help)
    convert.add_argument("--out", required=True, help=out_help)
    convert.add_argument("--kind", choices=["sft", "alpaca", "eval"], default="sft",
                         help="sft: MiniMind conversations; alpaca: instruction/input/output; "
                              f"eval: {eval_help} (default: sft)")
    convert.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json to create or update")
    return parser, convert
