"""Black-box distillation, step 1: a teacher model answers prompts; the answers become SFT data.

    python scripts/generate_sft_data.py --teacher out/sft_big/final --prompts prompts.jsonl \
        --out data/distilled_sft.jsonl --max_new_tokens 256 --temperature 0.7 --num_samples 2
    python train_full_sft.py --init_from out/pretrain_small/final --data_path data/distilled_sft.jsonl

Unlike white-box distillation (train_distillation.py) only the teacher's text is used, so teacher
and student may have different tokenizers and architectures.

Prompt file (JSONL, .json array or .txt, one prompt per record), any of:
  {"conversations": [...]}            everything before the last assistant turn is the prompt
                                      (system prompts and earlier turns kept; MiniMind SFT/DPO data)
  {"prompt": "..."} / {"question": "..."} / {"instruction": "...", "input": "..."} (Alpaca)
  a line of a .txt file
Output: MiniMind SFT JSONL, {"conversations": [prompt messages..., {"role": "assistant", ...}]}.
Answers cut by --max_new_tokens are dropped (a student should not learn to stop mid-sentence)
unless --keep_truncated; answers containing ChatML control strings are always dropped.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

from common.atomic import atomic_path
from common.errors import UserError
from dataset.chat import RESERVED_STRINGS
from dataset.jsonl import iter_records
from inference import load_for_inference
from model.generate import SamplingParams, generate
from model.precision import DTYPE_CHOICES
from model.tokenizer import Tokenizer

Message = dict[str, Any]


def prompt_messages(data: Any) -> list[Message]:
    """The prompt of one record as chat messages; ValueError (→ 'file:line: ...') if there is none."""
    if isinstance(data, dict) and "text" in data and len(data) == 1:   # a .txt line
        data = {"prompt": data["text"]}
    if not isinstance(data, dict):
        raise ValueError(f"expected an object, got {type(data).__name__}")
    if "conversations" in data:
        msgs = data["conversations"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ValueError("'conversations' must be a list of {role, content} messages")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        msgs = [dict(m) for m in msgs[:last]]   # earlier turns keep tool calls / reasoning
        if not msgs or msgs[-1]["role"] not in ("user", "tool"):
            raise ValueError("no user turn before the last assistant turn")
        return msgs
    for key in ("prompt", "question", "instruction"):
        if isinstance(data.get(key), str) and data[key].strip():
            text = data[key] + (f"\n\n{data['input']}" if key == "instruction" and data.get("input") else "")
            return [{"role": "user", "content": text}]
    raise ValueError("no prompt: expected 'conversations', 'prompt', 'question' or 'instruction'")


# <|im_end|>, <|reserved_12|>, ...: control tokens would be re-tokenized as control tokens and
# could forge chat turns in the student's data.
CONTROL_TOKEN = re.compile(r"<\|[^|<>\s]*\|>")


def usable(text: str, finish_reason: str, keep_truncated: bool) -> bool:
    """Whether a generated answer may become a training target.

    Rejected: empty answers, control tokens, and U+FFFD (bytes that do not form UTF-8: the
    teacher produced a broken character).
    """
    if not text.strip() or "\ufffd" in text or CONTROL_TOKEN.search(text):
        return False
    if any(s in text for s in RESERVED_STRINGS):
        return False
    return finish_reason == "stop" or keep_truncated


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher model folder (config.json + model.safetensors)")
    p.add_argument("--prompts", required=True, nargs="+", help="prompt files")
    p.add_argument("--out", required=True, help="output SFT JSONL")
    p.add_argument("--tokenizer_dir", default="", help="teacher's tokenizer ('' = the shipped default)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--num_samples", type=int, default=1, help="answers per prompt (needs temperature > 0)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts generated together")
    p.add_argument("--max_prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    p.add_argument("--keep_truncated", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="teacher weights' dtype (auto = bf16 where the hardware runs it natively, "
                        "else fp32)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    if args.num_samples > 1 and args.temperature == 0:
        raise UserError("--num_samples > 1 with greedy decoding gives identical answers; set --temperature")
    tokenizer = Tokenizer.from_dir(args.tokenizer_dir or None)
    teacher, _ = load_for_inference(args.teacher, device=args.device, dtype=args.dtype)

    read = lambda obj: {"messages": prompt_messages(obj)}  # noqa: E731  (errors get file:line)
    prompts = [rec.data["messages"] for path in args.prompts for rec in iter_records(path, validate=read)]
    if args.max_prompts:
        prompts = prompts[:args.max_prompts]
    jobs = [(i, k) for i in range(len(prompts)) for k in range(args.num_samples)]
    counts = {"prompts": len(prompts), "generated": 0, "kept": 0, "truncated": 0, "rejected": 0}
    with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start:start + args.batch_size]
            ids = [tokenizer.encode(tokenizer.apply_chat_template(prompts[i], add_generation_prompt=True))
                   for i, _ in chunk]
            params = [SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                     args.repetition_penalty, seed=args.seed + 1000 * i + k,
                                     stop_token_ids=(tokenizer.eos_id,)) for i, k in chunk]
            for (i, _), gen in zip(chunk, generate(teacher, tokenizer, ids, params)):
                counts["generated"] += 1
                counts["truncated"] += gen.finish_reason != "stop"
                if not usable(gen.text, gen.finish_reason, args.keep_truncated):
                    counts["rejected"] += 1
                    continue
                record = {"conversations": prompts[i] + [{"role": "assistant", "content": gen.text.strip()}]}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["kept"] += 1
            print(f"[generate] {min(start + args.batch_size, len(jobs))}/{len(jobs)}", flush=True)
    print(f"[done] {counts} -> {Path(args.out)}", flush=True)
    return counts


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
