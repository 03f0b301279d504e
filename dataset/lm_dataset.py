"""Pretraining, SFT and DPO datasets over cached token arrays, plus the shared collate function.

Scope: records → token arrays (once; cached on disk by ``dataset.cache``) → indexable,
deterministic ``torch.utils.data.Dataset`` objects returning dicts of 1-D int64 tensors. The
training loop owns the sampler (for exact resume), so ``ds[i]`` depends on ``i`` alone.

Pretraining (``{"text"}``). Each document becomes ``<|im_start|> text <|im_end|>`` — MiniMind's
layout, so the model learns where documents start and end (``add_bos=False`` gives
``text <|im_end|>``). Two modes:
- ``packed``: all documents concatenated and cut into ``max_length`` blocks; every token is kept,
  no padding inside the dataset; only the last block may be shorter (``drop_remainder=True``
  drops it for fixed shapes). Attention crosses document boundaries, as in MiniMind/nanoGPT.
- ``padded``: one document per row, truncated to ``max_length``; the collate pads.
Labels equal input_ids; the model shifts them.

SFT (``{"conversations"}``): ``dataset.chat.encode_conversation``; labels cover the assistant
replies only. DPO (``{"chosen", "rejected"}``): both sides encoded, labels cover only the final
assistant reply. Samples truncated to nothing supervised are dropped and counted in ``stats``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from dataset.cache import TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint
from dataset.chat import IGNORE_INDEX, ChatTokenizer, encode_conversation
from dataset.jsonl import DataError, ReadReport, Record, Schema, iter_records

Kind = Literal["pretrain", "sft", "dpo"]
PretrainMode = Literal["packed", "padded"]
SCHEMA_OF_KIND: dict[str, Schema] = {"pretrain": "text", "sft": "conversation", "dpo": "preference"}
MAX_MESSAGES = 5


@dataclass
class DataStats:
    """What building a dataset did; stored with the cache so a cache hit reports the same."""

    records: int = 0  # valid records read
    skipped_bad: int = 0  # records rejected by validation (skip_bad_records=True)
    samples: int = 0  # rows in the dataset
    truncated: int = 0  # samples cut to max_length
    dropped_no_supervision: int = 0  # samples with no supervised token left (never trained on)
    dropped_identical: int = 0  # DPO pairs whose sides match after truncation (no preference signal)
    tokens: int = 0
    supervised_tokens: int = 0
    messages: list[str] = field(default_factory=list)  # first few problems, with file:line

    def note(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def __str__(self) -> str:
        identical = f", {self.dropped_identical} identical pairs" if self.dropped_identical else ""
        text = (
            f"{self.samples} samples from {self.records} records ({self.skipped_bad} bad records skipped, "
            f"{self.truncated} truncated, {self.dropped_no_supervision} dropped with no supervised token"
            f"{identical}); {self.tokens} tokens, {self.supervised_tokens} supervised"
        )
        return text + ("; " + " | ".join(self.messages) if self.messages else "")


RecordSource = Callable[[ReadReport], Iterable[Record]]  # fills the report as it yields


# --------------------------------------------------------------------------------------------
# building token arrays
# --------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 halves the cache for vocabularies that fit (MiniMind: 6400)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


class _Ragged:
    """Append-only builder of a concatenated array plus row offsets."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype
        self.chunks: list[np.ndarray] = []
        self.lengths: list[int] = []

    def add(self, row: np.ndarray) -> None:
        self.chunks.append(np.asarray(row, dtype=self.dtype))
        self.lengths.append(len(row))

    def values(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=self.dtype)

    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)


def _fail_or_skip(stats: DataStats, where: str, error: Exception, skip: bool) -> None:
    message = f"{where}: {error}"
    if not skip:
        raise DataError(message) from None
    stats.skipped_bad += 1
    stats.note(message)


def _encode_texts(
    tokenizer: ChatTokenizer, records: Iterable[Record], chunk: int = 1024
) -> Iterator[list[int]]:
    """Token ids per record, through ``encode_batch`` (parallel in Rust) when the tokenizer has it."""
    batch_encode = getattr(tokenizer, "encode_batch", None)
    if batch_encode is None:
        for rec in records:
            yield tokenizer.encode(rec.data["text"])
        return
    texts: list[str] = []
    for rec in records:
        texts.append(rec.data["text"])
        if len(texts) == chunk:
            yield from batch_encode(texts)
            texts = []
    if texts:
        yield from batch_encode(texts)


def _build_pretrain(
    records: Iterable[Record], tokenizer: ChatTokenizer, max_length: int, mode: PretrainMode, add_bos: bool
) -> tuple[dict[str, np.ndarray], DataStats]:
    stats = DataStats()
    rows = _Ragged(token_dtype(tokenizer.vocab_size))
    prefix = [tokenizer.bos_id] if add_bos else []
    for text_ids in _encode_texts(tokenizer, records):
        ids = prefix + text_ids + [tokenizer.eos_id]
        if mode == "padded" and len(ids) > max_length:
            ids = ids[:max_length]
            stats.truncated += 1
        rows.add(np.asarray(ids))
    tokens = rows.values()
    stats.tokens = stats.supervised_tokens = int(len(tokens))
    if mode == "packed":
        return {"tokens": tokens}, stats
    return {"tokens": tokens, "offsets": rows.offsets()}, stats


def _build_sft(
    records: Iterable[Record], tokenizer: ChatTokenizer, max_length: int, skip: bool
) -> tuple[dict[str, np.ndarray], DataStats]:
    stats = DataStats()
    ids, mask = _Ragged(token_dtype(tokenizer.vocab_size)), _Ragged(np.uint8)
    for rec in records:
        try:
            enc = encode_conversation(tokenizer, rec.data["conversations"], rec.data.get("tools"), max_length)
        except ValueError as e:
            _fail_or_skip(stats, rec.where, e, skip)
            continue
        stats.truncated += enc.truncated
        if not enc.mask.any():
            stats.dropped_no_supervision += 1
            stats.note(f"{rec.where}: no assistant token left after truncation to {max_length}; dropped")
            continue
        ids.add(enc.ids)
        mask.add(enc.mask)
        stats.tokens += len(enc.ids)
        stats.supervised_tokens += int(enc.mask.sum())
    return {"input_ids": ids.values(), "mask": mask.values(), "offsets": ids.offsets()}, stats


def _build_dpo(
    records: Iterable[Record], tokenizer: ChatTokenizer, max_length: int, skip: bool
) -> tuple[dict[str, np.ndarray], DataStats]:
    stats = DataStats()
    dtype = token_dtype(tokenizer.vocab_size)
    sides = {s: (_Ragged(dtype), _Ragged(np.uint8)) for s in ("chosen", "rejected")}
    for rec in records:
        tools = rec.data.get("tools")
        try:
            encs = {
                s: encode_conversation(tokenizer, rec.data[s], tools, max_length, last_turn_only=True)
                for s in sides
            }
        except ValueError as e:
            _fail_or_skip(stats, rec.where, e, skip)
            continue
        stats.truncated += any(e.truncated for e in encs.values())
        if not all(e.mask.any() for e in encs.values()):
            stats.dropped_no_supervision += 1
            stats.note(f"{rec.where}: a response was truncated away at max_length {max_length}; dropped")
            continue
        if np.array_equal(encs["chosen"].ids, encs["rejected"].ids):
            # the two replies differ only past max_length: a zero-gradient pair that would also
            # count as a miss in the reward accuracy
            stats.dropped_identical += 1
            stats.note(f"{rec.where}: chosen and rejected are identical once truncated to max_length "
                       f"{max_length}; dropped (raise max_length to keep it)")
            continue
        for s, enc in encs.items():
            sides[s][0].add(enc.ids)
            sides[s][1].add(enc.mask)
            stats.tokens += len(enc.ids)
            stats.supervised_tokens += int(enc.mask.sum())
    arrays = {}
    for s, (ids, mask) in sides.items():
        arrays[f"{s}_input_ids"], arrays[f"{s}_mask"] = ids.values(), mask.values()
        arrays[f"{s}_offsets"] = ids.offsets()
    return arrays, stats


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


class TokenDataset(Dataset):
    """Base: arrays (usually read-only memory maps), build options and stats."""

    kind: Kind

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.arrays = arrays
        self.meta = meta
        self.stats = DataStats(**meta.get("stats", {}))

    def _row(self, name: str, offsets: str, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = i % len(self)
        off = self.arrays[offsets]
        return self.arrays[name][off[i] : off[i + 1]]

    def __len__(self) -> int:
        return len(self.arrays["offsets"]) - 1


class PretrainDataset(TokenDataset):
    """``{"input_ids", "labels", "attention_mask"}`` per block (packed) or document (padded)."""

    kind = "pretrain"

    def __len__(self) -> int:
        if self.meta["mode"] == "padded":
            return super().__len__()
        n, block = len(self.arrays["tokens"]), self.meta["max_length"]
        return n // block if self.meta.get("drop_remainder") else -(-n // block)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.meta["mode"] == "padded":
            ids = _long(self._row("tokens", "offsets", i))
        else:
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} blocks")
            block = self.meta["max_length"]
            start = (i % len(self)) * block
            ids = _long(self.arrays["tokens"][start : start + block])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class SFTDataset(TokenDataset):
    """``{"input_ids", "labels", "attention_mask"}``; labels are -100 outside assistant replies."""

    kind = "sft"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = _long(self._row("input_ids", "offsets", i))
        mask = torch.from_numpy(self._row("mask", "offsets", i).astype(bool))
        return {
            "input_ids": ids,
            "labels": torch.where(mask, ids, IGNORE_INDEX),
            "attention_mask": torch.ones_like(ids),
        }


class DPODataset(TokenDataset):
    """``{"chosen_input_ids", "chosen_labels", "chosen_attention_mask", "rejected_..."}``;
    labels are -100 everywhere except the final assistant reply."""

    kind = "dpo"

    def __len__(self) -> int:
        return len(self.arrays["chosen_offsets"]) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for s in ("chosen", "rejected"):
            ids = _long(self._row(f"{s}_input_ids", f"{s}_offsets", i))
            mask = torch.from_numpy(self._row(f"{s}_mask", f"{s}_offsets", i).astype(bool))
            out[f"{s}_input_ids"] = ids
            out[f"{s}_labels"] = torch.where(mask, ids, IGNORE_INDEX)
            out[f"{s}_attention_mask"] = torch.ones_like(ids)
        return out


DATASET_CLASSES: dict[str, type[TokenDataset]] = {
    "pretrain": PretrainDataset,
    "sft": SFTDataset,
    "dpo": DPODataset,
}


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def build_dataset(
    kind: Kind,
    source: RecordSource,
    tokenizer: ChatTokenizer,
    max_length: int,
    *,
    mode: PretrainMode = "packed",
    add_bos: bool = True,
    drop_remainder: bool = False,
    skip_bad_records: bool = False,
    source_id: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> TokenDataset:
    """Tokenize the records from ``source`` (or load them from the cache) into a dataset.

    ``source_id`` identifies the data for the cache key (file content hashes plus any conversion
    options); without it nothing is cached. ``max_length`` is the block size in packed mode.
    """
    if kind not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset kind {kind!r} (expected pretrain, sft or dpo)")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    options = {"kind": kind, "max_length": max_length, "skip_bad_records": skip_bad_records}
    if kind == "pretrain":
        options.update(mode=mode, add_bos=add_bos)
    cache = TokenCache(cache_dir) if use_cache and source_id is not None else None
    key = ""
    if cache is not None:
        key = cache_key(source=source_id, tokenizer=tokenizer_fingerprint(tokenizer), **options)
        entry = cache.load(key)
        if entry is not None:
            return _make(kind, entry.arrays, entry.meta, drop_remainder)
    report = ReadReport()
    records = source(report)
    if kind == "pretrain":
        arrays, stats = _build_pretrain(records, tokenizer, max_length, mode, add_bos)
    elif kind == "sft":
        arrays, stats = _build_sft(records, tokenizer, max_length, skip_bad_records)
    else:
        arrays, stats = _build_dpo(records, tokenizer, max_length, skip_bad_records)
    stats.records = report.records
    stats.skipped_bad += report.skipped
    stats.messages = (report.messages + stats.messages)[:MAX_MESSAGES]
    if stats.tokens == 0:
        raise DataError(f"no usable samples ({stats})")
    meta = {**options, "stats": asdict(stats)}
    if cache is not None:
        entry = cache.save(key, arrays, meta)
        arrays, meta = entry.arrays, entry.meta
    return _make(kind, arrays, meta, drop_remainder)


def _make(
    kind: Kind, arrays: dict[str, np.ndarray], meta: dict[str, Any], drop_remainder: bool
) -> TokenDataset:
    ds = DATASET_CLASSES[kind](arrays, {**meta, "drop_remainder": drop_remainder})
    ds.stats.samples = len(ds)
    return ds


def _file_source(paths: Sequence[Path], schema: Schema, skip_bad_records: bool) -> RecordSource:
    def source(report: ReadReport) -> Iterator[Record]:
        for p in paths:
            yield from iter_records(p, schema, skip_bad_records=skip_bad_records, report=report)

    return source


def load_files(
    kind: Kind,
    paths: str | Path | Sequence[str | Path],
    tokenizer: ChatTokenizer,
    max_length: int,
    **options: Any,
) -> TokenDataset:
    """A dataset from MiniMind-format files (``.jsonl``, ``.jsonl.gz``, ``.json`` array, ``.txt``
    for pretraining), concatenated in the given order. ``options`` as in ``build_dataset``."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no data files given")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: file not found")
    cache_dir = options.get("cache_dir")
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    source_id = None
    if options.get("use_cache", True):
        source_id = {"files": [file_fingerprint(p, cache_dir) for p in paths]}
    source = _file_source(paths, SCHEMA_OF_KIND[kind], options.get("skip_bad_records", False))
    return build_dataset(kind, source, tokenizer, max_length, source_id=source_id, **options)


def split_train_eval(dataset: Dataset, eval_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """A deterministic random split: the same seed and length always give the same indices.

    Indices inside each part stay sorted (friendlier to memory maps; the sampler shuffles).
    """
    n = len(dataset)
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = max(1, int(round(n * eval_fraction)))
    if n_eval >= n:
        raise ValueError(f"eval_fraction {eval_fraction} leaves no training samples out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return Subset(dataset, np.sort(perm[n_eval:]).tolist()), Subset(dataset, np.sort(perm[:n_eval]).tolist())


def _pad_value(key: str, pad_id: int) -> int:
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith("attention_mask"):
        return 0
    return pad_id


def collate(
    samples: Sequence[dict[str, torch.Tensor]], pad_id: int = 0, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad every sequence to the longest in the batch (across all keys, so DPO's chosen
    and rejected share one length and can be concatenated): ``*input_ids`` with ``pad_id``,
    ``*labels`` with -100, ``*attention_mask`` with 0."""
    if not samples:
        raise ValueError("empty batch")
    length = max(len(t) for s in samples for t in s.values())
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {}
    for key in samples[0]:
        out = torch.full((len(samples), length), _pad_value(key, pad_id), dtype=torch.long)
        for row, s in enumerate(samples):
            out[row, : len(s[key])] = s[key]
        batch[key] = out
    return batch


def make_collate(pad_id: int = 0, pad_to_multiple_of: int = 1) -> Callable[[Sequence[dict]], dict]:
    """``collate`` with the tokenizer's pad id bound, for ``DataLoader(collate_fn=...)``."""
    # functools.partial (not a lambda) so DataLoader workers can pickle it.
    return functools.partial(collate, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
