"""scripts/check_lm_eval.py's comparison: lm-evaluation-harness's multiple-choice scores against
log-probs computed by a plain forward of the same model, choice by choice.

Scope: the questions (two-number sums, four choices that carry their leading space), the
reference log-probs with lm-eval's tokenisation rule for causal models (context + continuation
encoded whole, split after the context's tokens; lm_eval.api.model.TemplateLM._encode_pair), and
`compare`, which says whether lm-eval scored the text we mean and the same numbers (within
TOLERANCE). Needs no lm-eval itself: `compare` reads the samples `simple_evaluate(log_samples=True)`
returns ({"arguments": [(context, continuation), ...], "filtered_resps": [(loglik, greedy), ...]}).
"""
from __future__ import annotations

import random

import torch

TOLERANCE = 1e-4


def context_of(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def make_questions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        right = a + b
        wrong = rng.sample([x for x in range(right - 5, right + 6) if x != right and x > 0], 3)
        choices = [f" {x}" for x in [right] + wrong]
        rng.shuffle(choices)
        docs.append({"question": f"{a} + {b} = ?", "choices": choices,
                     "label": choices.index(f" {right}")})
    return docs


@torch.no_grad()
def reference_logprobs(model, tokenizer, docs: list[dict]) -> list[list[dict]]:
    """Per question, per choice: the summed log-prob of the choice after the context by a plain
    forward, with lm-eval's tokenisation rule for causal models (context + choice encoded whole,
    split after the context's tokens); plus what an off-by-one position (each token scored by the
    logits of the position before) and a doubled space would have given instead."""
    out = []
    for doc in docs:
        context = context_of(doc)
        ctx = tokenizer.encode(context)
        rows = []
        for choice in doc["choices"]:
            scores = {}
            for name, text in (("logprob", choice), ("doubled_space", " " + choice)):
                whole = tokenizer.encode(context + text)
                n = len(ctx)
                logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
                cont = whole[n:]
                scores[name] = sum(float(logp[n + i - 1, t]) for i, t in enumerate(cont))
                if name == "logprob":
                    scores["clean_split"] = whole[:n] == ctx
                    scores["off_by_one"] = sum(float(logp[n + i - 2, t]) for i, t in enumerate(cont))
            rows.append(scores)
        out.append(rows)
    return out


def compare(docs: list[dict], samples: list[dict], ref: list[list[dict]], delimiter: str) -> dict:
    """Choice by choice: the text lm-eval scored against ours, and its log-prob against ours."""
    rows, text_diffs = [], 0
    for doc, sample, ours in zip(docs, samples, ref):
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        for (context, continuation), choice in zip(sample["arguments"], doc["choices"]):
            text_diffs += (context, continuation) != (context_of(doc), choice)
        diffs = [abs(a - b["logprob"]) for a, b in zip(theirs, ours)]
        rows.append({"question": doc["question"], "gold": doc["label"],
                     "lm_eval": max(range(len(theirs)), key=theirs.__getitem__),
                     "ours": max(range(len(ours)), key=lambda i: ours[i]["logprob"]),
                     "theirs": theirs, "max_diff": max(diffs)})
    flat = [c for q in ref for c in q]
    return {"rows": rows, "text_diffs": text_diffs, "max_diff": max(r["max_diff"] for r in rows),
            "unclean_splits": sum(not c["clean_split"] for c in flat),
            "min_off_by_one": min(abs(c["logprob"] - c["off_by_one"]) for c in flat),
            "min_doubled_space": min(abs(c["logprob"] - c["doubled_space"]) for c in flat),
            "mean_logprob": sum(c["logprob"] for c in flat) / len(flat), "delimiter": delimiter}
