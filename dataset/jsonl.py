"""Record readers: JSONL (plain or ``.gz``), a top-level JSON array (LLaMA-Factory), plain text.

Scope: turn a file into ``Record(where, data)`` items, validating every record against a schema,
and report problems as ``DataError("file:line: what is wrong")`` — never a bare traceback. With
``skip_bad_records=True`` bad records are skipped instead and counted in a ``ReadReport`` (which
keeps the first few messages), so a training run can say what it threw away.

Schemas (the MiniMind formats, see docs/REFERENCE in ../shared):
- ``"text"``: ``{"text": str}`` (pretraining)
- ``"conversation"``: ``{"conversations": [messages], "tools"?: ...}`` (SFT); messages are
  normalised by ``dataset.chat.normalize_conversation`` (tool calls parsed, tools collected)
- ``"preference"``: ``{"chosen": [messages], "rejected": [messages]}`` (DPO)
- ``"feedback"``: ``{"conversations": [messages], "label": bool}`` (KTO: one completion and
  whether it is desirable; LLaMA-Factory's ``kto_tag``)
- ``None``: any JSON object, unvalidated (converters validate themselves)

Line numbers: JSONL records are numbered by physical line; elements of a JSON array by the line
on which the element starts; ``.txt`` files yield one ``{"text": line}`` record per non-empty line.
A UTF-8 byte-order mark at the start of a file (Windows editors write one) is ignored.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal, NamedTuple

from common.errors import UserError
from dataset.chat import normalize_conversation

Schema = Literal["text", "conversation", "preference", "feedback"]
MAX_REPORTED = 5  # how many skip messages a report keeps verbatim


class DataError(UserError, ValueError):
    """A data problem, with its location: ``"path:line: what is wrong"``."""


class RecordError(UserError, ValueError):
    """Raised by validators with a location-free message; readers add ``file:line``.

    Converters may raise a plain ValueError for bad data too; readers treat both alike.
    """


class Record(NamedTuple):
    """One validated record and where it came from (``"path:line"``), for later error messages."""

    where: str
    data: dict[str, Any]


@dataclass
class ReadReport:
    """What a reader did: records kept, records skipped and the first few reasons."""

    records: int = 0
    skipped: int = 0
    messages: list[str] = field(default_factory=list)

    def note_skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.messages) < MAX_REPORTED:
            self.messages.append(message)

    def merge(self, other: "ReadReport") -> None:
        self.records += other.records
        for m in other.messages:
            if len(self.messages) < MAX_REPORTED:
                self.messages.append(m)
        self.skipped += other.skipped

    def __str__(self) -> str:
        text = f"{self.records} records read, {self.skipped} skipped"
        if self.messages:
            text += "; first problems: " + " | ".join(self.messages)
        return text


# --------------------------------------------------------------------------------------------
# validators: data -> normalised data, or RecordError
# --------------------------------------------------------------------------------------------


def _require_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(f"expected a JSON object, got {type(data).__name__}")
    return data


def validate_text(data: Any) -> dict[str, Any]:
    """``{"text": str}``; an empty text is an error (it would train on EOS alone)."""
    data = _require_object(data)
    if "text" not in data:
        raise RecordError("missing field 'text'")
    if not isinstance(data["text"], str):
        raise RecordError(f"field 'text' must be a string, got {type(data['text']).__name__}")
    if not data["text"].strip():
        raise RecordError("field 'text' is empty")
    return {"text": data["text"]}


def _messages_field(data: dict[str, Any], name: str) -> list[Any]:
    if name not in data:
        raise RecordError(f"missing field '{name}'")
    value = data[name]
    if not isinstance(value, list):
        raise RecordError(f"field '{name}' must be a list of messages, got {type(value).__name__}")
    return value


def validate_conversation(data: Any) -> dict[str, Any]:
    """``{"conversations": [...]}`` → ``{"conversations": normalised, "tools": list | None}``."""
    data = _require_object(data)
    messages = _messages_field(data, "conversations")
    try:
        messages, tools = normalize_conversation(messages, data.get("tools"))
    except ValueError as e:
        raise RecordError(f"conversations: {e}") from None
    return {"conversations": messages, "tools": tools}


def validate_preference(data: Any) -> dict[str, Any]:
    """``{"chosen": [...], "rejected": [...]}``, each a full conversation ending in the answer."""
    data = _require_object(data)
    out: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        messages = _messages_field(data, side)
        try:
            messages, tools = normalize_conversation(messages, data.get("tools"))
        except ValueError as e:
            raise RecordError(f"{side}: {e}") from None
        if messages[-1]["role"] != "assistant":
            raise RecordError(f"{side}: the last message must be the assistant's response")
        out[side] = messages
        out["tools"] = out.get("tools") or tools
    return out


def validate_feedback(data: Any) -> dict[str, Any]:
    """``{"conversations": [...], "label": true|false}``: a conversation ending in the assistant's
    completion, and whether that completion is desirable (KTO's unpaired feedback)."""
    data = _require_object(data)
    label = data.get("label")
    if not isinstance(label, bool):
        raise RecordError("field 'label' must be true (desirable) or false (undesirable), got "
                          + ("nothing" if label is None else repr(label)))
    out = validate_conversation(data)
    if out["conversations"][-1]["role"] != "assistant":
        raise RecordError("conversations: the last message must be the assistant's completion")
    return {**out, "label": label}


VALIDATORS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "text": validate_text,
    "conversation": validate_conversation,
    "preference": validate_preference,
    "feedback": validate_feedback,
}


# --------------------------------------------------------------------------------------------
# raw readers: path -> (line, parsed JSON or RecordError)
# --------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")


def _strip_bom(data: bytes) -> bytes:
    """Drop a UTF-8 byte-order mark (Windows editors write one) from the start of a file."""
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Stream ``(line number, raw bytes)`` of non-blank lines; pretraining corpora can be GBs."""
    line_no, seen = 0, False
    try:
        with _open_binary(path) as f:
            for line_no, line in enumerate(f, start=1):
                if line_no == 1:
                    line = _strip_bom(line)
                if line.strip():
                    seen = True
                    yield line_no, line
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a corrupt/truncated .gz
        raise DataError(f"{path}:{line_no + 1}: cannot read ({e})") from None
    if not seen:
        raise DataError(f"{path}:1: file is empty (no records)")


def _base_suffix(path: Path) -> str:
    """``.jsonl`` for ``x.jsonl.gz``; the format is decided by the name under the compression."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start} of the line") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, obj_or_RecordError)``; blank lines are allowed and ignored."""
    for line_no, line in _iter_lines(path):
        try:
            yield line_no, json.loads(_decode_line(line))
        except RecordError as e:
            yield line_no, e
        except json.JSONDecodeError as e:
            yield line_no, RecordError(f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_text_lines(path: Path) -> Iterator[tuple[int, Any]]:
    for line_no, line in _iter_lines(path):
        try:
            yield line_no, {"text": _decode_line(line).rstrip("\r\n")}
        except RecordError as e:
            yield line_no, e


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Walk a top-level JSON array element by element so each record keeps its line number.

    The whole file is read (LLaMA-Factory's array files are small). A syntax error inside an
    array leaves no reliable place to resume, so it is always fatal, even with
    ``skip_bad_records`` (per-record schema errors can still be skipped).
    """
    try:
        with _open_binary(path) as f:
            raw = _strip_bom(f.read())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}:1: cannot read ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: invalid UTF-8") from None
    decoder = json.JSONDecoder()
    pos, line = 0, 1

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_at(p: int) -> int:  # incremental, so the walk stays linear in the file size
        nonlocal pos, line
        line += text.count("\n", pos, p)
        pos = p
        return line

    i = skip_ws(0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}:{line_at(i)}: expected a JSON array of records")
    i = skip_ws(i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield line_at(i), obj
        i = skip_ws(end)
        if i < len(text) and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if skip_ws(i + 1) != len(text):
                raise DataError(f"{path}:{line_at(i)}: unexpected data after the JSON array")
            return
        raise DataError(f"{path}:{line_at(i)}: invalid JSON (expected ',' or ']' in the array)")


def _starts_with_bracket(path: Path) -> bool:
    try:
        with _open_binary(path) as f:
            head = _strip_bom(f.read(4096))
            while head and not head.strip():
                head = f.read(4096)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}:1: cannot read ({e})") from None
    if not head:
        raise DataError(f"{path}:1: file is empty (no records)")
    return head.lstrip()[:1] == b"["


def iter_raw(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Parsed objects (or the ``RecordError`` for an unparsable line) with their line numbers.

    ``.json`` is a top-level array (or, if it does not start with ``[``, JSON lines), ``.txt``
    one text record per line, anything else JSON lines; ``.gz`` is decompressed on the fly.
    Missing, unreadable and empty files raise DataError.
    """
    path = Path(path)
    _check_file(path)
    suffix = _base_suffix(path)
    if suffix == ".txt":
        yield from _iter_text_lines(path)
    elif suffix == ".json" and _starts_with_bracket(path):
        yield from _iter_json_array(path)
    else:
        yield from _iter_jsonl(path)


# --------------------------------------------------------------------------------------------
# public readers
# --------------------------------------------------------------------------------------------


def iter_records(
    path: str | Path,
    schema: Schema | None = None,
    *,
    skip_bad_records: bool = False,
    report: ReadReport | None = None,
    validate: Callable[[Any], dict[str, Any]] | None = None,
) -> Iterator[Record]:
    """Validated records of one file, lazily (pretraining corpora need not fit in memory).

    ``validate`` overrides the schema's validator (converters pass their own). A bad record raises
    ``DataError("path:line: ...")``, or with ``skip_bad_records`` is counted in ``report``. A file
    whose records were all bad raises even in skip mode: an empty dataset is never what was meant.
    """
    report = report if report is not None else ReadReport()
    check = validate or (VALIDATORS[schema] if schema else _require_object)
    kept_before = report.records
    path = Path(path)
    for line_no, obj in iter_raw(path):
        where = f"{path}:{line_no}"
        try:
            if isinstance(obj, RecordError):
                raise obj
            data = check(obj)
        except ValueError as e:  # RecordError, or a converter's ValueError; DataError has its location
            message = str(e) if isinstance(e, DataError) else f"{where}: {e}"
            if not skip_bad_records:
                raise DataError(message) from None
            report.note_skip(message)
            continue
        report.records += 1
        yield Record(where, data)
    if report.records == kept_before:
        raise DataError(f"{path}:1: no valid records ({report})")


def read_records(
    path: str | Path,
    schema: Schema | None = None,
    *,
    skip_bad_records: bool = False,
    validate: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[list[Record], ReadReport]:
    """All validated records of one file plus the report (see ``iter_records``)."""
    report = ReadReport()
    records = iter_records(path, schema, skip_bad_records=skip_bad_records, report=report, validate=validate)
    records = list(records)
    return records, report


def write_records(
    src: str | Path,
    dst: str | Path,
    validate: Callable[[Any], dict[str, Any]],
    *,
    skip_bad_records: bool = False,
) -> ReadReport:
    """Convert ``src`` record by record with ``validate`` and write JSON lines to ``dst``
    atomically (temp file + rename). ``tools: None`` is left out. Used by the converter CLIs."""
    dst = Path(dst)
    report = ReadReport()
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in iter_records(src, skip_bad_records=skip_bad_records, report=report, validate=validate):
                data = {k: v for k, v in rec.data.items() if v is not None}
                f.write(json.dumps(data, ensure_ascii=False) + "\n")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return report
