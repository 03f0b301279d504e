"""The quickstart pipeline end to end: at the smoke scale every stage (the opt-in GRPO one
included) runs through its real CLI,
is evaluated on the held-out split and lands in the report; a shortened default run up to SFT
takes the held-out accuracy from ~0 to >= 25 % (the full one reaches >= 90 %, README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


STAGE_DIRS = {"pretrain": "pretrain", "full SFT": "sft", "SFT step 2 (GRPO start)": "grpo_start",
              "GRPO (on SFT step 2)": "grpo", "LoRA (on SFT)": "lora",
              "DPO (on SFT)": "dpo", "distilled student (tiny)": "distill"}


def _gold(answer: str) -> str:
    return answer.rsplit("####", 1)[1].strip()


def test_smoke_pipeline_writes_report_with_every_stage(tmp_path):
    """Every stage runs, and the report states what the per-question records say: each stage's
    accuracy is recomputed from its eval items, whose golds and "#### n" answers are re-read here
    with a plain string check (independent of the GSM8K scorer)."""
    out = tmp_path / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--scale", "smoke", "--grpo",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in rows] == list(STAGE_DIRS)
    tests = [json.loads(line) for line in open(out / "data" / "test.jsonl")]
    report = (out / "REPORT.md").read_text()
    for r in rows:
        items = [json.loads(line) for line in open(out / STAGE_DIRS[r["stage"]] / "eval" / "gsm8k.items.jsonl")]
        assert len(items) == len(tests) == 20
        assert [str(it["gold"]) for it in items] == [_gold(t["answer"]) for t in tests]
        for it in items:   # a reply that ends in the right "#### n" is correct, one that has none is not
            tail = (it["prediction"] or "").rsplit("####", 1)
            if len(tail) == 2 and tail[1].strip() == str(it["gold"]):
                assert it["correct"], it
        assert r["accuracy"] == sum(it["correct"] for it in items) / len(items)
        assert f"| {r['stage']} | {r['accuracy']:.1%} | {r['seconds']:.0f} |" in report
        assert r["seconds"] > 0 or r["stage"].endswith("(GRPO start)")   # a checkpoint of the SFT run
    assert report.count("loss_curve.png") == len(rows) - 1   # the GRPO start is a checkpoint, not a run
    # GRPO's start and end, each answering every held-out problem twice at the rollout temperature
    sampled = rows[3]["sampled"]
    for side, folder in (("before", "grpo_start"), ("after", "grpo")):
        items = [json.loads(line) for line in open(out / folder / "eval_sampled" / "gsm8k.items.jsonl")]
        assert sorted((it["item"], it["sample"]) for it in items) == [(i, j) for i in range(20) for j in range(2)]
        assert sampled[side] == sum(it["correct"] for it in items) / len(items)
    assert sampled["better"] + sampled["worse"] + sampled["ties"] == 20 and 0 < sampled["p"] <= 1
    assert f"one-sided sign test p = {sampled['p']:.2g}" in report
    for stage in ("pretrain", "sft", "grpo", "dpo", "distill"):  # self-contained model folders
        final = out / stage / "final"
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert (out / "lora" / "final" / "adapter_model.safetensors").exists()
    test_questions = {t["question"] for t in tests}
    train_text = (out / "data" / "sft.jsonl").read_text()
    assert test_questions and not any(q in train_text for q in test_questions)
    assert "eval_model.py --model" in proc.stdout and "serve_openai_api.py" in proc.stdout


def test_short_run_learns_the_held_out_task(tmp_path):
    """The pipeline learns a task it has never seen solved: the default run's first two stages at
    60 % of its schedule (`--scale short`, 300/600 pretrain/SFT steps) take the held-out accuracy
    (the GSM8K scorer on 200 held-out problems) from ~0 to >= 25 %. About 6 minutes on 2 cores:
    the one slow test of the suite.

    The bar was measured, not hoped for (README): this schedule scored 83.5 % (seed 0) and 65.5 %
    (seed 1) after SFT and 0-1 % before it, but seed 0 scored only 47.0 % on an AMX machine
    (bf16 autocast): the schedule sits on the steep part of the learning curve (250/500 steps gave
    15 %), so the machine's kernels move it by tens of points. 25 % against <= 5 % before is still
    a gap that chance on 200 problems cannot explain. The full default run
    (500/1000 steps, 10 minutes) reaches 93-99.5 %; it is left to the README's table because the
    suite must stay well inside 15 minutes."""
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--scale", "short",
                           "--until", "sft", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["stage"]: r["accuracy"] for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["pretrain", "full SFT"]
    assert rows["pretrain"] <= 0.05, rows   # the scorer's last-number fallback can hit by luck
    assert rows["full SFT"] >= 0.25, rows
    assert "| full SFT |" in (out / "REPORT.md").read_text()
