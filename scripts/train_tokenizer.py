"""Train the byte-level BPE tokenizer with MiniMind's special tokens and our chat template.

    python scripts/train_tokenizer.py [--out model/tokenizer] [--vocab_size 6400] \
        [--data a.jsonl ...] [--text_files b.txt ...] [--no_synthetic]

By default the corpus is the project's synthetic generator. The corpus is
`dataset.tokenizer_corpus`, the training `model.tokenizer_train`, the chat template
`model.tokenizer.CHAT_TEMPLATE`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.errors import UserError
from dataset.tokenizer_corpus import tokenizer_corpus
from model.tokenizer import DEFAULT_DIR
from model.tokenizer_train import save, train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer.")
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--vocab_size", type=int, default=6400)
    ap.add_argument("--data", type=Path, nargs="*", default=[],
                    help="JSONL files (text / conversations / chosen+rejected)")
    ap.add_argument("--text_files", type=Path, nargs="*", default=[], help="plain text files")
    ap.add_argument("--no_synthetic", action="store_true", help="leave out the generator")
    ap.add_argument("--n_synthetic", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    missing = [str(p) for p in [*args.data, *args.text_files] if not p.is_file()]
    if missing:  # before the synthetic texts, which take a while
        raise UserError(f"no such file: {', '.join(missing)}")

    t0 = time.time()
    corpus = tokenizer_corpus(args.data, args.text_files,
                              0 if args.no_synthetic else args.n_synthetic, args.seed)
    tok = train(corpus, args.vocab_size)
    save(tok, args.out)
    learned = sum(1 for t in tok.get_vocab() if not t.startswith("<|reserved_"))
    print(f"vocab {tok.get_vocab_size()} ({learned} learned, "
          f"{tok.get_vocab_size() - learned} reserved) -> {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
