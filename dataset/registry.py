"""Named datasets: LLaMA-Factory's ``dataset_info.json`` registry, mixing and per-dataset eval.

Scope: resolve names to files and a converter, read + convert + validate every record into the
MiniMind format, mix several datasets (concatenate, optional per-dataset ``max_samples`` — the
first N, as LLaMA-Factory does — then a deterministic shuffle by ``seed``) and hand the result to
``lm_dataset.build_dataset`` (which caches the tokenized arrays).

Registry entries: ``file_name`` (a file, or a folder whose data files are read in name order),
``formatting`` (``alpaca`` default, or ``sharegpt``), ``columns``, ``tags``, ``ranking``. The kind
of data is decided per entry: ``ranking: true`` → DPO; a ``kto_tag`` column → KTO (the
conversation plus that column's boolean as ``label``); a ``.txt`` file, or an alpaca entry that
maps only a ``prompt`` column and no ``response`` (LLaMA-Factory's pretraining entries such as
``c4_demo``) → pretraining text; otherwise SFT. Not supported (a DataError says why): hub-only
entries (no ``file_name``; nothing is downloaded) and multimodal columns (images/videos/audios).

A name that is not in the registry but is a path to a MiniMind-format file (``.jsonl``, ``.json``,
``.gz``) is read as such, its kind inferred from the first record's keys.

Placeholders: ``identity.json`` contains ``{{name}}``/``{{author}}``; pass
``placeholders={"name": ..., "author": ...}`` to substitute them in every string of every record.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dataset.cache import file_fingerprint
from dataset.chat import ChatTokenizer
from dataset.convert.alpaca import alpaca_to_conversation, alpaca_to_preference, alpaca_to_text
from dataset.convert.sharegpt import sharegpt_to_conversation, sharegpt_to_preference
from dataset.jsonl import DataError, ReadReport, Record, iter_raw, iter_records, VALIDATORS
from dataset.lm_dataset import SCHEMA_OF_KIND, Kind, TokenDataset, build_dataset

DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".gz")
MULTIMODAL_COLUMNS = ("images", "videos", "audios")


@dataclass
class DatasetSpec:
    """One ``dataset_info.json`` entry (unknown keys kept in ``extra`` for error messages)."""

    name: str
    file_name: str | None = None
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_entry(cls, name: str, entry: dict[str, Any]) -> "DatasetSpec":
        known = {"file_name", "formatting", "ranking", "columns", "tags"}
        return cls(
            name=name,
            file_name=entry.get("file_name"),
            formatting=entry.get("formatting", "alpaca"),
            ranking=bool(entry.get("ranking", False)),
            columns=dict(entry.get("columns") or {}),
            tags=dict(entry.get("tags") or {}),
            extra={k: v for k, v in entry.items() if k not in known},
        )

    @property
    def kind(self) -> Kind:
        if self.ranking:
            return "dpo"
        if "kto_tag" in self.columns:
            return "kto"
        is_txt = bool(self.file_name) and self.file_name.endswith(".txt")
        cols = self.columns
        prompt_only = self.formatting == "alpaca" and "prompt" in cols and "response" not in cols
        return "pretrain" if is_txt or prompt_only else "sft"

    def unsupported_reason(self) -> str | None:
        """Why this entry cannot be loaded here, or None if it can (file existence aside)."""
        if not self.file_name:
            hubs = {k: v for k, v in self.extra.items() if k.endswith("_hub_url")}
            return f"hub-only dataset {hubs or ''}: download it and set file_name (nothing is fetched)"
        if self.formatting not in ("alpaca", "sharegpt"):
            return f"unknown formatting {self.formatting!r} (expected alpaca or sharegpt)"
        if any(c in self.columns for c in MULTIMODAL_COLUMNS):
            return "multimodal data (images/videos/audios) is not supported"
        return None


def load_dataset_info(dataset_dir: str | Path) -> dict[str, DatasetSpec]:
    """Parse ``dataset_dir/dataset_info.json`` (an absent file is an empty registry)."""
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM is accepted
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}:{getattr(e, 'lineno', 1)}: invalid dataset_info.json ({e})") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DataError(f"{path}:1: dataset_info.json must map names to objects")
    return {name: DatasetSpec.from_entry(name, entry) for name, entry in info.items()}


def substitute_placeholders(obj: Any, values: dict[str, str]) -> Any:
    """Replace ``{{key}}`` by ``values[key]`` in every string inside ``obj`` (other text untouched)."""
    if isinstance(obj, str):
        for key, value in values.items():
            obj = obj.replace("{{" + key + "}}", value)
        return obj
    if isinstance(obj, list):
        return [substitute_placeholders(x, values) for x in obj]
    if isinstance(obj, dict):
        return {k: substitute_placeholders(v, values) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# name → files + converter
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedDataset:
    """A name resolved to files, a record converter and a kind; ``ident`` feeds the cache key."""

    name: str
    kind: Kind
    files: list[Path]
    convert: Callable[[Any], dict[str, Any]]
    ident: dict[str, Any]


def _converter(spec: DatasetSpec) -> Callable[[Any], dict[str, Any]]:
    kind, cols, tags = spec.kind, spec.columns, spec.tags
    if kind == "pretrain":
        if spec.file_name and spec.file_name.endswith(".txt"):
            return lambda r: r  # the reader already made {"text": line}
        return lambda r: alpaca_to_text(r, cols)
    if kind == "dpo":
        if spec.formatting == "sharegpt":
            return lambda r: sharegpt_to_preference(r, cols, tags)
        return lambda r: alpaca_to_preference(r, cols)
    if spec.formatting == "sharegpt":
        conversation = lambda r: sharegpt_to_conversation(r, cols, tags)  # noqa: E731
    else:
        conversation = lambda r: alpaca_to_conversation(r, cols)  # noqa: E731
    if kind == "kto":   # the feedback validator checks that the tag is a boolean
        return lambda r: {**conversation(r), "label": r.get(cols["kto_tag"])}
    return conversation


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))
        if not files:
            raise DataError(f"{path}: folder holds no data files ({', '.join(DATA_SUFFIXES)})")
        return files
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return [path]


def _infer_kind(path: Path) -> Kind:
    """MiniMind files carry no format tag: the first record's keys tell."""
    for line, obj in iter_raw(path):
        if isinstance(obj, dict):
            if "conversations" in obj and "label" in obj:
                return "kto"
            for key, kind in (("text", "pretrain"), ("conversations", "sft"), ("chosen", "dpo")):
                if key in obj:
                    return kind  # type: ignore[return-value]
        raise DataError(
            f"{path}:{line}: cannot tell the data kind (expected 'text', 'conversations' or 'chosen')"
        )
    raise DataError(f"{path}:1: file is empty (no records)")


def resolve(name: str, dataset_dir: str | Path) -> ResolvedDataset:
    """Resolve one dataset name (registry entry or MiniMind file path)."""
    dataset_dir = Path(dataset_dir)
    registry = load_dataset_info(dataset_dir)
    if name in registry:
        spec = registry[name]
        reason = spec.unsupported_reason()
        if reason:
            info = dataset_dir / "dataset_info.json"
            raise DataError(f"{info}: dataset {name!r} is not supported: {reason}")
        files = _data_files(dataset_dir / spec.file_name)  # type: ignore[operator]
        ident = {"spec": asdict(spec)}
        return ResolvedDataset(name, spec.kind, files, _converter(spec), ident)
    for candidate in (Path(name), dataset_dir / name):
        if candidate.is_file() and candidate.name.endswith(DATA_SUFFIXES):
            kind = _infer_kind(candidate)
            return ResolvedDataset(name, kind, [candidate], lambda r: r, {"minimind": kind})
    known = ", ".join(sorted(registry)[:10]) + (" ..." if len(registry) > 10 else "")
    raise DataError(
        f"unknown dataset {name!r}: not in {dataset_dir / 'dataset_info.json'} ({known or 'no registry'}) "
        "and not a data file"
    )


def supported_datasets(dataset_dir: str | Path) -> dict[str, str | None]:
    """Every registry entry → None if it can be loaded here, else the reason it cannot."""
    out = {}
    for name, spec in load_dataset_info(dataset_dir).items():
        if spec.file_name and not (Path(dataset_dir) / spec.file_name).exists():
            out[name] = f"file {spec.file_name} not found"
        else:
            out[name] = spec.unsupported_reason()
    return out


# --------------------------------------------------------------------------------------------
# reading and mixing
# --------------------------------------------------------------------------------------------


def _split_names(names: str | Sequence[str]) -> list[str]:
    out = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    out = [n for n in out if n]
    if not out:
        raise ValueError("no dataset names given")
    return out


def _read_resolved(
    ds: ResolvedDataset,
    report: ReadReport,
    placeholders: dict[str, str] | None,
    skip_bad_records: bool,
    max_samples: int | None,
) -> list[Record]:
    check = VALIDATORS[SCHEMA_OF_KIND[ds.kind]]

    def validate(raw: Any) -> dict[str, Any]:
        if placeholders:
            raw = substitute_placeholders(raw, placeholders)
        return check(ds.convert(raw))

    records: list[Record] = []
    if max_samples is not None and max_samples <= 0:
        return records
    for path in ds.files:
        for rec in iter_records(path, skip_bad_records=skip_bad_records, report=report, validate=validate):
            records.append(rec)
            if max_samples is not None and len(records) >= max_samples:
                return records  # stop reading: the rest of a large file is never parsed
    return records


def _per_dataset_limit(max_samples: int | dict[str, int] | None, name: str) -> int | None:
    return max_samples.get(name) if isinstance(max_samples, dict) else max_samples


def load_named_records(
    names: str | Sequence[str],
    dataset_dir: str | Path = "data",
    *,
    max_samples: int | dict[str, int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    placeholders: dict[str, str] | None = None,
    skip_bad_records: bool = False,
    report: ReadReport | None = None,
) -> tuple[Kind, list[Record]]:
    """Converted, validated MiniMind records of the named datasets, mixed (see module doc)."""
    resolved = [resolve(n, dataset_dir) for n in _split_names(names)]
    kinds = {r.kind for r in resolved}
    if len(kinds) > 1:
        detail = ", ".join(f"{r.name}={r.kind}" for r in resolved)
        raise DataError(f"cannot mix datasets of different kinds: {detail}")
    report = report if report is not None else ReadReport()
    records: list[Record] = []
    for r in resolved:
        limit = _per_dataset_limit(max_samples, r.name)
        records += _read_resolved(r, report, placeholders, skip_bad_records, limit)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(records))
        records = [records[i] for i in order]
    return resolved[0].kind, records


def load_named_datasets(
    names: str | Sequence[str],
    tokenizer: ChatTokenizer,
    max_length: int,
    *,
    dataset_dir: str | Path = "data",
    max_samples: int | dict[str, int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    placeholders: dict[str, str] | None = None,
    skip_bad_records: bool = False,
    **build_options: Any,
) -> TokenDataset:
    """One tokenized dataset from ``"name1,name2"`` (registry entries or MiniMind files).

    ``build_options`` go to ``lm_dataset.build_dataset`` (mode, add_bos, drop_remainder,
    cache_dir, use_cache). The cache key covers the files' content hashes, the registry entries
    and every option here, so any change rebuilds.
    """
    resolved = [resolve(n, dataset_dir) for n in _split_names(names)]
    kinds = {r.kind for r in resolved}
    if len(kinds) > 1:
        detail = ", ".join(f"{r.name}={r.kind}" for r in resolved)
        raise DataError(f"cannot mix datasets of different kinds: {detail}")
    source_id = None
    if build_options.get("use_cache", True):
        cache_dir = Path(build_options["cache_dir"]) if build_options.get("cache_dir") else None
        source_id = {
            "datasets": [
                {"name": r.name, **r.ident, "files": [file_fingerprint(p, cache_dir) for p in r.files]}
                for r in resolved
            ],
            "max_samples": max_samples,
            "seed": seed,
            "shuffle": shuffle,
            "placeholders": placeholders,
        }

    def source(report: ReadReport) -> Iterator[Record]:
        _, records = load_named_records(
            names,
            dataset_dir,
            max_samples=max_samples,
            seed=seed,
            shuffle=shuffle,
            placeholders=placeholders,
            skip_bad_records=skip_bad_records,
            report=report,
        )
        return iter(records)

    return build_dataset(
        resolved[0].kind,
        source,
        tokenizer,
        max_length,
        skip_bad_records=skip_bad_records,
        source_id=source_id,
        **build_options,
    )


def load_eval_datasets(
    names: str | Sequence[str], tokenizer: ChatTokenizer, max_length: int, **options: Any
) -> dict[str, TokenDataset]:
    """Each named dataset on its own (unshuffled), for per-dataset evaluation: name → dataset."""
    options = {**options, "shuffle": False}
    return {n: load_named_datasets(n, tokenizer, max_length, **options) for n in _split_names(names)}
