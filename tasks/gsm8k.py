"""GSM8K, in one place: the release's format, SFT / alpaca / eval records, the prompt, answer
extraction, scoring and the RL prompt + gold (pure Python, no model; ``evaluation.runner`` drives
a model over these, ``trainer.grpo`` trains on them). The shape is the one of every task module
(``tasks/__init__.py``).

Data: ``{"question", "answer"}`` JSONL as released by openai/grade-school-math (train, test,
test_socratic), where ``answer`` is a worked solution with ``<<a*b=c>>`` calculator annotations
and a final ``#### <number>`` line.

Records written by ``convert_file`` (the CLI is ``python -m tasks.gsm8k convert``):
- ``sft``: MiniMind ``{"conversations": [{"role": "user", "content": question},
  {"role": "assistant", "reasoning_content": <worked solution>, "content": "The answer is 18."}]}``.
  Why split: MiniMind's chat template renders ``reasoning_content`` inside ``<think>...</think>``
  and ``content`` after it, so a model trained with thinking on learns to reason first and then
  state one short, machine-checkable line that ``extract_gsm8k_prediction`` reads directly. The
  worked solution loses the calculator annotations (they teach a tool format the model never
  gets at inference) and the ``####`` line (the answer is in ``content``). ``inline=True``
  instead puts reasoning and the answer line together in ``content`` for models trained
  without thinking.
- ``alpaca``: ``{"instruction", "input", "output"}`` with the reasoning inline, for LLaMA-Factory.
- ``eval``: ``{"id", "question", "answer", "solution"}`` with the canonical gold number
  (``"1,080"`` -> ``"1080"``).

Prompt: the bare question as the user turn (what the SFT records train on); few-shot exemplars
(``exemplars``) are earlier turns in the same "reasoning, then The answer is N." format.

References:
- GSM8K (Cobbe et al., "Training Verifiers to Solve Math Word Problems", 2021,
  https://github.com/openai/grade-school-math): reference solutions end with a line
  ``#### <number>``; the number may carry thousands separators ("1,080") or a sign.
- The usual extraction cascade (as in lm-evaluation-harness' "strict" / "flexible" GSM8K filters
  and the chain-of-thought prompt "The answer is N."): an explicit ``####`` marker first, then an
  answer phrase, then the last number in the text. Written here from that description.

Numbers are compared exactly as fractions (so "0.75" == "3/4" and "18.00" == "18") with a tiny
relative tolerance for printed floats such as "0.3333333".
"""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from dataset.convert._io import (DataError, first_field, iter_records, reasoning_alpaca,
                                 reasoning_sft, require, take, write_converted)
from tasks._cli import convert_parser

__all__ = [
    "NAME", "FEWSHOT",
    # data format and records
    "ANSWER_TEMPLATE", "strip_calculator", "split_solution", "read_gsm8k", "to_sft", "to_alpaca",
    "to_eval", "convert_file", "load", "main",
    # prompt
    "question", "exemplars",
    # answer extraction and scoring
    "extract_gsm8k_gold", "extract_gsm8k_prediction", "gsm8k_correct", "score_gsm8k",
    "parse_number", "canonical_number", "score", "summarize",
    # RL prompt and gold
    "ANSWER_MARKER", "is_record", "rl_prompt", "gold_of_reply", "correct",
]

NAME = "gsm8k"
FEWSHOT = True
ANSWER_TEMPLATE = "The answer is {answer}."   # the answer line SFT records end with

# ------------------------------------------------------------------------------------------
# Answer extraction and scoring
# ------------------------------------------------------------------------------------------

# A numeric literal as people and models write it: optional sign, optional currency symbol,
# digits with proper 3-digit comma groups (so "1,2,3" stays three numbers), optional decimals,
# optional "/denominator" (only when written without spaces, so "16 / 2" in a calculation is
# not glued into one fraction). The sign only counts as a minus when it is not a binary minus,
# i.e. it does not directly follow a digit or a letter ("5-3" is 5 and 3, "is -3" is -3).
_NUM_BODY = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(
    r"(?<![\w.])"                                # not the tail of a word/number ("x2", "1.5.")
    r"(?P<sign>[-\u2212\u2013])?"                # minus, unicode minus or en dash
    r"\s?(?P<cur>[$\u00a5\u20ac\u00a3\uffe5]|US\$|Rs\.?)?\s?"
    r"(?P<num>" + _NUM_BODY + r")"
    r"(?P<den>/(?:\d+(?:\.\d+)?))?"
    r"(?![\d])"
)

# Phrases that introduce a final answer. English covers the CoT prompt ("The answer is 18.") and
# "Final answer: 18"; a connector is required so that "To answer this, 5 + 3 ..." does not count
# as an answer statement, and "=" is not one ("2 points/answer = 48" is arithmetic, not a verdict); the Chinese variants matter because MiniMind's SFT data is
# largely Chinese and a model may answer in Chinese even to an English question.
_ANSWER_PHRASE_RE = re.compile(
    r"\banswer\s*(?:is|:|would\s+be|will\s+be|should\s+be)\s*:?"
    r"|答案\s*(?:是|为|:|：)",
    re.IGNORECASE,
)
_HASH_RE = re.compile(r"####")
# Start of a new few-shot exemplar inside a completion (only after some content: position > 0).
_NEW_QUESTION_RE = re.compile(r"(?<=.)\n\s*(?:Question|Q|Problem|问题)\s*[:：]", re.S)
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")

# Small number words are accepted only right after an answer phrase ("the answer is five").
_WORDS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_WORD_RE = re.compile(r"\s*(?:\$\s*)?([A-Za-z]+)\b")

# How far after an answer phrase we look for its number: "The answer is $1,234 dollars" needs a few
# characters of slack, but a phrase with no number right after must not steal a number from the
# next sentence.
_PHRASE_WINDOW = 40


def parse_number(text: str) -> Fraction | None:
    """Parse one number as written in text ("$1,080.00", "-3", "3/4", "50%", "7 apples").

    Returns an exact Fraction, or None when ``text`` holds no number. Units, currency, a percent sign
    and trailing words are ignored: GSM8K golds are bare numbers, so "50%" must equal "50".
    """
    m = _NUMBER_RE.search(text.strip())
    return _match_to_fraction(m) if m else None


def _match_to_fraction(m: re.Match[str]) -> Fraction | None:
    value = Fraction(m.group("num").replace(",", ""))
    if m.group("den"):
        den = Fraction(m.group("den")[1:])
        if den == 0:
            return None  # "5/0" is not a number; treat as no answer rather than crash
        value /= den
    if m.group("sign"):
        value = -value
    return value


def canonical_number(value: Fraction) -> str:
    """Stable text form of a number: integers without ".0", other values as a reduced fraction.

    Used for the ``extracted`` field in reports so that "18", "18.00" and "$18" all print as "18".
    """
    if value.denominator == 1:
        return str(value.numerator)
    # Prefer a short exact decimal when one exists (0.75, not 3/4); keep a fraction otherwise.
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:
        text = f"{float(value):.10f}".rstrip("0").rstrip(".")
        if Fraction(text) == value:
            return text
    return f"{value.numerator}/{value.denominator}"


def extract_gsm8k_gold(solution: str) -> str:
    """Gold answer of a GSM8K reference solution: the number after the last ``####``.

    Returns the canonical form ("1,080" -> "1080"). Raises ValueError when the solution has no
    ``####`` line or no number after it, since every real GSM8K record has one.
    """
    idx = solution.rfind("####")
    if idx < 0:
        raise ValueError("GSM8K solution has no '#### <answer>' line")
    value = parse_number(solution[idx + 4:])
    if value is None:
        raise ValueError(f"GSM8K solution has no number after '####': {solution[idx:idx + 40]!r}")
    return canonical_number(value)


def _number_after(text: str, start: int, window: int) -> Fraction | None:
    """First number starting within ``window`` characters after ``start`` (or a number word)."""
    segment = text[start:start + window]
    # Stop at a line break: "The answer is\n\nQuestion 2: ..." must not read the next question.
    segment = segment.split("\n\n", 1)[0]
    m = _NUMBER_RE.search(segment)
    if m:
        return _match_to_fraction(m)
    w = _WORD_RE.match(segment)
    if w and w.group(1).lower() in _WORDS:
        return Fraction(_WORDS[w.group(1).lower()])
    return None


def extract_gsm8k_prediction(text: str | None) -> str | None:
    """Final numeric answer in a model completion, or None when there is none.

    The text is first cut where a new exemplar starts (a line beginning "Question:", "Q:",
    "Problem:", "问题"): small models often ramble on with a made-up question and its answer.
    Then, first hit wins:
    1. the first ``#### n`` (the format GSM8K-trained models emit);
    2. the last ``\\boxed{n}`` (MATH-style models);
    3. the last answer phrase followed closely by a number ("The answer is $18.", "答案是 18"):
       last, because worked solutions say things like "the final answer is 15 * 8 = 120" on the
       way and restate the answer at the end;
    4. the last number anywhere in the text (the usual "flexible" fallback).
    Pass only the generated continuation, not the prompt: few-shot exemplars in the prompt contain
    answers of their own.
    """
    if not text:
        return None
    cut = _NEW_QUESTION_RE.search(text)
    if cut:
        text = text[:cut.start()]
    for m in _HASH_RE.finditer(text):
        value = _number_after(text, m.end(), _PHRASE_WINDOW)
        if value is not None:
            return canonical_number(value)
    for m in reversed(list(_BOXED_RE.finditer(text))):
        value = parse_number(m.group(1).replace("\\$", "$").replace("\\%", "%"))
        if value is not None:
            return canonical_number(value)
    for m in reversed(list(_ANSWER_PHRASE_RE.finditer(text))):
        value = _number_after(text, m.end(), _PHRASE_WINDOW)
        if value is not None:
            return canonical_number(value)
    last = None
    for m in _NUMBER_RE.finditer(text):
        last = m
    if last is None:
        return None
    value = _match_to_fraction(last)
    return canonical_number(value) if value is not None else None


def _gold_value(gold_answer: str | int | float) -> Fraction:
    if isinstance(gold_answer, (int, float)):
        return Fraction(gold_answer)
    text = str(gold_answer)
    if "####" in text:  # a whole reference solution was passed
        text = extract_gsm8k_gold(text)
    value = parse_number(text)
    if value is None:
        raise ValueError(f"gold answer is not a number: {gold_answer!r}")
    return value


def _close(a: Fraction, b: Fraction, rel_tol: float = 1e-6) -> bool:
    # Exact first; the tolerance only rescues printed floats like 0.3333333 for 1/3.
    return a == b or abs(a - b) <= Fraction(rel_tol) * max(Fraction(1), abs(b))


def gsm8k_correct(pred_text: str | None, gold_answer: str | int | float) -> bool:
    """True when the number extracted from ``pred_text`` equals the gold answer.

    ``gold_answer`` may be a bare number ("1,080", 18) or a full reference solution with ``####``.
    """
    return bool(score_gsm8k(pred_text, gold_answer)["correct"])


def score_gsm8k(pred_text: str | None, gold_answer: str | int | float) -> dict:
    """Score one completion; returns ``{"extracted", "gold", "correct", "error_kind"}``.

    ``error_kind`` is None when correct, ``"no_answer"`` when no number was found and
    ``"wrong_answer"`` otherwise (a runner that knows the generation hit its token limit may
    relabel these as ``"truncated"``). The dict plugs straight into ``evaluation.report``.
    """
    gold = _gold_value(gold_answer)
    extracted = extract_gsm8k_prediction(pred_text)
    if extracted is None:
        return {"extracted": None, "gold": canonical_number(gold), "correct": False,
                "error_kind": "no_answer"}
    pred = Fraction(extracted)
    ok = _close(pred, gold)
    return {"extracted": extracted, "gold": canonical_number(gold), "correct": ok,
            "error_kind": None if ok else "wrong_answer"}


# ------------------------------------------------------------------------------------------
# Data format: the release's records, and what we write from them
# ------------------------------------------------------------------------------------------

_CALC_RE = re.compile(r"<<[^<>]*>>")


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: ``"$<<9*2=18>>18"`` -> ``"$18"``."""
    return _CALC_RE.sub("", text)


def split_solution(solution: str, where: str = "<solution>", keep_calculator: bool = False
                   ) -> tuple[str, str]:
    """``(reasoning, gold)``: the worked steps before ``####`` and the canonical gold number."""
    idx = solution.rfind("####")
    if idx < 0:
        raise DataError(f"{where}: answer has no '#### <number>' line")
    try:
        gold = extract_gsm8k_gold(solution)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    reasoning = solution[:idx].strip()
    if not keep_calculator:
        reasoning = strip_calculator(reasoning)
    return reasoning, gold


def read_gsm8k(path: str | Path, split: str | None = None, keep_calculator: bool = False
               ) -> Iterator[dict]:
    """Parsed items ``{"id", "question", "reasoning", "answer", "solution"}`` from a GSM8K file."""
    path = Path(path)
    split = split or path.name.split(".")[0]
    for index, (where, obj) in enumerate(iter_records(path)):
        question = require(obj, "question", where)
        solution = require(obj, "answer", where)
        reasoning, gold = split_solution(solution, where, keep_calculator)
        yield {"id": f"gsm8k/{split}/{index}", "question": question.strip(),
               "reasoning": reasoning, "answer": gold, "solution": solution}


def to_sft(item: dict, inline: bool = False) -> dict:
    """MiniMind SFT conversation (see module docstring for why reasoning is separate)."""
    return reasoning_sft(item["question"], item["reasoning"], ANSWER_TEMPLATE.format(answer=item["answer"]), inline)


def to_alpaca(item: dict) -> dict:
    """Alpaca row with the reasoning inline (LLaMA-Factory has no reasoning column)."""
    return reasoning_alpaca(item["question"], item["reasoning"], ANSWER_TEMPLATE.format(answer=item["answer"]))


def to_eval(item: dict) -> dict:
    """Scoring record: question and canonical gold number (solution kept for error analysis)."""
    return {"id": item["id"], "question": item["question"], "answer": item["answer"],
            "solution": item["solution"]}


def convert_file(src: str | Path, out: str | Path, kind: str = "sft", inline: bool = False,
                 keep_calculator: bool = False, split: str | None = None,
                 dataset_info: str | Path | None = None, name: str | None = None) -> int:
    """Convert one GSM8K file to ``kind`` records (sft | alpaca | eval), registering them in
    ``dataset_info`` when given (name default ``gsm8k_<stem>_<kind>``); returns the count."""
    items = read_gsm8k(src, split, keep_calculator)
    stem = Path(src).name.split(".")[0]
    return write_converted(items, out, kind, inline, to_sft=to_sft, to_alpaca=to_alpaca,
                           to_eval=to_eval, dataset_info=dataset_info,
                           registry_name=name or f"gsm8k_{stem}_{kind}")


def load(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items to score, ``{"id", "question", "answer"}``: ``answer`` is a full GSM8K solution
    (ending in ``#### n``) or a bare number, as in the raw release and in our eval records."""
    def records() -> Iterable[dict]:
        for i, (where, obj) in enumerate(iter_records(path)):
            yield {"id": obj.get("id", f"gsm8k/{i}"), "question": first_field(obj, where, "question"),
                   "answer": str(first_field(obj, where, "answer"))}
    return take(records(), limit)


# ------------------------------------------------------------------------------------------
# Prompt
# ------------------------------------------------------------------------------------------

def question(item: Mapping[str, Any]) -> str:
    """The user turn of an item: the bare question (what the SFT records train on)."""
    return item["question"]


def exemplars(items: Sequence[dict]) -> list[dict[str, Any]]:
    """Few-shot turns in the format our GSM8K SFT data teaches (reasoning, then "The answer is N.").
    Items whose ``answer`` is a bare number (no worked solution) give the answer line only."""
    turns: list[dict[str, Any]] = []
    for it in items:
        if "####" in it["answer"]:
            reasoning, gold = split_solution(it["answer"])
            reply = f"{reasoning}\n{ANSWER_TEMPLATE.format(answer=gold)}"
        else:
            reply = ANSWER_TEMPLATE.format(answer=it["answer"])
        turns += [{"role": "user", "content": it["question"]},
                  {"role": "assistant", "content": reply}]
    return turns


# ------------------------------------------------------------------------------------------
# Scoring an item for a report
# ------------------------------------------------------------------------------------------

def score(item: Mapping[str, Any], text: str) -> dict:
    """One report row: ``score_gsm8k`` of the answer text against the item's gold."""
    return {"id": item.get("id"), "category": item.get("category"),
            **score_gsm8k(text, item["answer"])}


def summarize(results: Sequence[dict]) -> dict:
    """No summary fields beyond the report's own."""
    return {}


# ------------------------------------------------------------------------------------------
# RL: prompt and gold of a data record, and the reward's verdict
# ------------------------------------------------------------------------------------------

# What "an answer was given" looks like (the marker the training data teaches).
ANSWER_MARKER = re.compile(r"####\s*-?[\d.,]+")


def is_record(obj: Mapping[str, Any]) -> bool:
    """A GSM8K record (release or eval record): ``question`` and ``answer``."""
    return "question" in obj and "answer" in obj


def rl_prompt(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"messages", "task", "gold"}``: the question as the user turn; the gold is the number
    after ``####`` of a worked solution, or a bare answer as it is."""
    answer = str(obj["answer"])
    gold = extract_gsm8k_gold(answer) if "####" in answer else answer.strip()
    return {"messages": [{"role": "user", "content": obj["question"]}], "task": NAME, "gold": gold}


def gold_of_reply(text: str) -> str | None:
    """The gold of a worked reply ending in ``#### n``, or None."""
    if "####" not in text:
        return None
    try:
        return extract_gsm8k_gold(text)
    except ValueError:
        return None


def correct(text: str, sample: Mapping[str, Any]) -> bool:
    """Whether an answer text is right for an RL sample (``rl_prompt``'s record)."""
    return gsm8k_correct(text, sample["gold"])


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.gsm8k convert --src train.jsonl --out gsm8k_sft.jsonl [--kind ...]``."""
    parser, p = convert_parser(
        NAME, "Convert GSM8K {question, answer} JSONL into MiniMind SFT conversations "
              "(assistant reasoning_content = worked solution, content = 'The answer is N.'), "
              "alpaca rows, or eval records {id, question, answer, solution}.",
        "GSM8K .jsonl file (e.g. ../shared/data/gsm8k/train.jsonl)")
    p.add_argument("--inline", action="store_true",
                   help="sft only: put the reasoning and the answer line together in content "
                        "instead of reasoning_content (for models trained without thinking)")
    p.add_argument("--keep-calculator", action="store_true",
                   help="keep the <<a*b=c>> calculator annotations in the reasoning")
    p.add_argument("--split", help="split name used in ids (default: the file stem)")
    p.add_argument("--name", help="registry name (default: gsm8k_<stem>_<kind>)")
    args = parser.parse_args(argv)
    n = convert_file(args.src, args.out, args.kind, args.inline, args.keep_calculator, args.split,
                     args.dataset_info, args.name)
    print(f"wrote {n} records to {args.out}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
