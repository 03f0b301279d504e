"""transformers, PEFT and the openai client on a trained model, each against our own numbers.

    python scripts/check_ecosystem.py [--model DIR] [--only transformers,peft,openai]

The model is a trained one (evaluation/ecosystem.py: the quickstart's SFT model, else a tiny
model trained here once), so tokens, log-probs and greedy answers are sharp enough for a slip
to show. Per chat prompt:

- transformers: the export (convert.hf.export_hf) loaded by ``AutoModelForCausalLM`` /
  ``AutoTokenizer``: the same chat-template text and prompt tokens, logits within 1e-4, the same
  greedy answer from ``generate``.
- PEFT: a LoRA adapter trained here for a few steps (train_lora.py, PEFT format) loaded by
  ``PeftModel.from_pretrained`` on that export: logits within 1e-4 of our model with the adapter
  (and the adapter must move them, or the comparison says nothing).
- openai: the official client against our server (scripts/serve_openai_api.py's app, in
  process): the greedy chat answer equals our ``generate``, streamed equals non-streamed, and the
  answer tokens' log-probs equal a plain forward within 1e-4.

A missing package is reported as SKIPPED with what it leaves unchecked. Exit status: 1 if a
check failed, else 77 if one was skipped, else 0. The same comparisons on tiny random models run
in the suite (tests/test_hf_convert.py, test_peft_adapter.py, test_server.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common.errors import run_cli
from convert.hf import export_hf, find_tokenizer_dir
from dataset import synthetic
from evaluation.ecosystem import EXIT_SKIPPED, REPO, served, trained_model
from inference import load_for_inference
from model.generate import SamplingParams, generate
from serving.chat import parse_assistant_output
from serving.openai_api import stop_token_ids

TOLERANCE = 1e-4
NEW_TOKENS = 48
PROMPTS = ("Tom has 35 apples. Tom gets 12 more apples. How many apples does Tom have now?",
           "A shop sells 18 pens in the morning and 27 pens in the afternoon. How many pens does "
           "it sell in total?", "What is your name?")


def chat_ids(tok, prompt: str) -> tuple[str, list[int]]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return text, tok.encode(text)


def greedy(model, tok, ids: list[int]) -> list[int]:
    """Our greedy answer's tokens, the stop token cut."""
    stops = stop_token_ids(tok)
    out = generate(model, tok, [ids], SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=stops))
    return [t for t in out[0].token_ids if t not in stops]


@torch.no_grad()
def check_transformers(model, tok, folder: Path, work: Path) -> list[str]:
    """the transformers export's chat template, tokens, logits and greedy answers"""
    import transformers
    hf_dir = export_hf(model, work / "hf", tokenizer_dir=find_tokenizer_dir(folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    stops = list(stop_token_ids(tok))
    fails, worst = [], 0.0
    for prompt in PROMPTS:
        text, ids = chat_ids(tok, prompt)
        hf_text = hf_tok.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        if hf_text != text or hf_tok(text, add_special_tokens=False).input_ids != ids:
            fails.append(f"{prompt[:30]!r}: chat text or prompt tokens differ")
        x = torch.tensor([ids])
        worst = max(worst, float((hf(x).logits - model(x).logits).abs().max()))
        theirs = hf.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[-1])[0, len(ids):].tolist()
        theirs = [t for t in theirs if t not in stops]
        if theirs != greedy(model, tok, ids):
            fails.append(f"{prompt[:30]!r}: greedy answers differ")
    if worst > TOLERANCE:
        fails.append(f"logits differ by {worst:.2e}")
    return [f"transformers {transformers.__version__}: {len(PROMPTS)} prompts, same chat text and "
            f"tokens, same greedy answer ({NEW_TOKENS} tokens max), max |logit diff| {worst:.2e}",
            *fails]


@torch.no_grad()
def check_peft(model, tok, folder: Path, work: Path) -> list[str]:
    """our LoRA adapter loaded by PEFT on the transformers export"""
    import peft
    import transformers
    data = synthetic.write_jsonl(synthetic.sft_conversations(64, seed=1), work / "sft.jsonl")
    adapter = work / "lora"
    subprocess.run([sys.executable, "train_lora.py", "--init_from", str(folder), "--data_path",
                    str(data), "--out_dir", str(adapter), "--lora_rank", "8", "--lora_target", "all",
                    "--max_steps", "20", "--lr", "5e-3", "--batch_size", "8", "--seq_len", "128",
                    "--dtype", "fp32", "--no-progress", "--no-plot", "--log_every", "10"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    hf_dir = work / "hf"
    if not hf_dir.is_dir():
        export_hf(model, hf_dir, tokenizer_dir=find_tokenizer_dir(folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    wrapped = peft.PeftModel.from_pretrained(hf, str(adapter / "final")).eval()
    ours = load_for_inference(folder, adapter / "final", device="cpu", dtype="fp32")[0]
    worst = moved = 0.0
    for prompt in PROMPTS:
        x = torch.tensor([chat_ids(tok, prompt)[1]])
        adapted = wrapped(x).logits
        worst = max(worst, float((adapted - ours(x).logits).abs().max()))
        moved = max(moved, float((adapted - model(x).logits).abs().max()))
    fails = [f"logits differ by {worst:.2e}"] if worst > TOLERANCE else []
    if moved < 1e-3:
        fails.append(f"the adapter moves the logits by only {moved:.1e}: nothing was compared")
    return [f"peft {peft.__version__}: a LoRA adapter (rank 8, 20 steps) moves the logits by up to "
            f"{moved:.3f}; PeftModel against ours: max |logit diff| {worst:.2e}", *fails]


@torch.no_grad()
def check_openai(model, tok, folder: Path, work: Path) -> list[str]:
    """the openai client against our server: answers, streaming, log-probs"""
    import openai
    fails, worst, n_tokens = [], 0.0, 0
    with served(model, tok) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt in PROMPTS:
            msgs = [{"role": "user", "content": prompt}]
            ids = chat_ids(tok, prompt)[1]
            answer = greedy(model, tok, ids)
            expected = parse_assistant_output(tok.decode(answer)).content
            resp = client.chat.completions.create(model="forge", messages=msgs, temperature=0,
                                                  max_tokens=NEW_TOKENS, logprobs=True)
            stream = client.chat.completions.create(model="forge", messages=msgs, temperature=0,
                                                    max_tokens=NEW_TOKENS, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            got = resp.choices[0].message.content
            if got != expected or streamed != got:
                fails.append(f"{prompt[:30]!r}: server {got!r}, streamed {streamed!r}, ours {expected!r}")
            # the answer tokens' log-probs from one plain forward of prompt + answer
            logp = model(torch.tensor([ids + answer])).logits[0].float().log_softmax(-1)
            ref = [float(logp[len(ids) + i - 1, t]) for i, t in enumerate(answer)]
            served_lp = [e.logprob for e in resp.choices[0].logprobs.content][: len(ref)]
            if len(served_lp) != len(ref):
                fails.append(f"{prompt[:30]!r}: {len(served_lp)} log-probs for {len(ref)} tokens")
            worst = max([worst] + [abs(a - b) for a, b in zip(served_lp, ref)])
            n_tokens += len(ref)
    if worst > TOLERANCE:
        fails.append(f"log-probs differ by {worst:.2e}")
    return [f"openai {openai.__version__}: {len(PROMPTS)} chats, greedy answers equal ours, streamed "
            f"equal to non-streamed; {n_tokens} answer-token log-probs within {worst:.2e} of a "
            "plain forward", *fails]


CHECKS = {"transformers": (check_transformers, ("transformers",)),
          "peft": (check_peft, ("transformers", "peft")), "openai": (check_openai, ("openai",))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="model folder (default: the quickstart's SFT model, else a tiny trained one)")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    if unknown := sorted(set(names) - set(CHECKS)):
        ap.error(f"--only: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    folder, how = trained_model(args.model)
    print(f"[check] model {folder} ({how})", flush=True)
    model, tok = load_for_inference(folder, device="cpu", dtype="fp32")
    failed = skipped = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            fn, packages = CHECKS[name]
            missing = [p for p in packages if importlib.util.find_spec(p) is None]
            if missing:
                print(f"SKIPPED {name}: {', '.join(missing)} not installed (pip install "
                      f"{' '.join(missing)}); not checked: {fn.__doc__}", flush=True)
                skipped = True
                continue
            summary, *fails = fn(model, tok, folder, Path(tmp))
            failed |= bool(fails)
            print(f"{'FAILED' if fails else 'PASSED'} {name}: {summary}"
                  + "".join(f"\n  - {f}" for f in fails), flush=True)
    if failed or skipped:
        raise SystemExit(1 if failed else EXIT_SKIPPED)


if __name__ == "__main__":
    run_cli(main)
