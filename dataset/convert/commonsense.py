"""Convert the eight commonsense-reasoning sets into SFT data and uniform multiple-choice records.

Scope: ARC-Challenge, ARC-Easy, BoolQ, HellaSwag, OpenBookQA, PIQA, Social IQa, WinoGrande, read
from any of three layouts, written as one of three kinds.

Inputs (``--src-format``, detected from the first record when ``auto``):
- ``llm_adapters``: LLM-Adapters' ``{"instruction", "input", "output", "answer"}`` lists (question
  and choices are parsed back out of the instruction text, so the eval record is complete);
- ``mosaic``: MosaicML ICL ``{"query", "choices", "gold"}`` / WinoGrande
  ``{"context_options", "continuation", "gold"}``;
- ``original``: the original / HuggingFace field layouts (ARC ``question``+``choices{text,label}``
  +``answerKey``; OBQA ``question_stem``; SIQA ``context``/``question``/``answerA..C``/``label``
  1-based; WinoGrande ``sentence``/``option1``/``option2``/``answer``; BoolQ ``question``/
  ``passage``/``answer`` bool; PIQA ``goal``/``sol1``/``sol2`` (+ a ``--labels`` .lst file);
  HellaSwag ``ctx``/``endings``/``label``; or generic ``question``/``choices``/``label``).

Outputs (``--kind``):
- ``sft``: MiniMind ``{"conversations": [user: LLM-Adapters instruction, assistant: "the correct
  answer is answer3"]}``: the exact target LLM-Adapters fine-tunes on, so scores are comparable;
- ``alpaca``: the same pair as ``{"instruction", "input", "output"}`` (LLaMA-Factory alpaca);
- ``eval``: the uniform record ``{"id", "dataset", "question", "choices", "label", "gold",
  "instruction", "prompt", ...}`` that ``evaluation/commonsense.py`` scores.
``--dataset-info`` merges a LLaMA-Factory registry entry for the written file.

Reference: LLM-Adapters (Hu et al., 2023), ``dataset/<name>/{train,test}.json``; the prompt
templates below were reconstructed from those files and are checked by a round-trip test on every
shipped record (``format_instruction(parse_instruction(x)) == x``).

Run ``python -m dataset.convert.commonsense --help``.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Iterable, Iterator

from dataset.convert._io import (
    DataError,
    dataset_info_entry,
    iter_records,
    open_text,
    register_file,
    require,
    update_dataset_info,
    write_jsonl,
)
from evaluation.commonsense import BOOLQ_LABELS, TASKS, extract_choice, get_task, label_index, label_name

__all__ = [
    "format_instruction",
    "parse_instruction",
    "make_record",
    "read_llm_adapters",
    "read_mosaic",
    "read_original",
    "read_piqa_original",
    "read_commonsense",
    "to_sft",
    "to_alpaca",
    "convert_file",
    "convert_tree",
    "infer_dataset",
    "infer_split",
    "record_from_original",
]

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
# Readers
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
# Writers
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


_KINDS = {"sft": (to_sft, "sharegpt"), "alpaca": (to_alpaca, "alpaca"), "eval": (None, None)}


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dataset.convert.commonsense",
        description="Convert ARC-C/ARC-E/BoolQ/HellaSwag/OBQA/PIQA/SIQA/WinoGrande into MiniMind SFT "
                    "conversations, alpaca rows, or uniform multiple-choice eval records. With a "
                    "directory as --src (an LLM-Adapters tree), converts every <dataset>/<split>.json "
                    "into --out/<dataset>_<split>_{sft,eval}.jsonl plus dataset_info.json.")
    p.add_argument("--src", required=True, help="input file (.json/.jsonl, optionally .gz) or an "
                   "LLM-Adapters directory")
    p.add_argument("--out", required=True, help="output .jsonl file (or directory when --src is one)")
    p.add_argument("--kind", choices=sorted(_KINDS), default="sft",
                   help="sft: MiniMind conversations; alpaca: instruction/input/output; "
                        "eval: uniform multiple-choice records (default: sft)")
    p.add_argument("--dataset", help=f"one of {', '.join(TASKS)} (default: inferred from the path)")
    p.add_argument("--split", help="split name used in record ids (default: from the file name)")
    p.add_argument("--src-format", choices=["auto", "llm_adapters", "mosaic", "original"],
                   default="auto", help="input layout (default: detected from the first record)")
    p.add_argument("--labels", help="PIQA only: the line-aligned *-labels.lst file")
    p.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json to create or update")
    p.add_argument("--name", help="registry name in dataset_info.json (default: <dataset>_<split>_<kind>)")
    args = p.parse_args(argv)
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
    from model.errors import run_cli
    run_cli(main)
