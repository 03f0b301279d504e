"""Evaluation reports: per-item JSONL, summary JSON, Markdown and CSV from one list of results.

Scope: pure bookkeeping. A benchmark runner produces one dict per item, e.g.

    {"id", "prompt", "prediction", "extracted", "gold", "correct": bool,
     "error_kind": None | "no_answer" | "wrong_answer" | "truncated" | ..., "category", ...}

(``score_gsm8k`` / ``score_math`` / ``score_generation`` / ``score_loglik`` return these fields),
and ``write_report`` turns the list into four files whose numbers agree by construction: every
figure is computed once by ``summarize`` and the other files are rendered from that summary.

Only ``correct`` is required. ``error_kind`` is filled in when absent: None for a correct item,
``"truncated"`` when the item says ``truncated: True``, ``"no_answer"`` when nothing was extracted,
``"wrong_answer"`` otherwise. "Answer length" is the length of ``prediction`` in characters (and in
tokens when items carry ``n_generated_tokens``).
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from common.atomic import atomic_write_text

__all__ = ["ERROR_KINDS", "normalize_item", "summarize", "render_markdown", "write_report", "read_items"]

ERROR_KINDS = ("no_answer", "wrong_answer", "truncated")
CSV_COLUMNS = ("index", "id", "category", "correct", "error_kind", "extracted", "gold",
               "answer_chars", "prediction")
_NO_CATEGORY = "(none)"


def normalize_item(item: dict, index: int) -> dict:
    """Copy of one result with ``index``, a bool ``correct``, ``error_kind`` and ``category`` set."""
    if "correct" not in item:
        raise ValueError(f"result {index}: missing field 'correct'")
    out = dict(item)
    out["index"] = index
    out["correct"] = bool(item["correct"])
    if out["correct"]:
        out["error_kind"] = None
    elif not out.get("error_kind"):
        if out.get("truncated"):
            out["error_kind"] = "truncated"
        elif out.get("extracted") in (None, ""):
            out["error_kind"] = "no_answer"
        else:
            out["error_kind"] = "wrong_answer"
    cat = out.get("category")
    out["category"] = _NO_CATEGORY if cat is None or cat == "" else str(cat)
    return out


def _answer_chars(item: dict) -> int:
    pred = item.get("prediction")
    return len(pred) if isinstance(pred, str) else 0


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def summarize(items: list[dict], name: str = "eval", meta: dict | None = None) -> dict:
    """Summary of normalised items: overall and per-category accuracy, error-kind counts, mean
    answer length. Accuracy is ``correct / n`` (0.0 for an empty list)."""
    n = len(items)
    n_correct = sum(it["correct"] for it in items)
    by_cat: dict[str, list[dict]] = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it)
    per_category = {}
    for cat in sorted(by_cat):
        group = by_cat[cat]
        c = sum(it["correct"] for it in group)
        per_category[cat] = {"n": len(group), "correct": c, "accuracy": _ratio(c, len(group)),
                             "errors": dict(Counter(it["error_kind"] for it in group
                                                    if it["error_kind"]))}
    errors = Counter(it["error_kind"] for it in items if it["error_kind"])
    summary: dict[str, Any] = {
        "name": name,
        "n": n,
        "correct": n_correct,
        "accuracy": _ratio(n_correct, n),
        "per_category": per_category,
        "error_kinds": {k: errors.get(k, 0) for k in sorted(set(ERROR_KINDS) | set(errors))},
        "mean_answer_chars": _ratio(sum(_answer_chars(it) for it in items), n),
    }
    tokens = [it["n_generated_tokens"] for it in items if isinstance(it.get("n_generated_tokens"), int)]
    if tokens:
        summary["mean_answer_tokens"] = sum(tokens) / len(tokens)
    if meta:
        summary["meta"] = meta
    return summary


def _md_escape(text: object, limit: int = 120) -> str:
    s = "" if text is None else str(text)
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def render_markdown(summary: dict, items: list[dict], max_examples: int = 10) -> str:
    """Markdown report: headline, per-category table, error kinds, first failures."""
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731 - local formatter
    lines = [f"# Evaluation: {summary['name']}", ""]
    if summary.get("meta"):
        for k, v in summary["meta"].items():
            lines.append(f"- **{k}**: {_md_escape(v, 200)}")
        lines.append("")
    lines += [
        f"**Accuracy: {pct(summary['accuracy'])}** ({summary['correct']} / {summary['n']})  ",
        f"Mean answer length: {summary['mean_answer_chars']:.1f} characters"
        + (f", {summary['mean_answer_tokens']:.1f} tokens" if "mean_answer_tokens" in summary else ""),
        "",
        "## Per category",
        "",
        "| category | n | correct | accuracy |",
        "|---|---:|---:|---:|",
    ]
    for cat, row in summary["per_category"].items():
        lines.append(f"| {_md_escape(cat)} | {row['n']} | {row['correct']} | {pct(row['accuracy'])} |")
    lines += ["", "## Errors", "", "| error kind | count |", "|---|---:|"]
    for kind, count in summary["error_kinds"].items():
        lines.append(f"| {kind} | {count} |")
    failures = [it for it in items if not it["correct"]][:max_examples]
    if failures:
        lines += ["", f"## First {len(failures)} failures", "",
                  "| # | id | category | error | extracted | gold | prediction |",
                  "|---:|---|---|---|---|---|---|"]
        for it in failures:
            lines.append(
                f"| {it['index']} | {_md_escape(it.get('id'))} | {_md_escape(it['category'])} | "
                f"{it['error_kind']} | {_md_escape(it.get('extracted'), 40)} | "
                f"{_md_escape(it.get('gold'), 40)} | {_md_escape(it.get('prediction'), 80)} |")
    return "\n".join(lines) + "\n"


def _csv_text(items: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for it in items:
        row = {k: it.get(k) for k in CSV_COLUMNS}
        row["answer_chars"] = _answer_chars(it)
        row["error_kind"] = it["error_kind"] or ""
        for k in ("extracted", "gold", "id"):
            v = row[k]
            row[k] = "" if v is None else (json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v)
        writer.writerow(row)
    return buf.getvalue()


def _json_default(obj: object) -> Any:
    # Runners may hand over numpy / torch scalars; store their Python value, never crash the report.
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_report(results: Iterable[dict], out_dir: str | Path, name: str = "eval",
                 meta: dict | None = None) -> dict:
    """Write ``<name>.items.jsonl``, ``<name>.summary.json``, ``<name>.md`` and ``<name>.csv``.

    Returns the summary (with a ``files`` map added). ``meta`` (model, checkpoint, decoding
    settings, ...) is stored in the summary and printed at the top of the Markdown.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [normalize_item(r, i) for i, r in enumerate(results)]
    summary = summarize(items, name, meta)
    files = {"items": f"{name}.items.jsonl", "summary": f"{name}.summary.json",
             "markdown": f"{name}.md", "csv": f"{name}.csv"}
    dumps: Callable[[Any], str] = lambda o: json.dumps(o, ensure_ascii=False, default=_json_default)  # noqa: E731
    atomic_write_text(out / files["items"], "".join(dumps(it) + "\n" for it in items))
    atomic_write_text(out / files["csv"], _csv_text(items))
    atomic_write_text(out / files["markdown"], render_markdown(summary, items))
    summary = {**summary, "files": files}
    atomic_write_text(out / files["summary"],
                       json.dumps(summary, ensure_ascii=False, indent=2, default=_json_default) + "\n")
    return summary


def read_items(path: str | Path) -> list[dict]:
    """Read back a ``<name>.items.jsonl`` file (e.g. to re-summarise or merge runs)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
