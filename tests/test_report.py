"""Report writer: the four files agree with each other and with the input results."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from evaluation.report import normalize_item, read_items, summarize, write_report
from tasks.gsm8k import score_gsm8k


def _results() -> list[dict]:
    preds = [("#### 18", "18", "easy"), ("The answer is 7", "8", "easy"), ("no | idea", "3", "hard"),
             ("#### 5", "5", "hard"), ("so 12 | pipes\nand newlines", "12", "hard")]
    out = []
    for i, (pred, gold, cat) in enumerate(preds):
        r = score_gsm8k(pred, gold)
        out.append({"id": f"q{i}", "prompt": f"question {i}", "prediction": pred, "category": cat, **r})
    out.append({"id": "q5", "prompt": "p", "prediction": "The answer", "extracted": None, "gold": "1",
                "correct": False, "truncated": True, "category": "hard", "n_generated_tokens": 64})
    return out


def test_files_are_consistent(tmp_path: Path) -> None:
    results = _results()
    summary = write_report(results, tmp_path, name="gsm8k", meta={"model": "tiny", "temperature": 0})
    files = {k: tmp_path / v for k, v in summary["files"].items()}
    assert all(p.exists() for p in files.values())

    items = read_items(files["items"])
    on_disk = json.loads(files["summary"].read_text())
    with open(files["csv"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    md = files["markdown"].read_text()

    n, correct = len(results), sum(r["correct"] for r in results)
    assert summary["n"] == on_disk["n"] == len(items) == len(rows) == n == 6
    assert summary["correct"] == on_disk["correct"] == correct == 3
    assert sum(r["correct"] == "True" for r in rows) == correct
    assert on_disk["accuracy"] == pytest.approx(0.5)
    assert "**Accuracy: 50.00%** (3 / 6)" in md

    for cat, row in on_disk["per_category"].items():
        cat_rows = [r for r in rows if r["category"] == cat]
        assert row["n"] == len(cat_rows)
        assert row["correct"] == sum(r["correct"] == "True" for r in cat_rows)
        assert f"| {cat} | {row['n']} | {row['correct']} | {100 * row['accuracy']:.2f}% |" in md
    assert sum(r["n"] for r in on_disk["per_category"].values()) == n
    assert on_disk["per_category"]["easy"]["accuracy"] == pytest.approx(0.5)

    kinds = on_disk["error_kinds"]
    assert kinds == {"no_answer": 1, "truncated": 1, "wrong_answer": 1}
    assert sum(kinds.values()) == n - correct
    assert [r["error_kind"] for r in rows] == ["", "wrong_answer", "no_answer", "", "", "truncated"]
    for kind, count in kinds.items():
        assert f"| {kind} | {count} |" in md

    mean_chars = sum(len(r["prediction"]) for r in results) / n
    assert on_disk["mean_answer_chars"] == pytest.approx(mean_chars)
    assert sum(int(r["answer_chars"]) for r in rows) / n == pytest.approx(mean_chars)
    assert on_disk["mean_answer_tokens"] == 64
    assert on_disk["meta"]["model"] == "tiny"
    # the per-item file keeps everything the runner passed, plus the filled-in fields
    assert items[0]["prompt"] == "question 0" and items[5]["error_kind"] == "truncated"
    assert rows[4]["prediction"] == "so 12 | pipes\nand newlines"  # CSV quoting round-trips
    assert "\\|" in md  # Markdown table cells escape pipes


def test_error_kind_inference_and_edge_cases(tmp_path: Path) -> None:
    assert normalize_item({"correct": 1, "error_kind": "wrong_answer"}, 0)["error_kind"] is None
    assert normalize_item({"correct": False, "extracted": ""}, 0)["error_kind"] == "no_answer"
    assert normalize_item({"correct": False, "extracted": "3"}, 0)["error_kind"] == "wrong_answer"
    assert normalize_item({"correct": False, "error_kind": "format"}, 0)["error_kind"] == "format"
    assert normalize_item({"correct": True}, 3)["category"] == "(none)"
    with pytest.raises(ValueError, match="result 2: missing field 'correct'"):
        normalize_item({}, 2)
    empty = write_report([], tmp_path, name="empty")
    assert empty["n"] == 0 and empty["accuracy"] == 0.0
    assert (tmp_path / "empty.csv").read_text().startswith("index,id,category")
    s = summarize([normalize_item({"correct": True, "category": 3}, 0)])
    assert s["per_category"] == {"3": {"n": 1, "correct": 1, "accuracy": 1.0, "errors": {}}}
