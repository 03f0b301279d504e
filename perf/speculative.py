"""Speculative decoding (model/speculative.py) against plain decoding and transformers' assisted
generation, in one run (``scripts/bench.py --only spec``).

1. A trained pair on held-out prompts (``--spec_target``, ``--spec_draft``, ``--spec_prompts``;
   by default the quickstart's ``out/quickstart/{sft,distill}/final`` and ``data/test.jsonl``):
   batch-1 greedy answers (chat template, up to ``<|im_end|>``), end to end with the prefill, by
   ours plain (static step), ours with the draft model, ours with prompt lookup, and
   transformers on the same weights (exported with ``convert.hf.export_hf``): plain,
   ``assistant_model`` and ``prompt_lookup_num_tokens``; upstream MiniMind's plain decode with
   ``--upstream``. Every variant's tokens are checked against ours plain (``same_tokens``); ours
   report the acceptance rate, transformers' the tokens per target forward (counted by a hook).
2. The cost model at minimind2-small (fp32, random weights: no trained pair of that size is
   needed for timing): one target forward over 1 + k tokens against a one-token step, and a
   draft step of a smaller model (``demo`` preset with the same vocabulary). With acceptance rate
   a, a round yields (1 - a^(k+1)) / (1 - a) tokens for the cost of one verify and k draft steps;
   the implied speed-up over plain decoding is printed for a few a. This says which factor bounds
   the speed-up where no trained pair is at hand.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from model.config import MiniMindConfig
from model.fast_decode import PackedWeights, StaticDecoder, decode_step
from model.generate import SamplingParams, generate_tokens
from model.model import MiniMindLM
from model.speculative import Speculation
from perf.common import best_time

QUICKSTART = Path("out/quickstart")


def _held_out_prompts(path: Path, tokenizer, n: int) -> list[list[int]]:
    from dataset.chat import generation_prompt_ids

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    questions = [r.get("question") or r.get("prompt") or r["text"] for r in rows]
    return [generation_prompt_ids(tokenizer, [{"role": "user", "content": q}], False, 768)
            for q in questions]


def _hf_model(model: MiniMindLM, tmp: Path, name: str, tokenizer_dir: Path):
    from transformers import AutoModelForCausalLM

    from convert.hf import export_hf

    export_hf(model, tmp / name, tokenizer_dir=tokenizer_dir)
    return AutoModelForCausalLM.from_pretrained(tmp / name, dtype=torch.float32).eval()


def bench_pair(target_dir: str, draft_dir: str, prompts_path: str, n_prompts: int, new: int,
               draft_tokens: int, lookup: int, upstream_dir: str, repeat: int) -> list[dict]:
    from inference import load_for_inference

    target_dir = target_dir or str(QUICKSTART / "sft" / "final")
    draft_dir = draft_dir or str(QUICKSTART / "distill" / "final")
    prompts_path = prompts_path or str(QUICKSTART / "data" / "test.jsonl")
    missing = [p for p in (target_dir, draft_dir, prompts_path) if not Path(p).exists()]
    if missing:
        print(f"  trained pair skipped: {', '.join(missing)} not found (run scripts/quickstart.py, "
              "or pass --spec_target/--spec_draft/--spec_prompts)")
        return []
    target, tokenizer = load_for_inference(target_dir, device="cpu", dtype="fp32")
    draft, _ = load_for_inference(draft_dir, device="cpu", dtype="fp32")
    prompts = _held_out_prompts(Path(prompts_path), tokenizer, n_prompts)
    params = SamplingParams(max_new_tokens=new)
    stop = params.stop_token_ids[0]
    specs = {f"ours + draft model k={draft_tokens}": Speculation(draft_model=draft,
                                                                 draft_tokens=draft_tokens),
             f"ours + prompt lookup {lookup}": Speculation(prompt_lookup=lookup)}

    def ours(spec):  # each variant answers prompt i
        return lambda i: [s[0] for s in generate_tokens(target, [prompts[i]], params,
                                                        speculation=spec) if s[0] is not None]

    variants = {"ours static step": ours(None), **{k: ours(s) for k, s in specs.items()}}
    forwards = {"n": 0}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            hf = _hf_model(target, Path(tmp), "target", Path(target_dir))
            hf_draft = _hf_model(draft, Path(tmp), "draft", Path(target_dir))
        except ImportError as e:
            print(f"  transformers skipped: {e}")
            hf = None
    if hf is not None:
        hf.register_forward_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))

        def hf_run(**kw):
            def run(i):
                ids = torch.tensor([prompts[i]])
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  do_sample=False, eos_token_id=stop, pad_token_id=0, **kw)
                return out[0, ids.shape[1]:].tolist()
            return run

        variants["transformers"] = hf_run()
        variants["transformers assistant_model"] = hf_run(assistant_model=hf_draft)
        variants[f"transformers prompt_lookup_num_tokens={lookup}"] = hf_run(
            prompt_lookup_num_tokens=lookup)
    reference = [variants["ours static step"](i) for i in range(len(prompts))]
    if upstream_dir:
        from perf.speed import load_upstream, upstream_greedy

        up = load_upstream(upstream_dir, target)
        if up is not None:  # upstream's loop has no stop token: as many tokens as ours made
            variants["upstream MiniMind"] = lambda i: upstream_greedy(
                up, torch.tensor([prompts[i]]), len(reference[i]))[0].tolist()
    tokens = sum(len(r) for r in reference)
    same, per_forward, stats = {}, {}, {}
    for name, run in variants.items():  # a warm-up pass that also checks the tokens and counts
        spec = specs.get(name)
        if spec is not None:
            spec.stats = type(spec.stats)()
        forwards["n"] = 0
        t0 = time.perf_counter()
        same[name] = [run(i) for i in range(len(prompts))] == reference
        print(f"  {name}: first pass {time.perf_counter() - t0:.1f} s", flush=True)
        if spec is not None:
            stats[name] = spec.stats
        if name.startswith("transformers"):
            # the prefill is one forward per prompt, as in ours (not counted there)
            per_forward[name] = tokens / max(forwards["n"] - len(prompts), 1)
    # Each prompt is answered by every variant in turn, and each (variant, prompt) keeps its best
    # of ``repeat`` rounds: load changes on the shared machine hit all variants alike.
    per_prompt = {name: [float("inf")] * len(prompts) for name in variants}
    for _ in range(repeat):
        for i in range(len(prompts)):
            for name, run in variants.items():
                t0 = time.perf_counter()
                run(i)
                per_prompt[name][i] = min(per_prompt[name][i], time.perf_counter() - t0)
    best = {name: sum(t) for name, t in per_prompt.items()}
    rows = []
    plain = tokens / best["ours static step"]
    for name in variants:
        row = dict(bench=f"batch-1 greedy, {len(prompts)} held-out prompts, {tokens} tokens",
                   variant=name, tokens_per_s=tokens / best[name], same_tokens=same[name],
                   vs_ours_plain=tokens / best[name] / plain)
        if name in stats:
            row.update(acceptance_rate=stats[name].acceptance_rate,
                       tokens_per_target_forward=stats[name].tokens_per_forward)
        if name in per_forward:
            row["tokens_per_target_forward"] = per_forward[name]
        rows.append(row)
    for r in rows:
        for ref in ("transformers", "upstream MiniMind"):
            if ref in variants and r["variant"].startswith("ours"):
                r[f"vs_{ref.split()[0]}"] = r["tokens_per_s"] / (tokens / best[ref])
    if hf is not None:
        for r in rows:
            if r["variant"].startswith("ours + draft"):
                r["vs_transformers_assisted"] = r["tokens_per_s"] / (
                    tokens / best["transformers assistant_model"])
            if r["variant"].startswith("ours + prompt lookup"):
                r["vs_transformers_lookup"] = r["tokens_per_s"] / (
                    tokens / best[f"transformers prompt_lookup_num_tokens={lookup}"])
    return rows + _batched(target, prompts, params, specs, reference, repeat)


def _batched(target, prompts, params, specs, reference, repeat) -> list[dict]:
    """The same prompts as one batch (what the runner does): whether speculating batched pays,
    which decides the server's batch-1 speculation."""
    from model.generate import generate

    variants = {"ours static step": None, **specs}
    best = {name: float("inf") for name in variants}
    same = {}
    for r in range(repeat + 1):  # the first round warms up and checks the tokens
        for name, spec in variants.items():
            t0 = time.perf_counter()
            out = [g.token_ids for g in generate(target, None, prompts, params, speculation=spec)]
            if r == 0:
                same[name] = out == reference
            else:
                best[name] = min(best[name], time.perf_counter() - t0)
    tokens = sum(len(r) for r in reference)
    plain = tokens / best["ours static step"]
    return [dict(bench=f"batch-{len(prompts)} greedy, the same prompts", variant=name,
                 tokens_per_s=tokens / best[name], same_tokens=same[name],
                 vs_ours_plain=tokens / best[name] / plain) for name in variants]


@torch.no_grad()  # not inference mode: packed weights track the parameters' version counters
def bench_cost_model(quick: bool, ks=(1, 2, 4, 8)) -> list[dict]:
    """At minimind2-small: a verify forward over 1 + k tokens and a ``demo``-sized draft step,
    both as multiples of one target step, and the speed-ups they imply."""
    cfg = MiniMindConfig.from_preset("minimind2-small")
    torch.manual_seed(0)
    target = MiniMindLM(cfg).eval()
    draft = MiniMindLM(MiniMindConfig.from_preset("demo", vocab_size=cfg.vocab_size)).eval()
    reps = 10 if quick else 30
    pos = 200  # a mid-length answer: the cache holds 200 positions

    def step(model, S):
        dec = StaticDecoder(model, 1, pos + 16)
        packed = PackedWeights.for_model(model)
        tokens = torch.randint(10, 6000, (1, S))
        p = torch.tensor([pos])
        return lambda: decode_step(model, dec.cache.k, dec.cache.v,
                                   tokens if S > 1 else tokens[:, 0], p, packed)

    shapes = {("target", 1 + k): step(target, 1 + k) for k in (0, *ks)}
    shapes[("draft", 1)] = step(draft, 1)
    best = {key: float("inf") for key in shapes}
    for _ in range(reps):  # interleaved rounds, best of each: load changes hit all alike
        for key, fn in shapes.items():
            best[key] = min(best[key], best_time(fn, 1, warmup=0))
    base = best[("target", 1)]
    draft_ratio = best[("draft", 1)] / base
    rows = [dict(bench="cost model minimind2-small fp32, batch 1", variant="one-token step",
                 step_ms=1e3 * base, draft_step_vs_target=draft_ratio)]
    for k in ks:
        c = best[("target", 1 + k)] / base
        row = dict(bench="cost model minimind2-small fp32, batch 1", variant=f"verify 1+{k} tokens",
                   verify_vs_step=c)
        for a in (0.5, 0.7, 0.9):
            per_round = (1 - a ** (k + 1)) / (1 - a)
            row[f"speedup_draft_a{a}"] = per_round / (c + k * draft_ratio)
            row[f"speedup_lookup_a{a}"] = per_round / c
        rows.append(row)
    return rows


def bench_speculative(args) -> list[dict]:
    rows = bench_pair(args.spec_target, args.spec_draft, args.spec_prompts,
                      n_prompts=6 if args.quick else 10, new=128, draft_tokens=args.spec_k,
                      lookup=args.spec_lookup, upstream_dir=args.upstream,
                      repeat=1 if args.quick else 2)
    return rows + bench_cost_model(args.quick)
