"""Datasets: packing keeps every token with no pad, padded mode and collate, SFT/DPO labels, cache hits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.jsonl import DataError
from dataset.lm_dataset import collate, load_files, make_collate, split_train_eval

DOCS = [
    "MiniMind is a small language model.",
    "预训练的目标是预测下一个 token。",
    "Short.",
    "A somewhat longer document that spans more than one block of sixteen tokens for sure, yes.",
    "The end.",
]


@pytest.fixture(scope="module")
def tok(upstream_tokenizer):
    return upstream_tokenizer


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def chat(q: str, a: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a},
    ]
    return {"conversations": msgs}


def test_packed_pretrain_preserves_every_token_without_padding(tok, tmp_path):
    path = jsonl(tmp_path / "pt.jsonl", [{"text": d} for d in DOCS])
    ds = load_files("pretrain", path, tok, 16, cache_dir=tmp_path / "cache")
    expected = [t for d in DOCS for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    blocks = [ds[i] for i in range(len(ds))]
    assert len(ds) == -(-len(expected) // 16)
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]["input_ids"]) <= 16
    assert torch.cat([b["input_ids"] for b in blocks]).tolist() == expected
    assert not any((b["input_ids"] == tok.pad_id).any() for b in blocks)
    assert all(torch.equal(b["labels"], b["input_ids"]) and b["attention_mask"].all() for b in blocks)
    dropped = load_files("pretrain", path, tok, 16, cache_dir=tmp_path / "cache", drop_remainder=True)
    assert len(dropped) == len(expected) // 16
    no_bos = load_files("pretrain", path, tok, 16, cache_dir=tmp_path / "cache", add_bos=False)
    assert no_bos.stats.tokens == len(expected) - len(DOCS)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_padded_pretrain_and_collate(tok, tmp_path):
    path = jsonl(tmp_path / "pt.jsonl", [{"text": d} for d in DOCS])
    ds = load_files("pretrain", path, tok, 12, mode="padded", use_cache=False)
    assert len(ds) == len(DOCS)
    assert ds.stats.truncated == sum(len(tok.encode(d)) + 2 > 12 for d in DOCS) > 0
    assert ds[2]["input_ids"].tolist() == [tok.bos_id, *tok.encode("Short."), tok.eos_id]
    batch = collate([ds[2], ds[3]], pad_id=tok.pad_id)
    n = len(ds[2]["input_ids"])
    assert batch["input_ids"].shape == (2, 12)
    assert (batch["input_ids"][0, n:] == tok.pad_id).all()
    assert (batch["labels"][0, n:] == -100).all() and (batch["labels"][0, :n] == batch["input_ids"][0, :n]).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (12 - n)
    assert collate([ds[2]], pad_to_multiple_of=8)["input_ids"].shape[1] == 8


def test_sft_dataset_labels_drops_and_skips(tok, tmp_path):
    long_system = "background " * 60
    rows = [chat("hi", "hello"), chat("q", "a", system=long_system), chat("2+2?", "4")]
    path = jsonl(tmp_path / "sft.jsonl", rows)
    with path.open("a") as f:
        f.write('{"conversations": [{"role": "user", "content": "no reply"}]}\n')
    with pytest.raises(DataError, match=f"^{path}:4: .*no assistant turn"):
        load_files("sft", path, tok, 64, use_cache=False)
    ds = load_files("sft", path, tok, 64, use_cache=False, skip_bad_records=True)
    assert len(ds) == 2  # the long-system sample has no assistant token left within 64 tokens
    assert (ds.stats.records, ds.stats.skipped_bad, ds.stats.dropped_no_supervision) == (3, 1, 1)
    assert any(m.startswith(f"{path}:2: no assistant token left") for m in ds.stats.messages)
    sample = ds[1]
    sup = sample["input_ids"][sample["labels"] != -100].tolist()
    assert tok.decode(sup) == "<think>\n\n</think>\n\n4<|im_end|>"
    assert ds.stats.supervised_tokens == sum(int((ds[i]["labels"] != -100).sum()) for i in range(len(ds)))


def test_dpo_dataset_and_batch(tok, tmp_path):
    prompt = [{"role": "user", "content": "Capital of France?"}]
    row = {"chosen": prompt + [{"role": "assistant", "content": "Paris."}],
           "rejected": prompt + [{"role": "assistant", "content": "I do not know, sorry."}]}
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    row2 = {"chosen": earlier + row["chosen"], "rejected": earlier + row["rejected"]}
    ds = load_files("dpo", jsonl(tmp_path / "dpo.jsonl", [row, row2]), tok, 128, use_cache=False)
    loader = DataLoader(ds, batch_size=2, collate_fn=make_collate(tok.pad_id))
    batch = next(iter(loader))
    keys = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "attention_mask")}
    assert set(batch) == keys
    assert len({t.shape for t in batch.values()}) == 1  # one shared length: chosen/rejected can be concatenated
    for s, reply in (("chosen", "Paris."), ("rejected", "I do not know, sorry.")):
        for row_i in range(2):
            labels, ids = batch[f"{s}_labels"][row_i], batch[f"{s}_input_ids"][row_i]
            assert tok.decode(ids[labels != -100].tolist()) == f"<think>\n\n</think>\n\n{reply}<|im_end|>"


def test_dpo_pair_identical_after_truncation_is_dropped_and_named(tok, tmp_path):
    prompt = [{"role": "user", "content": "Count to ten."}]
    same_start = "one two three four five six seven eight nine "
    row = {"chosen": prompt + [{"role": "assistant", "content": same_start + "ten"}],
           "rejected": prompt + [{"role": "assistant", "content": same_start + "eleven"}]}
    short = {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}
    path = jsonl(tmp_path / "dpo.jsonl", [row, short, row])
    full = load_files("dpo", path, tok, 128, use_cache=False)
    assert len(full) == 3 and full.stats.dropped_identical == 0
    n_common = len(tok.encode(tok.apply_chat_template(row["chosen"]))) - 4   # cut well before the difference
    cut = load_files("dpo", path, tok, n_common, use_cache=False)
    assert len(cut) == 1 and cut.stats.dropped_identical == 2
    assert cut.stats.messages[0].startswith(f"{path}:1: chosen and rejected are identical")
    assert cut.stats.messages[1].startswith(f"{path}:3: chosen and rejected are identical")
    assert "2 identical pairs" in str(cut.stats)


def test_cache_hit_does_not_call_the_tokenizer(tok, tmp_path, monkeypatch):
    path = jsonl(tmp_path / "sft.jsonl", [chat("hi", "hello"), chat("2+2?", "4")])
    cache = tmp_path / "cache"
    first = load_files("sft", path, tok, 64, cache_dir=cache)
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())  # written atomically, no leftovers

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer called on a cache hit")

    monkeypatch.setattr(tok, "encode", boom)
    monkeypatch.setattr(tok, "apply_chat_template", boom)
    second = load_files("sft", path, tok, 64, cache_dir=cache)
    assert isinstance(second.arrays["input_ids"], np.memmap)
    for i in range(len(first)):
        assert all(torch.equal(first[i][k], second[i][k]) for k in first[i])
    assert second.stats == first.stats
    with pytest.raises(AssertionError, match="tokenizer called"):
        load_files("sft", path, tok, 32, cache_dir=cache)  # another max_length is another entry
    jsonl(path, [chat("hi", "hello!"), chat("2+2?", "4")])
    with pytest.raises(AssertionError, match="tokenizer called"):
        load_files("sft", path, tok, 64, cache_dir=cache)  # changed content is a miss


def test_split_is_deterministic_and_disjoint(tok, tmp_path):
    path = jsonl(tmp_path / "pt.jsonl", [{"text": f"document number {i}"} for i in range(40)])
    ds = load_files("pretrain", path, tok, 8, mode="padded", use_cache=False)
    train, val = split_train_eval(ds, 0.25, seed=3)
    train2, val2 = split_train_eval(ds, 0.25, seed=3)
    assert (train.indices, val.indices) == (train2.indices, val2.indices)
    assert len(val) == 10 and sorted(train.indices + val.indices) == list(range(40))
    assert split_train_eval(ds, 0.25, seed=4)[1].indices != val.indices
    with pytest.raises(ValueError):
        split_train_eval(ds, 1.0)
