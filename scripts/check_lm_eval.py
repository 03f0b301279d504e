"""lm-evaluation-harness against our server: a local multiple-choice task through
``local-completions`` (``/v1/completions`` with ``echo`` + ``logprobs``), checked choice by choice
against log-probs computed independently by a plain forward of the same model.

    pip install --no-deps lm_eval==0.4.13 datasets dill sacrebleu portalocker tabulate colorama \
        lxml multiprocess aiohttp tenacity aiosignal frozenlist multidict yarl propcache \
        aiohappyeyeballs sqlitedict     # the rest (pyarrow, pandas, ...) comes with the project
    python scripts/check_lm_eval.py [--model DIR] [--questions 40]

The model is a trained one (evaluation/ecosystem.py: the quickstart's SFT model, else a tiny
model trained here once): on random weights every token costs about ln V, and a scored text that
differs by a space or a token moves the log-probs by less than the check could see.

What must hold: lm-eval scores exactly the text we mean ("Question: ...\nAnswer:" + " 47"; the
choices carry their leading space, so the task's target_delimiter is "" - lm-eval's default " "
scored "Answer:  47"), and every choice's summed log-prob equals the plain forward's within 1e-4
(an off-by-one position or another tokenisation moves it by far more: the script prints by how
much on this model). ``--target_delimiter " "`` reproduces the old doubled space: the check fails.
Without lm-eval installed it exits 77 (skipped), saying so. lm-eval is kept out of
requirements.txt and out of the test suite: it is heavy and needs nothing but this check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common.atomic import atomic_write_text
from convert.hf import find_tokenizer_dir
from evaluation.ecosystem import served, skip, trained_model
from evaluation.lm_eval_parity import TOLERANCE, compare, make_questions, reference_logprobs
from inference import load_for_inference

TASK = "forge_arith_mc"
INSTALL = "see the pip line in scripts/check_lm_eval.py (lm_eval==0.4.13 with --no-deps)"
TASK_YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
target_delimiter: "{{delimiter}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def report(res: dict, docs: list[dict], shown: int) -> bool:
    """Print the per-question table (the first `shown` rows and every failing one) and the
    verdict; True if everything held."""
    print("| # | question | gold | lm-eval pick | plain-forward pick | choice log-probs (lm-eval) "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for i, (r, doc) in enumerate(zip(res["rows"], docs)):
        if i < shown or r["max_diff"] > TOLERANCE or r["lm_eval"] != r["ours"]:
            lps = ", ".join(f"{doc['choices'][k].strip()}: {v:.4f}" for k, v in enumerate(r["theirs"]))
            print(f"| {i} | {r['question']} | {doc['choices'][r['gold']].strip()} "
                  f"| {doc['choices'][r['lm_eval']].strip()} | {doc['choices'][r['ours']].strip()} "
                  f"| {lps} | {r['max_diff']:.1e} |")
    n = len(res["rows"])
    agree = sum(r["lm_eval"] == r["ours"] for r in res["rows"])
    print(f"\nscored text: {n * 4 - res['text_diffs']}/{n * 4} choices as intended "
          f"(context + choice, target_delimiter {res['delimiter']!r}); same choice on {agree}/{n}; "
          f"max |log-prob diff| {res['max_diff']:.2e} (bar {TOLERANCE:g})")
    print(f"sensitivity on this model: mean choice log-prob {res['mean_logprob']:.3f}; scoring "
          f"one position off would move a choice by at least {res['min_off_by_one']:.3f}, a "
          f"doubled space by at least {res['min_doubled_space']:.3f}; tokenisation splits at the "
          f"context on {n * 4 - res['unclean_splits']}/{n * 4} choices")
    ok = res["text_diffs"] == 0 and res["max_diff"] <= TOLERANCE and agree == n
    print("PASSED" if ok else "FAILED: lm-eval did not score what a plain forward scores")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="model folder (default: the quickstart's SFT model, else a tiny trained one)")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--target_delimiter", default="",
                    help="the task's target_delimiter ('' because the choices start with a space; "
                         "' ' reproduces the doubled space the check must catch)")
    ap.add_argument("--show", type=int, default=8, help="table rows shown besides failing ones")
    args = ap.parse_args()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        skip("lm-eval", INSTALL, "lm-evaluation-harness through /v1/completions")

    folder, how = trained_model(args.model)
    print(f"[check] model {folder} ({how})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, tokenizer = load_for_inference(folder, device="cpu", dtype="fp32")
        docs = make_questions(args.questions)
        data = tmp / "questions.jsonl"
        atomic_write_text(data, "".join(json.dumps(d) + "\n" for d in docs))
        atomic_write_text(tmp / f"{TASK}.yaml", TASK_YAML.replace("{data}", str(data))
                          .replace("{delimiter}", args.target_delimiter))
        with served(model, tokenizer) as (url, engine):
            t0 = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=(f"model=forge,base_url={url}/v1/completions,"
                            f"tokenizer_backend=huggingface,tokenizer={find_tokenizer_dir(folder)},"
                            f"num_concurrent=8,max_retries=1,max_length="
                            f"{model.config.max_position_embeddings}"),
                tasks=[TASK], task_manager=TaskManager(include_path=str(tmp)),
                log_samples=True)
            wall = time.perf_counter() - t0
        samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
        ref = reference_logprobs(model, tokenizer, docs)
        res = compare(docs, samples, ref, args.target_delimiter)
        ours_acc = sum(r["ours"] == r["gold"] for r in res["rows"]) / len(docs)
        print(f"lm-eval {lm_eval.__version__} local-completions on {len(docs)} questions "
              f"({len(docs) * 4} loglikelihood requests) in {wall:.1f} s: acc "
              f"{results['results'][TASK]['acc,none']:.3f}; a plain forward: acc {ours_acc:.3f}; "
              f"engine {engine.stats_snapshot()['requests_finished']} requests\n")
        if not report(res, docs, args.show):
            raise SystemExit(1)


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
