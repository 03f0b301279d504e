"""Sampled evaluation and the paired comparison: pass@k and the sign test against brute-force
enumeration, item pairing, the `--samples` run on a tiny checkpoint, and the CLI's errors."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation.compare import (ComparisonError, compare_items, compare_reports, pass_at_k,
                                sampled_summary, sign_test)
from evaluation.report import read_items
from evaluation.runner import run_benchmarks
from model.config import MiniMindConfig
from model.generate import SamplingParams
from model.model import MiniMindLM
from model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_is_the_share_of_k_subsets_with_a_right_answer(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def brute_force_sign_p(before, after):
    """P(at least as many 'better' as observed) over every equally likely up/down assignment of
    the changed items."""
    changed = [a != b for a, b in zip(after, before)]
    better = sum(a > b for a, b in zip(after, before))
    m = sum(changed)
    outcomes = list(itertools.product((0, 1), repeat=m))
    return sum(sum(o) >= better for o in outcomes) / len(outcomes)


@pytest.mark.parametrize("seed", range(6))
def test_sign_test_matches_enumeration(seed):
    g = torch.Generator().manual_seed(seed)
    before = (torch.randint(0, 5, (14,), generator=g) / 4).tolist()
    after = (torch.randint(0, 5, (14,), generator=g) / 4).tolist()
    r = sign_test(before, after)
    assert r["better"] + r["worse"] + r["ties"] == 14
    assert r["p"] == pytest.approx(brute_force_sign_p(before, after))


def test_sign_test_edges():
    assert sign_test([0.5] * 4, [0.5] * 4) == {"better": 0, "worse": 0, "ties": 4, "p": 1.0}
    assert sign_test([0] * 10, [1] * 10)["p"] == pytest.approx(2 ** -10)
    assert sign_test([1] * 10, [0] * 10)["p"] == 1.0
    with pytest.raises(ValueError):
        sign_test([0, 1], [1])


def rows(prompts, correct, samples=1):
    """Sampled-report rows: `correct[i]` is the list of item i's outcomes."""
    return [{"item": i, "sample": j, "prompt": p, "correct": c[j]}
            for j in range(samples) for i, (p, c) in enumerate(zip(prompts, correct))]


def test_sampled_summary_and_paired_comparison_group_by_item():
    prompts = ["q0", "q1", "q2"]
    before = rows(prompts, [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], samples=4)
    after = rows(prompts, [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], samples=4)
    s = sampled_summary(before)
    assert s["samples"] == 4 and s["items"] == 3
    assert s["mean_at_n"] == pytest.approx(3 / 12)
    assert s["pass_at_k"]["1"] == pytest.approx(3 / 12)
    assert s["pass_at_k"]["4"] == pytest.approx(2 / 3)
    r = compare_items(before, after)
    assert (r["better"], r["worse"], r["ties"]) == (2, 0, 1)
    assert r["before"] == pytest.approx(3 / 12) and r["after"] == pytest.approx(5 / 12)
    assert r["p"] == pytest.approx(0.25)
    with pytest.raises(ComparisonError, match="item 1 differs"):
        compare_items(before, rows(["q0", "other", "q2"], [[1]] * 3))
    with pytest.raises(ValueError, match="unevenly"):
        sampled_summary(before[:-1])


def test_sampled_benchmark_run_answers_each_item_n_times(tmp_path):
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny")).eval()
    tok = Tokenizer.from_dir()
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"})
                            + "\n" for i in range(3)))
    out = tmp_path / "sampled"
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=5)
    summary = run_benchmarks(model, tok, ["gsm8k"], out, {"gsm8k": data}, batch_size=2,
                             params=params, samples=3, log=None)["gsm8k"]
    items = read_items(out / "gsm8k.items.jsonl")
    assert len(items) == 9 and summary["n"] == 9
    assert sorted((it["item"], it["sample"]) for it in items) == [(i, j) for i in range(3)
                                                                   for j in range(3)]
    by_item = {}
    for it in items:
        by_item.setdefault(it["item"], []).append(it["prediction"])
    # different seeds per pass: a random tiny model at T = 1 does not repeat itself
    assert all(len(set(preds)) > 1 for preds in by_item.values())
    meta = summary["meta"]
    assert meta["samples"] == 3 and meta["items"] == 3
    assert meta["mean_at_n"] == pytest.approx(summary["accuracy"])
    # the same run again is the same report (seeded), and compares as all ties
    again = run_benchmarks(model, tok, ["gsm8k"], tmp_path / "again", {"gsm8k": data},
                           batch_size=3, params=params, samples=3, log=None)["gsm8k"]
    assert [it["prediction"] for it in read_items(tmp_path / "again" / "gsm8k.items.jsonl")] == \
        [it["prediction"] for it in items]
    assert compare_reports(out, tmp_path / "again")["ties"] == 3 == again["meta"]["items"]
    with pytest.raises(ValueError, match="temperature"):
        run_benchmarks(model, tok, ["gsm8k"], out, {"gsm8k": data},
                       params=SamplingParams(max_new_tokens=2), samples=2, log=None)


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "evaluation.compare", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_cli_compares_two_reports_and_errors_in_one_line(tmp_path):
    for name, outcome in (("a", [0, 0, 1]), ("b", [1, 1, 1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "gsm8k.items.jsonl").write_text("".join(
            json.dumps({"prompt": f"q{i}", "correct": bool(c)}) + "\n" for i, c in enumerate(outcome)))
    proc = run_module(str(tmp_path / "a"), str(tmp_path / "b"), "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (r["better"], r["worse"], r["p"]) == (2, 0, 0.25)
    proc = run_module(str(tmp_path / "a"), str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "missing: no such report" in proc.stderr
