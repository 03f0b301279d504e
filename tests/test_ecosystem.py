"""The ecosystem checks' shared parts: lm-eval's per-choice comparison (evaluation.lm_eval_parity)
can fail where it must, its reference log-probs equal the model's own cross-entropy, and a missing
tool is a skip (exit 77) that says what was not checked (evaluation.ecosystem)."""
import pytest
import torch

from evaluation import ecosystem
from evaluation.lm_eval_parity import TOLERANCE, compare, context_of, make_questions, reference_logprobs
from model.config import MiniMindConfig
from model.model import IGNORE_INDEX, MiniMindLM
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0)).eval()
    with torch.no_grad():      # peaked logits: choices differ, as on a trained model
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    tok = Tokenizer.from_dir()
    docs = make_questions(3)
    return model, tok, docs, reference_logprobs(model, tok, docs)


def lm_eval_samples(docs, ref, delimiter="", nudge=0.0):
    """What simple_evaluate(log_samples=True) logs per question, here from the reference itself."""
    return [{"arguments": [(context_of(d), delimiter + c) for c in d["choices"]],
             "filtered_resps": [(r["logprob"] + nudge * (i == 0), False) for i, r in enumerate(rows)]}
            for d, rows in zip(docs, ref)]


def test_reference_logprobs_equal_the_models_own_cross_entropy(scored):
    model, tok, docs, ref = scored
    for doc, rows in zip(docs, ref):
        ctx = tok.encode(context_of(doc))
        for choice, row in zip(doc["choices"], rows):
            ids = tok.encode(context_of(doc) + choice)
            labels = torch.tensor([[IGNORE_INDEX] * len(ctx) + ids[len(ctx):]])
            with torch.no_grad():
                ce = model(input_ids=torch.tensor([ids]), labels=labels).ce_loss   # mean over the choice
            assert row["logprob"] == pytest.approx(-float(ce) * (len(ids) - len(ctx)), abs=1e-4)
            assert row["clean_split"]


def test_compare_passes_the_same_text_and_fails_a_doubled_space_or_a_shifted_logprob(scored):
    _, _, docs, ref = scored
    same = compare(docs, lm_eval_samples(docs, ref), ref, "")
    assert same["text_diffs"] == 0 and same["max_diff"] == 0.0
    assert all(r["lm_eval"] == r["ours"] for r in same["rows"])
    doubled = compare(docs, lm_eval_samples(docs, ref, delimiter=" "), ref, " ")
    assert doubled["text_diffs"] == 4 * len(docs)
    nudged = compare(docs, lm_eval_samples(docs, ref, nudge=2 * TOLERANCE), ref, "")
    assert nudged["max_diff"] == pytest.approx(2 * TOLERANCE, rel=1e-3)
    # what the check would see on this model: far above its bar
    assert min(same["min_off_by_one"], same["min_doubled_space"]) > 100 * TOLERANCE


def test_a_missing_tool_is_a_skip_that_says_what_was_not_checked(capsys):
    with pytest.raises(SystemExit) as exit_:
        ecosystem.skip("llama-cpp-python", "pip install llama-cpp-python", "GGUF in llama.cpp")
    assert exit_.value.code == ecosystem.EXIT_SKIPPED == 77
    err = capsys.readouterr().err
    assert err.startswith("SKIPPED: llama-cpp-python is not installed; not checked: GGUF in llama.cpp")


def test_the_model_given_wins(tmp_path):
    assert ecosystem.trained_model(str(tmp_path)) == (tmp_path, "given with --model")
