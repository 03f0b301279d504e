"""SFT throughput on real data: supervised tokens per second of three data pipelines, one run.

Alpaca (``../shared/data/alpaca/alpaca_en_52k.json.gz``, converted to conversations with
``dataset.convert.alpaca``), the same model, the same conversations in the same shuffled order,
the same step (forward + backward + AdamW under the ``--dtype auto`` autocast), timed side by side:

- ``upstream``: an emulation of MiniMind's SFT pipeline, which pads every sample to max_seq_len
  (its SFTDataset returns fixed-length rows): our collate with ``pad_to_multiple_of=seq_len``,
  ``batch_size`` conversations per step. Not upstream's code: the same model and tokens, laid out
  as upstream lays them out.
- ``dynamic``: our default, ``batch_size`` conversations right-padded to the longest in the batch.
- ``packed``: ``--packing``, ``batch_size`` rows of several conversations each (block-diagonal
  attention, positions restarting per conversation).

Supervised tokens = label positions the loss covers (what an SFT step learns from); every pipeline
trains the same tokens per conversation, so tokens/s compares how fast each gets through the data.
The pipelines take one step each in turn, so a noisy neighbour slows all three alike; besides
wall-clock tokens/s the script reports supervised tokens per CPU-second of this process
(``per_cpu_s``), which a busy shared machine disturbs less (most meaningful with ``--threads 1``).
Read the ratios, which are measured in the same run.
Usage: ``python scripts/bench_packing.py [--quick] [--records 3000] [--steps 6]``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

from dataset.convert.alpaca import alpaca_to_conversation
from dataset.lm_dataset import collate, load_files
from dataset.synthetic import write_jsonl
from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.precision import resolve_precision
from model.tokenizer import Tokenizer
from perf.common import autocast
from trainer.losses import count_targets, lm_loss
from trainer.sampler import epoch_permutation

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_en_52k.json.gz"


def alpaca_conversations(path: Path, limit: int) -> list[dict]:
    """The first `limit` convertible records (a few Alpaca records have an empty output)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = json.load(f)
    out = []
    for record in records:
        try:
            out.append(alpaca_to_conversation(record))
        except ValueError:
            continue
        if len(out) == limit:
            break
    return out


class Pipeline:
    """One pipeline's model, optimizer and data order; `step()` runs and times one training step:
    fetching the rows, collate, forward, backward, AdamW."""

    def __init__(self, name: str, config: MiniMindConfig, data, batch_size: int, pad_to: int,
                 pad_id: int, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        self.name, self.model = name, MiniMindLM(config).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, foreach=True)
        self.data, self.bs, self.pad_to, self.pad_id, self.dtype = data, batch_size, pad_to, pad_id, dtype
        self.order = epoch_permutation(len(data), 0, 0).tolist()
        self.steps, self.elapsed, self.cpu, self.supervised, self.computed, self.real = 0, 0.0, 0.0, 0, 0, 0

    def step(self, timed: bool) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        at = self.steps * self.bs
        batch = collate([self.data[self.order[(at + k) % len(self.order)]] for k in range(self.bs)],
                        self.pad_id, pad_to_multiple_of=self.pad_to)
        with autocast(self.dtype):
            loss, _ = lm_loss(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if timed:
            self.elapsed += time.perf_counter() - t0
            self.cpu += time.process_time() - c0
            self.supervised += int(count_targets(batch["labels"]))
            self.computed += batch["input_ids"].numel()
            self.real += int(batch["attention_mask"].sum())

    def row(self, timed_steps: int) -> dict:
        return dict(pipeline=self.name, supervised_tokens_per_s=self.supervised / self.elapsed,
                    per_cpu_s=self.supervised / self.cpu, step_s=self.elapsed / timed_steps, supervised_per_step=self.supervised / timed_steps,
                    real_token_fraction=self.real / self.computed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="demo-small, seq 256 (a smoke run)")
    ap.add_argument("--records", type=int, default=3000, help="Alpaca records to convert and use")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per pipeline")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--data", default=str(ALPACA), help="alpaca_en_52k.json(.gz)")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"skipped: no Alpaca data at {args.data} (../shared is only on the project's machines)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, seq_len = ("demo-small", 256) if args.quick else ("minimind2-small", 512)
    precision = resolve_precision("auto", "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {precision.describe()}; "
          f"{preset}, seq_len {seq_len}, batch {args.batch_size}, {args.steps} timed steps each")
    tokenizer = Tokenizer.from_dir()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alpaca.jsonl"
        write_jsonl(alpaca_conversations(Path(args.data), args.records), path)
        plain = load_files("sft", path, tokenizer, seq_len, cache_dir=Path(tmp) / "cache")
        t0 = time.perf_counter()
        packed = load_files("sft", path, tokenizer, seq_len, packing=True, cache_dir=Path(tmp) / "cache")
        build_s = time.perf_counter() - t0
    print(f"[data] {plain.stats}")
    print(f"[data] packed: {len(packed)} rows, efficiency {packed.stats.packing_efficiency:.1%} "
          f"(tokenize + pack {build_s:.1f} s); mean conversation "
          f"{plain.stats.tokens / len(plain):.0f} tokens")
    config = MiniMindConfig.from_preset(preset, vocab_size=tokenizer.vocab_size)
    pipelines = [Pipeline(name, config, data, args.batch_size, pad_to, tokenizer.pad_id, precision.dtype)
                 for name, data, pad_to in [("upstream (pad to seq_len, emulated)", plain, seq_len),
                                            ("dynamic padding", plain, 1), ("packed", packed, 1)]]
    # Interleaved, one step of each in turn, so a noisy neighbour slows all three alike;
    # the first round warms up kernels and allocator and is not timed.
    for r in range(args.steps + 1):
        for p in pipelines:
            p.step(timed=r > 0)
    rows = [p.row(args.steps) for p in pipelines]
    up, dyn = rows[0], rows[1]
    print(f"{'pipeline':<37} {'sup tok/s':>9} {'/cpu-s':>8} {'step s':>7} {'real tok':>8} "
          f"{'x upstream (wall, cpu)':>23} {'x dynamic (wall, cpu)':>22}")
    for r in rows:
        ratios = [r[k] / base[k] for base in (up, dyn) for k in ("supervised_tokens_per_s", "per_cpu_s")]
        print(f"{r['pipeline']:<37} {r['supervised_tokens_per_s']:>9.0f} {r['per_cpu_s']:>8.0f} "
              f"{r['step_s']:>7.2f} {r['real_token_fraction']:>8.1%} "
              f"{ratios[0]:>14.2f}x {ratios[1]:>5.2f}x {ratios[2]:>14.2f}x {ratios[3]:>5.2f}x")
