"""Benchmark data formats: commonsense (3 source layouts), GSM8K and MATH, on the real shared files
and on hand-made bad input (errors must name file and line); their CLIs
(``python -m tasks.<name> convert``); and the layering (tasks/ over dataset/ only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dataset.convert._io import DataError, iter_records, update_dataset_info
from tasks import commonsense as cs
from tasks import gsm8k as g8
from tasks import math as mth
from tasks.commonsense import TASKS, extract_choice, score_generation
from tasks.gsm8k import gsm8k_correct
from tasks.math_answer import extract_boxed, math_equiv
from tests.conftest import REPO, shared_path


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ commonsense, LLM-Adapters

LLM_ADAPTERS_COUNTS = {
    "ARC-Challenge/test.json": 1172, "ARC-Challenge/train.json": 1119,
    "ARC-Easy/test.json": 2376, "ARC-Easy/train.json": 2251,
    "boolq/test.json": 3270, "boolq/train.json": 9427,
    "openbookqa/test.json": 500, "openbookqa/train.json": 4957,
    "piqa/test.json": 1838, "social_i_qa/test.json": 1954, "winogrande/test.json": 1267,
    "hellaswag/test_reconstructed.json.gz": 10042,
}


@pytest.mark.parametrize("rel,count", sorted(LLM_ADAPTERS_COUNTS.items()))
def test_llm_adapters_files(rel: str, count: int) -> None:
    path = shared_path("commonsense_llm_adapters", rel)
    dataset, split = cs.infer_dataset(path), cs.infer_split(path)
    assert split in ("train", "test")
    n = 0
    for rec in cs.read_commonsense(path, dataset, split):
        n += 1
        assert 0 <= rec["label"] < len(rec["choices"])
        spec = TASKS[dataset]
        if spec.num_choices:
            assert len(rec["choices"]) == spec.num_choices
        # the parsed question/choices rebuild the exact LLM-Adapters prompt
        assert cs.format_instruction(dataset, rec["question"], rec["choices"]) == rec["instruction"]
        sft = cs.to_sft(rec)
        assert [m["role"] for m in sft["conversations"]] == ["user", "assistant"]
        assert extract_choice(sft["conversations"][1]["content"], dataset) == rec["gold"]
    assert n == count


# ------------------------------------------------------------------ commonsense, other layouts

MOSAIC = {  # file: (dataset, count)
    "arc_challenge.jsonl": ("ARC-Challenge", 1172), "arc_easy.jsonl": ("ARC-Easy", 2376),
    "boolq.jsonl": ("boolq", 3270), "openbook_qa.jsonl": ("openbookqa", 500),
    "piqa.jsonl": ("piqa", 1838), "winogrande.jsonl": ("winogrande", 1267),
}


# Items whose mosaic label differs from LLM-Adapters' although both list the same choices. Spot
# checks say mosaic is wrong (e.g. "A structure that carries a single unit of hereditary
# information is a" -> mosaic: "tissue", LLM-Adapters: "gene"); the count pins the finding.
MOSAIC_LABEL_DISAGREEMENTS = {"ARC-Easy": 71, "ARC-Challenge": 19}


@pytest.mark.parametrize("fname", sorted(MOSAIC))
def test_mosaic_files_agree_with_llm_adapters(fname: str) -> None:
    """Same eval splits, same order: labels agree wherever both list the same choices, except
    the known mosaic ARC label errors (mosaic's ARC also keeps some duplicated options that
    LLM-Adapters dropped, those items are not compared)."""
    path = shared_path("commonsense_mosaic_icl", fname)
    dataset, count = MOSAIC[fname]
    assert cs.infer_dataset(path) == dataset
    recs = list(cs.read_commonsense(path, dataset, "test"))
    assert len(recs) == count
    ref_path = shared_path("commonsense_llm_adapters", dataset, "test.json")
    ref = list(cs.read_llm_adapters(ref_path, dataset, "test"))
    same = [(a, b) for a, b in zip(recs, ref)
            if [c.strip() for c in a["choices"]] == [c.strip() for c in b["choices"]]]
    assert len(same) >= 0.95 * count
    disagree = sum(a["label"] != b["label"] for a, b in same)
    assert disagree == MOSAIC_LABEL_DISAGREEMENTS.get(dataset, 0)
    assert all(0 <= r["label"] < len(r["choices"]) for r in recs)


def test_piqa_original_with_labels_file() -> None:
    src = shared_path("commonsense_original", "piqa", "valid.jsonl")
    labels = src.with_name("valid-labels.lst")
    recs = list(cs.read_piqa_original(src, labels))
    assert len(recs) == 1838
    ref = list(cs.read_llm_adapters(shared_path("commonsense_llm_adapters/piqa/test.json"), "piqa", "test"))
    assert [r["label"] for r in recs] == [r["label"] for r in ref]
    assert [r["instruction"] for r in recs] == [r["instruction"] for r in ref]


def test_hellaswag_original_matches_reconstruction() -> None:
    src = shared_path("commonsense_original", "hellaswag", "hellaswag_val_klosax.jsonl.gz")
    recs = list(cs.read_commonsense(src, cs.infer_dataset(src), "validation"))
    assert len(recs) == 10042
    ref = cs.read_llm_adapters(shared_path("commonsense_llm_adapters/hellaswag/test_reconstructed.json.gz"),
                               "hellaswag", "test")
    for a, b in zip(recs, ref):
        assert a["label"] == b["label"] and a["instruction"] == b["instruction"]


def test_hf_layouts(tmp_path: Path) -> None:
    """Original / HuggingFace field layouts of each set, written by hand."""
    rows = {
        "ARC-Easy": {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]},
                     "answerKey": "C"},
        "openbookqa": {"question_stem": "Q", "choices": {"text": list("abcd"), "label": list("ABCD")},
                       "answerKey": "B"},
        "social_i_qa": {"context": "Ctx.", "question": "Why?", "answerA": "x", "answerB": "y",
                        "answerC": "z", "label": "3"},
        "winogrande": {"sentence": "A beat B so _ won.", "option1": "A", "option2": "B", "answer": "1"},
        "boolq": {"question": "is it true", "passage": "P.", "answer": False},
        "piqa": {"goal": "g", "sol1": "s1", "sol2": "s2", "label": 1},
        "hellaswag": {"activity_label": "Cooking", "ctx_a": "A man", "ctx_b": "cooks",
                      "endings": list("abcd"), "label": "2"},
    }
    expected_label = {"ARC-Easy": 2, "openbookqa": 1, "social_i_qa": 2, "winogrande": 0, "boolq": 1,
                      "piqa": 1, "hellaswag": 2}
    for dataset, row in rows.items():
        path = tmp_path / f"{dataset}.jsonl"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
        (rec,) = cs.read_commonsense(path, dataset, "dev")
        assert rec["label"] == expected_label[dataset], dataset
        assert rec["id"] == f"{dataset}/dev/0"
        assert score_generation(f"the correct answer is {rec['gold']}", rec)["correct"]
    (sq,) = cs.read_commonsense(tmp_path / "social_i_qa.jsonl", "social_i_qa", "dev")
    assert sq["question"] == "Ctx. Why?"
    (wg,) = cs.read_commonsense(tmp_path / "winogrande.jsonl", "winogrande", "dev")
    assert wg["contexts"] == ["A beat B so A", "A beat B so B"] and wg["continuation"] == " won."
    (hs,) = cs.read_commonsense(tmp_path / "hellaswag.jsonl", "hellaswag", "dev")
    assert hs["question"] == "Cooking: A man cooks"


def test_bad_input_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "ARC-Easy" / "test.json"
    bad.parent.mkdir()
    good = {"instruction": cs.format_instruction("ARC-Easy", "Q", ["a", "b", "c"]), "input": "",
            "output": "the correct answer is answer2", "answer": "answer2"}
    broken = {k: v for k, v in good.items() if k != "instruction"}
    bad.write_text(json.dumps([good, broken], indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.json:\d+: missing field 'instruction'") as exc:
        list(cs.read_commonsense(bad, "ARC-Easy", "test"))
    line = int(str(exc.value).split(":")[-2])
    assert bad.read_text().splitlines()[line - 1].strip() == "{"  # the second record starts there

    wrong = dict(good, answer="answer3")  # output and answer disagree
    bad.write_text(json.dumps([wrong]), encoding="utf-8")
    with pytest.raises(DataError, match="disagrees"):
        list(cs.read_commonsense(bad, "ARC-Easy", "test"))

    out_of_range = dict(good, answer="answer4", output="the correct answer is answer4")
    bad.write_text(json.dumps([out_of_range]), encoding="utf-8")
    with pytest.raises(DataError, match="out of range"):
        list(cs.read_commonsense(bad, "ARC-Easy", "test"))

    jl = tmp_path / "x.jsonl"
    jl.write_text('{"question": "q", "choices": ["a"], "label": 0}\n\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:3: invalid JSON"):
        list(iter_records(jl))

    labels = tmp_path / "l.lst"
    labels.write_text("0\n", encoding="utf-8")
    jl.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2, encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:2: no label"):
        list(cs.read_piqa_original(jl, labels))


def test_commonsense_cli_tree_and_registry(tmp_path: Path) -> None:
    src = shared_path("commonsense_llm_adapters")
    out = tmp_path / "cs"
    cs.main(["convert", "--src", str(src), "--out", str(out)])
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {f"{Path(r).parent}_{cs.infer_split(Path(r))}_sft" for r in LLM_ADAPTERS_COUNTS}
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "conversations"}
        assert (out / entry["file_name"]).exists()
    assert len(_jsonl(out / "piqa_test_eval.jsonl")) == 1838
    # single file, alpaca kind, merged into an existing registry
    update_dataset_info(tmp_path / "dataset_info.json", {"keep_me": {"file_name": "k.json"}})
    cs.main(["convert", "--src", str(src / "boolq" / "test.json"), "--out", str(tmp_path / "b.jsonl"),
             "--kind", "alpaca", "--dataset-info", str(tmp_path / "dataset_info.json")])
    reg = json.loads((tmp_path / "dataset_info.json").read_text())
    assert reg["boolq_test_alpaca"] == {"file_name": "b.jsonl", "columns": {
        "prompt": "instruction", "query": "input", "response": "output"}}
    assert "keep_me" in reg
    rows = _jsonl(tmp_path / "b.jsonl")
    assert len(rows) == 3270 and set(rows[0]) == {"instruction", "input", "output"}


# ------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize("fname,count", [("train.jsonl", 7473), ("test.jsonl", 1319),
                                         ("test_socratic.jsonl", 1319)])
def test_gsm8k_real(fname: str, count: int) -> None:
    path = shared_path("gsm8k", fname)
    n = 0
    for item in g8.read_gsm8k(path):
        n += 1
        sft = g8.to_sft(item)
        user, asst = sft["conversations"]
        assert user == {"role": "user", "content": item["question"]}
        assert "<<" not in asst["reasoning_content"] and "####" not in asst["reasoning_content"]
        assert gsm8k_correct(asst["content"], item["answer"])  # the answer line scores itself
        inline = g8.to_sft(item, inline=True)["conversations"][1]
        assert "reasoning_content" not in inline and gsm8k_correct(inline["content"], item["answer"])
    assert n == count


def test_gsm8k_cli_and_errors(tmp_path: Path) -> None:
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps({"question": "Q", "answer": "2 * 9 = $<<2*9=18>>18\n#### 1,018"}) + "\n",
                   encoding="utf-8")
    g8.main(["convert", "--src", str(src), "--out", str(tmp_path / "sft.jsonl")])
    (row,) = _jsonl(tmp_path / "sft.jsonl")
    assert row["conversations"][1] == {"role": "assistant", "reasoning_content": "2 * 9 = $18",
                                       "content": "The answer is 1018."}
    g8.main(["convert", "--src", str(src), "--out", str(tmp_path / "eval.jsonl"), "--kind", "eval"])
    assert _jsonl(tmp_path / "eval.jsonl")[0]["answer"] == "1018"
    g8.main(["convert", "--src", str(src), "--out", str(tmp_path / "a.jsonl"), "--kind", "alpaca",
             "--dataset-info", str(tmp_path / "dataset_info.json")])
    assert "gsm8k_g_alpaca" in json.loads((tmp_path / "dataset_info.json").read_text())
    with pytest.raises(ValueError, match="--inline"):
        g8.convert_file(src, tmp_path / "s.jsonl", "sft", dataset_info=tmp_path / "dataset_info.json")
    assert not (tmp_path / "s.jsonl").exists()   # refused before anything is written
    src.write_text('{"question": "Q", "answer": "1"}\n{"question": "Q", "answer": "no marker"}\n')
    with pytest.raises(DataError, match=r"g\.jsonl:1: answer has no '#### <number>' line"):
        list(g8.read_gsm8k(src))
    src.write_text('{"answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"g\.jsonl:1: missing field 'question'"):
        list(g8.read_gsm8k(src))


# ------------------------------------------------------------------ MATH


@pytest.mark.parametrize("fname,count", [("train.jsonl", 7500), ("test.jsonl", 5000),
                                         ("math500_test.jsonl", 500)])
def test_math_real(fname: str, count: int) -> None:
    path = shared_path("math", fname)
    items = list(mth.read_math(path))
    assert len(items) == count
    for item in items:
        assert item["level"] is None or 1 <= item["level"] <= 5
        assert item["subject"]
        ev = mth.to_eval(item)
        assert set(ev) == {"id", "problem", "answer", "subject", "level", "solution"}
        if item["answer"]:
            content = mth.to_sft(item)["conversations"][1]["content"]
            assert math_equiv(extract_boxed(content), item["answer"])
    if fname == "train.jsonl":
        assert sum(it["level"] is None for it in items) == 2
        assert sum(not it["answer"] for it in items) == 2  # two problems box nothing


def test_math_cli_and_errors(tmp_path: Path) -> None:
    src = tmp_path / "m.jsonl"
    rows = [{"problem": "P", "solution": "so $\\boxed{\\frac{1}{2}}$.", "level": "Level 2",
             "type": "Algebra"},
            {"problem": "P2", "solution": "none", "answer": "", "level": 3, "subject": "Geometry"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert mth.convert_file(src, tmp_path / "sft.jsonl") == 1  # the empty answer is skipped
    asst = _jsonl(tmp_path / "sft.jsonl")[0]["conversations"][1]
    assert asst["content"] == "The answer is $\\boxed{\\frac{1}{2}}$."
    mth.main(["convert", "--src", str(src), "--out", str(tmp_path / "e.jsonl"), "--kind", "eval"])
    ev = _jsonl(tmp_path / "e.jsonl")
    assert [e["level"] for e in ev] == [2, 3] and ev[0]["answer"] == "\\frac{1}{2}"
    assert ev[0]["id"] == "math/m/0" and ev[1]["subject"] == "Geometry"
    src.write_text(json.dumps({"problem": "P", "solution": "no box", "type": "Algebra",
                               "level": "Level 1"}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:1: no 'answer' field"):
        list(mth.read_math(src))
    src.write_text(json.dumps({"problem": "P", "solution": "\\boxed{1}", "type": "A",
                               "level": "hard"}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl:1: cannot read level"):
        list(mth.read_math(src))


# ------------------------------------------------------------------ the project's own loader


def test_outputs_load_through_dataset_registry(tmp_path: Path) -> None:
    """What the converters write (and register) is readable by ``dataset.registry``: the
    commonsense sharegpt entries, a GSM8K alpaca entry, and a MiniMind file whose assistant turn
    keeps ``reasoning_content``."""
    from dataset.registry import load_named_records

    src = shared_path("commonsense_llm_adapters")
    for name in ("piqa", "winogrande"):
        cs.convert_file(src / name / "test.json", tmp_path / f"{name}.jsonl", "sft",
                        dataset_info=tmp_path / "dataset_info.json")
    kind, recs = load_named_records("piqa_test_sft,winogrande_test_sft", tmp_path, shuffle=False)
    assert kind == "sft" and len(recs) == 1838 + 1267
    assert recs[0].data["conversations"][1]["content"].startswith("the correct answer is solution")

    g = shared_path("gsm8k", "test.jsonl")
    g8.convert_file(g, tmp_path / "gsm8k_alpaca.jsonl", "alpaca",
                    dataset_info=tmp_path / "dataset_info.json", name="gsm8k_test")
    kind, recs = load_named_records("gsm8k_test", tmp_path, max_samples=3, shuffle=False)
    assert kind == "sft" and recs[0].data["conversations"][1]["content"].endswith("The answer is 18.")

    g8.convert_file(g, tmp_path / "gsm8k_sft.jsonl", "sft")
    kind, recs = load_named_records(str(tmp_path / "gsm8k_sft.jsonl"), tmp_path, max_samples=1,
                                    shuffle=False)
    asst = recs[0].data["conversations"][1]
    assert asst["content"] == "The answer is 18." and "Janet sells" in asst["reasoning_content"]


# ------------------------------------------------------------------ layering


def test_benchmark_modules_do_not_import_the_cli_entry_points() -> None:
    """The runner and the tasks load no converter of dataset/convert/ beyond the shared record
    I/O (the benchmark CLIs used to live there, on top of evaluation/: an import cycle)."""
    code = ("import sys, evaluation.runner, tasks.gsm8k, tasks.math, tasks.commonsense, "
            "evaluation.perplexity, evaluation.report\n"
            "print(sorted(m for m in sys.modules if m.startswith('dataset.convert.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "['dataset.convert._io']"


def test_tasks_import_neither_evaluation_nor_trainer() -> None:
    """tasks/ depends on dataset/ only; evaluation/ and trainer/ ask it (never the reverse)."""
    code = ("import sys, tasks, tasks.gsm8k, tasks.math, tasks.math_answer, tasks.commonsense\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('evaluation', 'trainer')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
