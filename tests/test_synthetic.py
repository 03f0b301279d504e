"""Synthetic data tests: determinism, arithmetic recomputed from the text, held-out split,
DPO pairs that really disagree, record formats, and the CLI."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from dataset import synthetic as syn
from dataset.synthetic import (column_work, Problem, dpo_pairs, is_test_question, make_problem,
                               pretrain_texts, sft_conversations, test_set, write_jsonl)



COLUMN_RE = re.compile(r"^(\d+) ([-+*]) (\d+): (.*), so \1 \2 \3 = (\d+)\.$")
TERM_RE = re.compile(r"^(\d+(?: [-+*] \d+)+) = (\d+)(?: (?:carry|borrow) \d+)?$")


def check_column_work(line: str) -> None:
    """Every column fact `x op y [op c] = v` is true and the stated result is a op b."""
    a, op, b, body, result = COLUMN_RE.match(line).groups()
    assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    for part in body.split(", "):
        m = TERM_RE.match(part)
        assert m, f"bad column fact {part!r} in {line!r}"
        tokens = m.group(1).split()
        value = int(tokens[0])
        for sym, num in zip(tokens[1::2], tokens[2::2]):
            value = value * int(num) if sym == "*" else value + int(num) if sym == "+" else value - int(num)
        assert value == int(m.group(2)), part


SENTENCE_RE = re.compile(r"(\d+) ([-+*]) (\d+)[^\d]*$")   # a step's sentence ends "a op b <unit>."
FACT_RE = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)\.$")


def solution_steps(text: str) -> list[tuple[int, str, int, int]]:
    """(a, op, b, r) of every step: a sentence naming `a op b`, then its arithmetic (column work
    or a one-digit fact `a op b = r.`) for the same operands. Reads only the text."""
    *lines, _ = text.split("\n")
    assert len(lines) % 2 == 0, f"steps are sentence + arithmetic pairs: {text!r}"
    steps = []
    for sentence, work in zip(lines[::2], lines[1::2]):
        said = SENTENCE_RE.search(sentence)
        assert said, f"no 'a op b' at the end of {sentence!r}"
        if COLUMN_RE.match(work):
            check_column_work(work)
            a, op, b, _, r = COLUMN_RE.match(work).groups()
        else:
            fact = FACT_RE.match(work)
            assert fact, f"bad arithmetic line {work!r}"
            a, op, b, r = fact.groups()
            assert int(r) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op], work
        assert (a, op, b) == said.groups(), f"{work!r} does not work out {sentence!r}"
        steps.append((int(a), op, int(b), int(r)))
    return steps


def check_solution(text: str) -> int:
    """Recompute every step of a solution; return the `#### n` answer.

    Independent of the generator: it only reads the text. Raises AssertionError on any error.
    """
    m = re.fullmatch(r"#### (-?\d+)", text.split("\n")[-1])
    assert m, f"no final answer line in {text!r}"
    prev = None
    for a, _, b, r in solution_steps(text):
        assert prev is None or prev in (a, b), f"step does not use the previous result: {text!r}"
        prev = r
    assert prev == int(m.group(1)), text
    return prev


def _questions_in(records: list[dict], key: str = "conversations") -> set[str]:
    return {m["content"] for r in records for m in r[key] if m["role"] == "user"}


def test_deterministic_by_seed() -> None:
    assert pretrain_texts(40, 3) == pretrain_texts(40, 3)
    assert sft_conversations(40, 3) == sft_conversations(40, 3)
    assert dpo_pairs(20, 3) == dpo_pairs(20, 3)
    assert test_set(20, 3) == test_set(20, 3)
    assert pretrain_texts(40, 3) != pretrain_texts(40, 4)
    assert sft_conversations(40, 3) != sft_conversations(40, 4)
    # Different purposes use different streams even with one seed.
    assert pretrain_texts(5, 0)[0] not in {m["content"] for r in sft_conversations(5, 0)
                                           for m in r["conversations"]}


def test_answers_are_correct_and_numbers_modest() -> None:
    rng = random.Random(0)
    for _ in range(500):
        p = make_problem(rng)
        assert check_solution(p.solution) == p.answer
        assert p.solution.endswith(f"\n#### {p.answer}")
        for a, op, b, _ in solution_steps(p.solution):
            if op == "*":
                assert a <= 99 and b <= 9
            else:
                assert a <= 1000 and b <= 1000
        assert p.answer >= 0
        # The given numbers of the first step come from the question, each after the same cue
        # word in the question as in the solution's sentence (what makes them easy to copy).
        first = p.solution.split("\n")[0]
        for number in re.findall(r"\d+", first.rsplit(", so ", 1)[0]):
            cue = re.search(rf"(\w+) {number}\b", first).group(1)
            assert re.search(rf"\b{cue} {number}\b", p.question), (cue, number, p.question)


def test_check_solution_catches_errors() -> None:
    with pytest.raises(AssertionError):
        check_solution("So that is 12 + 30 apples.\n12 + 30 = 43.\n#### 43")
    with pytest.raises(AssertionError):
        check_solution("So that is 12 + 30 apples.\n12 + 30 = 42.\n#### 41")
    with pytest.raises(AssertionError):   # the arithmetic is not the sentence's
        check_solution("So that is 12 + 31 apples.\n12 + 30 = 42.\n#### 42")


def test_test_set_is_held_out() -> None:
    tests = test_set(300, 0)
    questions = {p.question for p in tests}
    assert len(questions) == 300  # distinct
    assert all(is_test_question(q) for q in questions)
    for p in tests:
        check_solution(p.solution)
    sft = sft_conversations(2000, 0)
    user_texts = _questions_in(sft)
    assert not any(q in u for q in questions for u in user_texts)
    assert not questions & _questions_in(dpo_pairs(500, 0), "chosen")
    pre = "\n".join(pretrain_texts(2000, 0))
    assert not any(q in pre for q in questions)
    # Sanity of the rule itself: about 10% of random questions are held out.
    rng = random.Random(1)
    share = sum(is_test_question(make_problem(rng).question) for _ in range(3000)) / 3000
    assert 0.07 < share < 0.13


def test_sft_format() -> None:
    records = sft_conversations(300, 0)
    assert any(r["conversations"][0]["role"] == "system" for r in records)
    assert any(sum(m["role"] == "user" for m in r["conversations"]) == 2 for r in records)
    assert any("MiniMind" in r["conversations"][-1]["content"] for r in records)
    assert any(re.search(r"[\u4e00-\u9fff]", r["conversations"][-1]["content"]) for r in records)
    for r in records:
        msgs = r["conversations"]
        body = msgs[1:] if msgs[0]["role"] == "system" else msgs
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
        for m in body:
            assert isinstance(m["content"], str) and m["content"]
            if m["role"] == "assistant" and "####" in m["content"]:
                check_solution(m["content"])
    math_questions = [q for q in _questions_in(sft_conversations(50, 0, split="test"))
                      if "How many" in q]
    assert len(math_questions) > 20
    for q in math_questions:
        for prefix in syn._MATH_PREFIXES:
            q = q.removeprefix(prefix)
        assert is_test_question(q), q
    with pytest.raises(ValueError):
        sft_conversations(1, 0, split="valid")  # type: ignore[arg-type]


@pytest.mark.parametrize("held_out", [False, True])
def test_dpo_rejected_is_wrong(held_out: bool) -> None:
    records = syn.held_out_pairs(syn.test_set(300, 0)) if held_out else dpo_pairs(300, 0)
    for rec in records:
        chosen, rejected = rec["chosen"], rec["rejected"]
        assert chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        good = check_solution(chosen[-1]["content"])
        bad_text = rejected[-1]["content"]
        with pytest.raises(AssertionError):
            check_solution(bad_text)  # some step's arithmetic is wrong
        bad = int(bad_text.rsplit("#### ", 1)[1])
        assert bad != good and bad >= 0
        # The slip is a typo-sized error, not a random number: same number of lines.
        assert bad_text.count("\n") == chosen[-1]["content"].count("\n")


def test_pretrain_mix() -> None:
    texts = pretrain_texts(400, 0)
    assert sum(t.startswith("Question: ") for t in texts) > 150
    assert any("MiniMind" in t for t in texts)
    assert any(re.search(r"[\u4e00-\u9fff]", t) for t in texts)
    assert any(t.startswith("def ") for t in texts)
    for t in texts:
        if t.startswith("Question: "):
            check_solution(t.split("\nAnswer: ", 1)[1])


def test_problem_without_chain_cannot_be_corrupted() -> None:
    with pytest.raises(ValueError):
        syn.wrong_solution(Problem("q", ("1 + 1 = 2",), 2), random.Random(0))


def test_write_jsonl_and_cli(tmp_path: Path) -> None:
    path = write_jsonl(["a", {"b": "中文"}], tmp_path / "sub" / "x.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"text": "a"}, {"b": "中文"}]
    assert "中文" in path.read_text(encoding="utf-8")  # not \\u-escaped
    syn.main(["--out", str(tmp_path / "d"), "--seed", "1", "--n_pretrain", "20", "--n_sft", "10",
              "--n_dpo", "5", "--n_test", "7", "--n_tool_sft", "4", "--n_tool_test", "3"])
    assert [len((tmp_path / "d" / f"tool_{n}.jsonl").read_text().splitlines())
            for n in ("sft", "test")] == [4, 3]
    lines = {n: (tmp_path / "d" / f"{n}.jsonl").read_text(encoding="utf-8").splitlines()
             for n in ("pretrain", "sft", "dpo", "test", "dpo_test", "test_text")}
    assert [len(v) for v in lines.values()] == [20, 10, 5, 7, 7, 7]
    # The held-out pairs ask exactly the test questions, in order, chosen = the test's solution.
    for test_line, pair_line in zip(lines["test"], lines["dpo_test"]):
        test, pair = json.loads(test_line), json.loads(pair_line)
        assert pair["chosen"][-2]["content"] == test["question"]
        assert pair["chosen"][-1]["content"] == test["answer"] != pair["rejected"][-1]["content"]
    for test_line, text_line in zip(lines["test"], lines["test_text"]):
        test = json.loads(test_line)
        assert json.loads(text_line) == {"text": f"Question: {test['question']}\nAnswer: {test['answer']}"}
    test_rec = json.loads(lines["test"][0])
    assert set(test_rec) == {"question", "answer"} and is_test_question(test_rec["question"])
    check_solution(test_rec["answer"])


def test_column_work_against_hand_written_lines() -> None:
    assert column_work(48, "+", 37) == "48 + 37: 8 + 7 = 15 carry 1, 4 + 3 + 1 = 8, so 48 + 37 = 85."
    assert column_work(57, "+", 82) == "57 + 82: 7 + 2 = 9, 5 + 8 = 13, so 57 + 82 = 139."
    assert column_work(92, "-", 44) == "92 - 44: 12 - 4 = 8 borrow 1, 9 - 1 - 4 = 4, so 92 - 44 = 48."
    assert column_work(12, "*", 9) == "12 * 9: 2 * 9 = 18 carry 1, 1 * 9 + 1 = 10, so 12 * 9 = 108."
    assert column_work(7, "*", 9) is None and column_work(3, "+", 4) is None
    for a in range(0, 120, 7):
        for b in range(0, 120, 11):
            for op in "+-":
                line = column_work(a, op, b)
                if line is not None:
                    check_column_work(line)


def test_one_step_problems_only_when_asked() -> None:
    """--problems one_step: every problem of every split has a single-step solution (at most a
    restatement, one column computation and the answer line); the default mixes in two-step ones."""
    one = [make_problem(random.Random(i), "one_step") for i in range(300)]
    assert all(len(p.chain) == 1 for p in one)
    assert {len(make_problem(random.Random(i)).chain) for i in range(300)} == {1, 2}
    assert all(len(p.chain) == 1 for p in syn.test_set(50, 0, "one_step"))
    answers = [m["content"] for rec in syn.sft_conversations(100, 0, problems="one_step")
               for m in rec["conversations"] if m["role"] == "assistant" and "####" in m["content"]]
    assert answers and all(len(a.splitlines()) <= 3 for a in answers)
    mixed = [m["content"] for rec in syn.sft_conversations(100, 0)
             for m in rec["conversations"] if m["role"] == "assistant" and "####" in m["content"]]
    assert max(len(a.splitlines()) for a in mixed) > 3


# -- the tool-use split --------------------------------------------------------------------------

_HAND_FACTORS = {("mi", "km"): 1.609344, ("km", "mi"): 1 / 1.609344, ("lb", "kg"): 0.45359237,
                 ("kg", "lb"): 1 / 0.45359237, ("ft", "m"): 0.3048, ("gal", "l"): 3.785411784,
                 ("h", "s"): 3600.0, ("oz", "g"): 28.349523125, ("m", "mi"): 1 / 1609.344,
                 ("g", "lb"): 1 / 453.59237, ("ml", "gal"): 1 / 3785.411784}


def _expected_result(name: str, args: dict) -> float:
    """Independent of the tools: Python's integer product, textbook conversion factors."""
    if name == "calculator":
        a, b = (int(x) for x in args["expression"].split(" * "))
        return a * b
    if (args["from_unit"], args["to_unit"]) == ("F", "C"):
        return (args["value"] - 32) * 5 / 9
    return args["value"] * _HAND_FACTORS[(args["from_unit"], args["to_unit"])]


def test_tool_conversations_call_read_and_answer() -> None:
    from dataset.chat import normalize_conversation
    from tools import TABLES, default_registry
    records = syn.tool_conversations(300, seed=3)
    assert records == syn.tool_conversations(300, seed=3)
    kinds = set()
    names = {t["function"]["name"] for t in default_registry().schemas()}
    for rec in records:
        msgs = rec["conversations"]
        assert {t["function"]["name"] for t in rec["tools"]} == names
        normalize_conversation(msgs, rec["tools"])  # valid SFT data
        assert not is_test_question(msgs[0]["content"])
        calls = [m["tool_calls"][0] for m in msgs if m.get("tool_calls")]
        results = [m["content"] for m in msgs if m["role"] == "tool"]
        final = msgs[-1]["content"]
        if not calls:  # a distractor: answered directly, small numbers or identity
            kinds.add("none")
            if "####" in final:
                a, op, b = msgs[0]["content"].rstrip("?.").split()[-3:]
                assert final.endswith(f"#### {int(a) + int(b) if op == '+' else int(a) * int(b)}")
            continue
        assert len(calls) == len(results) and final.endswith(f"#### {results[-1]}")
        for call, result in zip(calls, results):
            kinds.add(call["name"])
            if call["name"] == "lookup":
                assert result == TABLES[call["arguments"]["table"]][call["arguments"]["key"]]
            else:
                assert float(result) == pytest.approx(_expected_result(call["name"], call["arguments"]),
                                                      rel=1e-9)
        if call["name"] == "calculator":  # 4-6 digit operands: out of reach of mental arithmetic
            assert all(4 <= len(x) <= 6 for x in call["arguments"]["expression"].split(" * "))
        if len(calls) == 2:  # chained: the conversion takes the product's result
            assert calls[1]["arguments"]["value"] == int(results[0])
    assert kinds == {"none", "calculator", "convert_units", "lookup"}


def test_tool_test_set_is_held_out() -> None:
    items = syn.tool_test_set(60, seed=0)
    assert len({it["question"] for it in items}) == 60
    assert all(is_test_question(it["question"]) for it in items)
    train = {r["conversations"][0]["content"] for r in syn.tool_conversations(500, seed=0)}
    assert not train & {it["question"] for it in items}
    assert {it["kind"] for it in items} >= {"multiply", "convert", "chain", "none"}
    chain = next(it for it in items if it["kind"] == "chain")
    assert chain["tools"] == ["calculator", "convert_units"]
    assert all(it["tools"] == [] for it in items if it["kind"] == "none")


def test_tool_split_with_a_subset_of_the_tools() -> None:
    """--tools calculator: only the calculator is listed, and only problems it solves are drawn."""
    from tools import default_registry
    calc = default_registry(["calculator"])
    records = syn.tool_conversations(80, seed=2, registry=calc)
    assert all([t["function"]["name"] for t in r["tools"]] == ["calculator"] for r in records)
    called = {c["name"] for r in records for m in r["conversations"] for c in m.get("tool_calls", [])}
    assert called == {"calculator"}
    assert {it["kind"] for it in syn.tool_test_set(40, registry=calc)} == {"multiply", "none"}
