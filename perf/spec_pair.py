"""A minimind2-small target and a small draft distilled from it: the second pair of the
speculative-decoding benchmark (``scripts/bench.py --only spec``), built from ../shared data.

    python scripts/make_spec_pair.py [--out out/spec_pair] [--target_steps 400] [--draft_steps 200]

1. Alpaca (English, 52k, ../shared/data/alpaca) as conversations; records with an empty answer
   are skipped; 200 shuffled records are held out as the benchmark's prompts (``prompts.jsonl``).
2. The target: minimind2-small (26M) trained from scratch by full SFT on the rest, with upstream
   MiniMind's tokenizer (../shared/data/minimind_tokenizer, 6400 tokens), so upstream's model
   file loads its weights.
3. The draft: the ``demo`` preset (hidden 256, 4 layers, same vocabulary) distilled from the
   target on the same conversations (α 0.5, T 1.5).

What a CPU affords in minutes is a weak chat model: its answers are generic and repeat themselves,
which makes drafting easier than it would be for a well-trained model. The benchmark's acceptance
rates are this pair's, not a general figure (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

from common.errors import UserError
from dataset.convert.alpaca import alpaca_to_conversation
from perf.common import REPO, run_stage, with_tokenizer

SHARED = REPO.parent / "shared" / "data"


def split_alpaca(source: Path, out: Path, n_prompts: int, seed: int) -> tuple[Path, Path]:
    """train.jsonl (conversations) and prompts.jsonl ({"question"}) from the alpaca JSON."""
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as f:
        records = json.load(f)
    pairs = []
    for r in records:
        try:
            pairs.append((r, alpaca_to_conversation(r)))
        except ValueError:  # an empty answer: nothing to imitate
            continue
    random.Random(seed).shuffle(pairs)
    held, rest = pairs[:n_prompts], pairs[n_prompts:]
    train, prompts = out / "train.jsonl", out / "prompts.jsonl"
    train.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for _, c in rest))
    prompts.write_text("".join(json.dumps({"question": c["conversations"][-2]["content"]},
                                          ensure_ascii=False) + "\n" for _, c in held))
    print(f"{len(rest)} training conversations, {len(held)} held-out prompts "
          f"({len(records) - len(pairs)} records without an answer skipped)")
    return train, prompts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "spec_pair")
    ap.add_argument("--alpaca", type=Path, default=SHARED / "alpaca" / "alpaca_en_52k.json.gz")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "minimind_tokenizer")
    ap.add_argument("--target_steps", type=int, default=400)
    ap.add_argument("--draft_steps", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for path, what in ((args.alpaca, "--alpaca"), (args.tokenizer / "tokenizer.json", "--tokenizer")):
        if not path.exists():
            raise UserError(f"{what}: {path} not found (../shared/data is needed)")
    args.out.mkdir(parents=True, exist_ok=True)
    train, prompts = split_alpaca(args.alpaca, args.out, 200, args.seed)
    common = ["--tokenizer_dir", str(args.tokenizer), "--data_path", str(train), "--packing",
              "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
              "--seed", str(args.seed), "--log_every", "20", "--dtype", "auto"]
    target, draft = args.out / "target", args.out / "draft"
    t_target = run_stage("train_full_sft.py", "--model_preset", "minimind2-small", "--lr", "1e-3",
                         "--warmup_steps", "20", "--max_steps", str(args.target_steps),
                         "--out_dir", str(target), *common)
    with_tokenizer(target / "final", args.tokenizer)
    t_draft = run_stage("train_distillation.py", "--teacher_path", str(target / "final"),
                        "--model_preset", "demo", "--lr", "2e-3", "--warmup_steps", "10",
                        "--max_steps", str(args.draft_steps), "--out_dir", str(draft), *common)
    with_tokenizer(draft / "final", args.tokenizer)
    print(f"target {t_target:.0f} s, draft {t_draft:.0f} s. Benchmark:\n"
          f"  python scripts/bench.py --only spec --dtypes fp32 --spec_target {target / 'final'} "
          f"--spec_draft {draft / 'final'} --spec_prompts {prompts} [--upstream DIR]")
