"""Model-driven benchmark runners: every task of ``tasks`` by generation (GSM8K, MATH,
commonsense), commonsense by log-likelihood, perplexity; plus ``generation_accuracy`` for the
trainer's periodic evaluation.

Scope: everything between a loaded model and a report. Each benchmark's own parts (its data
files, prompt, answer extraction and scoring) live in its task module, which this asks by name
(``tasks.get(bench)``: ``load``, ``question``, ``exemplars``, ``score``, ``summarize``); for
perplexity ``evaluation.perplexity``; the four report files are ``evaluation.report``. Data paths
come from the caller (``eval_model.py --data BENCH=PATH``); nothing here knows where a data set
lives.

Design:
- The model is reached through one injected function, ``GenerateFn(prompts) -> completions``
  (``model_generate_fn`` builds the real one over ``model.generate.generate``), so scoring is
  testable with a fake that returns known answers, and an expert-offloaded model (``--moe_backend
  cpu|kt``) is evaluated by generation and accuracy exactly like a plain one: nothing here looks
  inside the model. (LLaMA-Factory's KT mode only reports eval loss.)
- Prompts are the chat template with the bare question as the user turn: that is what our SFT
  records train on (``tasks/gsm8k.py``: user = question, assistant = reasoning +
  "The answer is N."). Few-shot exemplars (off by default) are earlier user/assistant turns.
- Greedy decoding by default; items are generated longest prompt first in batches (less left
  padding) and put back in input order. With thinking on, answers are extracted from the text
  after ``</think>`` (a worked solution inside the think block may contain intermediate
  ``####``/``\\boxed`` the extractor would otherwise take for the answer).
- A wrong item whose generation hit ``max_new_tokens`` is reported as ``truncated``: the fix there
  is a larger budget, not a better model, and the report should say so.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import tasks
from common.errors import UserError
from evaluation.compare import sampled_summary
from evaluation.perplexity import continuation_logprobs, eval_mode, load_texts, perplexity
from evaluation.report import write_report
from model.generate import SamplingParams, generate
from model.speculative import Speculation, SpeculationStats
from tasks import commonsense
from tools import ToolRegistry

__all__ = [
    "Completion", "GenerateFn", "BENCHMARKS", "BenchmarkDataError", "UnknownBenchmarkError",
    "chat_prompt", "answer_text",
    "model_generate_fn", "run_generation", "run_task", "run_commonsense_loglik", "run_perplexity",
    "generation_accuracy",
    "parse_data_flags", "resolve_data", "run_benchmarks",
]

Message = dict[str, Any]
# The tasks by generation, then the runs that do not decode (commonsense_ll reads commonsense data).
BENCHMARKS = (*tasks.NAMES, "commonsense_ll", "ppl")


class BenchmarkDataError(UserError, FileNotFoundError):
    """A benchmark was asked for without its data (``--data BENCH=PATH``) or with a path that
    does not exist; one line on the command line, still a FileNotFoundError for library callers."""


class UnknownBenchmarkError(UserError, ValueError):
    """A ``--bench`` name that is not one of ``BENCHMARKS``."""


# ------------------------------------------------------------------------------------------
# Prompts and generation
# ------------------------------------------------------------------------------------------

def chat_prompt(tokenizer, question: str, system: str | None = None,
                exemplars: Sequence[Message] = (), enable_thinking: bool = False) -> str:
    """The chat template with ``question`` as the last user turn and the generation prompt."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages += list(exemplars) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def answer_text(text: str) -> str:
    """The part of a completion that holds the answer: after the last ``</think>`` if any."""
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


@dataclass
class Completion:
    """One generated answer: text (stop token excluded), token count, "stop" | "length"."""

    text: str
    n_tokens: int = 0
    finish_reason: str = "stop"


GenerateFn = Callable[[Sequence[str]], Sequence["Completion | str"]]


def model_generate_fn(model: torch.nn.Module, tokenizer, params: SamplingParams,
                      speculation: Speculation | None = None) -> GenerateFn:
    """A ``GenerateFn`` over ``model.generate.generate``: one batched call per list of prompts
    (speculative with ``speculation``: the same greedy answers, the same sampling distribution).

    With sampling, each prompt's seed is ``params.seed`` mixed with a hash of the prompt, so an
    item's sample does not depend on which batch it landed in. A prompt longer than the context
    minus the answer budget keeps its end (the question sits at the end of a chat prompt).
    """
    context = model.config.max_position_embeddings
    keep = max(1, context - min(params.max_new_tokens, context // 2))

    def fn(prompts: Sequence[str]) -> list[Completion]:
        ids = [tokenizer.encode(p)[-keep:] for p in prompts]
        per_row = [params if params.seed is None else
                   replace(params, seed=(params.seed + zlib.crc32(p.encode("utf-8"))) % 2**62)
                   for p in prompts]
        with eval_mode(model):
            gens = generate(model, tokenizer, ids, per_row, speculation=speculation)
        stops = set(params.stop_token_ids)
        return [Completion(g.text, sum(t not in stops for t in g.token_ids), g.finish_reason)
                for g in gens]
    return fn


def _as_completion(out: Completion | str) -> Completion:
    return out if isinstance(out, Completion) else Completion(str(out))


Scorer = Callable[[dict, str], dict]


def run_generation(items: Sequence[dict], prompts: Sequence[str], score: Scorer,
                   generate_fn: GenerateFn, batch_size: int = 8,
                   log: Callable[[str], None] | None = None) -> list[dict]:
    """Generate for every prompt (in batches, longest first) and score each completion.

    ``score(item, answer_text) -> {"id", "category", "extracted", "gold", "correct",
    "error_kind", ...}``; this adds ``prompt``, ``prediction`` (the full completion),
    ``n_generated_tokens``, ``finish_reason`` and ``truncated``. Results are in input order.
    """
    if len(items) != len(prompts):
        raise ValueError(f"{len(items)} items but {len(prompts)} prompts")
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    results: list[dict] = [{}] * len(items)
    start, done, correct = time.perf_counter(), 0, 0
    for b in range(0, len(order), max(1, batch_size)):
        chunk = order[b:b + max(1, batch_size)]
        outs = list(generate_fn([prompts[i] for i in chunk]))
        if len(outs) != len(chunk):
            raise ValueError(f"generate_fn returned {len(outs)} completions for {len(chunk)}")
        for i, out in zip(chunk, outs):
            c = _as_completion(out)
            row = dict(score(items[i], answer_text(c.text)))
            truncated = c.finish_reason == "length"
            if not row["correct"] and truncated:
                row["error_kind"] = "truncated"
            results[i] = {**row, "prompt": prompts[i], "prediction": c.text,
                          "n_generated_tokens": c.n_tokens, "finish_reason": c.finish_reason,
                          "truncated": truncated}
            correct += bool(row["correct"])
        done += len(chunk)
        if log:
            log(f"{done}/{len(items)} items, accuracy so far {correct / done:.3f}, "
                f"{done / (time.perf_counter() - start):.2f} items/s")
    return results


def run_task(name: str, items: Sequence[dict], tokenizer, generate_fn: GenerateFn, *,
             batch_size: int = 8, system: str | None = None, exemplars: Sequence[Message] = (),
             enable_thinking: bool = False, log: Callable[[str], None] | None = None,
             registry: ToolRegistry | None = None) -> list[dict]:
    """Score the items of task ``name`` (``tasks.NAMES``) by generation: the task's
    ``question(item)`` as the user turn after ``exemplars``, its ``score(item, answer)`` per
    completion; one result dict per item, in input order. ``registry``: the tools an agent task
    offers (default: every built-in one)."""
    task = tasks.get(name)
    if getattr(task, "AGENT", False):  # multi-turn: the task runs its own loop over generate_fn
        head: list[Message] = [{"role": "system", "content": system}] if system else []

        def render(messages: list[Message], tools: list[dict]) -> str:
            return tokenizer.apply_chat_template(head + messages, tools=tools,
                                                 add_generation_prompt=True,
                                                 enable_thinking=enable_thinking)
        return task.run_agent(items, render, generate_fn, batch_size=batch_size,
                              exemplars=exemplars, log=log, registry=registry)
    prompts = [chat_prompt(tokenizer, task.question(it), system, exemplars, enable_thinking)
               for it in items]
    return run_generation(items, prompts, task.score, generate_fn, batch_size, log)


def run_commonsense_loglik(records: Sequence[dict], model: torch.nn.Module, tokenizer, *,
                           batch_size: int = 8, method: str = "sum") -> list[dict]:
    """Multiple choice by log-likelihood of each choice (raw text, no chat template, as in
    lm-evaluation-harness). All continuations are scored up front in batches (one forward pass
    each), then ``score_loglik`` reads them from a table; ``method`` picks sum / token / char."""
    requests = list(dict.fromkeys(q for r in records for q in commonsense.loglik_requests(r)))
    table = dict(zip(requests, continuation_logprobs(model, tokenizer, requests, batch_size)))
    return commonsense.score_loglik(records, lambda ctx, cont: table[(ctx, cont)], method)


def run_perplexity(model: torch.nn.Module, tokenizer, path: str | Path, out_dir: str | Path,
                   max_length: int | None = None, stride: int | None = None,
                   batch_size: int = 4, name: str = "ppl", meta: dict | None = None) -> dict:
    """Perplexity of a text file; writes ``<name>.summary.json`` and ``<name>.md``."""
    texts = load_texts(path)
    t0 = time.perf_counter()
    res = perplexity(model, tokenizer, texts, max_length, stride, batch_size).to_dict()
    summary = {"name": name, "data": str(path), **res, "seconds": time.perf_counter() - t0,
               "meta": meta or {}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from model.io import atomic_write_bytes
    atomic_write_bytes(out / f"{name}.summary.json",
                       (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    md = [f"# Perplexity: {name}", "", f"- **data**: {path}", "", "| metric | value |",
          "|---|---:|", f"| perplexity | {res['ppl']:.4f} |",
          f"| mean NLL (nats/token) | {res['mean_nll']:.4f} |",
          f"| bits per byte | {res['bits_per_byte']:.4f} |", f"| tokens scored | {res['tokens']} |",
          f"| bytes | {res['bytes']} |", f"| windows | {res['windows']} "
          f"(length {res['max_length']}, stride {res['stride']}) |"]
    atomic_write_bytes(out / f"{name}.md", ("\n".join(md) + "\n").encode("utf-8"))
    return {**summary, "files": {"summary": f"{name}.summary.json", "markdown": f"{name}.md"}}


# ------------------------------------------------------------------------------------------
# During training
# ------------------------------------------------------------------------------------------

def generation_accuracy(model: torch.nn.Module, tokenizer, items: Sequence[dict],
                        max_new_tokens: int = 256, batch_size: int = 8,
                        enable_thinking: bool = False,
                        generate_fn: GenerateFn | None = None) -> dict:
    """GSM8K-style accuracy by greedy generation, for ``eval_steps`` inside a training run.

    Returns plain numbers to log: ``{"accuracy", "correct", "n", "no_answer", "truncated",
    "mean_answer_tokens"}``. The model's train/eval mode is restored afterwards.
    """
    fn = generate_fn or model_generate_fn(model, tokenizer,
                                          SamplingParams(max_new_tokens=max_new_tokens))
    res = run_task("gsm8k", items, tokenizer, fn, batch_size=batch_size,
                   enable_thinking=enable_thinking)
    n = len(res)
    correct = sum(r["correct"] for r in res)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n,
            "no_answer": sum(r["error_kind"] == "no_answer" for r in res),
            "truncated": sum(r["error_kind"] == "truncated" for r in res),
            "mean_answer_tokens": sum(r["n_generated_tokens"] for r in res) / n if n else 0.0}


# ------------------------------------------------------------------------------------------
# The benchmark driver behind ``eval_model.py --bench``
# ------------------------------------------------------------------------------------------

def parse_data_flags(entries: Sequence[str], benches: Sequence[str]) -> dict[str, str]:
    """``--data`` values: ``BENCH=PATH`` for one benchmark, a bare ``PATH`` for all of ``benches``."""
    data: dict[str, str] = {}
    for e in entries:
        name, sep, path = e.partition("=")
        if sep and name in BENCHMARKS:
            data[name] = path
        else:
            data.update({b: e for b in benches})
    return data


def resolve_data(benches: Sequence[str], data: dict[str, str | Path]) -> dict[str, Path]:
    """The data path of each of ``benches``, checked before any model work starts.

    ``commonsense_ll`` falls back to the ``commonsense`` entry (same records). Raises
    UnknownBenchmarkError for a name not in ``BENCHMARKS``, BenchmarkDataError naming the
    ``--data`` flag when a path is missing or does not exist.
    """
    unknown = [b for b in benches if b not in BENCHMARKS]
    if unknown:
        raise UnknownBenchmarkError(f"unknown benchmark {unknown[0]!r}; choose from "
                                    f"{', '.join(BENCHMARKS)}")
    paths: dict[str, Path] = {}
    for bench in benches:
        given = data.get(bench) or data.get("commonsense" if bench == "commonsense_ll" else "")
        if not given:
            raise BenchmarkDataError(f"{bench}: no data given; pass --data {bench}=PATH")
        path = Path(given)
        if not path.exists():
            raise BenchmarkDataError(f"{bench}: data not found at {path} (pass --data {bench}=PATH)")
        paths[bench] = path
    return paths


def _split_fewshot(items: list[dict], fewshot: int, limit: int | None
                   ) -> tuple[list[dict], list[dict]]:
    # Exemplars are held out of the scored items (they would be answered from the prompt).
    rest = items[fewshot:]
    return items[:fewshot], rest[:limit] if limit is not None else rest


def run_benchmarks(model: torch.nn.Module, tokenizer, benches: Sequence[str],
                   out_dir: str | Path, data: dict[str, str | Path] | None = None,
                   limit: int | None = None, batch_size: int = 8,
                   params: SamplingParams | None = None, enable_thinking: bool = False,
                   system: str | None = None, fewshot: int = 0, seed: int = 0,
                   ppl_max_length: int | None = None, ppl_stride: int | None = None,
                   meta: dict | None = None, log: Callable[[str], None] | None = print,
                   samples: int = 1, speculation: Speculation | None = None,
                   registry: ToolRegistry | None = None) -> dict[str, dict]:
    """Run each named benchmark (``BENCHMARKS``) and write its report into ``out_dir``.

    Returns ``{bench: summary}``. ``data`` maps each bench to its file or folder (see
    ``resolve_data``); ``limit`` caps scored items (per set for commonsense).

    ``samples`` > 1 (sampling only) answers each generation item that many times, pass j seeded
    ``params.seed + j``: the report holds every answer (tagged ``item`` and ``sample``), so its
    accuracy is mean@n, and the summary adds ``samples``, ``mean_at_n`` and ``pass_at_k``.

    ``speculation`` decodes speculatively; each generation summary then adds the benchmark's
    acceptance rate and tokens per target forward (``speculation``). ``registry``: the tools
    the agent benchmarks (toolcall) offer; default every built-in one.
    """
    paths = resolve_data(benches, data or {})
    params = params or SamplingParams(max_new_tokens=512, seed=seed)
    if samples < 1 or (samples > 1 and params.temperature <= 0):
        raise ValueError(f"samples={samples}: needs >= 1, and sampling (temperature > 0) when > 1")
    torch.manual_seed(seed)
    meta = {**(meta or {}), "seed": seed}
    # Decoding settings only where they matter (log-likelihood and perplexity do not decode).
    decoding = {"temperature": params.temperature, "top_p": params.top_p,
                "max_new_tokens": params.max_new_tokens, "thinking": enable_thinking}
    gen_fn = model_generate_fn(model, tokenizer, params, speculation)
    summaries: dict[str, dict] = {}
    for bench in benches:
        path = paths[bench]
        if log:
            log(f"[{bench}] {path}")
        common = dict(batch_size=batch_size, system=system, enable_thinking=enable_thinking,
                      log=log)
        extra: dict = {} if bench == "commonsense_ll" else dict(decoding)
        if bench == "ppl":
            summaries[bench] = run_perplexity(model, tokenizer, path, out_dir, ppl_max_length,
                                              ppl_stride, batch_size, meta=meta)
            if log:
                log(f"[ppl] perplexity {summaries[bench]['ppl']:.3f}, "
                    f"bits/byte {summaries[bench]['bits_per_byte']:.4f}")
            continue
        if bench in tasks.NAMES:
            task = tasks.get(bench)
            if task.FEWSHOT:
                extra["fewshot"] = fewshot
                wanted = None if limit is None else limit + fewshot  # read no more than is scored
                shots, items = _split_fewshot(task.load(path, wanted), fewshot, limit)
                exemplars = task.exemplars(shots)
            else:
                items, exemplars = task.load(path, limit), []
            run = partial(run_task, bench, items, tokenizer, exemplars=exemplars,
                          registry=registry, **common)
            if speculation is not None:
                speculation.stats = SpeculationStats()  # this benchmark's own figures
            results = run(gen_fn)
            if samples > 1:
                results = [{**r, "item": i, "sample": 0} for i, r in enumerate(results)]
                for j in range(1, samples):
                    fn = model_generate_fn(model, tokenizer, replace(
                        params, seed=None if params.seed is None else params.seed + j),
                        speculation)
                    results += [{**r, "item": i, "sample": j} for i, r in enumerate(run(fn))]
                extra.update(sampled_summary(results))
            extra.update(task.summarize(results))
            if speculation is not None:
                stats = speculation.stats
                extra["speculation"] = {"acceptance_rate": round(stats.acceptance_rate, 4),
                                        "tokens_per_forward": round(stats.tokens_per_forward, 3),
                                        "drafted": stats.drafted, "accepted": stats.accepted}
                if log:
                    log(f"[{bench}] {stats.describe()}")
        else:
            results = run_commonsense_loglik(commonsense.load(path, limit), model, tokenizer,
                                             batch_size=batch_size)
            n = max(len(results), 1)
            extra.update({f"accuracy_{k}_norm": sum(r[f"correct_{k}"] for r in results) / n
                          for k in ("token", "char")})
        summaries[bench] = write_report(results, out_dir, bench,
                                        {**meta, "data": str(path), **extra})
        if log:
            s = summaries[bench]
            log(f"[{bench}] accuracy {s['accuracy']:.4f} ({s['correct']}/{s['n']})")
    return summaries

