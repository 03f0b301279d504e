"""Commonsense-reasoning scoring for the eight LoRA/DoRA benchmark sets (pure Python, no model).

Scope: the label vocabulary of each set, extraction of "the correct answer is X" from generations,
and log-likelihood multiple-choice scoring with the model call injected as a function. The uniform
multiple-choice records these functions take are produced by ``dataset/convert/commonsense.py``:

    {"id", "dataset", "question", "choices": [str], "label": int, "gold": "answer3",
     "instruction": <LLM-Adapters prompt, for generation>, "prompt": <context for log-likelihood>,
     optional "contexts": [str] + "continuation": str (WinoGrande partial scoring)}

References:
- LLM-Adapters (Hu et al., 2023, https://github.com/AGI-Edgerunners/LLM-Adapters): the prompts
  and the answer vocabulary (answer1..5 / true|false / solution1|2 / option1|2 / ending1..4); the
  model is fine-tuned to reply "the correct answer is <label>" and scored on the first label found.
- lm-evaluation-harness / Gao et al.: multiple choice by comparing log P(choice | context); "acc"
  uses the raw sum, "acc_norm" normalises by length (bytes there; tokens or characters here).
- WinoGrande "partial" scoring (Trinh & Le, 2018): substitute each option into the sentence and
  score the shared continuation after the blank.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

__all__ = [
    "TaskSpec",
    "TASKS",
    "get_task",
    "label_name",
    "label_index",
    "extract_choice",
    "commonsense_correct",
    "score_generation",
    "loglik_requests",
    "pick_choice",
    "score_loglik",
]


@dataclass(frozen=True)
class TaskSpec:
    """What varies between the eight sets.

    ``label_prefix`` is the stem of the LLM-Adapters answer labels ("" for BoolQ, whose labels are
    the words true/false); ``num_choices`` is None where it varies per item (ARC: 3-5).
    """

    name: str
    label_prefix: str
    num_choices: int | None


# Keys are the LLM-Adapters folder names, which are also our canonical dataset names.
TASKS: dict[str, TaskSpec] = {
    "ARC-Challenge": TaskSpec("ARC-Challenge", "answer", None),
    "ARC-Easy": TaskSpec("ARC-Easy", "answer", None),
    "boolq": TaskSpec("boolq", "", 2),
    "hellaswag": TaskSpec("hellaswag", "ending", 4),
    "openbookqa": TaskSpec("openbookqa", "answer", 4),
    "piqa": TaskSpec("piqa", "solution", 2),
    "social_i_qa": TaskSpec("social_i_qa", "answer", 3),
    "winogrande": TaskSpec("winogrande", "option", 2),
}
BOOLQ_LABELS = ("true", "false")  # LLM-Adapters order: "Answer format: true/false"

_ALIASES = {
    "arc_challenge": "ARC-Challenge", "arc-challenge": "ARC-Challenge", "arcc": "ARC-Challenge",
    "arc_easy": "ARC-Easy", "arc-easy": "ARC-Easy", "arce": "ARC-Easy",
    "boolq": "boolq", "hellaswag": "hellaswag", "obqa": "openbookqa", "openbook_qa": "openbookqa",
    "openbookqa": "openbookqa", "piqa": "piqa", "siqa": "social_i_qa", "social_i_qa": "social_i_qa",
    "socialiqa": "social_i_qa", "winogrande": "winogrande", "wino": "winogrande",
}


def get_task(name: str) -> TaskSpec:
    """TaskSpec by canonical name or a common alias (``arc_easy``, ``obqa``, ``siqa``, ...)."""
    if name in TASKS:
        return TASKS[name]
    key = _ALIASES.get(name.lower().replace(" ", "_"))
    if key is None:
        raise KeyError(f"unknown commonsense dataset {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


def label_name(dataset: str, index: int) -> str:
    """LLM-Adapters label for a 0-based choice index: ("ARC-Easy", 2) -> "answer3"."""
    spec = get_task(dataset)
    if index < 0 or (spec.num_choices is not None and index >= spec.num_choices):
        raise ValueError(f"{spec.name}: choice index {index} out of range")
    if not spec.label_prefix:
        return BOOLQ_LABELS[index]
    return f"{spec.label_prefix}{index + 1}"


def label_index(dataset: str, label: str) -> int:
    """Inverse of ``label_name``: ("piqa", "solution2") -> 1. Raises ValueError on a foreign label."""
    spec = get_task(dataset)
    text = label.strip().lower()
    if not spec.label_prefix:
        if text not in BOOLQ_LABELS:
            raise ValueError(f"boolq: label {label!r} is not true/false")
        return BOOLQ_LABELS.index(text)
    m = re.fullmatch(re.escape(spec.label_prefix) + r"(\d+)", text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{spec.name}: label {label!r} is not {spec.label_prefix}<n>")
    index = int(m.group(1)) - 1
    if spec.num_choices is not None and index >= spec.num_choices:
        raise ValueError(f"{spec.name}: label {label!r} out of range")
    return index


# ------------------------------------------------------------------------------------------
# Scoring by generation
# ------------------------------------------------------------------------------------------

# The phrase the fine-tuned model is taught to produce; "answer is"/"answer:" cover paraphrases.
_PHRASE_RE = re.compile(
    r"correct\s+(?:answer|option|solution|ending|choice)\s*(?:is|:|would\s+be)|answer\s*(?:is|:)",
    re.IGNORECASE,
)
_BOOL_RE = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)
_TRUE_FALSE_RE = re.compile(r"\b(true|false)\b", re.IGNORECASE)
_LETTER_RE = re.compile(r"^\W{0,3}\(?([A-Ea-e])\)?(?:\W|$)")
_DIGIT_RE = re.compile(r"^\W{0,3}(\d)\b")


def _labelled(prefix: str) -> re.Pattern[str]:
    # "answer3", "Answer 3", "answer_3", "ANSWER-3", "answer #3"
    return re.compile(r"\b" + prefix + r"\s*[-_#:]?\s*(\d)\b", re.IGNORECASE)


def extract_choice(text: str | None, dataset: str, num_choices: int | None = None) -> str | None:
    """The LLM-Adapters label a generation commits to ("answer3", "true", ...), or None.

    Looks first right after the first "the correct answer is" (so chatter before it is ignored),
    then anywhere in the text like LLM-Adapters does (first label found). Case, spacing and
    punctuation are ignored ("Answer 3.", "answer_3", "SOLUTION2!"); after the phrase a bare
    digit ("is 2") or letter ("is (B)") is accepted too; "yes"/"no" count for BoolQ.
    ``num_choices`` (for ARC, whose count varies) rejects labels beyond the last choice.
    """
    if not text:
        return None
    spec = get_task(dataset)
    limit = num_choices or spec.num_choices
    phrase = _PHRASE_RE.search(text)
    segments = [text[phrase.end():phrase.end() + 80]] if phrase else []
    segments.append(text)
    for k, seg in enumerate(segments):
        after_phrase = phrase is not None and k == 0
        if not spec.label_prefix:
            # yes/no only right after the phrase: elsewhere "no" is too common a word.
            m = (_BOOL_RE if after_phrase else _TRUE_FALSE_RE).search(seg)
            if m:
                word = m.group(1).lower()
                return {"yes": "true", "no": "false"}.get(word, word)
            continue
        for m in _labelled(spec.label_prefix).finditer(seg):
            n = int(m.group(1))
            if n >= 1 and (limit is None or n <= limit):
                return f"{spec.label_prefix}{n}"
        if after_phrase:
            m = _DIGIT_RE.match(seg)
            if m and 1 <= int(m.group(1)) <= (limit or 5):
                return f"{spec.label_prefix}{int(m.group(1))}"
            m = _LETTER_RE.match(seg)
            if m:
                n = "abcde".index(m.group(1).lower()) + 1
                if n <= (limit or 5):
                    return f"{spec.label_prefix}{n}"
    return None


def _gold_label(dataset: str, gold: str | int) -> str:
    return label_name(dataset, gold) if isinstance(gold, int) else gold.strip().lower()


def commonsense_correct(pred_text: str | None, gold: str | int, dataset: str,
                        num_choices: int | None = None) -> bool:
    """True when the generation's label equals ``gold`` (a label string or a 0-based index)."""
    pred = extract_choice(pred_text, dataset, num_choices)
    return pred is not None and pred == _gold_label(dataset, gold)


def score_generation(pred_text: str | None, record: dict) -> dict:
    """Score one generation against a uniform MC record.

    Returns ``{"id", "category", "extracted", "gold", "correct", "error_kind"}`` ready for
    ``evaluation.report`` (category = dataset name).
    """
    dataset = record["dataset"]
    extracted = extract_choice(pred_text, dataset, len(record["choices"]))
    gold = _gold_label(dataset, record.get("gold", record["label"]))
    correct = extracted is not None and extracted == gold
    kind = None if correct else ("no_answer" if extracted is None else "wrong_answer")
    return {"id": record.get("id"), "category": dataset, "extracted": extracted, "gold": gold,
            "correct": correct, "error_kind": kind}


# ------------------------------------------------------------------------------------------
# Scoring by log-likelihood
# ------------------------------------------------------------------------------------------

LogprobFn = Callable[[str, str], tuple[float, int]]


def loglik_requests(record: dict) -> list[tuple[str, str]]:
    """The (context, continuation) pairs whose log-probabilities decide the record.

    Default: the shared ``prompt`` and each choice after a space. WinoGrande-style records carry
    ``contexts`` (the sentence up to the blank with each option filled in) and one
    ``continuation`` (the rest of the sentence, verbatim): the option is judged by how well the
    rest of the sentence follows it.
    """
    if record.get("contexts"):
        # The continuation keeps its own leading space (" always got ..."), or none before
        # punctuation ("'s car ..."), so it is used verbatim.
        return [(ctx, record["continuation"]) for ctx in record["contexts"]]
    prompt = record["prompt"]
    return [(prompt, " " + c if not prompt.endswith((" ", "\n")) else c) for c in record["choices"]]


def pick_choice(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the first (deterministic); NaN never wins."""
    best, best_i = -math.inf, 0
    for i, s in enumerate(scores):
        if not math.isnan(s) and s > best:
            best, best_i = s, i
    return best_i


def score_loglik(items: Iterable[dict], logprob_fn: LogprobFn,
                 method: str = "sum") -> list[dict]:
    """Multiple-choice accuracy by log-likelihood; the model call is injected.

    ``logprob_fn(context, continuation) -> (sum of log-probs of the continuation tokens, n_tokens)``.
    For each record three predictions are made: ``sum`` (raw total, lm-eval "acc"), ``token``
    (mean per token) and ``char`` (total / characters of the continuation, lm-eval's "acc_norm"
    up to bytes vs characters). ``method`` picks which one fills ``correct``; all three are kept
    (``correct_sum``, ``correct_token``, ``correct_char``) so one pass yields every variant.
    """
    if method not in ("sum", "token", "char"):
        raise ValueError(f"method must be sum | token | char, got {method!r}")
    results: list[dict] = []
    for rec in items:
        requests = loglik_requests(rec)
        sums: list[float] = []
        ntoks: list[int] = []
        for ctx, cont in requests:
            lp, n = logprob_fn(ctx, cont)
            sums.append(float(lp))
            ntoks.append(int(n))
        per_token = [s / max(n, 1) for s, n in zip(sums, ntoks)]
        per_char = [s / max(len(cont.strip()), 1) for s, (_, cont) in zip(sums, requests)]
        preds = {"sum": pick_choice(sums), "token": pick_choice(per_token),
                 "char": pick_choice(per_char)}
        label = int(rec["label"])
        pred = preds[method]
        results.append({
            "id": rec.get("id"),
            "category": rec.get("dataset"),
            "prompt": requests[0][0] if not rec.get("contexts") else rec.get("question", ""),
            "prediction": rec["choices"][pred],
            "extracted": pred,
            "gold": label,
            "correct": pred == label,
            "error_kind": None if pred == label else "wrong_answer",
            "logprobs": sums,
            "n_tokens": ntoks,
            **{f"correct_{k}": v == label for k, v in preds.items()},
        })
    return results
