"""Texts to train the tokenizer on: the project's synthetic corpus and user files.

Scope: by default the synthetic generator (dataset/synthetic.py); JSONL files (`text`,
`conversations`, or DPO `chosen`/`rejected`) and plain text files may be added. The training
itself is `model.tokenizer_train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from dataset.jsonl import iter_records
from dataset.synthetic import pretrain_texts, sft_conversations
from model.tokenizer import CHAT_TEMPLATE, render_chat_template


def jsonl_texts(path: Path) -> Iterator[str]:
    """Texts from one JSONL file: `text`, or every message content of conversations / DPO.
    The project's one reader parses it (`DataError("path:line: ...")` on a bad line)."""
    for rec in iter_records(path):
        if "text" in rec.data:
            yield str(rec.data["text"])
        for key in ("conversations", "chosen", "rejected"):
            for msg in rec.data.get(key) or []:
                for field in ("reasoning_content", "content"):
                    if isinstance(msg.get(field), str) and msg[field]:
                        yield msg[field]


def synthetic_texts(n: int, seed: int) -> Iterator[str]:
    """The default corpus: pretraining documents plus SFT conversations rendered with the chat
    template (so role names and the think-block newlines get merges of their own)."""
    yield from pretrain_texts(n, seed)
    for rec in sft_conversations(n // 4, seed):
        yield render_chat_template(CHAT_TEMPLATE, rec["conversations"])


def tokenizer_corpus(jsonl_files: Sequence[Path] = (), text_files: Sequence[Path] = (),
                     n_synthetic: int = 40000, seed: int = 0) -> Iterator[str]:
    """The synthetic texts (none if `n_synthetic` is 0), then every JSONL file's texts, then
    each plain text file whole."""
    if n_synthetic:
        yield from synthetic_texts(n_synthetic, seed)
    for path in jsonl_files:
        yield from jsonl_texts(path)
    for path in text_files:
        yield path.read_text(encoding="utf-8")
