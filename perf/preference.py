"""Preference stages compared on the quickstart's synthetic data: the reward model's held-out
pairwise accuracy, and KTO and ORPO against DPO on held-out preference accuracy, for several seeds.

    python scripts/compare_preference.py [--seeds 0 1] [--steps 60] [--lr 1e-3] [--out out/compare_preference]

What it does: `dataset.synthetic` data (the same generator the quickstart uses: right worked
solutions against ones with a slipped digit), a tiny model pretrained and then SFT-trained on it
once (the start of every preference run), then per seed four runs of the stage scripts from that
SFT model, each with the same number of steps and of sequences per step (a DPO/ORPO/RM batch of
B pairs is 2B sequences; KTO gets batches of 2B samples of kto.jsonl, the same pairs unpaired),
and the same lr. Each run is scored on the held-out pairs (dpo_test.jsonl: one pair per test
problem, never trained on):

- RM: pairwise accuracy, r(chosen) > r(rejected), from the run's last validation;
- DPO, KTO, ORPO: `implicit` = share of pairs where the policy raised the chosen answer's summed
  log-prob relative to the SFT start more than the rejected one's (the DPO implicit reward's
  ranking, with the SFT model as the reference for all three, ORPO included); `policy` = share
  where the trained policy itself gives the chosen answer the higher summed log-prob (the SFT
  model's own share is printed as the baseline).

Small on purpose (a 2-core CPU): the figures say which way each method moves a tiny model in a
few dozen steps, not how they compare at scale.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import torch

from dataset.lm_dataset import load_files, make_collate
from model.io import load_pretrained
from model.tokenizer import Tokenizer
from perf.common import run_stage
from trainer.dpo import concat_pair, sequence_logps

METHODS = ("dpo", "kto", "orpo")


@torch.no_grad()
def pair_logps(model_dir: Path, pairs: Path, seq_len: int, batch_size: int = 16) -> torch.Tensor:
    """Summed log-probs [N, 2] (chosen, rejected) of every held-out pair under a model folder."""
    model = load_pretrained(model_dir).eval()
    tok = Tokenizer.from_dir(None)
    ds = load_files("dpo", pairs, tok, seq_len, use_cache=False)
    collate = make_collate(tok.pad_id)
    out = []
    for start in range(0, len(ds), batch_size):
        ids, labels = concat_pair(collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))]))
        out.append(torch.stack(sequence_logps(model(ids).logits, labels)[0].chunk(2), dim=1))
    return torch.cat(out)


def accuracies(policy: torch.Tensor, start: torch.Tensor) -> dict[str, float]:
    """implicit: (π_c - π0_c) > (π_r - π0_r); policy: π_c > π_r (summed log-probs, [N, 2])."""
    gain = policy - start
    return {"implicit": (gain[:, 0] > gain[:, 1]).float().mean().item(),
            "policy": (policy[:, 0] > policy[:, 1]).float().mean().item()}


def last_value(metrics: Path, key: str) -> float:
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if key in r]
    return rows[-1][key]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/compare_preference", help="working folder (reused: the base "
                    "model is trained once and kept)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of each preference run")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (KTO: twice as many samples)")
    ap.add_argument("--lr", type=float, default=1e-3, help="lr of every preference run")
    ap.add_argument("--beta", type=float, default=0.1, help="β of DPO and KTO, λ of ORPO")
    ap.add_argument("--pretrain_steps", type=int, default=150)
    ap.add_argument("--sft_steps", type=int, default=100)
    ap.add_argument("--base_batch", type=int, default=8, help="batch of the pretraining and SFT runs")
    ap.add_argument("--n_test", type=int, default=100, help="held-out pairs")
    return ap.parse_args(argv)


def base_model(out: Path, a: argparse.Namespace) -> Path:
    """Data plus a tiny model pretrained then SFT-trained on it (kept in `out` and reused)."""
    data, sft = out / "data", out / "sft" / "final"
    if not (data / "kto.jsonl").exists():
        run_stage("-m", "dataset.synthetic", "--out", str(data), "--n_pretrain", "4000", "--n_sft", "3000",
            "--n_dpo", "1000", "--n_test", str(a.n_test))
    common = ["--seq_len", "256", "--batch_size", str(a.base_batch), "--no-progress", "--no-plot",
              "--log_every", "25"]
    if not (out / "pretrain" / "final").exists():
        run_stage("train_pretrain.py", "--data_path", str(data / "pretrain.jsonl"), "--model_preset", "tiny",
            "--max_steps", str(a.pretrain_steps), "--lr", "2e-3", "--out_dir", str(out / "pretrain"),
            *common)
    if not sft.exists():
        run_stage("train_full_sft.py", "--init_from", str(out / "pretrain" / "final"), "--packing",
            "--data_path", str(data / "sft.jsonl"), "--max_steps", str(a.sft_steps), "--lr", "1e-3",
            "--out_dir", str(out / "sft"), *common)
    return sft


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out = Path(a.out).resolve()
    sft = base_model(out, a)
    data = out / "data"
    test = data / "dpo_test.jsonl"
    start = pair_logps(sft, test, 256)
    base = accuracies(start, start)["policy"]
    results: dict[str, list[dict]] = {m: [] for m in ("rm", *METHODS)}
    for seed in a.seeds:
        common = ["--init_from", str(sft), "--max_steps", str(a.steps), "--lr", str(a.lr),
                  "--seq_len", "256", "--seed", str(seed), "--no-progress", "--no-plot",
                  "--log_every", str(max(1, a.steps // 4)), "--weight_decay", "0"]
        pairs = ["--batch_size", str(a.pairs)]
        rm_dir = out / f"rm_s{seed}"
        seconds = run_stage("train_reward.py", "--data_path", str(data / "dpo.jsonl"), "--eval_data_path", str(test),
                      "--eval_batches", str(-(-a.n_test // a.pairs)), "--out_dir", str(rm_dir), *pairs, *common)
        results["rm"].append({"accuracy": last_value(rm_dir / "metrics.jsonl", "val/dpo_test/rm/accuracy"),
                              "seconds": seconds})
        runs = {"dpo": ("train_dpo.py", "--data_path", str(data / "dpo.jsonl"), "--loss", "sigmoid", *pairs),
                "orpo": ("train_dpo.py", "--data_path", str(data / "dpo.jsonl"), "--loss", "orpo", *pairs),
                "kto": ("train_kto.py", "--data_path", str(data / "kto.jsonl"),
                        "--batch_size", str(2 * a.pairs))}
        for method, args in runs.items():
            run_dir = out / f"{method}_s{seed}"
            seconds = run_stage(*args, "--beta", str(a.beta), "--out_dir", str(run_dir), *common)
            results[method].append({**accuracies(pair_logps(run_dir / "final", test, 256), start),
                                    "seconds": seconds})
    report(results, base, a)


def report(results: dict[str, list[dict]], base: float, a: argparse.Namespace) -> None:
    seeds = " ".join(str(s) for s in a.seeds)
    print(f"\nheld-out pairs: {a.n_test}; seeds {seeds}; {a.steps} steps x {a.pairs} pairs, lr {a.lr}, "
          f"beta {a.beta}; SFT start prefers the chosen answer on {base:.1%} of pairs")
    print(f"{'method':<6} {'metric':<9} " + " ".join(f"{'seed ' + str(s):>8}" for s in a.seeds)
          + f" {'mean':>8} {'s/run':>7}")
    rows = [("rm", "accuracy")] + [(m, k) for m in METHODS for k in ("implicit", "policy")]
    for method, key in rows:
        vals = [r[key] for r in results[method]]
        secs = mean(r["seconds"] for r in results[method])
        print(f"{method:<6} {key:<9} " + " ".join(f"{v:>8.1%}" for v in vals)
              + f" {mean(vals):>8.1%} {secs:>7.0f}")
