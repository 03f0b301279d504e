"""Alpaca/ShareGPT conversion, the dataset_info.json registry, mixing, and LLaMA-Factory's demo sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataset.convert import alpaca, sharegpt
from dataset.convert.alpaca import alpaca_to_conversation, alpaca_to_preference
from dataset.convert.sharegpt import sharegpt_to_conversation, sharegpt_to_preference
from dataset.jsonl import DataError, read_records
from dataset.registry import (
    load_named_datasets,
    load_named_records,
    load_eval_datasets,
    substitute_placeholders,
    supported_datasets,
)
from tests.conftest import shared_path



@pytest.fixture(scope="module")
def tok(upstream_tokenizer):
    return upstream_tokenizer


def lf_demo() -> Path:
    return shared_path("llamafactory_demo", "dataset_info.json").parent


# ------------------------------------------------------------------------------------------
# converters
# ------------------------------------------------------------------------------------------


def test_alpaca_conversion():
    rec = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be exact.",
           "history": [["hi", "hey"]]}
    assert alpaca_to_conversation(rec)["conversations"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "Translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert alpaca_to_conversation({"instruction": "Q", "input": "", "output": "A"})["conversations"] == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    remapped = alpaca_to_conversation({"question": "Q", "answer": "A"}, {"prompt": "question", "response": "answer"})
    assert remapped["conversations"][-1] == {"role": "assistant", "content": "A"}
    pair = alpaca_to_preference({"instruction": "Q", "chosen": "good", "rejected": "bad"})
    assert pair["chosen"][-1]["content"] == "good" and pair["rejected"][0] == {"role": "user", "content": "Q"}
    bad_records = [
        ({"instruction": "Q"}, "missing field 'output'"),
        ({"instruction": 3, "output": "A"}, "must be a string"),
        ({"instruction": "", "output": "A"}, "empty instruction"),
        ({"instruction": "Q", "output": "A", "history": [["only one"]]}, "history entry 0"),
    ]
    for bad, what in bad_records:
        with pytest.raises(ValueError, match=what):
            alpaca_to_conversation(bad)


GLAIVE_LIKE = {
    "conversations": [
        {"from": "human", "value": "Password of length 8?"},
        {"from": "function_call", "value": '{"name": "make_password", "arguments": {"length": 8}}'},
        {"from": "observation", "value": '{"password": "x1y2z3w4"}'},
        {"from": "gpt", "value": "Here: x1y2z3w4"},
    ],
    "system": "You help.",
    "tools": '[{"name": "make_password", "parameters": {"type": "object"}}]',
}


def test_sharegpt_conversion():
    out = sharegpt_to_conversation(GLAIVE_LIKE)
    assert out["tools"] == GLAIVE_LIKE["tools"]
    assert out["conversations"] == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Password of length 8?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "make_password", "arguments": {"length": 8}}]},
        {"role": "tool", "content": '{"password": "x1y2z3w4"}'},
        {"role": "assistant", "content": "Here: x1y2z3w4"},
    ]
    openai_style = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    assert sharegpt_to_conversation(openai_style, {"messages": "messages"}, tags)["conversations"][1]["content"] == "b"
    ranked = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    pair = sharegpt_to_preference(ranked)
    assert [m["content"] for m in pair["chosen"]] == ["q", "good"] and pair["rejected"][-1]["content"] == "bad"
    with pytest.raises(ValueError, match="turn 0: unknown role 'bot'"):
        sharegpt_to_conversation({"conversations": [{"from": "bot", "value": "x"}]})
    with pytest.raises(ValueError, match="turn 0: function_call value is not valid JSON"):
        sharegpt_to_conversation({"conversations": [{"from": "function_call", "value": "{"}]})


OPENAI_TOOLS = {
    "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "12345 * 6789?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "12345 * 6789"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "83810205"},
        {"role": "assistant", "content": "#### 83810205"},
    ],
    "tools": [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}],
}
OPENAI_INFO = {"file_name": "agent.json", "formatting": "sharegpt",
               "columns": {"messages": "messages", "tools": "tools"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                        "assistant_tag": "assistant", "system_tag": "system"}}


def test_openai_tool_conversations_through_dataset_info(tmp_path):
    """LLaMA-Factory's OpenAI-format entry: tool_calls kept (null content), role tool = result,
    and the rendered text holds the call and the result where the template puts them."""
    from model.tokenizer import Tokenizer
    (tmp_path / "agent.json").write_text(json.dumps([OPENAI_TOOLS]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"agent": OPENAI_INFO}))
    kind, [rec] = load_named_records("agent", tmp_path)
    assert kind == "sft"
    msgs = rec.data["conversations"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_calls"] == [{"name": "calculator", "arguments": '{"expression": "12345 * 6789"}'}]
    assert msgs[3]["content"] == "83810205" and rec.data["tools"][0]["function"]["name"] == "calculator"
    text = Tokenizer.from_dir().apply_chat_template(msgs, tools=rec.data["tools"])
    assert ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "12345 * 6789"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n83810205\n</tool_response>') in text
    bad = {"messages": [{"role": "assistant", "content": None}]}
    with pytest.raises(ValueError, match="turn 0: 'content' must be a string"):
        sharegpt_to_conversation(bad, OPENAI_INFO["columns"], OPENAI_INFO["tags"])


def test_converter_cli_writes_minimind_jsonl(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps([{"instruction": "Q", "input": "", "output": "A"}, {"instruction": "Q2"}], indent=1))
    dst = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=f"^{src}:\\d+: missing field 'output'"):
        alpaca.main([str(src), str(dst)])
    alpaca.main([str(src), str(dst), "--skip-bad-records"])
    records, _ = read_records(dst, "conversation")
    assert [m["content"] for m in records[0].data["conversations"]] == ["Q", "A"]
    src2 = tmp_path / "s.jsonl"
    src2.write_text(json.dumps(GLAIVE_LIKE) + "\n")
    sharegpt.main([str(src2), str(dst)])
    [rec], _ = read_records(dst, "conversation")
    assert rec.data["tools"][0]["name"] == "make_password"


def test_placeholders():
    rec = {"instruction": "who?", "output": "I am {{name}} by {{author}}; {{other}} stays", "n": 1}
    out = substitute_placeholders(rec, {"name": "MiniMind", "author": "Forge"})
    assert out == {"instruction": "who?", "output": "I am MiniMind by Forge; {{other}} stays", "n": 1}


# ------------------------------------------------------------------------------------------
# a self-contained registry
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def registry(tmp_path: Path) -> Path:
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": f"a{i}", "output": f"A{i}"} for i in range(6)]))
    turns = [[{"from": "human", "value": f"s{i}"}, {"from": "gpt", "value": f"S{i}"}] for i in range(4)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns))
    ranked = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "y"},
        "rejected": {"from": "gpt", "value": "n"},
    }
    (tmp_path / "p.json").write_text(json.dumps([ranked]))
    (tmp_path / "bad.json").write_text('[\n{"instruction": "x", "output": "y"},\n{"instruction": "x"}\n]')
    info = {
        "a": {"file_name": "a.json"},
        "s": {"file_name": "s.jsonl", "formatting": "sharegpt"},
        "p": {"file_name": "p.json", "formatting": "sharegpt", "ranking": True,
              "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "bad": {"file_name": "bad.json"},
        "hub": {"hf_hub_url": "someone/something"},
        "missing": {"file_name": "nope.json"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def users(records) -> list[str]:
    return [r.data["conversations"][0]["content"] for r in records]


def test_mixing_max_samples_and_seeded_shuffle(registry):
    kind, records = load_named_records("a,s", registry, shuffle=False, max_samples={"a": 2})
    assert kind == "sft" and users(records) == ["a0", "a1", "s0", "s1", "s2", "s3"]
    _, shuffled = load_named_records(["a", "s"], registry, seed=1, max_samples=3)
    _, again = load_named_records(["a", "s"], registry, seed=1, max_samples=3)
    assert users(shuffled) == users(again) and sorted(users(shuffled)) == ["a0", "a1", "a2", "s0", "s1", "s2"]
    assert users(load_named_records("a,s", registry, seed=2, max_samples=3)[1]) != users(shuffled)
    kind, pairs = load_named_records("p", registry)
    assert kind == "dpo" and pairs[0].data["chosen"][-1] == {"role": "assistant", "content": "y"}


def test_registry_errors(registry):
    with pytest.raises(DataError, match="cannot mix datasets of different kinds: a=sft, p=dpo"):
        load_named_records("a,p", registry)
    with pytest.raises(DataError, match="unknown dataset 'zzz'"):
        load_named_records("zzz", registry)
    with pytest.raises(DataError, match="'hub' is not supported: hub-only"):
        load_named_records("hub", registry)
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_named_records("missing", registry)
    with pytest.raises(DataError, match=f"^{registry / 'bad.json'}:3: missing field 'output'"):
        load_named_records("bad", registry)
    report_kind, recs = load_named_records("bad", registry, skip_bad_records=True)
    assert len(recs) == 1


def test_minimind_file_by_path(registry, tok):
    path = registry / "mm.jsonl"
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    path.write_text(json.dumps({"conversations": msgs}) + "\n")
    ds = load_named_datasets(f"s,{path}", tok, 64, dataset_dir=registry, use_cache=False)
    assert len(ds) == 5


# ------------------------------------------------------------------------------------------
# LLaMA-Factory's demo folder
# ------------------------------------------------------------------------------------------

EXPECTED_DEMO = {  # every entry whose file exists in the demo folder → kind, or None if unsupported
    "identity": "sft", "alpaca_en_demo": "sft", "alpaca_zh_demo": "sft",
    "glaive_toolcall_en_demo": "sft", "glaive_toolcall_zh_demo": "sft",
    "dpo_en_demo": "dpo", "dpo_zh_demo": "dpo", "wiki_demo": "pretrain", "c4_demo": "pretrain",
    "kto_en_demo": "kto",
}


def test_every_demo_entry_with_a_file(tok, tmp_path):
    demo = lf_demo()
    info = json.loads((demo / "dataset_info.json").read_text())
    with_file = {n for n, e in info.items() if e.get("file_name") and (demo / e["file_name"]).exists()}
    assert with_file == set(EXPECTED_DEMO)
    support = supported_datasets(demo)
    assert {n for n, reason in support.items() if reason is None} == {n for n, k in EXPECTED_DEMO.items() if k}
    assert "hub-only" in support["alpaca_en"] and "not found" in support["mllm_demo"]
    for name, kind in EXPECTED_DEMO.items():
        ds = load_named_datasets(name, tok, 1024, dataset_dir=demo, max_samples=8, cache_dir=tmp_path)
        assert ds.kind == kind and len(ds) > 0 and ds.stats.skipped_bad == 0, (name, ds.stats)


def test_alpaca_plus_identity_mix(tok, tmp_path):
    demo = lf_demo()
    names = "alpaca_en_demo,identity"
    ds = load_named_datasets(names, tok, 256, dataset_dir=demo, placeholders={"name": "MiniMind", "author": "Forge"},
                             cache_dir=tmp_path)
    n_alpaca, n_identity = (len(json.loads((demo / f).read_text())) for f in ("alpaca_en_demo.json", "identity.json"))
    assert ds.stats.records == n_alpaca + n_identity and len(ds) == ds.stats.records - ds.stats.dropped_no_supervision
    texts = [tok.decode(ds[i]["input_ids"].tolist()) for i in range(len(ds))]
    assert not any("{{name}}" in t or "{{author}}" in t for t in texts)
    n_named = sum("{{name}}" in json.dumps(r) for r in json.loads((demo / "identity.json").read_text()))
    assert sum("MiniMind" in t for t in texts) >= n_named > 50
    evals = load_eval_datasets(names, tok, 256, dataset_dir=demo, cache_dir=tmp_path, max_samples=5)
    assert list(evals) == ["alpaca_en_demo", "identity"]
    assert all(len(d) == 5 and d.stats.records == 5 for d in evals.values())
