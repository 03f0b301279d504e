"""The eight commonsense-reasoning sets of the LoRA/DoRA papers, in one place: their source
layouts, the uniform multiple-choice record, SFT / alpaca records, the LLM-Adapters prompt,
answer extraction, scoring (generation and log-likelihood; the model call is injected) and the
RL prompt + gold. The shape is the one of every task module (``tasks/__init__.py``); no few-shot
exemplars (LLM-Adapters evaluates zero-shot).

Sets: ARC-Challenge, ARC-Easy, BoolQ, HellaSwag, OpenBookQA, PIQA, Social IQa, WinoGrande.

Inputs (``src_format``, detected from the first record when ``auto``):
- ``llm_adapters``: LLM-Adapters' ``{"instruction", "input", "output", "answer"}`` lists (question
  and choices are parsed back out of the instruction text, so the eval record is complete);
- ``mosaic``: MosaicML ICL ``{"query", "choices", "gold"}`` / WinoGrande
  ``{"context_options", "continuation", "gold"}``;
- ``original``: the original / HuggingFace field layouts (ARC ``question``+``choices{text,label}``
  +``answerKey``; OBQA ``question_stem``; SIQA ``context``/``question``/``answerA..C``/``label``
  1-based; WinoGrande ``sentence``/``option1``/``option2``/``answer``; BoolQ ``question``/
  ``passage``/``answer`` bool; PIQA ``goal``/``sol1``/``sol2`` (+ a ``labels`` .lst file);
  HellaSwag ``ctx``/``endings``/``label``; or generic ``question``/``choices``/``label``).

Every layout becomes the uniform record that the scorers take:

    {"id", "dataset", "question", "choices": [str], "label": int, "gold": "answer3",
     "instruction": <LLM-Adapters prompt, for generation>, "prompt": <context for log-likelihood>,
     optional "passage", optional "contexts": [str] + "continuation": str (WinoGrande partial
     scoring)}

Records written by ``convert_file`` / ``convert_tree`` (the CLI is
``python -m tasks.commonsense convert``): ``sft`` = MiniMind ``{"conversations": [user:
LLM-Adapters instruction, assistant: "the correct answer is answer3"]}``, the exact target
LLM-Adapters fine-tunes on, so scores are comparable; ``alpaca`` = the same pair as
``{"instruction", "input", "output"}``; ``eval`` = the uniform record.

References:
- LLM-Adapters (Hu et al., 2023, https://github.com/AGI-Edgerunners/LLM-Adapters),
  ``dataset/<name>/{train,test}.json``: the prompts and the answer vocabulary (answer1..5 /
  true|false / solution1|2 / option1|2 / ending1..4); the model is fine-tuned to reply "the
  correct answer is <label>" and scored on the first label found. The prompt templates below were
  reconstructed from those files and are checked by a round-trip test on every shipped record
  (``format_instruction(parse_instruction(x)) == x``).
- lm-evaluation-harness / Gao et al.: multiple choice by comparing log P(choice | context); "acc"
  uses the raw sum, "acc_norm" normalises by length (bytes there; tokens or characters here).
- WinoGrande "partial" scoring (Trinh & Le, 2018): substitute each option into the sentence and
  score the shared continuation after the blank.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from dataset.convert._io import (
    DataError,
    dataset_info_entry,
    iter_records,
    open_text,
    register_file,
    require,
    take,
    update_dataset_info,
    write_jsonl,
)
from tasks._cli import convert_parser

__all__ = [
    "NAME", "FEWSHOT",
    # the sets and their label vocabulary
    "TaskSpec", "TASKS", "BOOLQ_LABELS", "get_task", "label_name", "label_index",
    # prompt and the uniform record
    "format_instruction", "parse_instruction", "make_record", "ASSISTANT_TEMPLATE",
    # source layouts
    "read_llm_adapters", "read_mosaic", "read_original", "read_piqa_original",
    "read_commonsense", "record_from_original", "infer_dataset", "infer_split",
    # written records
    "KINDS", "to_sft", "to_alpaca", "convert_file", "convert_tree", "load", "main",
    # prompt
    "question",
    # scoring
    "extract_choice", "commonsense_correct", "score_generation", "score", "summarize",
    "loglik_requests", "pick_choice", "score_loglik",
    # RL prompt and gold
    "ANSWER_MARKER", "is_record", "rl_prompt", "gold_of_reply", "correct",
]

NAME = "commonsense"
FEWSHOT = False


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
# Prompt and the uniform record
# ------------------------------------------------------------------------------------------

# Instruction header and the marker word of the choices, per dataset family.
_HEADER_MC = "Please choose the correct answer to the question: "
_HEADERS = {
    "ARC-Challenge": _HEADER_MC, "ARC-Easy": _HEADER_MC, "openbookqa": _HEADER_MC,
    "social_i_qa": _HEADER_MC,
    "boolq": "Please answer the following question with true or false, question: ",
    "piqa": "Please choose the correct solution to the question: ",
    "winogrande": "Please choose the correct answer to fill in the blank to complete the given sentence: ",
    "hellaswag": "Please choose the correct ending to complete the given sentence: ",
}
# Separator between consecutive choices and before "Answer format:" (LLM-Adapters is not uniform:
# PIQA puts each solution in its own paragraph, WinoGrande runs everything on one line).
_CHOICE_SEP = {"piqa": "\n\n"}
_FORMAT_SEP = {"winogrande": " "}
ASSISTANT_TEMPLATE = "the correct answer is {label}"


def _marker(dataset: str) -> str:
    return get_task(dataset).label_prefix.capitalize()


def format_instruction(dataset: str, question: str, choices: list[str]) -> str:
    """The LLM-Adapters prompt for one item (exactly as in their data files)."""
    name = get_task(dataset).name
    header = _HEADERS[name]
    if name == "boolq":
        # LLM-Adapters appends "?" to the HF question, which has none.
        q = question if question.endswith("?") else question + "?"
        return f"{header}{q}\n\nAnswer format: true/false"
    marker = _marker(name)
    sep = _CHOICE_SEP.get(name, " ")
    listed = sep.join(f"{marker}{i + 1}: {c}" for i, c in enumerate(choices))
    formats = "/".join(label_name(name, i) for i in range(len(choices)))
    return f"{header}{question}\n\n{listed}{_FORMAT_SEP.get(name, chr(10) * 2)}Answer format: {formats}"


def parse_instruction(dataset: str, instruction: str, where: str = "<instruction>") -> tuple[str, list[str]]:
    """Recover ``(question, choices)`` from an LLM-Adapters prompt; inverse of format_instruction.

    Choice markers are searched from the end backwards, so a question that happens to contain
    "Answer1:" cannot shift the split. BoolQ returns the choices ``["true", "false"]`` and the
    question without LLM-Adapters' appended "?".
    """
    name = get_task(dataset).name
    header = _HEADERS[name]
    if not instruction.startswith(header):
        raise DataError(f"{where}: instruction does not start with the {name} header {header!r}")
    fmt_at = instruction.rfind("Answer format: ")
    if fmt_at < 0:
        raise DataError(f"{where}: instruction has no 'Answer format:' line")
    labels = instruction[fmt_at + len("Answer format: "):].strip().split("/")
    body = instruction[len(header):fmt_at]
    fsep = _FORMAT_SEP.get(name, "\n\n")
    if not body.endswith(fsep):
        raise DataError(f"{where}: expected {fsep!r} before 'Answer format:'")
    body = body[: -len(fsep)]
    if name == "boolq":
        if labels != list(BOOLQ_LABELS):
            raise DataError(f"{where}: boolq answer format should be true/false, got {labels}")
        return (body[:-1] if body.endswith("?") else body), list(BOOLQ_LABELS)
    spec = get_task(name)
    expected = [f"{spec.label_prefix}{i + 1}" for i in range(len(labels))]
    if labels != expected or (spec.num_choices is not None and len(labels) != spec.num_choices):
        raise DataError(f"{where}: unexpected answer format {'/'.join(labels)!r} for {name}")
    marker = _marker(name)
    sep = _CHOICE_SEP.get(name, " ")
    starts: list[int] = []
    end = len(body)
    for i in range(len(labels), 0, -1):
        pos = body.rfind(f"{marker}{i}: ", 0, end)
        if pos < 0:
            raise DataError(f"{where}: choice marker '{marker}{i}:' not found")
        starts.append(pos)
        end = pos
    starts.reverse()
    choices = []
    for i, pos in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(body)
        text = body[pos + len(f"{marker}{i + 1}: "):stop]
        if i + 1 < len(starts):
            if not text.endswith(sep):
                raise DataError(f"{where}: expected {sep!r} after choice {i + 1}")
            text = text[: -len(sep)]
        choices.append(text)
    head = body[:starts[0]]
    if not head.endswith("\n\n"):
        raise DataError(f"{where}: expected a blank line between question and choices")
    return head[:-2], choices


def _loglik_prompt(name: str, question: str, passage: str | None) -> str:
    """Context for log-likelihood scoring, following lm-evaluation-harness' per-task prompts."""
    if name in ("openbookqa", "hellaswag", "winogrande"):
        # the choice continues the sentence directly (WinoGrande is scored via "contexts")
        return question
    if name == "boolq":
        q = question if question.endswith("?") else question + "?"
        return (f"{passage}\nQuestion: {q}\nAnswer:" if passage else f"Question: {q}\nAnswer:")
    return f"Question: {question}\nAnswer:"


def make_record(dataset: str, split: str, index: int, question: str, choices: list[str],
                label: int, *, where: str = "", instruction: str | None = None,
                passage: str | None = None) -> dict:
    """Build the uniform multiple-choice record (validates the label and the choice count)."""
    spec = get_task(dataset)
    if not choices or any(not isinstance(c, str) for c in choices):
        raise DataError(f"{where}: choices must be a non-empty list of strings")
    if spec.num_choices is not None and len(choices) != spec.num_choices:
        raise DataError(f"{where}: {spec.name} needs {spec.num_choices} choices, got {len(choices)}")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label} out of range for {len(choices)} choices")
    rec = {
        "id": f"{spec.name}/{split}/{index}",
        "dataset": spec.name,
        "question": question,
        "choices": list(choices),
        "label": label,
        "gold": label_name(spec.name, label),
        "instruction": instruction if instruction is not None
        else format_instruction(spec.name, question, choices),
        "prompt": _loglik_prompt(spec.name, question, passage),
    }
    if passage:
        rec["passage"] = passage
    if spec.name == "winogrande":
        # Partial scoring: each option fills the blank, the shared rest of the sentence is scored.
        blank = question.find("_")
        if blank < 0:
            raise DataError(f"{where}: winogrande sentence has no '_' blank")
        rec["contexts"] = [question[:blank] + opt for opt in choices]
        rec["continuation"] = question[blank + 1:]
    return rec


# ------------------------------------------------------------------------------------------
# Source layouts
# ------------------------------------------------------------------------------------------


def read_llm_adapters(path: str | Path, dataset: str, split: str) -> Iterator[dict]:
    """Uniform records from an LLM-Adapters ``{instruction, input, output, answer}`` file."""
    name = get_task(dataset).name
    for index, (where, obj) in enumerate(iter_records(path)):
        instruction = require(obj, "instruction", where)
        answer = require(obj, "answer", where)
        output = require(obj, "output", where)
        if obj.get("input"):
            raise DataError(f"{where}: non-empty 'input' is not part of the LLM-Adapters format")
        question, choices = parse_instruction(name, instruction, where)
        try:
            label = label_index(name, answer)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if label >= len(choices):
            raise DataError(f"{where}: answer {answer!r} out of range for {len(choices)} choices")
        if extract_choice(output, name, len(choices)) != answer.strip().lower():
            raise DataError(f"{where}: output {output!r} disagrees with answer {answer!r}")
        yield make_record(name, split, index, question, choices, label,
                          where=where, instruction=instruction)


def _common_word_prefix(texts: list[str]) -> str:
    """Longest common prefix of ``texts`` cut back to a word start ("...so Ma" -> "...so ")."""
    prefix = texts[0]
    for t in texts[1:]:
        i = 0
        while i < min(len(prefix), len(t)) and prefix[i] == t[i]:
            i += 1
        prefix = prefix[:i]
    while prefix and prefix[-1].isalnum():
        prefix = prefix[:-1]
    return prefix


def read_mosaic(path: str | Path, dataset: str, split: str) -> Iterator[dict]:
    """Uniform records from MosaicML ICL files (``query/choices/gold`` or WinoGrande's
    ``context_options/continuation/gold``)."""
    name = get_task(dataset).name
    for index, (where, obj) in enumerate(iter_records(path)):
        gold = require(obj, "gold", where, int)
        if "context_options" in obj:
            options = require(obj, "context_options", where, list)
            cont = require(obj, "continuation", where)
            prefix = _common_word_prefix(options)
            choices = [o[len(prefix):] for o in options]
            question = f"{prefix}_ {cont}"
            yield make_record(name, split, index, question, choices, gold, where=where)
            continue
        query = require(obj, "query", where)
        choices = require(obj, "choices", where, list)
        passage = None
        text = query.strip()
        if text.startswith("Passage:") and "\nQuestion:" in text:
            # rsplit: passages may themselves contain "\nQuestion:"-like text
            passage, text = text[len("Passage:"):].rsplit("\nQuestion:", 1)
            passage, text = passage.strip(), text.strip()
        elif text.startswith("Question:"):
            text = text[len("Question:"):].strip()
        if name == "boolq":
            yield _boolq_record(split, index, text, choices[gold] if 0 <= gold < len(choices) else None,
                                where, passage)
            continue
        yield make_record(name, split, index, text, choices, gold, where=where, passage=passage)


def _boolq_record(split: str, index: int, question: str, answer: object, where: str,
                  passage: str | None) -> dict:
    """BoolQ in LLM-Adapters order (true, false) whatever words or booleans the source used."""
    truth = {True: 0, "true": 0, "yes": 0, False: 1, "false": 1, "no": 1}
    key = answer.strip().lower() if isinstance(answer, str) else answer
    if key not in truth:
        raise DataError(f"{where}: boolq answer {answer!r} is not yes/no/true/false")
    # Stored without the "?" that LLM-Adapters appends, like the HF original.
    question = question[:-1].rstrip() if question.endswith("?") else question
    return make_record("boolq", split, index, question, list(BOOLQ_LABELS), truth[key],
                       where=where, passage=passage)


def _letter_or_number_index(key: object, labels: list[str] | None, where: str, one_based: bool) -> int:
    """Index from an answer key: a letter ("C"), a digit string ("3"), or an int."""
    if isinstance(key, bool):
        raise DataError(f"{where}: label {key!r} is a boolean")
    if labels is not None and str(key) in labels:
        return labels.index(str(key))
    if isinstance(key, int):
        return key - 1 if one_based else key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key) - 1 if one_based else int(key)
    if isinstance(key, str) and len(key.strip()) == 1 and key.strip().upper() in "ABCDE":
        return "ABCDE".index(key.strip().upper())
    raise DataError(f"{where}: cannot read label {key!r}")


def record_from_original(dataset: str, split: str, index: int, obj: dict, where: str,
                         label: object = None) -> dict:
    """One uniform record from an original / HuggingFace-layout object (see module docstring).

    ``label`` overrides the record's own (PIQA keeps labels in a separate .lst file).
    """
    name = get_task(dataset).name
    if name == "boolq":
        question = require(obj, "question", where)
        answer = label if label is not None else obj.get("answer", obj.get("label"))
        return _boolq_record(split, index, question, answer, where, obj.get("passage"))
    if name == "piqa" and "goal" in obj:
        lab = label if label is not None else require(obj, "label", where, (int, str))
        choices = [require(obj, "sol1", where), require(obj, "sol2", where)]
        return make_record(name, split, index, require(obj, "goal", where), choices,
                           _letter_or_number_index(lab, None, where, one_based=False), where=where)
    if name == "winogrande" and "sentence" in obj:
        choices = [require(obj, "option1", where), require(obj, "option2", where)]
        lab = label if label is not None else require(obj, "answer", where, (int, str))
        return make_record(name, split, index, require(obj, "sentence", where), choices,
                           _letter_or_number_index(lab, None, where, one_based=True), where=where)
    if name == "social_i_qa" and "answerA" in obj:
        question = f"{require(obj, 'context', where)} {require(obj, 'question', where)}"
        choices = [require(obj, k, where) for k in ("answerA", "answerB", "answerC")]
        lab = label if label is not None else require(obj, "label", where, (int, str))
        return make_record(name, split, index, question, choices,
                           _letter_or_number_index(lab, ["A", "B", "C"], where, one_based=True),
                           where=where)
    if name == "hellaswag" and "endings" in obj:
        ctx = obj.get("ctx")
        if ctx is None:
            ctx = f"{require(obj, 'ctx_a', where)} {require(obj, 'ctx_b', where)}".strip()
        if obj.get("activity_label") and not ctx.startswith(f"{obj['activity_label']}: "):
            ctx = f"{obj['activity_label']}: {ctx}"
        lab = label if label is not None else require(obj, "label", where, (int, str))
        return make_record(name, split, index, ctx, require(obj, "endings", where, list),
                           _letter_or_number_index(lab, None, where, one_based=False), where=where)
    # ARC / OBQA (HF) and the generic question/choices/label layout.
    question = obj.get("question_stem", obj.get("question"))
    if isinstance(question, dict):  # original ARC/OBQA JSONL: {"question": {"stem", "choices"}}
        obj = {**obj, "choices": question.get("choices"), "question": question.get("stem")}
        question = question.get("stem")
    if not isinstance(question, str):
        raise DataError(f"{where}: missing field 'question'")
    raw = obj.get("choices")
    labels: list[str] | None = None
    if isinstance(raw, dict):  # HF: {"text": [...], "label": ["A", ...]}
        choices, labels = raw.get("text"), [str(x) for x in raw.get("label", [])]
    elif isinstance(raw, list) and raw and isinstance(raw[0], dict):  # original: [{"text","label"}]
        choices, labels = [c.get("text") for c in raw], [str(c.get("label")) for c in raw]
    else:
        choices = raw
    if not isinstance(choices, list):
        raise DataError(f"{where}: missing field 'choices'")
    if label is None:
        for key in ("answerKey", "label", "gold"):
            if key in obj:
                label = obj[key]
                break
        else:
            raise DataError(f"{where}: missing field 'label' (or 'answerKey'/'gold')")
    idx = _letter_or_number_index(label, labels, where, one_based=False)
    return make_record(name, split, index, question, choices, idx, where=where)


def read_original(path: str | Path, dataset: str, split: str) -> Iterator[dict]:
    """Uniform records from an original / HuggingFace-layout JSON or JSONL file."""
    for index, (where, obj) in enumerate(iter_records(path)):
        yield record_from_original(dataset, split, index, obj, where)


def read_piqa_original(path: str | Path, labels_path: str | Path, split: str = "validation"
                       ) -> Iterator[dict]:
    """PIQA as released: ``{goal, sol1, sol2}`` JSONL plus a line-aligned ``*-labels.lst``."""
    with open_text(labels_path) as f:
        labels = [line.strip() for line in f if line.strip()]
    count = 0
    for index, (where, obj) in enumerate(iter_records(path)):
        if index >= len(labels):
            raise DataError(f"{where}: no label for this record in {labels_path}")
        yield record_from_original("piqa", split, index, obj, where, label=labels[index])
        count += 1
    if count != len(labels):
        raise DataError(f"{labels_path}:{count + 1}: {len(labels)} labels for {count} records")


def _detect_format(obj: dict) -> str:
    if "instruction" in obj and "answer" in obj:
        return "llm_adapters"
    if "context_options" in obj or ("query" in obj and "gold" in obj):
        return "mosaic"
    return "original"


def read_commonsense(path: str | Path, dataset: str, split: str, src_format: str = "auto",
                     labels: str | Path | None = None) -> Iterator[dict]:
    """Uniform records from any supported layout (``src_format`` auto-detected from record 1)."""
    if labels is not None:
        yield from read_piqa_original(path, labels, split)
        return
    if src_format == "auto":
        first = next(iter_records(path), None)
        if first is None:
            return
        src_format = _detect_format(first[1])
    readers = {"llm_adapters": read_llm_adapters, "mosaic": read_mosaic, "original": read_original}
    if src_format not in readers:
        raise ValueError(f"unknown source format {src_format!r}: {', '.join(readers)}")
    yield from readers[src_format](path, dataset, split)


# ------------------------------------------------------------------------------------------
# Written records
# ------------------------------------------------------------------------------------------


def to_sft(rec: dict) -> dict:
    """MiniMind SFT conversation: the LLM-Adapters prompt and "the correct answer is <label>"."""
    return {"conversations": [
        {"role": "user", "content": rec["instruction"]},
        {"role": "assistant", "content": ASSISTANT_TEMPLATE.format(label=rec["gold"])},
    ]}


def to_alpaca(rec: dict) -> dict:
    """Alpaca / LLM-Adapters row (what LLaMA-Factory's alpaca formatting reads)."""
    return {"instruction": rec["instruction"], "input": "",
            "output": ASSISTANT_TEMPLATE.format(label=rec["gold"])}


# kind -> (record writer, LLaMA-Factory formatting); eval records are the uniform ones as they are.
_KINDS = {"sft": (to_sft, "sharegpt"), "alpaca": (to_alpaca, "alpaca"), "eval": (None, None)}
KINDS = tuple(_KINDS)


def infer_dataset(path: Path) -> str:
    """Dataset name from the folder (``ARC-Easy/test.json``) or file stem (``arc_easy.jsonl``)."""
    stem = path.name.split(".")[0]
    for candidate in (path.parent.name, stem, stem.split("_")[0]):
        try:
            return get_task(candidate).name
        except KeyError:
            continue
    raise ValueError(f"{path}: cannot infer the dataset from the path; pass --dataset "
                     f"({', '.join(TASKS)})")


def infer_split(path: Path) -> str:
    """Split from the file stem (``test_reconstructed.json.gz`` -> test); "test" otherwise,
    because the mosaic files are evaluation splits."""
    head = path.name.split(".")[0].split("_")[0].split("-")[0].lower()
    return head if head in ("train", "test", "valid", "validation", "dev") else "test"


def convert_file(src: str | Path, out: str | Path, kind: str, dataset: str | None = None,
                 split: str | None = None, src_format: str = "auto",
                 labels: str | Path | None = None, dataset_info: str | Path | None = None,
                 name: str | None = None) -> int:
    """Convert one file; returns the number of records written (see module docstring)."""
    src, out = Path(src), Path(out)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}")
    dataset = get_task(dataset).name if dataset else infer_dataset(src)
    split = split or infer_split(src)
    records: Iterable[dict] = read_commonsense(src, dataset, split, src_format, labels)
    fn, formatting = _KINDS[kind]
    if fn is not None:
        records = map(fn, records)
    n = write_jsonl(out, records)
    if dataset_info is not None:
        if formatting is None:
            raise ValueError("--dataset-info needs --kind sft or alpaca (eval records are not training data)")
        register_file(dataset_info, out, name or f"{dataset}_{split}_{kind}", formatting)
    return n


def convert_tree(src_dir: str | Path, out_dir: str | Path, kinds: tuple[str, ...] = ("sft", "eval")
                 ) -> dict[str, int]:
    """Convert every ``<dataset>/<split>.json[.gz]`` under an LLM-Adapters tree into ``out_dir``
    (``<dataset>_<split>_<kind>.jsonl``) and write one ``dataset_info.json`` for the training kinds.
    Returns ``{output file name: record count}``."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    counts: dict[str, int] = {}
    entries: dict[str, dict] = {}
    files = sorted(itertools.chain(src_dir.glob("*/*.json"), src_dir.glob("*/*.json.gz")))
    if not files:
        raise FileNotFoundError(f"{src_dir}: no <dataset>/<split>.json files found")
    for path in files:
        dataset, split = infer_dataset(path), infer_split(path)
        records = list(read_commonsense(path, dataset, split))
        for kind in kinds:
            fn, formatting = _KINDS[kind]
            fname = f"{dataset}_{split}_{kind}.jsonl"
            counts[fname] = write_jsonl(out_dir / fname, map(fn, records) if fn else records)
            if formatting is not None:
                entries[fname[: -len(".jsonl")]] = dataset_info_entry(fname, formatting)
    if entries:
        update_dataset_info(out_dir / "dataset_info.json", entries)
    return counts


# ------------------------------------------------------------------------------------------
# Loading for evaluation
# ------------------------------------------------------------------------------------------

def _commonsense_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # An LLM-Adapters tree (<set>/test.json, hellaswag/test_reconstructed.json.gz) or a folder of
    # mosaic / converted .jsonl files; training splits are never evaluated.
    files = [p for p in sorted(path.glob("*/*.json*")) + sorted(path.glob("*.jsonl*"))
             if infer_split(p) == "test"]
    if not files:
        raise FileNotFoundError(f"{path}: no commonsense test files (<set>/test.json or *.jsonl)")
    return files


def load(path: str | Path, limit: int | None = None, dataset: str | None = None) -> list[dict]:
    """Uniform multiple-choice records to score, from a file or a folder.

    A file of already converted eval records is read as is; any other layout goes through
    ``read_commonsense`` with the set inferred from the path.
    ``limit`` applies per set, so a folder run with ``limit=50`` scores 50 items of each.
    """
    out: list[dict] = []
    for f in _commonsense_files(Path(path)):
        first = next(iter(iter_records(f)), None)
        if first is not None and {"choices", "label", "dataset"} <= first.data.keys():
            recs: Iterable[dict] = (r.data for r in iter_records(f))
        else:
            name = dataset or infer_dataset(f)
            recs = read_commonsense(f, name, infer_split(f))
        out += take(recs, limit)
    return out


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


def question(item: Mapping[str, Any]) -> str:
    """The user turn of a record: its LLM-Adapters instruction (what the SFT records train on)."""
    return item["instruction"]


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


def score(item: Mapping[str, Any], text: str) -> dict:
    """One report row: ``score_generation`` of the answer text against the record."""
    return score_generation(text, item)


def summarize(results: Sequence[dict]) -> dict:
    """No summary fields beyond the report's own (the per-set accuracies are its categories)."""
    return {}


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


# ------------------------------------------------------------------------------------------
# RL: prompt and gold of a data record, and the reward's verdict
# ------------------------------------------------------------------------------------------

# What "an answer was given" looks like (the phrase the training data teaches).
ANSWER_MARKER = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def is_record(obj: Mapping[str, Any]) -> bool:
    """A uniform eval record (``instruction``, ``label``, ``dataset``, ``choices``)."""
    return {"instruction", "label", "dataset", "choices"} <= obj.keys()


def rl_prompt(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"messages", "task", "gold", "dataset", "num_choices"}``: the instruction as the user
    turn; the set and its choice count go along, since the label vocabulary depends on them."""
    return {"messages": [{"role": "user", "content": obj["instruction"]}], "task": NAME,
            "gold": obj.get("gold", obj["label"]), "dataset": obj["dataset"],
            "num_choices": len(obj["choices"])}


def gold_of_reply(text: str) -> str | None:
    """Always None: an SFT reply ("the correct answer is answer3") does not say which set it
    belongs to, and its label cannot be scored without one; train on eval records instead."""
    return None


def correct(text: str, sample: Mapping[str, Any]) -> bool:
    """Whether an answer text is right for an RL sample (``rl_prompt``'s record)."""
    return commonsense_correct(text, sample["gold"], sample["dataset"], sample.get("num_choices"))


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.commonsense convert --src FILE|DIR --out FILE|DIR [--kind ...]``."""
    parser, p = convert_parser(
        NAME, "Convert ARC-C/ARC-E/BoolQ/HellaSwag/OBQA/PIQA/SIQA/WinoGrande into MiniMind SFT "
              "conversations, alpaca rows, or uniform multiple-choice eval records. With a "
              "directory as --src (an LLM-Adapters tree), converts every <dataset>/<split>.json "
              "into --out/<dataset>_<split>_{sft,eval}.jsonl plus dataset_info.json.",
        "input file (.json/.jsonl, optionally .gz) or an LLM-Adapters directory",
        out_help="output .jsonl file (or directory when --src is one)",
        eval_help="uniform multiple-choice records")
    p.add_argument("--dataset", help=f"one of {', '.join(TASKS)} (default: inferred from the path)")
    p.add_argument("--split", help="split name used in record ids (default: from the file name)")
    p.add_argument("--src-format", choices=["auto", "llm_adapters", "mosaic", "original"],
                   default="auto", help="input layout (default: detected from the first record)")
    p.add_argument("--labels", help="PIQA only: the line-aligned *-labels.lst file")
    p.add_argument("--name", help="registry name in dataset_info.json "
                                  "(default: <dataset>_<split>_<kind>)")
    args = parser.parse_args(argv)
    src = Path(args.src)
    if src.is_dir():
        counts = convert_tree(src, args.out)
        for fname, n in counts.items():
            print(f"{n:7d}  {Path(args.out) / fname}")
        return
    n = convert_file(src, args.out, args.kind, args.dataset, args.split, args.src_format,
                     args.labels, args.dataset_info, args.name)
    print(f"wrote {n} records to {args.out}")


if __name__ == "__main__":
    from common.errors import run_cli
    run_cli(main)
