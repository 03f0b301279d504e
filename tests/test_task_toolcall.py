"""The tool-use benchmark: answer scoring, the agent loop's mechanics (pause at a call, execute,
append the result, resume) on scripted models, and the metrics counted by hand."""
from __future__ import annotations

import json
import re

import pytest

import tasks
from dataset.synthetic import tool_conversations, write_jsonl
from model.generate import SamplingParams
from model.tokenizer import Tokenizer
from tasks import toolcall
from tests.scripted_model import scripted_model
from tools import default_registry


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir()


def call(name: str, **args) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


ITEMS = [
    {"id": "mul", "question": "What is 1234 * 5678?", "answer": "7006652", "kind": "multiply",
     "tools": ["calculator"]},
    {"id": "chain", "question": "12 laps of 400 m, in miles?", "answer": "2.982581723",
     "kind": "chain", "tools": ["calculator", "convert_units"]},
    {"id": "plain", "question": "What is 2 + 3?", "answer": "5", "kind": "none", "tools": []},
    {"id": "eager", "question": "What is 4 + 4?", "answer": "8", "kind": "none", "tools": []},
    {"id": "bad", "question": "What is 99999 * 2?", "answer": "199998", "kind": "multiply",
     "tools": ["calculator"]},
    {"id": "loop", "question": "Capital of Peru?", "answer": "Lima", "kind": "lookup",
     "tools": ["lookup"]},
]
# What the scripted "model" replies to each item, turn by turn. A reply that reads a tool result
# is a function of the last <tool_response> in the prompt, so a wrong append would show.
REPLIES = {
    "mul": [call("calculator", expression="1234 * 5678"), "1234 * 5678 = {r}\n#### {r}"],
    "chain": [call("calculator", expression="12 * 400"),
              lambda r: call("convert_units", value=int(r), from_unit="m", to_unit="mi"),
              "#### {r}"],
    "plain": ["2 + 3 = 5\n#### 5"],
    "eager": [call("calculator", expression="4 + 4"), "#### {r}"],
    "bad": [call("calculator", expr="99999 * 2") + "\n" + call("calculator", expression="9 / 0"),
            "#### 3"],
    "loop": [call("lookup", table="capital", key="Peru")] * 9,
}


def text_model(tok):
    """A generate function over rendered prompts: finds the item by its question, counts the
    model turns already in the prompt, and fills ``{r}`` with the last tool response."""
    def generate(prompts):
        outs = []
        for p in prompts:
            item = next(it for it in ITEMS if it["question"] in p)
            turn = p.count("<|im_start|>assistant") - 1  # the generation prompt is one of them
            reply = REPLIES[item["id"]][turn]
            responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", p, re.S)
            last = responses[-1] if responses else ""
            outs.append(reply(last) if callable(reply) else reply.replace("{r}", last))
        return outs
    return generate


def render(tok):
    return lambda msgs, tools: tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True)


def test_answers_are_extracted_and_compared():
    assert toolcall.extract_answer("x = 5\n#### 2.982581723\n") == "2.982581723"
    assert toolcall.extract_answer("The capital is Lima.\n#### Lima.") == "Lima"
    assert toolcall.extract_answer("so 12 and then 13") == "13"
    assert toolcall.extract_answer("no idea") is None
    assert toolcall.answer_correct("2.98258172", "2.982581723")
    assert not toolcall.answer_correct("2.982582171", "2.982581723")  # 1e-8 relative, no more
    assert toolcall.answer_correct("7,006,652", "7006652")
    assert not toolcall.answer_correct("7006653", "7006652")
    assert toolcall.answer_correct("lima", "Lima") and not toolcall.answer_correct("Lim", "Lima")


def test_agent_loop_pauses_executes_and_resumes(tok):
    rows = toolcall.run_agent(ITEMS, render(tok), text_model(tok), batch_size=4, max_turns=4)
    by = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == [it["id"] for it in ITEMS]
    # mul: call, read the product (computed by the real calculator), answer.
    assert by["mul"]["correct"] and by["mul"]["turns"] == 2 and by["mul"]["called"] == ["calculator"]
    transcript = json.loads(by["mul"]["transcript"])
    assert [m["role"] for m in transcript] == ["user", "assistant", "tool", "assistant"]
    assert transcript[2]["content"] == str(1234 * 5678)
    # chain: the conversion reads the product; three turns; both tools, right tool.
    assert by["chain"]["correct"] and by["chain"]["turns"] == 3 and by["chain"]["right_tool"]
    assert by["chain"]["extracted"] == "2.982581723"
    # distractors: direct answer (no call), and a needless call.
    assert (by["plain"]["turns"], by["plain"]["unnecessary_call"], by["plain"]["correct"]) == \
        (1, False, True)
    assert by["eager"]["unnecessary_call"] is True and by["eager"]["correct"]
    # bad: a schema-invalid call and a valid one the tool refuses; both results reach the model.
    t = json.loads(by["bad"]["transcript"])
    assert [m["role"] for m in t] == ["user", "assistant", "tool", "tool", "assistant"]
    assert "missing required argument 'expression'" in t[2]["content"] and "division by zero" in t[3]["content"]
    assert (by["bad"]["n_calls"], by["bad"]["valid_calls"], by["bad"]["correct"]) == (2, 1, False)
    # loop: still calling at the turn limit: no answer, out of turns, every turn used.
    assert by["loop"]["turns"] == 4 and by["loop"]["error_kind"] == "out_of_turns"
    assert not by["loop"]["correct"] and by["loop"]["n_calls"] == 4
    s = toolcall.summarize(rows)
    # Hand count: calls 1 + 2 + 0 + 1 + 2 + 4 = 10, valid 1 + 2 + 1 + 1 + 4 = 9.
    assert s["calls"] == 10 and s["valid_call_rate"] == pytest.approx(9 / 10)
    assert s["right_tool_rate"] == pytest.approx(4 / 4)        # bad called calculator: right tool
    assert s["unnecessary_call_rate"] == pytest.approx(1 / 2)
    assert s["accuracy_tool_items"] == pytest.approx(2 / 4) and s["accuracy_no_tool_items"] == 1.0
    assert s["mean_turns"] == pytest.approx((2 + 3 + 1 + 2 + 2 + 4) / 6)


def test_benchmark_through_the_real_generate_loop(tok, tmp_path):
    """eval_model's path (run_benchmarks, --bench toolcall) on a token-scripted tiny model:
    turn 1 emits a calculator call, turn 2 the answer, each from a fresh prefill of the
    re-rendered conversation."""
    from evaluation.runner import run_benchmarks
    first = tok.encode(call("calculator", expression="1234 * 5678")) + [tok.eos_id]
    second = tok.encode("#### 7006652") + [tok.eos_id]
    model = scripted_model([], tok.eos_id, turns=[first, second, second])
    data = tmp_path / "items.jsonl"
    write_jsonl([ITEMS[0]], data)
    out = run_benchmarks(model, tok, ["toolcall"], tmp_path / "eval", {"toolcall": data},
                         batch_size=1, params=SamplingParams(max_new_tokens=64), log=None)
    s = out["toolcall"]
    assert s["accuracy"] == 1.0
    assert (s["meta"]["valid_call_rate"], s["meta"]["mean_turns"], s["meta"]["calls"]) == (1.0, 2, 1)
    [row] = [json.loads(line) for line in (tmp_path / "eval" / "toolcall.items.jsonl").open()]
    assert row["called"] == ["calculator"] and row["turns"] == 2
    assert json.loads(row["transcript"])[2] == {"role": "tool", "content": "7006652"}
    assert "toolcall" in tasks.NAMES


def test_benchmark_offers_the_tools_asked_for(tok, tmp_path):
    """eval_model.py --tools: 'none' renders no tool list, so the same call is one of an unknown
    tool (invalid) and the item is answered from the model's head; an unknown name is refused."""
    import eval_model
    from common.errors import UserError
    from evaluation.runner import run_benchmarks
    first = tok.encode(call("calculator", expression="1234 * 5678")) + [tok.eos_id]
    model = scripted_model([], tok.eos_id, turns=[first, tok.encode("#### 7") + [tok.eos_id]])
    data = tmp_path / "items.jsonl"
    write_jsonl([ITEMS[0]], data)
    args = eval_model.parse_args(["--model", "m", "--bench", "toolcall", "--tools", "none"])
    out = run_benchmarks(model, tok, ["toolcall"], tmp_path / "eval", {"toolcall": data},
                         batch_size=1, params=SamplingParams(max_new_tokens=64), log=None,
                         registry=default_registry(eval_model.tool_names(args.tools)))
    [row] = [json.loads(line) for line in (tmp_path / "eval" / "toolcall.items.jsonl").open()]
    assert "<tools>" not in row["prompt"] and "calculator" not in row["prompt"]
    assert out["toolcall"]["meta"]["valid_call_rate"] == 0.0 and row["called"] == ["calculator"]
    with pytest.raises(UserError, match="--tools: unknown built-in tool 'calc'"):
        eval_model.parse_args(["--model", "m", "--tools", "calc"])


def test_items_from_tool_conversations(tmp_path):
    src, out = tmp_path / "sft.jsonl", tmp_path / "items.jsonl"
    records = tool_conversations(20, seed=5)
    write_jsonl(records, src)
    toolcall.main(["convert", "--src", str(src), "--out", str(out), "--kind", "eval"])
    items = toolcall.load(out)
    # Identity distractors end in a sentence, not an answer to check: they are skipped.
    answered = [r for r in records if "####" in r["conversations"][-1]["content"]]
    assert len(items) == len(answered) >= 15
    for rec, it in zip(answered, items):
        msgs = rec["conversations"]
        assert it["question"] == msgs[0]["content"]
        assert it["tools"] == list(dict.fromkeys(c["name"] for m in msgs for c in m.get("tool_calls", [])))
        assert msgs[-1]["content"].endswith(f"#### {it['answer']}")
    sample = tasks.rl_prompt(items[0], "x:1")
    assert sample["task"] == "toolcall" and sample["gold"] == items[0]["answer"]
    assert tasks.rl_prompt({"question": "q", "answer": "#### 4"}, "x:1")["task"] == "gsm8k"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1", "tools": "calculator"}\n')
    with pytest.raises(Exception, match="bad.jsonl:1.*tools"):
        toolcall.load(bad)
