r"""Load our GGUF exports in llama.cpp itself and compare its greedy tokens and logits with ours.

    python scripts/check_gguf_llamacpp.py                    # a trained model + each architecture
    python scripts/check_gguf_llamacpp.py --model out/sft/final --model out/sft_moe/final
    python scripts/check_gguf_llamacpp.py --outtype f32,f16,q8_0,q4_0,q4_k_m [--limit 50]

Needs llama-cpp-python (``pip install llama-cpp-python``: it compiles llama.cpp, 10-30 minutes
on two cores), so it is kept out of the test suite; tests/test_gguf.py checks the file's names,
shapes and values with the gguf package's reader instead. Without it the script exits 77
(skipped) and says what was not checked.

For each model: export with ``convert.gguf.export_gguf``, tokenize a prompt both ways, run greedy
decoding both ways (llama.cpp: one ``eval`` per token, argmax of its fp32 logits, no sampler),
and report the first differing step and the largest logit difference over the prompt.

Without ``--model`` the first row is a trained model (evaluation/ecosystem.py: the quickstart's
SFT model, else a tiny one trained here once), exported with its own tokenizer. The other rows
are tiny random models, one per llama.cpp architecture we export (MoE, MLA, ...): they check each
architecture's maths, not a trained model's tokenizer or the answer a user would read. Their
norms are perturbed away from 1 (a dropped RMSNorm would show) and their weights scaled up so the
logits are peaked: near-ties would make token agreement a coin toss.

``--outtype`` (quantized mode) takes the trained model (or the first ``--model``) and its
held-out problems (``--data``; default the ``data/test.jsonl`` of the run the model comes from,
as the quickstart lays it out), exports it at each type and reports per type: held-out accuracy
through llama.cpp against our fp32 model's (greedy, the same chat prompts and GSM8K answer
extraction: evaluation.runner.run_task), greedy agreement with our fp32 tokens, and decode tok/s
at batch 1 of llama.cpp next to ours (the static-cache step), in one run
(evaluation/llama_cpp_parity.py). It fails when a prompt is tokenized differently, when the f32
file's answers are not our tokens (at least 99 % of problems whole: fp32 sums in another order
may flip a near-tie), when the file's chat template, rendered by llama-cpp-python, is not our
prompt text, or when a type's accuracy falls more than ``--max_drop`` points below ours.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common.errors import UserError, run_cli
from convert.gguf import OUTTYPES, check_outtype, export_gguf, gguf_arch
from evaluation import llama_cpp_parity as parity
from evaluation.ecosystem import skip, trained_model
from evaluation.runner import run_task
from inference import load_for_inference
from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import Tokenizer

PROMPT = "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n"
_MLA = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            num_key_value_heads=4, first_k_dense_replace=1, n_shared_experts=2)
# name → overrides of the "tiny" preset (one per llama.cpp architecture we export)
CASES = {
    "qwen3 (dense, QK-norm)": dict(qk_norm=True),
    "llama (dense)": dict(tie_word_embeddings=False),
    "qwen3moe": dict(qk_norm=True, use_moe=True, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=96),
    "llama MoE (Mixtral)": dict(use_moe=True, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=96),
    "qwen2moe": dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_gate=True, shared_expert_intermediate_size=48,
                     attention_bias=True, norm_topk_prob=False),
    "deepseek2 (V2-Lite shape)": dict(_MLA, norm_topk_prob=False),
    "deepseek2 (V3: q-LoRA, sigmoid + bias, groups)": dict(
        _MLA, q_lora_rank=24, topk_method="noaux_tc", n_group=2, topk_group=1,
        routed_scaling_factor=2.5),
}


def tiny_model(overrides: dict, seed: int = 0) -> MiniMindLM:
    torch.manual_seed(seed)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
            elif p.ndim >= 2:
                p.mul_(3.0)   # peaked logits: greedy choices with clear margins
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.1)   # the aux-free bias changes the choice
    return model


@torch.no_grad()
def our_run(model: MiniMindLM, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """(greedy continuation, fp32 logits over the prompt) from our model, no KV cache."""
    x = torch.tensor([ids])
    prompt_logits = model(x).logits[0].float()
    out = []
    for _ in range(steps):
        nxt = int(model(x).logits[0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out, prompt_logits


def llama_cpp_run(path: Path, ids: list[int], steps: int, threads: int
                  ) -> tuple[list[int], torch.Tensor, list[int]]:
    """(greedy continuation, logits over the prompt, llama.cpp's tokens of PROMPT)."""
    from llama_cpp import Llama
    # f32 KV cache (ggml type 0): llama.cpp's default f16 cache alone moves the logits by ~1e-3
    llm = Llama(model_path=str(path), n_ctx=len(ids) + steps + 8, logits_all=True, verbose=False,
                n_threads=threads, n_batch=512, type_k=0, type_v=0)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    prompt_logits = torch.tensor(llm.scores[: len(ids)]).float()
    out = []
    for _ in range(steps):
        nxt = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        out.append(nxt)
        llm.eval([nxt])
    llm.close()
    return out, prompt_logits, tokens


def check(name: str, model: MiniMindLM, tok: Tokenizer, tok_dir: Path | None, steps: int,
          threads: int, work: Path) -> dict:
    path = export_gguf(model, work / f"{len(list(work.iterdir()))}.gguf", tokenizer_dir=tok_dir)
    ids = tok.encode(PROMPT)
    ours, our_logits = our_run(model, ids, steps)
    try:
        theirs, their_logits, their_ids = llama_cpp_run(path, ids, steps, threads)
    except ValueError as e:   # llama.cpp refused the file (its log says why: rerun with -v)
        return {"model": name, "arch": gguf_arch(model.config), "tokenizer": False,
                "same": False, "first_diff": f"load failed: {e}", "steps": steps,
                "max_logit_diff": float("nan")}
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return {"model": name, "arch": gguf_arch(model.config), "tokenizer": their_ids == ids,
            "same": differ is None, "first_diff": differ, "steps": steps,
            "max_logit_diff": float((our_logits[:, : their_logits.shape[1]] - their_logits).abs().max())}


def held_out(folder: Path, data: str | None) -> Path:
    run = folder.resolve().parents[1] if len(folder.resolve().parents) > 1 else folder
    path = Path(data) if data else run / "data" / "test.jsonl"   # <run>/sft/final → <run>/data
    if not path.is_file():
        raise UserError(f"{path}: no held-out problems there; pass --data test.jsonl "
                        "(GSM8K-style records: question, answer)")
    return path


def quantized(folder: Path, outtypes: list[str], args: argparse.Namespace, work: Path
              ) -> list[str]:
    """The quantized mode's table; returns what failed (see the module docstring)."""
    from llama_cpp import Llama

    from tasks import gsm8k
    model, tok = load_for_inference(folder, device="cpu", dtype="fp32")
    tok_dir = folder if (folder / "tokenizer.json").is_file() else None
    data = held_out(folder, args.data)
    items = gsm8k.load(data, args.limit)
    budget = args.max_new_tokens or max(len(tok.encode(it["answer"])) for it in gsm8k.load(data)) + 16
    torch.set_num_threads(args.threads)
    print(f"[check] {len(items)} held-out problems from {data}, up to {budget} new tokens, "
          f"{args.threads} threads", flush=True)
    ref = parity.Decoded()
    res = run_task("gsm8k", items, tok, parity.ours(model, tok, budget, ref), batch_size=1)
    ours_acc = parity.accuracy(res)
    answers = {it["question"]: r["prediction"] for it, r in zip(items, res)}
    print(f"| type | tensors | file MB | held-out accuracy | same answers as our fp32 | tokens "
          f"agreeing | same prompt tokens | llama.cpp tok/s | ours (fp32) tok/s |\n"
          f"|---|---|---|---|---|---|---|---|---|\n"
          f"| ours, fp32 (PyTorch) | | | {ours_acc:.1%} | | | | | {ref.tok_per_s:.0f} |", flush=True)
    failed = []
    for outtype in outtypes:
        path = export_gguf(model, work / f"{outtype}.gguf", tokenizer_dir=tok_dir, outtype=outtype)
        longest = max(map(len, ref.prompt_ids.values()))
        # f32 KV cache (ggml type 0) for every type: the rows then differ by the weights alone
        llm = Llama(model_path=str(path), n_ctx=longest + budget + 8, verbose=False,
                    n_threads=args.threads, n_batch=512, type_k=0, type_v=0)
        rec = parity.Decoded()
        acc = parity.accuracy(run_task("gsm8k", items, tok, parity.llama_cpp(
            llm, model.config.eos_token_id, budget, rec), batch_size=1))
        if outtype == outtypes[0]:
            chat = parity.chat_path(llm, tok, items[:args.chat_checks], answers, budget)
        llm.close()
        agree = parity.agreement(ref, rec)
        n = agree["n"]
        print(f"| {outtype} | {parity.tensor_types(path)} | {path.stat().st_size / 1e6:.2f} "
              f"| {acc:.1%} | {agree['same_answers']}/{n} | {agree['token_agreement']:.1%} "
              f"| {agree['same_prompt_tokens']}/{n} | {rec.tok_per_s:.0f} | {ref.tok_per_s:.0f} |",
              flush=True)
        if agree["same_prompt_tokens"] != n:
            failed.append(f"{outtype}: llama.cpp tokenized {n - agree['same_prompt_tokens']} "
                          "prompts differently")
        if ours_acc - acc > args.max_drop / 100:
            failed.append(f"{outtype}: accuracy {acc:.1%}, more than {args.max_drop} points "
                          f"below ours ({ours_acc:.1%})")
        if outtype == "f32" and agree["same_answers"] < 0.99 * n:
            failed.append(f"f32: our tokens on only {agree['same_answers']}/{n} answers")
    print(f"[check] {outtypes[0]} through llama-cpp-python's chat API (the file's chat template, "
          f"rendered by its Jinja formatter): prompt text equal to our template's on "
          f"{chat['same_prompt']}/{chat['n']}, greedy answer text equal to ours on "
          f"{chat['same_answer']}/{chat['n']}", flush=True)
    if chat["same_prompt"] != chat["n"]:
        failed.append("the file's chat template renders another prompt than ours")
    print(f"[check] ours: {ref.decode_tokens} decode tokens; tok/s counts the tokens after the "
          "first of each answer over their time, batch 1, from Python on both sides; noisy on "
          "a shared machine", flush=True)
    return failed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="append", default=[],
                   help="our model folder (repeatable); default: a trained model, then a tiny "
                        "random model per architecture")
    p.add_argument("--steps", type=int, default=24, help="greedy tokens to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--outtype", help="quantized mode: comma-separated GGUF types to check on "
                                     f"held-out problems ({', '.join(OUTTYPES)})")
    p.add_argument("--data", help="quantized mode: held-out problems (default: the data/test.jsonl "
                                  "of the model's run)")
    p.add_argument("--limit", type=int, help="quantized mode: the first N problems only")
    p.add_argument("--max_new_tokens", type=int,
                   help="quantized mode: answer budget (default: the longest answer + 16)")
    p.add_argument("--chat_checks", type=int, default=5,
                   help="quantized mode: problems sent through llama-cpp-python's chat API with "
                        "the file's own template (first type only)")
    p.add_argument("--max_drop", type=float, default=100.0,
                   help="quantized mode: fail when a type's accuracy is more than this many "
                        "points below ours (default 100: reported, not gated)")
    args = p.parse_args(argv)
    outtypes = [t.strip().lower() for t in (args.outtype or "").split(",") if t.strip()]
    for t in outtypes:
        check_outtype(t)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        skip("llama-cpp-python", "pip install llama-cpp-python (compiles llama.cpp)",
             "our GGUF exports in llama.cpp (tokens, greedy decoding, logits; with --outtype "
             "the held-out accuracy, agreement and speed per type)")
    if outtypes:
        folder, how = trained_model(args.model[0] if args.model else None)
        print(f"[check] model {folder} ({how}), quantized: {', '.join(outtypes)}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            failed = quantized(Path(folder), outtypes, args, Path(tmp))
        if failed:
            print("FAILED: " + "; ".join(failed), file=sys.stderr)
            sys.exit(1)
        return
    rows = []
    folders = args.model
    if not folders:
        folder, how = trained_model(None)
        print(f"[check] model {folder} ({how}), then random-weight models per architecture")
        folders = [str(folder)]
    with tempfile.TemporaryDirectory() as tmp:
        for folder in folders:
            model, tok = load_for_inference(folder, device="cpu", dtype="fp32")
            has_tok = (Path(folder) / "tokenizer.json").is_file()
            rows.append(check(folder, model, tok, Path(folder) if has_tok else None,
                              args.steps, args.threads, Path(tmp)))
        if not args.model:
            tok = Tokenizer.from_dir()
            for name, overrides in CASES.items():
                rows.append(check(f"{name}, random weights", tiny_model(overrides), tok, None,
                                  args.steps, args.threads, Path(tmp)))
    print(f"| model | llama.cpp arch | same prompt tokens | greedy tokens equal ({args.steps}) "
          "| max abs logit diff (prompt) |")
    print("|---|---|---|---|---|")
    for r in rows:
        same = "yes" if r["same"] else f"no (first differs at {r['first_diff']})"
        print(f"| {r['model']} | {r['arch']} | {'yes' if r['tokenizer'] else 'NO'} | {same} "
              f"| {r['max_logit_diff']:.2e} |")
    if not all(r["same"] and r["tokenizer"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
