"""Record I/O shared by the benchmark modules (``tasks/{commonsense,gsm8k,math}.py``): read
records with their location, check fields, write JSONL atomically, maintain a LLaMA-Factory
registry.

Scope: only what those modules need on top of ``dataset.jsonl``; this module imports nothing from
``tasks`` (the layering is ``tasks`` -> this -> ``dataset.jsonl``).
Every error names the file and the line of the offending record (``DataError("path:line: what is
wrong")``, the contract in docs/DESIGN.md), so a bad record in a 10k-item file is found at once.
"""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from common.atomic import atomic_path, atomic_write_text
from dataset.jsonl import DataError, Record
from dataset.jsonl import iter_records as _iter_records

__all__ = [
    "DataError", "open_text", "iter_records", "require", "first_field", "take", "write_jsonl",
    "write_json",
    "dataset_info_entry", "update_dataset_info", "register_file", "write_converted",
]


def open_text(path: str | Path) -> IO[str]:
    """Open a text file for reading, transparently gunzipping ``*.gz`` (used for PIQA's .lst)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")   # -sig: a leading BOM is dropped
    return open(path, encoding="utf-8-sig")


def iter_records(path: str | Path) -> Iterator[Record]:
    """``(where, record)`` for each JSON object of a ``.json`` array or ``.jsonl`` file (``.gz`` ok).

    Thin wrapper over ``dataset.jsonl.iter_records`` (the project's one reader: streaming JSONL,
    element-wise JSON arrays with line numbers, ``DataError("path:line: ...")`` on bad JSON, a
    missing or an empty file). ``where`` prefixes every error a converter raises about a record.
    """
    return _iter_records(path)


def require(record: dict, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """``record[key]``, checked for presence and type; raises DataError naming file and line."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} should be {want}, got {type(value).__name__}")
    return value


def first_field(record: dict, where: str, *names: str) -> Any:
    """The first of ``names`` that ``record`` holds (not None); DataError naming them all otherwise.
    Unlike ``require`` the type is not checked: eval files hold golds as numbers or strings."""
    for n in names:
        if record.get(n) is not None:
            return record[n]
    raise DataError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")


def take(records: Iterable[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records (all when ``limit`` is None or negative), read lazily."""
    return list(itertools.islice(records, limit if limit is not None and limit >= 0 else None))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as UTF-8 JSONL (non-ASCII kept readable); returns the number written."""
    count = 0

    def write(f: IO[str]) -> None:
        nonlocal count
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        write(f)
    return count


def write_json(path: str | Path, obj: Any) -> None:
    """Write one JSON document (indented, UTF-8), atomically."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


# LLaMA-Factory registry (data/dataset_info.json) entries for the files the converters write.
# "alpaca" files hold {"instruction","input","output"}; "sharegpt" here means our MiniMind
# conversations ({"role","content"} messages), which LLaMA-Factory reads with role/content tags.
def dataset_info_entry(file_name: str, formatting: str) -> dict:
    """One ``dataset_info.json`` entry for a converted file (``formatting``: alpaca | sharegpt)."""
    if formatting == "alpaca":
        return {"file_name": file_name,
                "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    if formatting == "sharegpt":
        return {"file_name": file_name, "formatting": "sharegpt",
                "columns": {"messages": "conversations"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
    raise ValueError(f"unknown LLaMA-Factory formatting {formatting!r} (alpaca | sharegpt)")


def update_dataset_info(path: str | Path, entries: dict[str, dict]) -> dict:
    """Merge ``entries`` into the registry at ``path`` (created if missing); returns the result.

    Existing entries with other names are kept, so several converter runs can share one registry.
    """
    path = Path(path)
    registry: dict = {}
    if path.exists():
        with open(path, encoding="utf-8-sig") as f:
            try:
                registry = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(registry, dict):
            raise DataError(f"{path}:1: dataset_info.json must be a JSON object")
    registry.update(entries)
    write_json(path, registry)
    return registry


def register_file(dataset_info: str | Path, out: str | Path, name: str, formatting: str) -> dict:
    """Add ``out`` to the registry ``dataset_info`` under ``name``.

    LLaMA-Factory resolves ``file_name`` against the registry's folder, so the path is stored
    relative to it when ``out`` lies inside that folder, absolute otherwise.
    """
    info = Path(dataset_info).resolve()
    out_abs = Path(out).resolve()
    rel = out_abs.relative_to(info.parent) if out_abs.is_relative_to(info.parent) else out_abs
    return update_dataset_info(info, {name: dataset_info_entry(rel.as_posix(), formatting)})


def write_converted(items: Iterable[dict], out: str | Path, kind: str, inline: bool, *,
                    to_sft: Callable[[dict, bool], dict], to_alpaca: Callable[[dict], dict],
                    to_eval: Callable[[dict], dict], dataset_info: str | Path | None = None,
                    registry_name: str = "") -> int:
    """Write a benchmark's items as ``kind`` records (sft | alpaca | eval) to ``out``, and
    register them in ``dataset_info`` when given; returns the number written.

    The GSM8K and MATH converters differ only in how one item becomes a record.
    """
    formats = {"sft": ("sharegpt", lambda it: to_sft(it, inline)), "alpaca": ("alpaca", to_alpaca),
               "eval": (None, to_eval)}
    if kind not in formats:
        raise ValueError(f"kind must be sft | alpaca | eval, got {kind!r}")
    formatting, convert = formats[kind]
    if dataset_info is not None:   # checked before writing, so a refused call leaves no file
        if formatting is None:
            raise ValueError("--dataset-info needs --kind sft or alpaca")
        if kind == "sft" and not inline:
            # LLaMA-Factory's sharegpt reader ignores reasoning_content; register the inline form.
            raise ValueError("--dataset-info with --kind sft needs --inline (LLaMA-Factory does not "
                             "read reasoning_content); or use --kind alpaca")
    n = write_jsonl(out, map(convert, items))
    if dataset_info is not None:
        register_file(dataset_info, out, registry_name, formatting)
    return n


def reasoning_sft(question: str, reasoning: str, final: str, inline: bool) -> dict:
    """A one-turn SFT conversation for a worked answer: the reasoning in ``reasoning_content``
    (rendered inside <think> by the chat template), or inline before the final line."""
    assistant: dict = {"role": "assistant"}
    if inline:
        assistant["content"] = f"{reasoning}\n{final}"
    else:
        assistant["reasoning_content"] = reasoning
        assistant["content"] = final
    return {"conversations": [{"role": "user", "content": question}, assistant]}


def reasoning_alpaca(question: str, reasoning: str, final: str) -> dict:
    """An Alpaca row with the reasoning inline (LLaMA-Factory has no reasoning column)."""
    return {"instruction": question, "input": "", "output": f"{reasoning}\n{final}"}
