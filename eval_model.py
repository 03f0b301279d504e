"""Chat with a checkpoint, or run benchmarks on it.

    python eval_model.py --model out/sft                       # interactive, streaming, history
    python eval_model.py --model out/sft --prompt "2+3=?"      # one answer, then exit
    python eval_model.py --model out/sft --draft_model out/student   # speculative decoding
    python eval_model.py --model out/sft --bench gsm8k,ppl --limit 100 --out out/eval \
        --data gsm8k=gsm8k/test.jsonl --data ppl=wikitext2_raw/wiki.test.raw

Sizes come from the checkpoint's config.json; the tokenizer from the folder if it has one, else
the shipped default. Interactive commands: /reset (forget the conversation), /exit. Speed
(tokens/s, prefill included) goes to stderr after each answer, so stdout holds only the text.
Chat samples (temperature 0.85, top-p 0.85) unless told otherwise; benchmarks decode greedily.
Speculative decoding (--draft_model or --prompt_lookup) gives the same greedy tokens and the same
sampling distribution, faster where proposals are accepted; its acceptance rate goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common.errors import UserError, run_cli
from dataset.chat import generation_prompt_ids
from evaluation.runner import BENCHMARKS, answer_text, parse_data_flags, resolve_data, run_benchmarks
from inference import load_for_inference, load_speculation
from model.generate import SamplingParams, TextStream, generate_tokens
from model.precision import DTYPE_CHOICES
from model.speculative import Speculation, SpeculationStats
from tools import default_registry, tool_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--lora", help="LoRA adapter folder, merged into the weights after loading")
    p.add_argument("--moe_backend", choices=["torch", "cpu", "kt"], default="torch",
                   help="where routed experts run (cpu/kt need offload/experts.py)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--think", action="store_true", help="let the model reason in <think> first")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    g = p.add_argument_group("sampling (chat default: 0.85 / 0.85; benchmarks: greedy)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top_p", type=float)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--max_new_tokens", type=int, help="default: 1024 chat, 512 benchmarks")
    g.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("speculative decoding (model/speculative.py; chat and benchmarks)")
    s.add_argument("--draft_model", help="a smaller model folder with the same tokenizer that "
                                         "proposes tokens the model verifies")
    s.add_argument("--draft_tokens", type=int, default=6,
                   help="most tokens the draft model proposes per target forward (fewer where it is unsure)")
    s.add_argument("--draft_p_min", type=float, default=0.5,
                   help="stop proposing where the draft's top probability is below this")
    s.add_argument("--prompt_lookup", type=int, default=0,
                   help="N > 0: propose N tokens by n-gram lookup in the prompt and the text so "
                        "far (no draft model)")
    b = p.add_argument_group("benchmarks")
    b.add_argument("--bench", help=f"comma-separated: {','.join(BENCHMARKS)}")
    b.add_argument("--data", action="append", default=[],
                   help="BENCH=PATH, the data of each --bench (repeatable; required); "
                        "a bare PATH applies to every benchmark")
    b.add_argument("--limit", type=int, help="score at most N items (per set for commonsense)")
    b.add_argument("--out", help="report folder (default: <model>/eval)")
    b.add_argument("--batch_size", type=int, default=8)
    b.add_argument("--samples", type=int, default=1,
                   help="answer each item N times (needs --temperature > 0): accuracy is then "
                        "mean@N, and the summary adds pass@k (evaluation/compare.py)")
    b.add_argument("--fewshot", type=int, default=0, help="GSM8K/MATH exemplars (held out)")
    b.add_argument("--tools", default="calculator,convert_units,lookup",
                   help="the built-in tools --bench toolcall offers (their list is part of every "
                        "prompt); 'none' offers none: the model answers in its head")
    b.add_argument("--ppl_max_length", type=int, help="perplexity window (default: context)")
    b.add_argument("--ppl_stride", type=int, help="perplexity stride (default: window / 2)")
    args = p.parse_args(argv)
    try:
        default_registry(tool_names(args.tools))
    except ValueError as exc:
        raise UserError(f"--tools: {exc}") from None
    if args.samples < 1 or (args.samples > 1 and not (args.temperature or 0) > 0):
        raise UserError(f"--samples {args.samples}: needs >= 1, and --temperature > 0 when > 1 "
                        "(benchmarks decode greedily by default: every sample would be the same)")
    return args


def sampling(args: argparse.Namespace, bench: bool, seed: int) -> SamplingParams:
    chat = not bench
    return SamplingParams(
        max_new_tokens=args.max_new_tokens or (1024 if chat else 512),
        temperature=args.temperature if args.temperature is not None else (0.85 if chat else 0.0),
        top_p=args.top_p if args.top_p is not None else (0.85 if chat else 1.0),
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=seed)


def reply(model, tokenizer, messages: list[dict], params: SamplingParams, think: bool,
          speculation: Speculation | None = None) -> str:
    """Stream one answer to stdout; report tokens/s on stderr; return the full text."""
    budget = model.config.max_position_embeddings - min(params.max_new_tokens,
                                                        model.config.max_position_embeddings // 2)
    ids = generation_prompt_ids(tokenizer, messages, think, budget)
    text = TextStream(tokenizer, params.stop_strings, params.stop_token_ids)
    n, t0 = 0, time.perf_counter()
    if speculation is not None:
        speculation.stats = SpeculationStats()  # this answer's own figures
    for step in generate_tokens(model, [ids], [params], should_stop=lambda b: text.stopped,
                                speculation=speculation):
        if step[0] is None:
            continue
        n += 1
        if step[0] not in params.stop_token_ids:
            print(text.push(step[0]), end="", flush=True)
    print(text.flush(), flush=True)
    dt = time.perf_counter() - t0
    spec = f"; {speculation.stats.describe()}" if speculation is not None else ""
    print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s, prompt {len(ids)} tokens"
          f"{spec}]", file=sys.stderr, flush=True)
    return text.text


def chat(model, tokenizer, args: argparse.Namespace, system: list[dict],
         speculation: Speculation | None = None) -> None:
    """Multi-turn loop on stdin; the history keeps answers without their reasoning."""
    history: list[dict] = []
    turn = 0
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history, turn = [], 0
            print("(conversation reset)", flush=True)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        text = reply(model, tokenizer, system + history, sampling(args, False, args.seed + turn),
                     args.think, speculation)
        history.append({"role": "assistant", "content": answer_text(text).strip()})
        turn += 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.bench:  # a missing --data path fails here, before the model is loaded
        benches = [b.strip() for b in args.bench.split(",") if b.strip()]
        data = resolve_data(benches, parse_data_flags(args.data, benches))
    model, tokenizer = load_for_inference(args.model, args.lora, args.device, args.dtype,
                                          args.moe_backend)
    speculation = load_speculation(model, tokenizer, args.draft_model, args.prompt_lookup,
                                   args.draft_tokens, args.draft_p_min, args.device, args.dtype)
    if args.bench:
        out = Path(args.out) if args.out else Path(args.model) / "eval"
        run_benchmarks(model, tokenizer, benches, out, data,
                       limit=args.limit, batch_size=args.batch_size,
                       params=sampling(args, True, args.seed), enable_thinking=args.think,
                       system=args.system, fewshot=args.fewshot, seed=args.seed,
                       ppl_max_length=args.ppl_max_length, ppl_stride=args.ppl_stride,
                       samples=args.samples, speculation=speculation,
                       registry=default_registry(tool_names(args.tools)),
                       meta={"model": str(args.model), "lora": args.lora, "tools": args.tools,
                             "moe_backend": args.moe_backend, "draft_model": args.draft_model,
                             "prompt_lookup": args.prompt_lookup},
                       log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"reports written to {out}")
        return
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(model, tokenizer, system + [{"role": "user", "content": args.prompt}],
              sampling(args, False, args.seed), args.think, speculation)
    else:
        chat(model, tokenizer, args, system, speculation)


if __name__ == "__main__":
    run_cli(main)
