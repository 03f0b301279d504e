"""The quickstart pipeline end to end: at the smoke scale every stage (the opt-in GRPO one
included) runs through its real CLI, is evaluated on the held-out split and lands in the report;
--seeds gathers one table; and a short run learns the held-out task (docs/experiments/quickstart.md:
the bar and what it was measured against)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


STAGE_DIRS = {"pretrain": "pretrain", "full SFT": "sft", "SFT step 2 (LoRA and GRPO start)": "sft_early",
              "GRPO (on SFT step 2)": "grpo", "LoRA (on SFT step 2)": "lora", "DPO (on SFT)": "dpo",
              "student (tiny), plain SFT": "student_sft", "student (tiny), distilled": "distill"}


def _gold(answer: str) -> str:
    return answer.rsplit("####", 1)[1].strip()


def _items(folder: Path) -> list[dict]:
    return [json.loads(line) for line in open(folder / "gsm8k.items.jsonl")]


def _run(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--scale", "smoke", "--out", str(out),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_smoke_pipeline_writes_report_with_every_stage(tmp_path):
    """Every stage runs, and the report states what the per-question records say: each stage's
    accuracy is recomputed from its eval items, whose golds and "#### n" answers are re-read here
    with a plain string check (independent of the GSM8K scorer); the paired comparisons (LoRA
    against its start, the distilled student against the plain-SFT one, GRPO sampled) from the
    items of both sides; DPO's held-out preference from the run's own validation log."""
    out = tmp_path / "qs"
    proc = _run(["--grpo", "--distill"], out)
    results = json.loads((out / "results.json").read_text())
    rows = results["stages"]
    assert [r["stage"] for r in rows] == list(STAGE_DIRS)
    assert results["seed"] == 0 and results["numeric_path"]["cpu_capability"]
    tests = [json.loads(line) for line in open(out / "data" / "test.jsonl")]
    report = (out / "REPORT.md").read_text()
    for r in rows:
        items = _items(out / STAGE_DIRS[r["stage"]] / "eval")
        assert len(items) == len(tests) == 20
        assert [str(it["gold"]) for it in items] == [_gold(t["answer"]) for t in tests]
        for it in items:   # a reply that ends in the right "#### n" is correct, one that has none is not
            tail = (it["prediction"] or "").rsplit("####", 1)
            if len(tail) == 2 and tail[1].strip() == str(it["gold"]):
                assert it["correct"], it
        assert r["accuracy"] == sum(it["correct"] for it in items) / len(items)
        assert f"| {r['stage']} | {r['accuracy']:.1%} | {r['seconds']:.0f} |" in report
        assert r["seconds"] > 0
    assert report.count("loss_curve.png") == len(rows) - 1   # the early SFT step is a checkpoint, not a run
    by_stage = dict(zip(STAGE_DIRS, rows))
    # Paired comparisons: both sides' accuracies and the per-problem counts from the item files.
    for stage, before in (("LoRA (on SFT step 2)", "sft_early"), ("student (tiny), distilled", "student_sft")):
        c = by_stage[stage]["compare"]
        old, new = _items(out / before / "eval"), _items(out / STAGE_DIRS[stage] / "eval")
        assert c["before"] == sum(it["correct"] for it in old) / 20
        assert c["after"] == by_stage[stage]["accuracy"]
        assert c["better"] == sum(n["correct"] and not o["correct"] for o, n in zip(old, new))
        assert c["worse"] == sum(o["correct"] and not n["correct"] for o, n in zip(old, new))
        assert f"one-sided sign test p = {c['p']:.2g}" in report
    # GRPO's start and end, each answering every held-out problem twice at the rollout temperature
    sampled = by_stage["GRPO (on SFT step 2)"]["sampled"]
    for side, folder in (("before", "sft_early"), ("after", "grpo")):
        items = _items(out / folder / "eval_sampled")
        assert sorted((it["item"], it["sample"]) for it in items) == [(i, j) for i in range(20) for j in range(2)]
        assert sampled[side] == sum(it["correct"] for it in items) / len(items)
    assert sampled["better"] + sampled["worse"] + sampled["ties"] == 20 and 0 < sampled["p"] <= 1
    # DPO on the held-out pairs: the last validation of the run, one pair per test problem.
    pref = by_stage["DPO (on SFT)"]["preference"]
    val = [json.loads(line) for line in open(out / "dpo" / "metrics.jsonl") if "val_loss" in line][-1]
    assert pref == {"accuracy": val["val/dpo_test/rewards/accuracies"], "margin": val["val/dpo_test/rewards/margins"]}
    assert len((out / "data" / "dpo_test.jsonl").read_text().splitlines()) == 20
    assert f"prefers the right one {pref['accuracy']:.1%}" in report
    assert by_stage["pretrain"]["perplexity"] > 1 and "perplexity of the held-out" in report
    for stage in ("pretrain", "sft", "grpo", "dpo", "student_sft", "distill"):  # self-contained model folders
        final = out / stage / "final"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert (out / "lora" / "final" / "adapter_model.safetensors").exists()
    test_questions = {t["question"] for t in tests}
    train_text = (out / "data" / "sft.jsonl").read_text()
    assert test_questions and not any(q in train_text for q in test_questions)
    assert "eval_model.py --model" in proc.stdout and "serve_openai_api.py" in proc.stdout


def test_seeds_table_gathers_each_seeds_run(tmp_path):
    """--seeds runs the pipeline once per seed (different data: the seed drives the generator)
    and SEEDS.md states each run's own results.json."""
    out = tmp_path / "qs"
    _run(["--seeds", "3,4", "--until", "pretrain"], out)   # one stage shows the table; each more costs CI time
    runs = {s: json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (3, 4)}
    assert [r["seed"] for r in runs.values()] == [3, 4]
    assert (out / "seed_3" / "data" / "test.jsonl").read_text() != (out / "seed_4" / "data" / "test.jsonl").read_text()
    table = (out / "SEEDS.md").read_text()
    rows = {s: runs[s]["stages"][0] for s in (3, 4)}
    assert all(r["stage"] == "pretrain" for r in rows.values())
    accs, secs = [rows[s]["accuracy"] for s in (3, 4)], [rows[s]["seconds"] for s in (3, 4)]
    assert (f"| pretrain | {accs[0]:.1%} | {accs[1]:.1%} | {min(accs):.1%} | "
            f"{secs[0]:.0f} / {secs[1]:.0f} |") in table
    for s in (3, 4):   # each seed's own perplexity (accuracies before SFT are alike: ~0)
        assert f"- seed {s}: pretrain: perplexity of the held-out solved problems {rows[s]['perplexity']:.2f}," in table
    assert runs[3]["numeric_path"]["dtype"] in table


# The held-out accuracy after `--scale test --until sft`, measured on three seeds in both numeric
# paths (docs/experiments/quickstart.md, "The suite's learning test"); the bar sits 20 points
# below the worst of them, so a machine's kernels cannot decide the test, only a broken pipeline.
WORST_MEASURED = 0.49   # fp32 on AVX2 kernels, seed 1 (the others: 56-66 %)
BAR = WORST_MEASURED - 0.20
# Before SFT the scorer's last-number fallback finds the answer in a pretrained model's rambling
# now and then: 0-4 % measured, so the ceiling has 11 points of margin too.
PRETRAIN_MAX = 0.15


def test_short_run_learns_the_held_out_task(tmp_path):
    """The pipeline learns a task it has never seen solved: the test scale (one-step word
    problems, 300 pretraining and 300 packed SFT steps of demo-small) takes the held-out accuracy
    (the GSM8K scorer on 100 held-out problems) from ~0 to at least BAR."""
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--scale", "test",
                           "--until", "sft", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["stage"]: r["accuracy"] for r in json.loads((out / "results.json").read_text())["stages"]}
    assert list(rows) == ["pretrain", "full SFT"]
    assert rows["pretrain"] <= PRETRAIN_MAX, rows
    assert rows["full SFT"] >= BAR, rows
    assert "| full SFT |" in (out / "REPORT.md").read_text()


def test_opt_in_stages_must_be_asked_for(tmp_path):
    """GRPO and the student stage are opt-in: stopping after one that is not switched on is a
    usage error (exit 2, one line naming the flag), not a run that silently skips it."""
    for stage, flag in (("grpo", "--grpo"), ("distill", "--distill")):
        proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--until", stage,
                               "--out", str(tmp_path / stage)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].endswith(f"--until {stage} needs {flag}")
        assert not (tmp_path / stage).exists()
