"""Readers: every bad-data case names file and line; skip mode counts; formats (.gz, JSON array, .txt)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dataset.jsonl import DataError, iter_raw, read_records

GOOD = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path: Path, name: str, lines: list[str] | bytes) -> Path:
    path = tmp_path / name
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


def conv(*messages: dict) -> str:
    return json.dumps({"conversations": list(messages)}, ensure_ascii=False)


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}

BAD_CONVERSATIONS = [
    ("{not json", "invalid JSON"),
    (json.dumps({"messages": []}), "missing field 'conversations'"),
    (json.dumps({"conversations": "hi"}), "must be a list"),
    (conv(U, {"role": "assistant", "content": 5}), "'content' must be a string"),
    (conv(U, {"role": "bot", "content": "x"}), "unknown role 'bot'"),
    (conv({"content": "x"}, A), "has no 'role'"),
    (conv(), "empty conversation"),
    (conv(U, {"role": "system", "content": "s"}), "no assistant turn"),
    (conv(U, {"role": "assistant", "content": "", "tool_calls": "{bad"}), "tool_calls is not valid JSON"),
    (conv(U, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}), "has no 'name'"),
    (conv(U, {"role": "user", "content": "", "tool_calls": [{"name": "f"}]}), "only assistant messages"),
    (conv({"role": "user", "content": "x<|im_start|>assistant\n"}, A), "reserved control string"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("bad, what", BAD_CONVERSATIONS)
def test_bad_conversation_names_file_and_line(tmp_path, bad, what):
    path = write(tmp_path, "sft.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(DataError) as err:
        read_records(path, "conversation")
    assert str(err.value).startswith(f"{path}:3: ")  # line 2 is blank and still counted
    assert what in str(err.value)


@pytest.mark.parametrize(
    "bad, what",
    [
        (json.dumps({"txt": "x"}), "missing field 'text'"),
        (json.dumps({"text": ["x"]}), "'text' must be a string"),
        (json.dumps({"text": "  "}), "'text' is empty"),
    ],
)
def test_bad_pretrain_record(tmp_path, bad, what):
    path = write(tmp_path, "pt.jsonl", [json.dumps({"text": "ok"}), bad])
    with pytest.raises(DataError, match=f"^{path}:2: .*{what}"):
        read_records(path, "text")


def test_bad_preference_record(tmp_path):
    chosen = [U, A]
    path = write(tmp_path, "dpo.jsonl", [json.dumps({"chosen": chosen, "rejected": [A, U]})])
    with pytest.raises(DataError, match=f"^{path}:1: rejected: the last message must be the assistant"):
        read_records(path, "preference")
    path = write(tmp_path, "dpo2.jsonl", [json.dumps({"chosen": chosen})])
    with pytest.raises(DataError, match=f"^{path}:1: missing field 'rejected'"):
        read_records(path, "preference")


def test_non_utf8_line(tmp_path):
    path = write(tmp_path, "x.jsonl", json.dumps(GOOD).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: invalid UTF-8"):
        read_records(path, "conversation")


def test_empty_and_missing_files(tmp_path):
    empty = write(tmp_path, "empty.jsonl", b"")
    with pytest.raises(DataError, match=f"^{empty}:1: file is empty"):
        read_records(empty, "text")
    blank = write(tmp_path, "blank.jsonl", b"\n  \n")
    with pytest.raises(DataError, match="file is empty"):
        read_records(blank, "text")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl", "text")
    corrupt = tmp_path / "bad.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=f"^{corrupt}:1: cannot read"):
        read_records(corrupt, "text")


def test_skip_mode_counts_and_reports(tmp_path):
    lines = [json.dumps(GOOD), "{oops", conv(U), json.dumps(GOOD), conv(U, {"role": "x", "content": "c"})]
    path = write(tmp_path, "mixed.jsonl", lines)
    records, report = read_records(path, "conversation", skip_bad_records=True)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:4"]
    assert (report.records, report.skipped) == (2, 3)
    assert [m.split(": ")[0] for m in report.messages] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "no assistant turn" in report.messages[1]


def test_skip_mode_with_nothing_valid_still_raises(tmp_path):
    path = write(tmp_path, "allbad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no valid records .*2 skipped"):
        read_records(path, "text", skip_bad_records=True)


def test_gzip_jsonl(tmp_path):
    path = write(tmp_path, "pt.jsonl.gz", [json.dumps({"text": "a"}), json.dumps({"text": "b"}), "{"])
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
        read_records(path, "text")
    records, _ = read_records(path, "text", skip_bad_records=True)
    assert [r.data["text"] for r in records] == ["a", "b"]


def test_json_array_keeps_element_lines(tmp_path):
    items = [GOOD, {"conversations": [U]}, GOOD]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(items, indent=2))
    starts = [line for line, _ in iter_raw(path)]
    text_lines = path.read_text().split("\n")
    assert [text_lines[i - 1].strip() for i in starts] == ["{"] * 3
    with pytest.raises(DataError, match=f"^{path}:{starts[1]}: .*no assistant turn"):
        read_records(path, "conversation")
    records, report = read_records(path, "conversation", skip_bad_records=True)
    assert len(records) == 2 and report.skipped == 1


def test_json_array_syntax_error_is_fatal_with_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
        read_records(path, "text", skip_bad_records=True)


def test_txt_lines_are_text_records(tmp_path):
    path = write(tmp_path, "corpus.txt", ["first doc", "", "second doc"])
    records, _ = read_records(path, "text")
    assert [(r.where, r.data["text"]) for r in records] == [(f"{path}:1", "first doc"), (f"{path}:3", "second doc")]


def test_normalisation_of_tools_and_tool_calls(tmp_path):
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    record = {
        "conversations": [
            {"role": "system", "content": "sys", "tools": json.dumps(tools)},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": json.dumps(
                    [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
                ),
            },
            {"role": "tool", "content": {"temp": 20}},
            {"role": "assistant", "content": [{"type": "text", "text": "20"}], "reasoning_content": "easy"},
        ]
    }
    path = write(tmp_path, "t.jsonl", [json.dumps(record)])
    [rec], _ = read_records(path, "conversation")
    msgs = rec.data["conversations"]
    assert rec.data["tools"] == tools
    assert "tools" not in msgs[0]
    assert msgs[2] == {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": "{}"}]}
    assert msgs[3]["content"] == '{"temp": 20}'
    assert msgs[4] == {"role": "assistant", "content": "20", "reasoning_content": "easy"}


def test_json_array_gz_and_bad_bytes(tmp_path):
    path = write(tmp_path, "arr.json.gz", b'[\n {"text": "a"},\n {"text": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=f"^{path}:3: invalid UTF-8"):
        read_records(path, "text")
    good = write(tmp_path, "ok.json.gz", json.dumps([{"text": "a"}, {"text": "b"}]).encode())
    assert [r.data["text"] for r in read_records(good, "text")[0]] == ["a", "b"]


BOM = b"\xef\xbb\xbf"   # what Windows editors (Notepad, Excel's "UTF-8" CSV->JSON tools) put first


@pytest.mark.parametrize("name, body", [
    ("pt.jsonl", b'{"text": "a"}\n{"text": "b"}\n'),
    ("pt.jsonl.gz", b'{"text": "a"}\n{"text": "b"}\n'),
    ("pt.json", b'[\n {"text": "a"},\n {"text": "b"}\n]\n'),   # a JSON array
    ("lines.json", b'{"text": "a"}\n{"text": "b"}\n'),          # JSON lines named .json
    ("pt.txt", b"a\nb\n"),
])
def test_utf8_bom_is_accepted(tmp_path, name, body):
    path = write(tmp_path, name, BOM + body)
    records, report = read_records(path, "text")
    assert [r.data["text"] for r in records] == ["a", "b"] and report.skipped == 0
    assert records[0].where == f"{path}:{2 if name == 'pt.json' else 1}"


def test_bom_inside_a_line_is_still_an_error(tmp_path):
    path = write(tmp_path, "pt.jsonl", b'{"text": "a"}\n' + BOM + b'{"text": "b"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: invalid JSON"):
        read_records(path, "text")


def test_dataset_info_with_bom(tmp_path):
    from dataset.convert._io import update_dataset_info
    from dataset.registry import load_dataset_info

    info = tmp_path / "dataset_info.json"
    info.write_bytes(BOM + json.dumps({"mine": {"file_name": "mine.jsonl"}}).encode())
    assert list(load_dataset_info(tmp_path)) == ["mine"]
    assert set(update_dataset_info(info, {"other": {"file_name": "o.jsonl"}})) == {"mine", "other"}
