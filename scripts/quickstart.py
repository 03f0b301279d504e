"""The main job: the whole pipeline on data the project generates, on a laptop CPU.

    python scripts/quickstart.py                    # every stage, then out/quickstart/REPORT.md
    python scripts/quickstart.py --seeds 0,1,2      # once per seed, then one table (SEEDS.md)
    python scripts/quickstart.py --scale smoke      # a one-minute dry run of every stage
    python scripts/quickstart.py --until sft        # stop after a stage
    python scripts/quickstart.py --grpo             # add the GRPO stage (opt-in: it is slow)
    python scripts/quickstart.py --distill          # add the student stage (opt-in: see below)

Stages, each a real run of the same command a user would type (so this file is also a tour), and
each scored on held-out data for the effect it is meant to have:
  data → tokenizer
  → pretrain (perplexity of held-out solved problems)
  → full SFT, packed (GSM8K-scorer accuracy on held-out problems)
  → [GRPO with --grpo: RL with the correctness reward from an early SFT checkpoint, scored
     sampled at the rollouts' temperature, before / after, problem by problem]
  → LoRA from that early SFT checkpoint (accuracy before / after, problem by problem)
  → DPO on the SFT model (preference accuracy and reward margin on held-out pairs)
  → [distillation with --distill: a smaller student (itself pretrained first), distilled from
     the SFT model, against the same student trained by plain SFT for the same steps (accuracy,
     problem by problem). Opt-in because at this budget the student does not learn the task
     either way (1.5 % / 3.0 %, docs/experiments/quickstart.md), and it would double the run]
then a Markdown report in <out>/REPORT.md (accuracy table, stage times, the numeric path, loss
curves). The task: arithmetic word problems with worked steps ending in `#### answer`, plus
identity Q&A (dataset/synthetic.py); test questions never appear in training data. Measured
figures per seed and machine: docs/experiments/quickstart.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from common.atomic import atomic_write_text
from evaluation.compare import compare_reports
from model.precision import resolve_precision
from model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
GRPO_TEMPERATURE, GRPO_BETAS, GRPO_WARMUP = 1.0, ("0.9", "0.999"), 5


@dataclass
class Scale:
    """Sizes of one pipeline run (docs/experiments/quickstart.md: what each choice measured)."""

    n_pretrain: int
    n_sft: int
    n_dpo: int
    n_test: int
    vocab_size: int  # the synthetic corpus needs few merges; a small vocab makes lm_head cheap
    teacher: str  # model preset of pretrain → SFT → LoRA → DPO
    student: str  # the smaller preset: pretrained on the same text, then distilled / SFT-trained
    pretrain_steps: int
    sft_steps: int
    early_step: int  # the SFT checkpoint LoRA and GRPO start from: partway, so they can improve it
    lora_steps: int
    dpo_steps: int
    student_pretrain_steps: int
    student_steps: int  # distillation, and the plain-SFT baseline it is compared with
    grpo_steps: int
    grpo_prompts: int  # prompts per step, each sampled grpo_group times
    grpo_group: int
    grpo_lr: float
    grpo_samples: int  # held-out answers per problem at the rollout temperature, before and after
    batch_size: int  # DPO takes half: each pair is two sequences
    seq_len: int
    problems: str = "all"  # dataset.synthetic --problems: every template, or the one-step ones
    pretrain_lr: float = 3e-3
    sft_lr: float = 2e-3  # also LoRA's, and the students'


SCALES = {
    "default": Scale(n_pretrain=30000, n_sft=30000, n_dpo=2000, n_test=200, vocab_size=2048,
                     teacher="demo-small", student="demo-mini", pretrain_steps=500, sft_steps=500,
                     early_step=150, lora_steps=100, dpo_steps=60, student_pretrain_steps=200,
                     student_steps=300, grpo_steps=100, grpo_prompts=8, grpo_group=8, grpo_lr=1e-4,
                     grpo_samples=4, batch_size=16, seq_len=256),
    "smoke": Scale(n_pretrain=400, n_sft=300, n_dpo=100, n_test=20, vocab_size=1024,
                   teacher="tiny", student="tiny", pretrain_steps=4, sft_steps=4, early_step=2,
                   lora_steps=2, dpo_steps=2, student_pretrain_steps=2, student_steps=2,
                   grpo_steps=2, grpo_prompts=2, grpo_group=2, grpo_lr=1e-4, grpo_samples=2,
                   batch_size=4, seq_len=128),
}
# The suite's learning test (tests/test_quickstart.py): pretrain and SFT only, with smaller batches
# (more updates for the same tokens) and 100 held-out problems.
SCALES["test"] = replace(SCALES["default"], n_pretrain=12000, n_sft=8000, n_dpo=100, n_test=100,
                         pretrain_steps=300, sft_steps=300, early_step=150, problems="one_step")

STAGES = ("pretrain", "sft", "grpo", "lora", "dpo", "distill")


def numeric_path() -> dict:
    """What decides this machine's numbers: the dtype --dtype auto picks on the CPU and the
    kernels PyTorch dispatches to (ATen's CPU capability)."""
    return {"dtype": resolve_precision("auto", torch.device("cpu")).describe(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


class Pipeline:
    def __init__(self, out: Path, scale: Scale, seed: int, until: str = "distill", grpo: bool = False,
                 distill: bool = False):
        self.out, self.scale, self.seed, self.until = out, scale, seed, until
        self.grpo, self.distill = grpo, distill
        self.data = out / "data"
        self.tokenizer = out / "tokenizer"
        self.rows: list[dict] = []
        self.chat_model = out  # the model the closing lines offer to chat with; set by stages()
        self.max_new_tokens = 0  # fitted to the test answers once the tokenizer exists

    # --- helpers ------------------------------------------------------------------------------
    def run(self, title: str, *args: str) -> float:
        print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=REPO, check=True)
        return time.perf_counter() - t0

    def common(self, out_dir: Path, steps: int, lr: float, batch: int = 0) -> list[str]:
        s = self.scale
        return ["--out_dir", str(out_dir), "--tokenizer_dir", str(self.tokenizer),
                "--max_steps", str(steps), "--lr", str(lr), "--batch_size", str(batch or s.batch_size),
                "--seq_len", str(s.seq_len), "--seed", str(self.seed),
                "--log_every", str(max(1, steps // 50))]

    def finalize(self, stage_dir: Path, folder: str = "final") -> Path:
        """A model folder of the stage (its final one by default), made self-contained with the
        tokenizer files."""
        final = stage_dir / folder
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if final.is_dir():
                shutil.copy2(self.tokenizer / name, final / name)
        return final

    def fit_answer_budget(self) -> int:
        """max_new_tokens for evaluation: the longest held-out solution plus a margin. A model
        that never stops (the pretrained one) then costs what a right answer could need, not a
        fixed 512."""
        tok = Tokenizer.from_dir(self.tokenizer)
        with open(self.data / "test.jsonl", encoding="utf-8") as f:
            longest = max(len(tok.encode(json.loads(line)["answer"])) for line in f)
        return longest + 16

    def eval_args(self, model: Path, out_dir: Path) -> list[str]:
        """eval_model.py on the held-out split with the run's answer budget, all problems in one
        batch (a CPU decode step costs nearly the same for 200 rows as for 50)."""
        return ["eval_model.py", "--model", str(model), "--bench", "gsm8k",
                "--data", f"gsm8k={self.data / 'test.jsonl'}", "--out", str(out_dir),
                "--max_new_tokens", str(self.max_new_tokens), "--batch_size", str(self.scale.n_test)]

    def evaluate(self, stage: str, model: Path, seconds: float, lora: Path | None = None,
                 out_dir: Path | None = None, extra: tuple[str, ...] = ()) -> float:
        eval_dir = (out_dir or model.parent) / "eval"
        args = self.eval_args(model, eval_dir) + list(extra)
        if lora is not None:
            args += ["--lora", str(lora)]
        seconds += self.run(f"evaluate after {stage}", *args)
        summary = json.loads((eval_dir / "gsm8k.summary.json").read_text())
        accuracy = summary["accuracy"]
        self.rows.append(dict(stage=stage, accuracy=accuracy, seconds=seconds, eval_dir=eval_dir,
                              curve=next((p for p in ((out_dir or model.parent) / "loss_curve.png",
                                                      model.parent / "loss_curve.png")
                                          if p.exists()), None)))
        print(f"[quickstart] {stage}: held-out accuracy {accuracy:.1%}", flush=True)
        return accuracy

    def compare(self, before: Path, what: str) -> None:
        """Attach a problem-by-problem comparison with an earlier evaluation to the last row."""
        self.rows[-1]["compare"] = {**compare_reports(before, self.rows[-1]["eval_dir"]), "against": what}

    def pretrain(self, out_dir: Path, preset: str, steps: int) -> float:
        return self.run(f"pretrain {preset}", "train_pretrain.py", "--data_path",
                        str(self.data / "pretrain.jsonl"), "--model_preset", preset,
                        "--warmup_steps", str(max(1, steps // 20)),
                        *self.common(out_dir, steps, self.scale.pretrain_lr))

    def sft(self, title: str, out_dir: Path, init: Path, steps: int, *extra: str) -> float:
        """Full SFT on the generated conversations, packed: several conversations per row, each
        attending only to itself, so a step carries ~1.9x the conversations of a padded one."""
        return self.run(title, "train_full_sft.py", "--init_from", str(init), "--packing",
                        "--data_path", str(self.data / "sft.jsonl"),
                        "--warmup_steps", str(max(1, steps // 50)),
                        *self.common(out_dir, steps, self.scale.sft_lr), *extra)

    # --- the stages ---------------------------------------------------------------------------
    def go(self) -> None:
        """Run the stages up to and including `until`, then write the report."""
        for stage in self.stages():
            if stage == self.until:
                break
        self.report(self.chat_model)

    def stages(self) -> Iterator[str]:
        """Each stage in turn; yields its name once it is trained and evaluated."""
        s = self.scale
        t = self.run("generate data", "-m", "dataset.synthetic", "--out", str(self.data),
                     "--seed", str(self.seed), "--n_pretrain", str(s.n_pretrain),
                     "--n_sft", str(s.n_sft), "--n_dpo", str(s.n_dpo), "--n_test", str(s.n_test),
                     "--problems", s.problems)
        t += self.run("train the tokenizer", "scripts/train_tokenizer.py", "--out",
                      str(self.tokenizer), "--data", str(self.data / "pretrain.jsonl"),
                      str(self.data / "sft.jsonl"), "--vocab_size", str(s.vocab_size),
                      "--seed", str(self.seed))
        self.max_new_tokens = self.fit_answer_budget()

        pre = self.out / "pretrain"
        t += self.pretrain(pre, s.teacher, s.pretrain_steps)
        self.evaluate("pretrain", self.finalize(pre), t,
                      extra=("--bench", "gsm8k,ppl", "--data", f"ppl={self.data / 'test_text.jsonl'}"))
        ppl = json.loads((pre / "eval" / "ppl.summary.json").read_text())
        self.rows[-1]["perplexity"] = ppl["ppl"]
        self.chat_model = pre / "final"
        yield "pretrain"

        sft = self.out / "sft"
        t = self.sft("full SFT", sft, pre / "final", s.sft_steps, "--save_every", str(s.early_step),
                     "--keep_last", str(-(-s.sft_steps // s.early_step)))  # ceil: the last step saves too
        self.evaluate("full SFT", self.finalize(sft), t)
        self.chat_model = sft / "final"
        yield "sft"

        early = self.finalize(sft / "checkpoints", f"step_{s.early_step:06d}")
        self.evaluate(f"SFT step {s.early_step} (LoRA and GRPO start)", early, 0.0,
                      out_dir=self.out / "sft_early")
        if self.grpo:
            self.grpo_stage(early)
            yield "grpo"

        lora = self.out / "lora"
        t = self.run("LoRA", "train_lora.py", "--init_from", str(early), "--packing",
                     "--data_path", str(self.data / "sft.jsonl"), "--lora_rank", "16",
                     *self.common(lora, s.lora_steps, s.sft_lr))
        self.evaluate(f"LoRA (on SFT step {s.early_step})", early, t, lora=lora / "final", out_dir=lora)
        self.compare(self.out / "sft_early" / "eval", f"SFT step {s.early_step}")
        yield "lora"

        dpo = self.out / "dpo"
        t = self.run("DPO", "train_dpo.py", "--init_from", str(sft / "final"),
                     "--data_path", str(self.data / "dpo.jsonl"), "--beta", "0.1",
                     "--eval_data_path", str(self.data / "dpo_test.jsonl"),
                     *self.common(dpo, s.dpo_steps, 1e-5, max(1, s.batch_size // 2)))
        self.evaluate("DPO (on SFT)", self.finalize(dpo), t)
        self.rows[-1]["preference"] = held_out_preference(dpo / "metrics.jsonl")
        yield "dpo"
        if not self.distill:
            return

        # MiniMind's recipe: the student starts from its own pretrained weights and learns the
        # task from the teacher's token distributions (plus the data's labels). The same student
        # trained by plain SFT for the same steps is the baseline that says what the teacher added.
        student_pre = self.out / "student_pretrain"
        t_pre = self.pretrain(student_pre, s.student, s.student_pretrain_steps)
        baseline = self.out / "student_sft"
        t = t_pre + self.sft(f"student ({s.student}) by plain SFT", baseline, student_pre / "final",
                             s.student_steps)
        self.evaluate(f"student ({s.student}), plain SFT", self.finalize(baseline), t)
        student = self.out / "distill"
        t = t_pre + self.run("distillation", "train_distillation.py", "--teacher_path", str(sft / "final"),
                             "--init_from", str(student_pre / "final"), "--packing",
                             "--data_path", str(self.data / "sft.jsonl"),
                             "--warmup_steps", str(max(1, s.student_steps // 50)),
                             *self.common(student, s.student_steps, s.sft_lr))
        self.evaluate(f"student ({s.student}), distilled", self.finalize(student), t)
        self.compare(baseline / "eval", "the plain-SFT student")
        yield "distill"

    def grpo_stage(self, start: Path) -> None:
        """RL on the training questions, scored on the held-out ones: an early SFT checkpoint is
        right on some problems and wrong on others, so groups carry signal."""
        s = self.scale
        before = self.evaluate_sampled(start, self.out / "sft_early" / "eval_sampled")
        grpo = self.out / "grpo"
        t = self.run("GRPO", "train_grpo.py", "--init_from", str(start),
                     "--data_path", str(self.data / "sft.jsonl"), "--loss", "cispo",
                     "--group_size", str(s.grpo_group), "--max_new_tokens", str(self.max_new_tokens),
                     "--reward", "correctness:1.0,format:0.1", "--no-track_kl",
                     "--temperature", str(GRPO_TEMPERATURE), "--betas", *GRPO_BETAS,
                     "--warmup_steps", str(min(GRPO_WARMUP, s.grpo_steps // 4)),
                     *self.common(grpo, s.grpo_steps, s.grpo_lr, s.grpo_prompts),
                     "--seq_len", str(s.seq_len + self.max_new_tokens))   # the whole question fits
        self.evaluate(f"GRPO (on SFT step {s.early_step})", self.finalize(grpo), t)
        after = self.evaluate_sampled(grpo / "final", grpo / "eval_sampled")
        self.rows[-1]["sampled"] = {**compare_reports(before, after), "samples": s.grpo_samples,
                                    "temperature": GRPO_TEMPERATURE}

    def evaluate_sampled(self, model: Path, out_dir: Path) -> Path:
        """What GRPO optimises, on problems it never trained on: each held-out problem answered
        grpo_samples times at the rollout temperature (the same seeds for every model, so the
        paired comparison sees the models differ, not the dice)."""
        self.run("sampled evaluation", *self.eval_args(model, out_dir),
                 "--samples", str(self.scale.grpo_samples), "--temperature", str(GRPO_TEMPERATURE),
                 "--seed", str(self.seed))
        return out_dir

    def report(self, model: Path) -> None:
        """REPORT.md + results.json for the stages run; then how to chat with / serve `model`."""
        path = numeric_path()
        lines = ["# Quickstart report", "",
                 f"Seed {self.seed}; numeric path: {path['dtype']}; ATen CPU capability "
                 f"{path['cpu_capability']} ({path['machine']}, {path['threads']} threads).", "",
                 "Held-out accuracy of the GSM8K scorer on generated arithmetic word problems "
                 "(test questions never appear in training). Stage time includes its evaluation.", "",
                 "| stage | held-out accuracy | stage time (s) |", "|---|---|---|"]
        lines += [f"| {r['stage']} | {r['accuracy']:.1%} | {r['seconds']:.0f} |" for r in self.rows]
        lines += [""] + [f"- {line}" for r in self.rows for line in effect_lines(r)]
        lines += ["", "## Training curves", "", "Each stage's picture draws what it optimises "
                  "(trainer/logging.py PANELS): the loss for pretraining and SFT; reward, rollout "
                  "accuracy, KL and response length for RL; the reward margin and preference accuracy "
                  "for DPO; the KL to the teacher for distillation; validation curves with markers.", ""]
        for r in self.rows:
            if r["curve"] is not None:
                lines.append(f"### {r['stage']}\n\n![{r['stage']}]({os.path.relpath(r['curve'], self.out)})\n")
        atomic_write_text(self.out / "REPORT.md", "\n".join(lines) + "\n")
        atomic_write_text(self.out / "results.json", json.dumps(
            {"seed": self.seed, "numeric_path": path,
             "stages": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in self.rows]},
            indent=2))
        print("\n" + "\n".join(lines[:lines.index("## Training curves")]))
        print(f"Report: {self.out / 'REPORT.md'}\n"
              f"Chat with the model:   .venv/bin/python eval_model.py --model {model}\n"
              f"Serve it (OpenAI API): .venv/bin/python scripts/serve_openai_api.py --model {model}\n"
              f"Web demo:              .venv/bin/streamlit run scripts/web_demo.py -- --model {model}")


def held_out_preference(metrics: Path) -> dict:
    """The DPO run's last evaluation on the held-out pairs: how often the implicit reward
    β·log(π/π_ref) ranks the right solution above the slipped one, and by how much."""
    key = "val/dpo_test/rewards/"
    last = [r for r in map(json.loads, metrics.read_text().splitlines()) if key + "accuracies" in r][-1]
    return {"accuracy": last[key + "accuracies"], "margin": last[key + "margins"]}


def effect_lines(r: dict) -> list[str]:
    """What the report says a stage did, beyond its accuracy."""
    out = []
    if "perplexity" in r:
        out.append(f"{r['stage']}: perplexity of the held-out solved problems {r['perplexity']:.2f}, "
                   "against about the vocabulary size for a model that has learned nothing.")
    if "preference" in r:
        p = r["preference"]
        out.append(f"{r['stage']}: on held-out pairs (right solution vs a slipped one) the implicit "
                   f"reward prefers the right one {p['accuracy']:.1%} of the time, mean margin "
                   f"{p['margin']:.3f} (before DPO both are 0: the policy is its reference).")
    if "compare" in r:
        c = r["compare"]
        out.append(f"{r['stage']} against {c['against']}: {c['before']:.1%} → {c['after']:.1%}; "
                   f"{c['better']} problems right only after, {c['worse']} only before; "
                   f"one-sided sign test p = {c['p']:.2g}.")
    if "sampled" in r:
        c = r["sampled"]
        out.append(f"{r['stage']}, sampled on the held-out problems ({c['samples']} answers each at "
                   f"T {c['temperature']}, the rollouts' temperature): {c['before']:.1%} → "
                   f"{c['after']:.1%} right; {c['better']} problems more often right, {c['worse']} "
                   f"less often, {c['ties']} the same; one-sided sign test p = {c['p']:.2g}.")
    return out


def seeds_table(out: Path, seeds: list[int]) -> None:
    """One table over the per-seed runs: accuracy per stage per seed, the stage times, and the
    numeric path each ran on (SEEDS.md + seeds.json in `out`)."""
    runs = {seed: json.loads((out / f"seed_{seed}" / "results.json").read_text()) for seed in seeds}
    stages = list(dict.fromkeys(st["stage"] for run in runs.values() for st in run["stages"]))
    cell = {(seed, st["stage"]): st for seed, run in runs.items() for st in run["stages"]}
    head = "| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | worst | time (s), per seed |"
    lines = ["# Quickstart over seeds", ""]
    lines += [f"- seed {seed}: {run['numeric_path']['dtype']}; ATen CPU capability "
              f"{run['numeric_path']['cpu_capability']}" for seed, run in runs.items()]
    lines += ["", head, "|" + "---|" * (len(seeds) + 3)]
    for stage in stages:
        accs = [cell[(s, stage)]["accuracy"] if (s, stage) in cell else None for s in seeds]
        times = [f"{cell[(s, stage)]['seconds']:.0f}" if (s, stage) in cell else "-" for s in seeds]
        present = [a for a in accs if a is not None]
        lines.append(f"| {stage} | " + " | ".join("-" if a is None else f"{a:.1%}" for a in accs)
                     + f" | {min(present):.1%} | {' / '.join(times)} |")
    extra = [f"- seed {seed}: {line}" for seed, run in runs.items() for st in run["stages"]
             for line in effect_lines(st)]
    lines += [""] + extra
    atomic_write_text(out / "SEEDS.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "seeds.json", json.dumps(runs, indent=2))
    print("\n" + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="out/quickstart", help="run folder (replaced if it exists)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="comma-separated seeds: one run each in OUT/seed_N, then OUT/SEEDS.md")
    ap.add_argument("--until", choices=STAGES, default=None,
                    help="stop after this stage (the report covers the stages run; default: all)")
    ap.add_argument("--grpo", action=argparse.BooleanOptionalAction, default=False,
                    help="run the GRPO stage (docs/experiments/grpo.md: what it measured)")
    ap.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                    help="run the student stage: distillation against plain SFT of the same student")
    args = ap.parse_args()
    if args.until == "grpo" and not args.grpo:
        ap.error("--until grpo needs --grpo")
    if args.until == "distill" and not args.distill:
        ap.error("--until distill needs --distill")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for seed in seeds or [args.seed]:
        run_dir = out / f"seed_{seed}" if seeds else out
        run_dir.mkdir(parents=True, exist_ok=True)
        Pipeline(run_dir, SCALES[args.scale], seed, args.until or STAGES[-1], args.grpo, args.distill).go()
    if seeds:
        seeds_table(out, seeds)
    print(f"[quickstart] done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
