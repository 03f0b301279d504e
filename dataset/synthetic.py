"""Deterministic synthetic data that a tiny model can genuinely learn on a CPU in minutes.

Scope: English arithmetic word problems in GSM8K style (one or two short worked steps, then
`#### <answer>`), identity Q&A for the assistant "MiniMind" (English and Chinese) and templated
general sentences (English and Chinese). They are exposed as pretraining text, SFT conversations,
DPO pairs and a held-out test set, all in MiniMind's JSONL formats (see docs/DESIGN.md).

Numbers stay modest on purpose: 2-3 digit addition/subtraction and (1-2 digit) * (1 digit)
multiplication, so a model of a few million parameters can learn the digit-level procedures.

Held-out guarantee: a problem is in the test split iff sha1(question) % 10 == 0. Training
generators only emit problems with a non-zero remainder, so no test question can ever appear in
pretraining, SFT or DPO data, whatever the seeds. Everything is a pure function of its seed
(`random.Random(f"{purpose}:{seed}")`, so pretrain/SFT/DPO with the same seed still differ).

Tool use (`tool_conversations`, `tool_test_set`): problems a small model cannot do in its head —
4-6 digit multiplications, unit conversions, a conversion after a product (two calls), table
look-ups — each solved by a conversation that calls a tool of `tools.default_registry()`, reads
its result (the real tool's output, so training and evaluation read the same text) and answers
`#### <answer>`; plus distractors (1-digit arithmetic, identity questions) answered directly,
where calling a tool is wrong. Every record lists the tools; the held-out rule is the same.

CLI: `python -m dataset.synthetic --out DIR --seed 0` writes pretrain.jsonl, sft.jsonl, dpo.jsonl,
kto.jsonl (the DPO pairs unpaired for KTO: each chosen answer desirable, each rejected one not),
test.jsonl (GSM8K layout: {"question", "answer"} where answer is the worked solution) and
dpo_test.jsonl (a chosen / rejected pair on each test problem, for scoring preference stages) and
test_text.jsonl (the test problems solved, as pretraining text: held-out perplexity), and
tool_sft.jsonl / tool_test.jsonl (the tool-use split; the test file is `tasks/toolcall.py`'s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

from common.atomic import atomic_path
from tools import TABLES, ToolRegistry, default_registry, tool_names

Split = Literal["train", "test"]
Message = dict[str, str]

ASSISTANT_NAME = "MiniMind"


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One worked step: the sentence `{lead}{left} {op} {right}{tail}`, then the arithmetic.

    An operand of None stands for the previous step's result; that is what lets a DPO "slip"
    (a wrong intermediate result) propagate to a wrong final answer.
    """

    lead: str
    left: int | None
    op: str  # "+", "-" or "*"
    right: int | None
    tail: str = ""


@dataclass(frozen=True)
class Problem:
    """A word problem: the question, its worked steps and the integer answer.

    `chain` keeps the structured steps the text was rendered from (used to build wrong
    solutions for DPO); it is empty for problems built by hand.
    """

    question: str
    steps: tuple[str, ...]
    answer: int
    chain: tuple[Step, ...] = ()

    @property
    def solution(self) -> str:
        """The assistant's answer text: steps, one per line, then `#### answer`."""
        return format_solution(self.steps, self.answer)


def format_solution(steps: Iterable[str], answer: int) -> str:
    return "\n".join(steps) + f"\n#### {answer}"


_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


def _run_chain(
    chain: tuple[Step, ...], slip_at: int = -1, slip: Callable[[int], int] | None = None
) -> list[tuple[int, int, int]]:
    """(left, right, result) of every step; step `slip_at`'s result is passed through `slip`.

    The corrupted value feeds every later step, as a student's arithmetic slip would.
    """
    values: list[tuple[int, int, int]] = []
    prev = 0
    for i, st in enumerate(chain):
        a = prev if st.left is None else st.left
        b = prev if st.right is None else st.right
        result = _OPS[st.op](a, b)
        if i == slip_at and slip is not None:
            result = slip(result)
        values.append((a, b, result))
        prev = result
    return values


def column_work(a: int, op: str, b: int) -> str | None:
    """Schoolbook column arithmetic, ones column first, e.g.
    ``48 + 37: 8 + 7 = 15 carry 1, 4 + 3 + 1 = 8, so 48 + 37 = 85.``

    Why: a small model writes the answer's digits most significant first, but the carries flow
    the other way; written out column by column, every digit it must produce is a one-digit fact
    plus a carry it has just written, and the final number is copied from the columns.
    None for one-digit facts (times tables, single-digit sums), which need no work.
    """
    if op == "*":
        if a < 10 or b >= 10:
            return None
        parts, carry = [], 0
        for i, d in enumerate(reversed(str(a))):
            v = int(d) * b + carry
            last = i == len(str(a)) - 1
            parts.append(f"{d} * {b}" + (f" + {carry}" if carry else "") + f" = {v}"
                         + (f" carry {v // 10}" if v >= 10 and not last else ""))
            carry = v // 10
        return f"{a} * {b}: " + ", ".join(parts) + f", so {a} * {b} = {a * b}."
    if max(a, b) < 10 or (op == "-" and a < b):
        return None
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    parts, carry = [], 0
    for i, (x, y) in enumerate(zip(da, db)):
        x, y, last = int(x), int(y), i == width - 1
        if op == "+":
            v = x + y + carry
            text = f"{x} + {y}" + (" + 1" if carry else "") + f" = {v}"
            carry = int(v >= 10 and not last)
            parts.append(text + (" carry 1" if carry else ""))
        else:
            borrow = int(x - carry < y)
            top = x + 10 * borrow
            v = top - carry - y
            parts.append(f"{top}" + (" - 1" if carry else "") + f" - {y} = {v}"
                         + (" borrow 1" if borrow else ""))
            carry = borrow
    result = a + b if op == "+" else a - b
    return f"{a} {op} {b}: " + ", ".join(parts) + f", so {a} {op} {b} = {result}."


def render_chain(
    chain: tuple[Step, ...], slip_at: int = -1, slip: Callable[[int], int] | None = None
) -> tuple[tuple[str, ...], int]:
    """Render a chain of steps to text lines; returns (lines, final answer).

    Each step is its sentence (which restates the question's numbers, each after the same cue
    words as in the question), then the arithmetic: column work, or `a op b = r.` for a one-digit
    fact. Why this order: the operands are copied while the question's wording of them is the
    context (a lookup a small model learns fast); the column work then copies them from the line
    just above. A slipped step keeps its columns but states the slipped result, as a student
    who misread their own working would."""
    values = _run_chain(chain, slip_at, slip)
    lines: list[str] = []
    for st, (a, b, r) in zip(chain, values):
        lines.append(f"{st.lead}{a} {st.op} {b}{st.tail}")
        work = column_work(a, st.op, b)
        lines.append(f"{a} {st.op} {b} = {r}." if work is None
                     else work.rsplit(" = ", 1)[0] + f" = {r}.")
    return tuple(lines), values[-1][2]


_NAMES = ["Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Lucas", "Sofia", "Ben", "Lily",
          "Omar", "Grace", "Ravi", "Chloe", "Leo", "Zoe", "Sam", "Nina", "Jack", "Ivy"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "stamps",
          "shells", "balloons", "eggs", "coins", "beads", "toys", "flowers"]
_CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("crate", "crates"),
               ("basket", "baskets"), ("jar", "jars")]
_GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("toy car", "toy cars"),
          ("sandwich", "sandwiches"), ("ticket", "tickets"), ("cup", "cups"),
          ("shirt", "shirts"), ("ball", "balls"), ("lamp", "lamps"), ("puzzle", "puzzles")]
_GROUPS = [("students", "school"), ("visitors", "museum"), ("runners", "race"),
           ("players", "club"), ("guests", "hotel"), ("workers", "factory")]


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(_NAMES, 2)
    return a, b


# Every number in a question follows a cue word of its own (has, gets, gave, owns, buys, holds,
# costs, for, with, stop, then), and the solution restates it after the same cue: copying a
# number is then a lookup of "what came after this word in the question", which a 1M-parameter
# model learns in a few hundred steps, while "the third number of the question" it kept getting
# wrong. Numbers also come in the order the solution uses them, and a two-step solution's first
# sentence restates all of them: the number the second step needs is then copied from the line
# above, not looked up far back in the question (one seed of three never learned that lookup).

def _add_buy(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    q = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
    return q, (Step(f"{name} has {a} and gets {b} more, so {name} has ", a, "+", b, f" {item}."),)


def _sub_give(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    name, friend = _two_names(rng)
    item = rng.choice(_ITEMS)
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1)
    q = (f"{name} had {a} {item} and gave {b} of them to {friend}. "
         f"How many {item} does {name} have left?")
    return q, (Step(f"{name} had {a} and gave {b} away, so {name} has ", a, "-", b, f" {item} left."),)


def _compare(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    name, friend = _two_names(rng)
    item = rng.choice(_ITEMS)
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1)
    q = (f"{name} has {a} {item} and {friend} owns {b} {item}. "
         f"How many more {item} does {name} have than {friend}?")
    return q, (Step(f"{name} has {a} and {friend} owns {b}, so the difference is ", a, "-", b,
                    f" {item}."),)


def _group_total(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    people, place = rng.choice(_GROUPS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    q = (f"A {place} has {a} {people} in the morning and then {b} {people} in the afternoon. "
         f"How many {people} are there in total?")
    return q, (Step(f"The {place} has {a} and then {b} more, so in total there are ", a, "+", b,
                    f" {people}."),)


def _mul_boxes(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    one, many = rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    q = (f"{name} buys {a} {many} of {item}. Each {one} holds {b} {item}. "
         f"How many {item} does {name} buy in total?")
    return q, (Step(f"{name} buys {a} and each holds {b}, so that is ", a, "*", b, f" {item}."),)


def _price_total(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    name = rng.choice(_NAMES)
    (g1, g1s), (g2, _) = rng.sample(_GOODS, 2)
    p, k, extra = rng.randint(2, 12), rng.randint(2, 9), rng.randint(10, 99)
    q = (f"A {g1} costs {p} dollars. {name} buys {k} {g1s} and one {g2} for {extra} dollars. "
         f"How many dollars does {name} spend?")
    return q, (
        Step(f"A {g1} costs {p} and {name} buys {k} and one {g2} for {extra}, so the {g1s} cost ",
             p, "*", k, " dollars."),
        Step(f"The {g2} is for {extra} more, so {name} spends ", None, "+", extra, " dollars."),
    )


def _change(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    name = rng.choice(_NAMES)
    g, gs = rng.choice(_GOODS)
    p, k = rng.randint(2, 12), rng.randint(2, 9)
    bill = next(v for v in (100, 200, 500, 1000) if v >= p * k)
    q = (f"One {g} costs {p} dollars. {name} buys {k} {gs} and pays with {bill} dollars. "
         f"How many dollars of change does {name} get?")
    return q, (
        Step(f"One {g} costs {p} and {name} buys {k} and pays with {bill}, so the {gs} cost ", p, "*",
             k, " dollars."),
        Step(f"{name} pays with {bill}, so the change is ", bill, "-", None, " dollars."),
    )


def _bus(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    a = rng.randint(20, 99)
    off, on = rng.randint(10, a - 1), rng.randint(10, 99)
    q = (f"A train has {a} people on it. At the next stop {off} people get off and then {on} "
         f"people get on. How many people are on the train now?")
    return q, (
        Step(f"The train has {a} and at the next stop {off} get off and then {on} get on, so first "
             "there are ", a, "-", off, " people."),
        Step(f"And then {on} get on, so there are ", None, "+", on, " people."),
    )


def _savings(rng: random.Random) -> tuple[str, tuple[Step, ...]]:
    name = rng.choice(_NAMES)
    w, k, gift = rng.randint(2, 12), rng.randint(2, 9), rng.randint(10, 99)
    q = (f"{name} saves {w} dollars every week for {k} weeks and then gets a gift of {gift} "
         f"dollars. How many dollars does {name} have now?")
    return q, (
        Step(f"{name} saves {w} for {k} weeks and then gets a gift of {gift}, so {name} saves ", w,
             "*", k, " dollars."),
        Step(f"Then the gift of {gift} makes ", None, "+", gift, " dollars."),
    )


_TEMPLATES = [_add_buy, _sub_give, _compare, _group_total, _mul_boxes, _price_total, _change,
              _bus, _savings]
# Which problems a data set holds: every template, or the one-step ones alone (an easier task
# that a model learns in a fraction of the steps: the suite's learning test uses it).
PROBLEMS = {"all": tuple(_TEMPLATES), "one_step": (_add_buy, _sub_give, _compare, _group_total, _mul_boxes)}
Problems = Literal["all", "one_step"]


def make_problem(rng: random.Random, problems: Problems = "all") -> Problem:
    """One random word problem (either split); the answer is computed, never typed by hand."""
    question, chain = rng.choice(PROBLEMS[problems])(rng)
    steps, answer = render_chain(chain)
    return Problem(question, steps, answer, chain)


def is_test_question(question: str) -> bool:
    """The held-out rule: stable across processes (sha1, not Python's salted hash())."""
    digest = hashlib.sha1(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10 == 0


def sample_problem(rng: random.Random, split: Split = "train", problems: Problems = "all") -> Problem:
    """A random problem from `split` (rejection sampling: ~10% of questions are test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    want_test = split == "test"
    while True:
        p = make_problem(rng, problems)
        if is_test_question(p.question) == want_test:
            return p


def wrong_solution(problem: Problem, rng: random.Random) -> tuple[str, int]:
    """A plausible wrong solution: one step's result slips and the error carries to the end.

    Returns (solution text, wrong answer). The wrong answer always differs from the right one
    and every intermediate value stays non-negative (a negative count would be too easy to spot).
    """
    if not problem.chain:
        raise ValueError("wrong_solution needs a problem built by make_problem (with a chain)")
    for _ in range(100):
        at = rng.randrange(len(problem.chain))
        slip = _slip_fn(rng)
        values = _run_chain(problem.chain, at, slip)
        if values[-1][2] != problem.answer and min(r for _, _, r in values) >= 0:
            steps, answer = render_chain(problem.chain, at, slip)
            return format_solution(steps, answer), answer
    raise RuntimeError(f"could not corrupt {problem.question!r}")  # unreachable in practice


def _slip_fn(rng: random.Random) -> Callable[[int], int]:
    """Typical slips: off by one or ten (a dropped/extra carry), or two digits swapped."""
    kind = rng.choice(["+1", "-1", "+10", "-10", "swap"])

    def slip(v: int) -> int:
        if kind == "swap" and v >= 10:
            s = str(v)
            swapped = int(s[:-2] + s[-1] + s[-2])
            if swapped != v:
                return swapped
        delta = {"+1": 1, "-1": -1, "+10": 10, "-10": -10}.get(kind, 10)
        return v + delta

    return slip


# --------------------------------------------------------------------------------------------
# Identity Q&A and general sentences
# --------------------------------------------------------------------------------------------

_IDENTITY: list[tuple[list[str], list[str]]] = [
    (["Who are you?", "What are you?", "Introduce yourself.", "Tell me about yourself."],
     [f"I am {ASSISTANT_NAME}, a small language model. I can chat and solve simple arithmetic "
      "word problems step by step.",
      f"I'm {ASSISTANT_NAME}, a small AI assistant trained from scratch. I answer questions and "
      "work through math problems one step at a time."]),
    (["What is your name?", "What should I call you?"],
     [f"My name is {ASSISTANT_NAME}.", f"You can call me {ASSISTANT_NAME}."]),
    (["What can you do?", "How can you help me?"],
     ["I can answer simple questions and solve arithmetic word problems with addition, "
      "subtraction and multiplication, showing each step.",
      "I can help with small math word problems: I write the steps and finish with the answer."]),
    (["Are you ChatGPT?", "Are you a human?"],
     [f"No, I am {ASSISTANT_NAME}, a small language model.",
      f"No. I am {ASSISTANT_NAME}, an AI assistant, and a very small one."]),
    (["你是谁？", "请介绍一下你自己。", "你是什么？"],
     [f"我是{ASSISTANT_NAME}，一个小型语言模型，可以聊天，也可以一步一步地解答简单的数学应用题。",
      f"我是{ASSISTANT_NAME}，一个从零开始训练的小型人工智能助手。"]),
    (["你叫什么名字？"],
     [f"我的名字是{ASSISTANT_NAME}。", f"你可以叫我{ASSISTANT_NAME}。"]),
    (["你能做什么？", "你可以帮我做什么？"],
     ["我可以回答简单的问题，并解答加法、减法和乘法的应用题，每一步都会写清楚。"]),
    (["你是ChatGPT吗？"],
     [f"不是，我是{ASSISTANT_NAME}，一个小型语言模型。"]),
]


def identity_qa(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair about who the assistant is."""
    questions, answers = rng.choice(_IDENTITY)
    return rng.choice(questions), rng.choice(answers)


# --------------------------------------------------------------------------------------------
# Tool use
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolProblem:
    """A question, the tool calls that solve it (in order; none for a distractor) and its answer."""

    question: str
    kind: str  # "multiply" | "convert" | "chain" | "lookup" | "none"
    calls: tuple[tuple[str, dict], ...]
    answer: str
    reply: str = ""  # the answer turn of a distractor (tool problems answer from the results)


TOOL_KINDS = ("multiply", "convert", "chain", "lookup", "none")
_CONVERSIONS = [("mi", "km", "miles", "kilometres"), ("km", "mi", "kilometres", "miles"),
                ("lb", "kg", "pounds", "kilograms"), ("kg", "lb", "kilograms", "pounds"),
                ("ft", "m", "feet", "metres"), ("gal", "l", "gallons", "litres"),
                ("F", "C", "degrees Fahrenheit", "degrees Celsius"),
                ("h", "s", "hours", "seconds"), ("oz", "g", "ounces", "grams")]


def _multiply_problem(rng: random.Random) -> ToolProblem:
    a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in (rng.randint(4, 6), rng.randint(4, 6)))
    q = rng.choice(["What is {a} * {b}?", "Compute {a} × {b}.", "Multiply {a} by {b}.",
                    "How much is {a} times {b}?"]).format(a=a, b=b)
    return ToolProblem(q, "multiply", (("calculator", {"expression": f"{a} * {b}"}),), "")


def _convert_problem(rng: random.Random) -> ToolProblem:
    src, dst, src_name, dst_name = rng.choice(_CONVERSIONS)
    value = rng.choice([rng.randint(2, 999), round(rng.uniform(1, 99), 1)])
    q = rng.choice(["How many {d} is {v} {s}?", "Convert {v} {s} to {d}.",
                    "What is {v} {s} in {d}?"]).format(v=value, s=src_name, d=dst_name)
    return ToolProblem(q, "convert", (("convert_units", {"value": value, "from_unit": src,
                                                         "to_unit": dst}),), "")


def _chain_problem(rng: random.Random) -> ToolProblem:
    # Two calls: a product the model cannot do in its head, then a conversion of that product.
    n, each = rng.randint(12, 99), rng.randint(105, 999)
    src, dst, src_name, dst_name = rng.choice([("m", "mi", "metres", "miles"),
                                               ("g", "lb", "grams", "pounds"),
                                               ("ml", "gal", "millilitres", "gallons")])
    thing = {"m": "laps of {e} metres", "g": "boxes of {e} grams", "ml": "bottles of {e} millilitres"}
    q = f"Someone has {n} {thing[src].format(e=each)}. How many {dst_name} is that in total?"
    total = n * each
    return ToolProblem(q, "chain", (("calculator", {"expression": f"{n} * {each}"}),
                                    ("convert_units", {"value": total, "from_unit": src,
                                                       "to_unit": dst})), "")


def _lookup_problem(rng: random.Random) -> ToolProblem:
    if rng.random() < 0.5:
        key = rng.choice(sorted(TABLES["capital"]))
        q = rng.choice(["What is the capital of {k}?", "Which city is the capital of {k}?"]).format(k=key)
        return ToolProblem(q, "lookup", (("lookup", {"table": "capital", "key": key}),), "")
    key = rng.choice(sorted(TABLES["atomic_number"]))
    return ToolProblem(f"What is the atomic number of {key}?", "lookup",
                       (("lookup", {"table": "atomic_number", "key": key}),), "")


def _distractor_problem(rng: random.Random) -> ToolProblem:
    if rng.random() < 0.3:
        q, a = identity_qa(rng)
        return ToolProblem(q, "none", (), a, a)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    op = rng.choice(["+", "*"])
    value = a + b if op == "+" else a * b
    q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}."]).format(a=a, op=op, b=b)
    return ToolProblem(q, "none", (), str(value), f"{a} {op} {b} = {value}\n#### {value}")


_TOOL_MAKERS = {"multiply": _multiply_problem, "convert": _convert_problem, "chain": _chain_problem,
                "lookup": _lookup_problem, "none": _distractor_problem}
# Kind mix: distractors are a quarter, so "never call a tool" and "always call" both lose.
_TOOL_MIX = [("multiply", 0.3), ("convert", 0.2), ("chain", 0.15), ("lookup", 0.1), ("none", 0.25)]


def _tool_mix(registry: ToolRegistry | None) -> list[tuple[str, float]]:
    """The kind mix restricted to problems that `registry`'s tools can solve."""
    if registry is None:
        return _TOOL_MIX
    needs = {"multiply": {"calculator"}, "convert": {"convert_units"},
             "chain": {"calculator", "convert_units"}, "lookup": {"lookup"}, "none": set()}
    mix = [(k, w) for k, w in _TOOL_MIX if needs[k] <= set(registry.names)]
    total = sum(w for _, w in mix)
    return [(k, w / total) for k, w in mix]


def sample_tool_problem(rng: random.Random, split: Split = "train",
                        registry: ToolRegistry | None = None) -> ToolProblem:
    """A tool-use problem from `split` (the held-out rule on the question, as for word problems),
    of a kind `registry`'s tools solve (default: every kind)."""
    mix = _tool_mix(registry)
    while True:
        r, kind = rng.random(), mix[-1][0]
        for name, w in mix:
            if r < w:
                kind = name
                break
            r -= w
        p = _TOOL_MAKERS[kind](rng)
        if is_test_question(p.question) == (split == "test"):
            return p


def solve_with_tools(p: ToolProblem, registry: ToolRegistry | None = None) -> list[dict]:
    """The assistant and tool turns that solve `p`: one call per turn, each result read from the
    real tool, then the answer. A distractor is one direct reply."""
    if not p.calls:
        return [{"role": "assistant", "content": p.reply}]
    registry = registry or default_registry()
    turns: list[dict] = []
    result = ""
    for name, args in p.calls:
        out = registry.call(name, args)
        if not out.ok:
            raise ValueError(f"{p.question}: {name}({args}) failed: {out.content}")
        result = out.content
        turns += [{"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": args}]},
                  {"role": "tool", "content": result}]
    return turns + [{"role": "assistant", "content": f"{tool_answer_line(p, result)}\n#### {result}"}]


def tool_answer_line(p: ToolProblem, result: str) -> str:
    """The sentence before `#### <answer>` in a solved tool problem."""
    name, args = p.calls[-1]
    if name == "calculator":
        return f"{args['expression']} = {result}"
    if name == "convert_units":
        return f"{format_quantity(args['value'])} {args['from_unit']} = {result} {args['to_unit']}"
    return f"The {args['table'].replace('_', ' ')} of {args['key']} is {result}."


def format_quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def tool_gold(p: ToolProblem, registry: ToolRegistry | None = None) -> str:
    """The answer of `p`: a distractor's own; otherwise the last tool result."""
    if not p.calls:
        return p.answer
    return solve_with_tools(p, registry)[-2]["content"]


def tool_conversations(n: int, seed: int = 0, split: Split = "train",
                       registry: ToolRegistry | None = None) -> list[dict]:
    """`n` SFT records of the tool-use split, each with the tool list (``tools``); with
    `registry`, only its tools are listed and only problems they solve are drawn."""
    rng = _rng(f"tool-{split}", seed)
    subset, registry = registry, registry or default_registry()
    schemas = registry.schemas()
    out = []
    for _ in range(n):
        p = sample_tool_problem(rng, split, subset)
        msgs = [{"role": "user", "content": p.question}] + solve_with_tools(p, registry)
        out.append({"conversations": msgs, "tools": schemas})
    return out


def tool_test_set(n: int, seed: int = 0, registry: ToolRegistry | None = None) -> list[dict]:
    """`n` distinct held-out tool-use items, ``{"id", "question", "answer", "kind", "tools"}``
    (``tools``: the tool names a solution calls, empty for a distractor); `registry` as in
    `tool_conversations`."""
    rng = _rng("tool-test", seed)
    subset, registry = registry, registry or default_registry()
    seen: set[str] = set()
    out: list[dict] = []
    for _ in range(n * 1000):
        if len(out) == n:
            break
        p = sample_tool_problem(rng, "test", subset)
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append({"id": f"tool-{len(out)}", "question": p.question, "kind": p.kind,
                    "answer": tool_gold(p, registry), "tools": [c[0] for c in p.calls]})
    if len(out) < n:
        raise ValueError(f"could only make {len(out)} distinct tool test items, asked for {n}")
    return out


# Word pools for templated sentences. They are deliberately broad (a few hundred English words,
# a few hundred Chinese words) so the tokenizer trained on this text learns useful merges and
# the LM sees varied text besides arithmetic.
_EN_PLACES = (
    "park library market school river station garden museum kitchen forest beach village city "
    "harbor bakery hospital office farm bridge valley island mountain lake theater stadium "
    "airport castle classroom factory restaurant street tower desert cave hill field shop"
).split()
_EN_NOUNS = (
    "book letter window door table chair lamp clock bottle basket ladder blanket pillow mirror "
    "picture camera guitar piano violin drum kite ball bicycle wagon boat engine bucket shovel "
    "candle rope map compass umbrella jacket sweater scarf glove boot hat ribbon button needle "
    "hammer nail brush pencil notebook envelope stamp coin wallet ticket key lock box bag jar "
    "cup plate spoon fork knife kettle oven stove bread cheese butter honey soup salad orange "
    "banana lemon peach cherry grape carrot potato tomato onion pepper melon cake pie cookie "
    "sandwich tea coffee milk juice water rock stone leaf branch flower tree seed cloud storm "
    "rainbow star planet moon sun wind snow river song story poem puzzle riddle question answer "
    "problem idea plan dream secret message computer phone screen keyboard robot machine model"
).split()
_EN_ADJ = (
    "small quiet happy old bright busy tired clever brave calm careful cheerful curious eager "
    "gentle honest kind lucky polite proud shy silly strong wise young ancient broad clean cold "
    "dark deep dry empty fresh full heavy hollow huge light long loud narrow new noisy plain "
    "rough round sharp short smooth soft solid sticky sweet tall thick thin tiny warm wet wide "
    "wild golden silver green blue red yellow purple simple strange famous useful friendly"
).split()
_EN_VERBS_PAST = (
    "found carried painted opened closed cleaned fixed built moved lifted dropped washed "
    "borrowed returned bought sold shared hid watched studied measured counted described "
    "drew wrote read packed wrapped folded repaired visited explored noticed remembered "
    "forgot discovered chose ordered delivered collected sorted planted picked cooked baked"
).split()
_EN_VERBS = (
    "read write draw paint sing dance run swim climb cook bake travel explore build learn "
    "teach listen watch count measure plan solve practice remember imagine collect visit"
).split()
_EN_ANIMALS = (
    "cat dog bird rabbit horse fox duck turtle owl tiger lion bear wolf deer goat sheep cow "
    "mouse frog fish whale dolphin monkey panda zebra camel eagle parrot squirrel"
).split()
_EN_TIMES = ("morning afternoon evening night weekend holiday summer winter spring autumn "
             "Monday Tuesday Wednesday Thursday Friday Saturday Sunday").split()
_EN_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_EN_FACTS = [
    "There are 7 days in a week.", "A year has 12 months.", "An hour has 60 minutes.",
    "Water boils at 100 degrees Celsius at sea level.", "The sun rises in the east.",
    "A language model predicts the next token from the tokens before it.",
    "Addition combines two numbers into a sum.", "Subtraction finds the difference.",
    "Multiplication is repeated addition.", "A tokenizer turns text into token ids.",
    "Training a model means adjusting its weights to lower the loss.",
    "A small model can learn simple arithmetic if it sees enough examples.",
]
_ZH_NAMES = "小明 小红 李华 王芳 张伟 刘洋 陈静 赵磊 孙丽 周杰 吴敏 郑强 林娜 黄涛 何雪 马超".split()
_ZH_PLACES = ("学校 公园 图书馆 超市 医院 车站 博物馆 厨房 森林 海边 村子 城市 商店 工厂 办公室 "
              "农场 山上 湖边 操场 教室 餐厅 电影院 机场 花园 书店 动物园 体育馆 银行").split()
_ZH_ACTS = ("看书 散步 买东西 打球 写作业 画画 跑步 唱歌 跳舞 游泳 做饭 学习 休息 聊天 拍照 "
            "种花 钓鱼 爬山 听音乐 打扫卫生 做实验 练习写字 讨论问题 准备考试").split()
_ZH_NOUNS = ("苹果 香蕉 面包 牛奶 米饭 蔬菜 水果 鸡蛋 茶 咖啡 桌子 椅子 窗户 门 电脑 手机 "
             "书包 铅笔 本子 地图 雨伞 衣服 帽子 鞋子 自行车 汽车 火车 飞机 小船 花 草 树 "
             "山 河 云 星星 月亮 太阳 风 雨 雪 小猫 小狗 小鸟 兔子 熊猫 老虎 问题 答案 故事 "
             "音乐 电影 游戏 礼物 信 照片 朋友 老师 学生 医生 科学家 模型 数据 语言 数字").split()
_ZH_ADJ = ("漂亮 干净 安静 热闹 有趣 简单 困难 重要 新鲜 高兴 认真 聪明 勇敢 温暖 凉快 "
           "舒服 便宜 好吃 可爱 奇怪 明亮 古老 年轻 快乐 友好 忙").split()
_ZH_TIMES = "早上 中午 下午 晚上 周末 春天 夏天 秋天 冬天 昨天 今天 明天 假期里".split()
_ZH_WEATHER = ["很好", "下雨", "有点冷", "晴朗", "很热", "刮风", "下雪", "多云"]
_ZH_FACTS = [
    "一个星期有七天。", "一年有十二个月。", "水在一百摄氏度时沸腾。", "太阳从东方升起。",
    "语言模型根据前面的词预测下一个词。", "乘法是重复的加法。", "分词器把文本切分成词元。",
    "训练模型就是不断调整参数，让损失变小。", "小模型只要看到足够多的例子，也能学会简单的算术。",
]


def _en_sentence(rng: random.Random) -> str:
    c = rng.choice
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    small, digit = a % 100, b % 9 + 1
    options = [
        lambda: f"{c(_NAMES)} walks to the {c(_EN_PLACES)} every {c(_EN_DAYS)}.",
        lambda: f"The {c(_EN_ADJ)} {c(_EN_ANIMALS)} sleeps near the {c(_EN_PLACES)}.",
        lambda: f"{c(_NAMES)} {c(_EN_VERBS_PAST)} the {c(_EN_ADJ)} {c(_EN_NOUNS)} at the {c(_EN_PLACES)}.",
        lambda: f"In the {c(_EN_TIMES)}, {c(_NAMES)} likes to {c(_EN_VERBS)} with {c(_NAMES)}.",
        lambda: f"{c(_NAMES)} asked {c(_NAMES)} why the {c(_EN_NOUNS)} was so {c(_EN_ADJ)}.",
        lambda: f"There is a {c(_EN_ADJ)} {c(_EN_NOUNS)} next to the {c(_EN_NOUNS)}.",
        lambda: f"The {c(_EN_ANIMALS)} {c(_EN_VERBS_PAST)} a {c(_EN_NOUNS)} in the {c(_EN_PLACES)}.",
        lambda: c(_EN_FACTS),
        lambda: f"{a} plus {b} equals {a + b}.",
        lambda: f"The number after {a} is {a + 1}.",
        lambda: f"{small} times {digit} is {small * digit}.",
    ]
    return c(options)()


def _zh_sentence(rng: random.Random) -> str:
    c = rng.choice
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    small, digit = a % 100, b % 9 + 1
    options = [
        lambda: f"{c(_ZH_NAMES)}每天{c(_ZH_TIMES)}去{c(_ZH_PLACES)}{c(_ZH_ACTS)}。",
        lambda: f"今天天气{c(_ZH_WEATHER)}，我们去{c(_ZH_PLACES)}{c(_ZH_ACTS)}。",
        lambda: f"{c(_ZH_TIMES)}，{c(_ZH_NAMES)}在{c(_ZH_PLACES)}看到了一个{c(_ZH_ADJ)}的{c(_ZH_NOUNS)}。",
        lambda: f"{c(_ZH_NAMES)}觉得这个{c(_ZH_NOUNS)}很{c(_ZH_ADJ)}。",
        lambda: f"{c(_ZH_NAMES)}和{c(_ZH_NAMES)}一起去{c(_ZH_PLACES)}{c(_ZH_ACTS)}。",
        lambda: f"{c(_ZH_NAMES)}问{c(_ZH_NAMES)}：“你喜欢{c(_ZH_NOUNS)}吗？”",
        lambda: c(_ZH_FACTS),
        lambda: f"{a}加{b}等于{a + b}。",
        lambda: f"{small}乘以{digit}等于{small * digit}。",
    ]
    return c(options)()


def general_sentence(rng: random.Random, chinese: bool = False) -> str:
    """One templated English or Chinese sentence (varied vocabulary, some numbers)."""
    return _zh_sentence(rng) if chinese else _en_sentence(rng)


def code_snippet(rng: random.Random) -> str:
    """A tiny, correct Python snippet about the same arithmetic (code-shaped text for the
    tokenizer and LM: indentation, brackets, keywords)."""
    item, name = rng.choice(_ITEMS), rng.choice(_NAMES).lower()
    a, b = rng.randint(10, 999), rng.randint(2, 9)
    values = [rng.randint(1, 99) for _ in range(rng.randint(2, 5))]
    options = [
        lambda: (f"def total_{item}(a: int, b: int) -> int:\n"
                 f"    \"\"\"Return how many {item} there are together.\"\"\"\n"
                 f"    return a + b\n\n\nprint(total_{item}({a}, {b}))  # {a + b}"),
        lambda: (f"total = 0\nfor price in {values}:\n    total += price\n"
                 f"print(total)  # {sum(values)}"),
        lambda: (f"{name}_{item} = {a}\n{name}_{item} -= {b}\n"
                 f"assert {name}_{item} == {a - b}"),
        lambda: (f"def times(x, y):\n    result = 0\n    for _ in range(y):\n"
                 f"        result += x\n    return result\n\n"
                 f"print(times({a % 100}, {b}))  # {(a % 100) * b}"),
        lambda: (f"{item} = {{\"{name}\": {a}, \"count\": {b}}}\n"
                 f"if {item}[\"count\"] > 5:\n    print(\"many\")\nelse:\n    print(\"few\")"),
    ]
    return rng.choice(options)()


def general_paragraph(rng: random.Random) -> str:
    """2-5 sentences in one language (about a third of paragraphs are Chinese)."""
    chinese = rng.random() < 0.35
    sentences = [general_sentence(rng, chinese) for _ in range(rng.randint(2, 5))]
    # Chinese text is written without spaces between sentences.
    return ("" if chinese else " ").join(sentences)


# --------------------------------------------------------------------------------------------
# Dataset builders
# --------------------------------------------------------------------------------------------

_SYSTEM_PROMPTS = [
    f"You are {ASSISTANT_NAME}, a helpful assistant.",
    "You are a helpful assistant that solves math problems step by step.",
    f"你是{ASSISTANT_NAME}，一个乐于助人的助手。",
]
_MATH_PREFIXES = ["Solve this problem: ", "Please solve step by step: ", "Question: "]


def _rng(purpose: str, seed: int) -> random.Random:
    # String seeds are hashed with sha512 by `random`, so this is stable across processes.
    return random.Random(f"{purpose}:{seed}")


def problem_text(p: Problem) -> str:
    """A solved problem as pretraining text."""
    return f"Question: {p.question}\nAnswer: {p.solution}"


def pretrain_texts(n: int, seed: int = 0, problems: Problems = "all") -> list[str]:
    """`n` pretraining documents: ~60% solved problems, ~15% identity Q&A, ~20% general text
    (English and Chinese), ~5% small Python snippets."""
    rng = _rng("pretrain", seed)
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.60:
            out.append(problem_text(sample_problem(rng, "train", problems)))
        elif r < 0.75:
            q, a = identity_qa(rng)
            out.append(f"{q}\n{a}")
        elif r < 0.95:
            out.append(general_paragraph(rng))
        else:
            out.append(code_snippet(rng))
    return out


def _math_turn(rng: random.Random, split: Split, problems: Problems) -> list[Message]:
    p = sample_problem(rng, split, problems)
    prefix = rng.choice(_MATH_PREFIXES) if rng.random() < 0.2 else ""
    return [{"role": "user", "content": prefix + p.question},
            {"role": "assistant", "content": p.solution}]


def _identity_turn(rng: random.Random) -> list[Message]:
    q, a = identity_qa(rng)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def sft_conversations(n: int, seed: int = 0, split: Split = "train",
                      problems: Problems = "all") -> list[dict]:
    """`n` MiniMind SFT records: ~70% math, ~15% identity, ~15% two-turn; ~30% with a system.

    `split="test"` draws its problems from the held-out split (for chat-format evaluation).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = _rng(f"sft-{split}", seed)
    out: list[dict] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.70:
            msgs = _math_turn(rng, split, problems)
        elif r < 0.85:
            msgs = _identity_turn(rng)
        else:
            first = _identity_turn(rng) if rng.random() < 0.5 else _math_turn(rng, split, problems)
            msgs = first + _math_turn(rng, split, problems)
        if rng.random() < 0.3:
            msgs = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}] + msgs
        out.append({"conversations": msgs})
    return out


def dpo_pairs(n: int, seed: int = 0, problems: Problems = "all") -> list[dict]:
    """`n` DPO records on training-split problems: chosen = correct, rejected = slipped."""
    rng = _rng("dpo", seed)
    return [_preference_pair(sample_problem(rng, "train", problems), rng) for _ in range(n)]


def held_out_pairs(problems: Iterable[Problem], seed: int = 0) -> list[dict]:
    """DPO records on held-out problems (one per problem, e.g. the test set): what a preference
    stage is scored on, since its training pairs never hold these questions."""
    rng = _rng("dpo-test", seed)
    return [_preference_pair(p, rng) for p in problems]


def unpaired(pairs: Iterable[dict]) -> list[dict]:
    """DPO records -> KTO records (``{"conversations", "label"}``): each chosen conversation
    desirable, each rejected one not (TRL's ``unpair_preference_dataset``)."""
    return [{"conversations": p[side], "label": side == "chosen"} for p in pairs
            for side in ("chosen", "rejected")]


def _preference_pair(p: Problem, rng: random.Random) -> dict:
    prompt: list[Message] = []
    if rng.random() < 0.3:
        prompt.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    prompt.append({"role": "user", "content": p.question})
    wrong, _ = wrong_solution(p, rng)
    return {"chosen": prompt + [{"role": "assistant", "content": p.solution}],
            "rejected": prompt + [{"role": "assistant", "content": wrong}]}


def test_set(n: int, seed: int = 0, problems: Problems = "all") -> list[Problem]:
    """`n` distinct held-out problems (sha1(question) % 10 == 0); never seen in training data."""
    rng = _rng("test", seed)
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(n * 1000):  # bound: the question space is large, duplicates are rare
        if len(out) == n:
            break
        p = sample_problem(rng, "test", problems)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    if len(out) < n:
        raise ValueError(f"could only make {len(out)} distinct test problems, asked for {n}")
    return out


# Not a pytest test despite the name (pytest collects `test_*` functions from imported names).
test_set.__test__ = False  # type: ignore[attr-defined]


def write_jsonl(records: Iterable[dict | str], path: str | os.PathLike) -> Path:
    """Write one JSON object per line (UTF-8, Chinese kept readable); atomic via tmp + rename.

    A bare string becomes `{"text": s}` (pretraining format).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            obj = {"text": rec} if isinstance(rec, str) else rec
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_pretrain", type=int, default=20000)
    ap.add_argument("--n_sft", type=int, default=10000)
    ap.add_argument("--n_dpo", type=int, default=2000)
    ap.add_argument("--n_test", type=int, default=500)
    ap.add_argument("--n_tool_sft", type=int, default=2000, help="tool-use SFT records")
    ap.add_argument("--n_tool_test", type=int, default=200, help="held-out tool-use items")
    ap.add_argument("--tools", default="calculator,convert_units,lookup",
                    help="the tools the tool split lists and needs (the whole list costs ~720 "
                         "prompt tokens; calculator alone ~260, for small contexts)")
    ap.add_argument("--problems", choices=sorted(PROBLEMS), default="all",
                    help="every problem template, or the one-step ones alone (an easier task)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    out = Path(args.out)
    kind = args.problems
    write_jsonl(pretrain_texts(args.n_pretrain, args.seed, kind), out / "pretrain.jsonl")
    write_jsonl(sft_conversations(args.n_sft, args.seed, problems=kind), out / "sft.jsonl")
    pairs = dpo_pairs(args.n_dpo, args.seed, kind)
    write_jsonl(pairs, out / "dpo.jsonl")
    write_jsonl(unpaired(pairs), out / "kto.jsonl")
    tests = test_set(args.n_test, args.seed, kind)
    write_jsonl(({"question": p.question, "answer": p.solution} for p in tests),
                out / "test.jsonl")
    write_jsonl(held_out_pairs(tests, args.seed), out / "dpo_test.jsonl")
    write_jsonl((problem_text(p) for p in tests), out / "test_text.jsonl")
    registry = default_registry(tool_names(args.tools))
    write_jsonl(tool_conversations(args.n_tool_sft, args.seed, registry=registry),
                out / "tool_sft.jsonl")
    write_jsonl(tool_test_set(args.n_tool_test, args.seed, registry), out / "tool_test.jsonl")
    print(f"wrote {args.n_pretrain} pretrain, {args.n_sft} sft, {args.n_dpo} dpo, "
          f"{args.n_test} test, {args.n_tool_sft} tool sft, {args.n_tool_test} tool test records "
          f"to {out}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
