"""GSM8K answer extraction and scoring (pure Python, no model).

Scope: turn a GSM8K reference solution into its gold number, pull the final number out of a
model's free-form answer, and decide whether the two agree. The model-driven runner calls these.

References:
- GSM8K (Cobbe et al., 2021, https://github.com/openai/grade-school-math): reference solutions end
  with a line ``#### <number>``; the number may carry thousands separators ("1,080") or a sign.
- The usual extraction cascade (as in lm-evaluation-harness' "strict" / "flexible" GSM8K filters
  and the chain-of-thought prompt "The answer is N."): an explicit ``####`` marker first, then an
  answer phrase, then the last number in the text. Written here from that description.

Numbers are compared exactly as fractions (so "0.75" == "3/4" and "18.00" == "18") with a tiny
relative tolerance for printed floats such as "0.3333333".
"""
from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "extract_gsm8k_gold",
    "extract_gsm8k_prediction",
    "gsm8k_correct",
    "score_gsm8k",
    "parse_number",
    "canonical_number",
]

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
