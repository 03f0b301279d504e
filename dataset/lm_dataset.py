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
replies only (``train_on_prompt`` / ``mask_history``: LLaMA-Factory's variants). ``packing``
puts several conversations in one row of at most ``max_length`` tokens (best-fit decreasing,
computed once at build time and cached with the tokens, so a sample is a packed row and resume
by sample count stays exact). Each row carries ``document_ids`` (1, 2, ... per conversation, 0
for collate padding): the model keeps attention inside each conversation and restarts its
positions (LLaMA-Factory's neat_packing), and the first token of each conversation is never a
target, so a packed row trains exactly what its conversations would alone. DPO (``{"chosen", "rejected"}``): both sides encoded, labels cover only the final
assistant reply. KTO (``{"conversations", "label"}``): one conversation, labels on its final
assistant reply, and ``kto_tag`` (1 desirable, 0 not); ``kto_collate`` adds the mismatched
prompt/completion rows of KTO's KL estimate. Samples truncated to nothing supervised are dropped
and counted in ``stats``.
"""

from __future__ import annotations

import bisect
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

Kind = Literal["pretrain", "sft", "dpo", "kto"]
PretrainMode = Literal["packed", "padded"]
SCHEMA_OF_KIND: dict[str, Schema] = {"pretrain": "text", "sft": "conversation", "dpo": "preference",
                                     "kto": "feedback"}
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
    documents: int = 0  # conversations packed into the rows (SFT packing; 0 = not packed)
    packing_efficiency: float = 0.0  # real tokens / (rows * max_length) when packed
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
        if self.documents:
            text += (f"; packed {self.documents} conversations into {self.samples} rows, "
                     f"efficiency {self.packing_efficiency:.1%} (real tokens / row capacity)")
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
    records: Iterable[Record], tokenizer: ChatTokenizer, max_length: int, skip: bool,
    train_on_prompt: bool = False, mask_history: bool = False, kto: bool = False,
) -> tuple[dict[str, np.ndarray], DataStats]:
    """SFT arrays; with ``kto`` the final reply alone is supervised and each kept record's
    ``label`` goes to ``kto_tag``."""
    stats = DataStats()
    ids, mask, tags = _Ragged(token_dtype(tokenizer.vocab_size)), _Ragged(np.uint8), []
    for rec in records:
        try:
            enc = encode_conversation(tokenizer, rec.data["conversations"], rec.data.get("tools"), max_length,
                                      last_turn_only=kto, train_on_prompt=train_on_prompt,
                                      mask_history=mask_history)
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
        tags += [rec.data["label"]] if kto else []
        stats.tokens += len(enc.ids)
        stats.supervised_tokens += int(enc.mask.sum())
    arrays = {"input_ids": ids.values(), "mask": mask.values(), "offsets": ids.offsets()}
    return ({**arrays, "kto_tag": np.asarray(tags, dtype=np.uint8)} if kto else arrays), stats


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


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices whose lengths sum to at most ``capacity``: best-fit decreasing.

    Items go longest first (ties by index, so the result is deterministic) into the open bin with
    the least room that still fits them, else a new bin; FFD/BFD use at most 11/9 OPT + 1 bins.
    O(n log n) searches over a sorted list of (room left, bin).
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin index) of bins with space left
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            bins.append([i])
            free, b = capacity - n, len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, b))
    return bins


def _pack_sft(arrays: dict[str, np.ndarray], stats: DataStats, max_length: int) -> dict[str, np.ndarray]:
    """The SFT arrays plus the packing: ``pack_docs`` (conversation indices, row by row) and
    ``pack_offsets`` (row r = pack_docs[pack_offsets[r]:pack_offsets[r + 1]])."""
    bins = pack_lengths(np.diff(arrays["offsets"]), max_length)
    stats.documents = len(arrays["offsets"]) - 1
    stats.packing_efficiency = stats.tokens / (len(bins) * max_length) if bins else 0.0
    docs = np.fromiter((d for b in bins for d in b), dtype=np.int64, count=stats.documents)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bins], dtype=np.int64)]).astype(np.int64)
    return {**arrays, "pack_docs": docs, "pack_offsets": offsets}


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
    """``{"input_ids", "labels", "attention_mask"}``; labels are -100 outside assistant replies.
    Packed: one row of several conversations, plus ``document_ids`` (1, 2, ... per conversation)."""

    kind = "sft"

    @property
    def packed(self) -> bool:
        return "pack_offsets" in self.arrays

    def __len__(self) -> int:
        return len(self.arrays["pack_offsets"]) - 1 if self.packed else super().__len__()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.packed:
            ids = _long(self._row("input_ids", "offsets", i))
            mask = torch.from_numpy(self._row("mask", "offsets", i).astype(bool))
            return {
                "input_ids": ids,
                "labels": torch.where(mask, ids, IGNORE_INDEX),
                "attention_mask": torch.ones_like(ids),
            }
        off, docs = self.arrays["offsets"], self._row("pack_docs", "pack_offsets", i)
        spans = [(int(off[d]), int(off[d + 1])) for d in docs]
        ids = _long(np.concatenate([self.arrays["input_ids"][a:b] for a, b in spans]))
        mask = torch.from_numpy(np.concatenate([self.arrays["mask"][a:b] for a, b in spans]).astype(bool))
        lengths = torch.tensor([b - a for a, b in spans])
        doc_ids = torch.repeat_interleave(torch.arange(1, len(spans) + 1), lengths)
        # A conversation's first token is never a target alone (nothing precedes it); in a packed
        # row the previous conversation's last token must not learn to predict it either.
        mask[torch.cumsum(lengths, 0) - lengths] = False
        return {
            "input_ids": ids,
            "labels": torch.where(mask, ids, IGNORE_INDEX),
            "attention_mask": torch.ones_like(ids),
            "document_ids": doc_ids,
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


class KTODataset(TokenDataset):
    """``{"kto_input_ids", "kto_labels", "kto_tag"}``: labels -100 except on the final assistant
    reply, kto_tag a 0-d tensor (1 = desirable). Batch with ``kto_collate``."""

    kind = "kto"

    def __len__(self) -> int:
        return len(self.arrays["offsets"]) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = _long(self._row("input_ids", "offsets", i))
        mask = torch.from_numpy(self._row("mask", "offsets", i).astype(bool))
        return {"kto_input_ids": ids, "kto_labels": torch.where(mask, ids, IGNORE_INDEX),
                "kto_tag": torch.tensor(int(self.arrays["kto_tag"][i]))}


DATASET_CLASSES: dict[str, type[TokenDataset]] = {
    "pretrain": PretrainDataset,
    "sft": SFTDataset,
    "dpo": DPODataset,
    "kto": KTODataset,
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
    packing: bool = False,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    skip_bad_records: bool = False,
    source_id: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> TokenDataset:
    """Tokenize the records from ``source`` (or load them from the cache) into a dataset.

    ``source_id`` identifies the data for the cache key (file content hashes plus any conversion
    options); without it nothing is cached. ``max_length`` is the block size in packed mode, and
    the row size with SFT ``packing``. ``packing``, ``train_on_prompt`` and ``mask_history`` are
    SFT options (see the module docstring).
    """
    if kind not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset kind {kind!r} (expected pretrain, sft, dpo or kto)")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    options = {"kind": kind, "max_length": max_length, "skip_bad_records": skip_bad_records}
    if kind == "pretrain":
        options.update(mode=mode, add_bos=add_bos)
    sft_options = {"packing": packing, "train_on_prompt": train_on_prompt, "mask_history": mask_history}
    if kind != "sft" and any(sft_options.values()):
        on = ", ".join(k for k, v in sft_options.items() if v)
        raise ValueError(f"{on}: SFT data options, but this is {kind} data")
    options.update({k: True for k, v in sft_options.items() if v})  # keys of older caches unchanged
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
        arrays, stats = _build_sft(records, tokenizer, max_length, skip_bad_records, train_on_prompt,
                                   mask_history)
    elif kind == "kto":
        arrays, stats = _build_sft(records, tokenizer, max_length, skip_bad_records, kto=True)
    else:
        arrays, stats = _build_dpo(records, tokenizer, max_length, skip_bad_records)
    stats.records = report.records
    stats.skipped_bad += report.skipped
    stats.messages = (report.messages + stats.messages)[:MAX_MESSAGES]
    if stats.tokens == 0:
        raise DataError(f"no usable samples ({stats})")
    if packing:
        arrays = _pack_sft(arrays, stats, max_length)
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
    if key.endswith("attention_mask") or key == "document_ids":
        return 0  # document 0 = padding
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


def kto_collate(samples: Sequence[dict[str, torch.Tensor]], pad_id: int = 0, max_length: int = 0
                ) -> dict[str, torch.Tensor]:
    """A KTO batch: the samples (``collate``d), ``kto_tag`` [B], and ``kl_input_ids`` /
    ``kl_labels``: row i = prompt i followed by the completion of sample i-1 (the last one for
    i = 0), labels on that completion only. These mismatched pairs are KTO's sample of
    unrelated (prompt, completion) pairs for its KL estimate, built as TRL builds them (its
    ``KL_completion`` rotates each batch's completions by one). A batch of one pairs a sample
    with itself. ``max_length`` > 0 cuts a longer row's completion end.
    """
    tags = torch.stack([s["kto_tag"] for s in samples])
    rows = [{k: v for k, v in s.items() if k != "kto_tag"} for s in samples]
    kl = []
    for i, s in enumerate(rows):
        other = rows[i - 1]
        start = [int(torch.nonzero(r["kto_labels"] != IGNORE_INDEX)[0]) for r in (s, other)]
        ids = torch.cat([s["kto_input_ids"][:start[0]], other["kto_input_ids"][start[1]:]])
        labels = torch.cat([torch.full((start[0],), IGNORE_INDEX), other["kto_labels"][start[1]:]])
        if max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        kl.append({"kl_input_ids": ids, "kl_labels": labels})
    kto = collate(rows, pad_id)
    return {**kto, **collate(kl, pad_id), "kto_tag": tags}


def make_kto_collate(pad_id: int = 0, max_length: int = 0) -> Callable[[Sequence[dict]], dict]:
    """``kto_collate`` with the tokenizer's pad id and the row limit bound (picklable)."""
    return functools.partial(kto_collate, pad_id=pad_id, max_length=max_length)
