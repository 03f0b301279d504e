"""GRPO step anatomy: rollout tokens/s, update tokens/s and the share of step time in generation.

One GRPO step = a rollout (prompts x G completions in one batched KV-cache decode, the
`trainer.rollout.sample_groups` the stage runs) + the update (forward with grad over prompt+completion,
CISPO loss, backward, AdamW step). Also times the same rollout decoded row by row, to show what
batching across G x prompts buys. All figures come from the same process, side by side (the
machine may be shared: compare the ratios, not the absolute numbers).

    python scripts/bench_grpo.py                               # demo-small, 8 prompts x G 8, 128 tokens
    python scripts/bench_grpo.py --init_from out/sft/final --prompts 4 --group_size 16
    python scripts/bench_grpo.py --quick                       # tiny model, a few seconds
"""
from __future__ import annotations

import argparse
import time

import torch

from model.config import MiniMindConfig
from model.generate import SamplingParams, generate_tokens
from model.model import MiniMindLM
from model.precision import resolve_precision
from model.tokenizer import Tokenizer
from trainer import grpo
from trainer.loop import make_autocast
from trainer.losses import token_logps
from trainer.rollout import group_advantages, sample_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--init_from", default="", help="model folder ('' = a fresh --preset model)")
    ap.add_argument("--preset", default="demo-small")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 prompts x G 4, 32 tokens")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.prompts, args.group_size, args.max_new_tokens, args.steps = "tiny", 2, 4, 32, 2

    tok = Tokenizer.from_dir(args.init_from or None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.init_from:
        from model.io import load_pretrained
        model = load_pretrained(args.init_from)
    else:
        torch.manual_seed(0)
        model = MiniMindLM(MiniMindConfig.from_preset(args.preset, vocab_size=tok.vocab_size))
    model.to(device)
    precision = resolve_precision(args.dtype, device.type)
    autocast = make_autocast(device.type, precision.name)
    prompts = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Tom has {10 + i} apples and buys {3 + i} more. How many now?"}],
        add_generation_prompt=True)) for i in range(args.prompts)]
    # A fresh model rarely emits the stop token: every row then runs the full budget, which is
    # the worst case for the batch (no row finishes early).
    s = grpo.GRPOSettings("cispo", group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                          eps_low=1.0, eps_high=4.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    gen_s = upd_s = loop_s = 0.0
    gen_tok = upd_tok = 0
    for step in range(args.steps + 1):
        with autocast():
            ro = sample_groups(model, prompts, s.rollout, seed=step * 10_000, stop_ids=[tok.eos_id],
                               pad_id=tok.pad_id)
        ids, mask = ro.input_ids.to(device), ro.action_mask.to(device)
        rewards = torch.tensor([float(len(c) % 2) for c in ro.completions])   # any non-flat signal
        adv, _ = group_advantages(rewards, args.group_size)
        t0 = time.perf_counter()
        model.train()
        with autocast():
            logps = token_logps(model(input_ids=ids).logits, ids)
            loss, _ = grpo.policy_loss(logps, logps.detach(), adv.to(device), mask, s)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_upd = time.perf_counter() - t0
        if step == 0:
            continue            # warm-up
        gen_s, upd_s = gen_s + ro.seconds, upd_s + t_upd
        gen_tok += sum(len(c) for c in ro.completions)
        upd_tok += ids.numel()
        if step == 1:           # the same rows decoded one at a time: what batching buys
            t0 = time.perf_counter()
            with autocast():
                for k in range(len(prompts)):
                    sample_groups(model, prompts[k:k + 1], s.rollout, seed=step * 10_000 + k * args.group_size,
                                  stop_ids=[tok.eos_id], pad_id=tok.pad_id)
            per_group = time.perf_counter() - t0
            t0 = time.perf_counter()
            n_rows = min(4, len(prompts) * args.group_size)    # a sample of rows decoded alone
            with autocast():
                for k in range(n_rows):
                    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0,
                                            seed=k, stop_token_ids=(tok.eos_id,))
                    with torch.no_grad():
                        for _ in generate_tokens(model.eval(), prompts[:1], [params]):
                            pass
            loop_s = (time.perf_counter() - t0) / n_rows * len(prompts) * args.group_size
            batch_s = ro.seconds
            print(f"rollout of {len(prompts)} x {args.group_size} rows: batched {batch_s:.2f} s, "
                  f"one group at a time {per_group:.2f} s ({per_group / batch_s:.1f}x), "
                  f"one row at a time ~{loop_s:.2f} s ({loop_s / batch_s:.1f}x)")
    print(f"model {args.init_from or args.preset} ({sum(p.numel() for p in model.parameters()):,} params), "
          f"{device.type}, {precision.name}; {args.prompts} prompts x G {args.group_size}, "
          f"{args.max_new_tokens} new tokens, {args.steps} steps")
    print(f"rollout tok/s {gen_tok / gen_s:,.0f} | update tok/s {upd_tok / upd_s:,.0f} "
          f"(prompt + completion, fwd + bwd + AdamW) | generation share of step time "
          f"{gen_s / (gen_s + upd_s):.0%}")
