"""Sampled accuracy (mean@n, pass@k) and a paired test of two evaluations on the same items.

    python -m evaluation.compare BEFORE AFTER     # report folders or <name>.items.jsonl files

Why paired: two models scored on the same 200 problems differ mostly on a few of them, and which
problems those are is what carries the evidence. An unpaired comparison of two accuracies throws
that away (its noise is the spread over the whole set); a paired one asks only "of the problems
whose score changed, did more go up than down?" - the sign test (Dixon & Mood, 1946), exact under
the null hypothesis that a change is as likely up as down.

With ``eval_model.py --samples n`` every item is answered n times at the sampling temperature and
its score is the fraction right (its mean@n), so the test sees small shifts in how often a
problem is solved, not only flips of one greedy answer.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

from common.errors import UserError
from evaluation.report import read_items

__all__ = ["pass_at_k", "per_item_scores", "sampled_summary", "sign_test", "compare_items",
           "compare_reports"]


class ComparisonError(UserError, ValueError):
    """Two evaluations that cannot be paired (different items), or a missing report."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are right (Chen et al., 2021,
    "Evaluating Large Language Models Trained on Code", eq. 1): 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def per_item_scores(results: Sequence[dict]) -> tuple[list[str], list[float], list[int]]:
    """Group results by item (the ``item`` field of a sampled evaluation, else one result per
    item): the items' prompts, their fraction right, and their number of samples."""
    groups: dict[int, list[dict]] = {}
    for i, r in enumerate(results):
        groups.setdefault(int(r.get("item", i)), []).append(r)
    keys = sorted(groups)
    prompts = [str(groups[k][0].get("prompt", k)) for k in keys]
    counts = [len(groups[k]) for k in keys]
    scores = [sum(bool(r["correct"]) for r in groups[k]) / len(groups[k]) for k in keys]
    return prompts, scores, counts


def sampled_summary(results: Sequence[dict]) -> dict:
    """Summary fields of a sampled evaluation: samples per item, mean@n and pass@k for the powers
    of two up to n (each item's estimate averaged over items)."""
    _, scores, counts = per_item_scores(results)
    n = min(counts)
    if n != max(counts):
        raise ValueError(f"items were sampled unevenly ({n} to {max(counts)} times)")
    right = [round(s * n) for s in scores]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if k <= n})
    return {"samples": n, "items": len(scores), "mean_at_n": sum(scores) / len(scores),
            "pass_at_k": {str(k): sum(pass_at_k(n, c, k) for c in right) / len(right) for k in ks}}


def sign_test(before: Sequence[float], after: Sequence[float]) -> dict:
    """One-sided exact sign test that ``after`` beats ``before`` item by item.

    Ties are dropped (the usual convention); p = P(X >= better) for X ~ Binomial(better + worse,
    1/2). Returns ``{"better", "worse", "ties", "p"}``.
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} scores before but {len(after)} after")
    better = sum(a > b for a, b in zip(after, before))
    worse = sum(a < b for a, b in zip(after, before))
    m = better + worse
    p = sum(math.comb(m, i) for i in range(better, m + 1)) / 2 ** m
    return {"better": better, "worse": worse, "ties": len(before) - m, "p": p}


def compare_items(before: Sequence[dict], after: Sequence[dict],
                  names: tuple[str, str] = ("before", "after")) -> dict:
    """Mean score of each side and the sign test, after checking both scored the same items."""
    prompts_a, a, _ = per_item_scores(before)
    prompts_b, b, _ = per_item_scores(after)
    if len(a) != len(b):
        raise ComparisonError(f"{names[0]} has {len(a)} items but {names[1]} has {len(b)}")
    for i, (pa, pb) in enumerate(zip(prompts_a, prompts_b)):
        if pa != pb:
            raise ComparisonError(f"item {i} differs between {names[0]} and {names[1]} "
                                  "(the evaluations must score the same items in the same order)")
    return {"items": len(a), "before": sum(a) / len(a), "after": sum(b) / len(b),
            **sign_test(a, b)}


def _items_file(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("*.items.jsonl"))
        if len(found) != 1:
            raise ComparisonError(f"{path}: expected one *.items.jsonl report, found {len(found)}")
        return found[0]
    if not path.exists():
        raise ComparisonError(f"{path}: no such report")
    return path


def compare_reports(before: str | Path, after: str | Path) -> dict:
    """``compare_items`` over two reports written by ``eval_model.py --bench`` (a folder with one
    ``*.items.jsonl`` or the file itself)."""
    fa, fb = _items_file(Path(before)), _items_file(Path(after))
    return compare_items(read_items(fa), read_items(fb), (str(fa), str(fb)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("before", help="report folder or .items.jsonl of the baseline")
    ap.add_argument("after", help="report folder or .items.jsonl of the candidate")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    r = compare_reports(args.before, args.after)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['items']} items: mean score {r['before']:.4f} -> {r['after']:.4f}; "
          f"{r['better']} better, {r['worse']} worse, {r['ties']} tied; "
          f"one-sided sign test p = {r['p']:.3g}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
