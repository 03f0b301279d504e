"""Training our byte-level BPE tokenizer and writing it as a tokenizer folder.

Scope: `train` builds the BPE from texts, `save` writes `tokenizer.json` + `tokenizer_config.json`
(HF layout, so transformers' `PreTrainedTokenizerFast` and `model.tokenizer.Tokenizer` both load
the folder). The corpus is the caller's (`dataset.tokenizer_corpus`; the CLI is
`scripts/train_tokenizer.py`).

- Ids: `<|endoftext|>`=0 (pad/unk), `<|im_start|>`=1 (bos), `<|im_end|>`=2 (eos), then the
  ordinary (non-special) added tokens `<tool_call>` `</tool_call>` `<tool_response>`
  `</tool_response>` `<think>` `</think>` = 3..8, as in MiniMind's REFERENCE.md
  (`model.tokenizer.SPECIAL_TOKENS`, `ADDED_TOKENS`).
- Digits: every digit is its own pre-token (`\\p{N}` in PRETOKENIZE_REGEX), so "1234" is always
  1,2,3,4. A number's tokens then line up with its place
  values, which is what makes multi-digit arithmetic learnable for a small model; merged digit
  chunks ("12" + "34" vs "1" + "234") would hide the carries.
- Vocab: when the corpus has too few distinct pairs to reach `vocab_size` merges, the id space is
  padded with `<|reserved_N|>` added tokens so the vocabulary is exactly `vocab_size` (the
  model's embedding size contract); upstream MiniMind reserves `<|bufferN|>` ids the same way.
- The chat template written into `tokenizer_config.json` is `model.tokenizer.CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from common.atomic import atomic_write_text
from model.tokenizer import ADDED_TOKENS, CHAT_TEMPLATE, PRETOKENIZE_REGEX, SPECIAL_TOKENS


def build_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with per-digit splitting (see the module docstring)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts: Iterable[str], vocab_size: int = 6400) -> Tokenizer:
    """Train BPE on `texts`; ids 0..8 are the special then the added tokens."""
    fixed = SPECIAL_TOKENS + ADDED_TOKENS
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=fixed, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    data = json.loads(tok.to_str())
    # The trainer registers every fixed token as special; only the first three are (the rest
    # must survive decode(skip_special_tokens=True), as in MiniMind).
    for entry in data["added_tokens"]:
        entry["special"] = entry["content"] in SPECIAL_TOKENS
        entry["normalized"] = False
    _pad_vocab(data, vocab_size)
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, t in enumerate(fixed):
        assert tok.token_to_id(t) == i, f"{t} must have id {i}"
    return tok


def _pad_vocab(data: dict, vocab_size: int) -> None:
    """Append `<|reserved_N|>` tokens (model vocab + added entries) up to `vocab_size`."""
    vocab = data["model"]["vocab"]
    for n in range(vocab_size - len(vocab)):
        content, idx = f"<|reserved_{n}|>", len(vocab)
        vocab[content] = idx
        data["added_tokens"].append({"id": idx, "content": content, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "special": True})


def tokenizer_config(tok: Tokenizer) -> dict:
    """HF-style tokenizer_config.json, carrying the chat template."""
    decoder = {}
    for tid, tok_obj in sorted(tok.get_added_tokens_decoder().items()):
        if tok_obj.content.startswith("<|reserved_"):
            continue  # listed in tokenizer.json already; ~1000 entries would bloat the config
        decoder[str(tid)] = {"content": tok_obj.content, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False, "special": tok_obj.special}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def save(tok: Tokenizer, out_dir: Path) -> None:
    """Write both files, each to a temp name then renamed, so a crash leaves no half file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": tok.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tokenizer_config(tok), ensure_ascii=False,
                                                 indent=2)}
    for name, text in files.items():
        atomic_write_text(out_dir / name, text + "\n")
