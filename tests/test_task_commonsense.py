"""Commonsense scoring: label vocabulary, generation extraction, log-likelihood selection."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from tasks.commonsense import (TASKS, commonsense_correct, extract_choice, get_task, label_index,
                               label_name, loglik_requests, pick_choice, score_generation,
                               score_loglik)
from tests.conftest import shared_path

# (generation, dataset, gold label, expected correct)
CASES = [
    ("the correct answer is answer3", "ARC-Easy", "answer3", True),
    ("The correct answer is Answer 3.", "ARC-Challenge", "answer3", True),
    ("THE CORRECT ANSWER IS ANSWER_2!", "openbookqa", "answer2", True),
    ("the correct answer is true", "boolq", "true", True),
    ("The correct answer is False.", "boolq", "false", True),
    ("The correct answer is yes", "boolq", "true", True),
    ("the correct answer is solution2", "piqa", "solution2", True),
    ("the correct answer is option1", "winogrande", "option1", True),
    ("the correct answer is ending4", "hellaswag", "ending4", True),
    ("the correct answer is answer1", "social_i_qa", "answer1", True),
    ("the correct answer is 2", "piqa", "solution2", True),
    ("The correct answer is (B).", "ARC-Easy", "answer2", True),
    ("Looking at answer1 and answer2... the correct answer is answer2", "ARC-Easy", "answer2", True),
    ("answer4", "openbookqa", "answer4", True),
    ("the correct answer is answer5", "ARC-Challenge", "answer5", True),
    # must be judged WRONG (or unanswerable)
    ("the correct answer is answer2", "ARC-Easy", "answer3", False),
    ("the correct answer is false", "boolq", "true", False),
    ("There is no doubt.", "boolq", "false", False),      # "no" outside the answer phrase
    ("the correct answer is option3", "winogrande", "option1", False),  # out of range
    ("the correct answer is ending5", "hellaswag", "ending1", False),
    ("I am not sure.", "piqa", "solution1", False),
    ("", "social_i_qa", "answer1", False),
    ("the correct answer is answer12", "ARC-Easy", "answer1", False),
]


@pytest.mark.parametrize("text,dataset,gold,expected", CASES)
def test_generation_table(text: str, dataset: str, gold: str, expected: bool) -> None:
    assert commonsense_correct(text, gold, dataset) is expected


def test_extract_edge_cases() -> None:
    assert extract_choice("the correct answer is option3", "winogrande") is None
    assert extract_choice("the correct answer is answer4", "ARC-Easy", num_choices=3) is None
    assert extract_choice("the correct answer is answer4", "ARC-Easy") == "answer4"
    assert extract_choice(None, "piqa") is None
    assert commonsense_correct("the correct answer is answer2", 1, "siqa")  # index gold + alias


def test_labels_round_trip() -> None:
    for name, spec in TASKS.items():
        n = spec.num_choices or 5
        for i in range(n):
            assert label_index(name, label_name(name, i)) == i
    assert label_name("boolq", 0) == "true"
    assert get_task("obqa").name == "openbookqa"
    with pytest.raises(ValueError):
        label_index("piqa", "answer1")
    with pytest.raises(ValueError):
        label_name("piqa", 2)
    with pytest.raises(KeyError):
        get_task("mmlu")


def test_score_generation_record() -> None:
    rec = {"id": "x/0", "dataset": "ARC-Easy", "choices": ["a", "b", "c"], "label": 2, "gold": "answer3"}
    r = score_generation("the correct answer is answer3", rec)
    assert r["correct"] and r["error_kind"] is None and r["category"] == "ARC-Easy"
    assert score_generation("hmm", rec)["error_kind"] == "no_answer"
    assert score_generation("the correct answer is answer1", rec)["error_kind"] == "wrong_answer"


def test_pick_choice() -> None:
    assert pick_choice([-3.0, -1.0, -1.0]) == 1  # tie -> first
    assert pick_choice([math.nan, -5.0]) == 1
    assert pick_choice([]) == 0


def test_score_loglik_normalisations() -> None:
    # Choice 0 is short and likely in total; choice 1 is long but likelier per token/char.
    rec = {"id": "t/0", "dataset": "hellaswag", "prompt": "ctx", "label": 1,
           "choices": ["ab", "abcdefghij"]}
    table = {" ab": (-2.0, 1), " abcdefghij": (-3.0, 5)}
    calls = []

    def logprob_fn(ctx: str, cont: str) -> tuple[float, int]:
        calls.append((ctx, cont))
        return table[cont]

    (r,) = score_loglik([rec], logprob_fn, method="sum")
    assert calls == [("ctx", " ab"), ("ctx", " abcdefghij")]
    assert r["extracted"] == 0 and not r["correct"]
    assert r["correct_token"] and r["correct_char"] and not r["correct_sum"]
    (r2,) = score_loglik([rec], logprob_fn, method="token")
    assert r2["correct"] and r2["prediction"] == "abcdefghij"
    with pytest.raises(ValueError):
        score_loglik([rec], logprob_fn, method="bytes")


def test_winogrande_partial_scoring_requests() -> None:
    rec = {"dataset": "winogrande", "prompt": "unused", "choices": ["Sarah", "Maria"], "label": 1,
           "contexts": ["... so Sarah", "... so Maria"], "continuation": " always got the easier cases."}
    assert loglik_requests(rec) == [("... so Sarah", " always got the easier cases."),
                                    ("... so Maria", " always got the easier cases.")]
    (r,) = score_loglik([rec], lambda c, k: (-1.0 if c.endswith("Maria") else -2.0, 5))
    assert r["correct"]


# The eight LLM-Adapters test files and their published sizes.
LLM_ADAPTERS_TEST = {
    "ARC-Challenge": ("ARC-Challenge/test.json", 1172), "ARC-Easy": ("ARC-Easy/test.json", 2376),
    "boolq": ("boolq/test.json", 3270), "hellaswag": ("hellaswag/test_reconstructed.json.gz", 10042),
    "openbookqa": ("openbookqa/test.json", 500), "piqa": ("piqa/test.json", 1838),
    "social_i_qa": ("social_i_qa/test.json", 1954), "winogrande": ("winogrande/test.json", 1267),
}


def _raw_items(path: Path) -> list[dict]:
    """The file read with nothing of ours: json (+ gzip for HellaSwag)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(LLM_ADAPTERS_TEST))
def test_real_oracle_generations_score_100(name: str) -> None:
    """The file's own target text ("output") of every LLM-Adapters test item scores as correct
    against our parsed record, whose gold must be the file's "answer"; every other label of the
    item scores as wrong."""
    from tasks.commonsense import read_llm_adapters

    rel, count = LLM_ADAPTERS_TEST[name]
    path = shared_path("commonsense_llm_adapters", *rel.split("/"))
    raw = _raw_items(path)
    records = list(read_llm_adapters(path, name, "test"))
    assert len(raw) == len(records) == count
    for item, rec in zip(raw, records):
        assert rec["dataset"] == name and rec["gold"] == item["answer"], rec["id"]
        assert score_generation(item["output"], rec)["correct"], rec["id"]
        assert commonsense_correct(item["output"], rec["label"], name, len(rec["choices"]))
        for i in range(len(rec["choices"])):
            if i != rec["label"]:
                wrong = f"the correct answer is {label_name(name, i)}"
                assert not score_generation(wrong, rec)["correct"], (rec["id"], wrong)
