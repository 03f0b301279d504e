"""PPO against GRPO on the quickstart's arithmetic problems, with the same rollout budget, per seed.

    python scripts/compare_rl.py [--run out/quickstart] [--seeds 0 1] [--steps 40] [--out out/compare_rl]

What it runs: from a partway SFT checkpoint of a quickstart run (`--start`, by default the
step-150 checkpoint the quickstart's LoRA and GRPO stages start from; the run is made with
`scripts/quickstart.py --until sft` when `--run` has none), per seed

- GRPO as the quickstart's stage runs it (train_grpo.py: CISPO, `--prompts` × G `--group`
  completions a step, correctness 1.0 + format 0.1, T 1.0, no KL), `--steps` optimizer steps;
- PPO (train_ppo.py: TRL's defaults, γ 1, λ 0.95, ε 0.2, value clip 0.2, vf_coef 0.1, KL
  penalty β 0.05 to the SFT start, 4 epochs per rollout) on the same reward and temperature,
  one completion for each of prompts × group prompts per rollout: the same number of rollouts
  per rollout step and in total (PPO takes 4 optimizer steps on each rollout, GRPO one);

both with the same lr, Adam β and warm-up. The seed is the RL run's (prompt order and rollout
dice); every run starts from the same SFT weights.

How it scores them, on the run's held-out problems (data/test.jsonl, never trained on): greedy
accuracy (eval_model.py --bench gsm8k) and sampled accuracy (4 answers per problem at T 1.0, the
same evaluation seed for every model, so a paired comparison sees the models differ, not the
dice), each paired per problem against the start and PPO against GRPO with a one-sided exact sign
test (evaluation/compare.py); and each run's wall time (training only; the machine may be
shared: compare times of one invocation, side by side).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common.atomic import atomic_write_text
from evaluation.compare import compare_reports
from model.tokenizer import Tokenizer
from perf.common import run_stage, with_tokenizer

METHODS = ("grpo", "ppo")
REWARD = "correctness:1.0,format:0.1"
TEMPERATURE = 1.0
PPO_EPOCHS = 4


def answer_budget(test: Path, tokenizer_dir: Path) -> int:
    """max_new_tokens: the longest held-out solution plus a margin (as the quickstart fits it)."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    with open(test, encoding="utf-8") as f:
        return max(len(tok.encode(json.loads(line)["answer"])) for line in f) + 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="out/quickstart", help="a quickstart run folder (data/, tokenizer/, "
                    "sft/checkpoints/); made with `quickstart.py --until sft` when it has none")
    ap.add_argument("--start", default="sft/checkpoints/step_000150",
                    help="the SFT checkpoint both methods start from, relative to --run")
    ap.add_argument("--out", default="out/compare_rl", help="working folder (runs are redone)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=40, help="GRPO optimizer steps = rollout steps of both")
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step")
    ap.add_argument("--group", type=int, default=8, help="GRPO completions per prompt (PPO: prompts x "
                    "group prompts per rollout, one completion each)")
    ap.add_argument("--lr", type=float, default=1e-4, help="lr of both (the quickstart GRPO stage's)")
    ap.add_argument("--samples", type=int, default=4, help="sampled answers per held-out problem")
    ap.add_argument("--seq_len", type=int, default=256, help="prompt tokens kept (the quickstart's)")
    return ap.parse_args(argv)


def evaluate(model: Path, out: Path, a: argparse.Namespace, test: Path, budget: int, n_test: int) -> dict:
    """Greedy and sampled held-out reports of `model` (folders with *.items.jsonl)."""
    args = ["eval_model.py", "--model", str(model), "--bench", "gsm8k", "--data", f"gsm8k={test}",
            "--max_new_tokens", str(budget), "--batch_size", str(n_test)]
    run_stage(*args, "--out", str(out / "greedy"))
    run_stage(*args, "--out", str(out / "sampled"), "--samples", str(a.samples),
        "--temperature", str(TEMPERATURE), "--seed", "0")
    return {kind: out / kind for kind in ("greedy", "sampled")}


def train(method: str, start: Path, out_dir: Path, seed: int, a: argparse.Namespace, data: Path,
          tokenizer: Path, budget: int) -> float:
    common = ["--init_from", str(start), "--data_path", str(data / "sft.jsonl"),
              "--tokenizer_dir", str(tokenizer), "--reward", REWARD, "--temperature", str(TEMPERATURE),
              "--max_new_tokens", str(budget), "--seq_len", str(a.seq_len + budget), "--lr", str(a.lr),
              "--betas", "0.9", "0.999", "--seed", str(seed),
              "--out_dir", str(out_dir), "--no-progress", "--log_every", str(max(1, a.steps // 20))]
    warmup = min(5, a.steps // 4)    # rollout steps: the same schedule per rollout for both
    if method == "grpo":
        return run_stage("train_grpo.py", *common, "--loss", "cispo", "--group_size", str(a.group),
                   "--batch_size", str(a.prompts), "--no-track_kl", "--max_steps", str(a.steps),
                   "--warmup_steps", str(warmup))
    # PPO: prompts x group prompts per rollout in one micro-batch, so they decode as one batch of
    # the same rows as GRPO's (PPO rolls out each micro-batch separately: 8 micro-batches of 8
    # rows would decode 8 times), PPO_EPOCHS optimizer steps on each rollout
    return run_stage("train_ppo.py", *common, "--batch_size", str(a.prompts * a.group),
               "--samples_per_prompt", "1", "--ppo_epochs", str(PPO_EPOCHS),
               "--max_steps", str(a.steps * PPO_EPOCHS), "--warmup_steps", str(warmup * PPO_EPOCHS))


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    qs, out = Path(a.run).resolve(), Path(a.out).resolve()
    start = qs / a.start
    if not start.is_dir():
        run_stage("scripts/quickstart.py", "--out", str(qs), "--until", "sft")
    data, tokenizer = qs / "data", qs / "tokenizer"
    test = data / "test.jsonl"
    n_test = len(test.read_text(encoding="utf-8").splitlines())
    budget = answer_budget(test, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    reports = {"start": evaluate(start, out / "start", a, test, budget, n_test)}
    seconds: dict[str, float] = {}
    for seed in a.seeds:
        for method in METHODS:
            name = f"{method}_s{seed}"
            if (out / name).exists():
                shutil.rmtree(out / name)
            seconds[name] = train(method, start, out / name, seed, a, data, tokenizer, budget)
            final = with_tokenizer(out / name / "final", tokenizer)
            reports[name] = evaluate(final, out / name / "eval", a, test, budget, n_test)
    results = summarize(reports, seconds, a)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    print(f"\n{json.dumps(results['settings'])}")
    print("\n".join(table(results)))
    print(f"\nresults: {out / 'results.json'}")


def summarize(reports: dict[str, dict], seconds: dict[str, float], a: argparse.Namespace) -> dict:
    """Per run: greedy and sampled accuracy, paired against the start and PPO against GRPO."""
    runs: dict[str, dict] = {}
    for name, rep in reports.items():
        row: dict = {"seconds": seconds.get(name)}
        for kind, folder in rep.items():
            vs = compare_reports(reports["start"][kind], folder)
            row[kind] = {"accuracy": vs["after"], "vs_start": vs}
            if name.startswith("ppo_"):
                row[kind]["vs_grpo"] = compare_reports(reports["grpo" + name[3:]][kind], folder)
        runs[name] = row
    return {"settings": {"run": a.run, "start": a.start, "steps": a.steps, "prompts": a.prompts,
                         "group": a.group, "lr": a.lr, "samples": a.samples, "seeds": a.seeds,
                         "ppo_epochs": PPO_EPOCHS, "reward": REWARD, "temperature": TEMPERATURE,
                         "rollouts_per_run": a.steps * a.prompts * a.group},
            "runs": runs}


def table(results: dict) -> list[str]:
    """A Markdown table: accuracy and its paired change (better / worse, one-sided p)."""
    def paired(cell: dict, key: str) -> str:
        c = cell.get(key)
        return f"{c['better']} / {c['worse']}, p = {c['p']:.2g}" if c else ""

    lines = ["| run | greedy | vs start | sampled | vs start | sampled vs GRPO | train s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        g, s = r["greedy"], r["sampled"]
        if name == "start":
            g, s = {"accuracy": g["accuracy"]}, {"accuracy": s["accuracy"]}
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {name} | {g['accuracy']:.1%} | {paired(g, 'vs_start')} | {s['accuracy']:.1%} "
                     f"| {paired(s, 'vs_start')} | {paired(s, 'vs_grpo')} | {secs} |")
    return lines
