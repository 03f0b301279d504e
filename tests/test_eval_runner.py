"""Benchmark runners: scoring with injected generations, likelihoods against hand computations,
report consistency on a tiny random checkpoint, optional shared-data loaders and expert backends."""

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation.perplexity import _windows, continuation_logprobs, load_texts, perplexity
from evaluation.report import read_items
from evaluation.runner import (BenchmarkDataError, Completion, UnknownBenchmarkError, answer_text,
                               chat_prompt, generation_accuracy, model_generate_fn, resolve_data,
                               run_benchmarks, run_commonsense_loglik, run_task)
from model.config import MiniMindConfig
from model.generate import SamplingParams, generate
from model.io import save_pretrained
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from tasks import commonsense, gsm8k
from tasks import math as math_task
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MiniMindLM(MiniMindConfig.from_preset("tiny")).eval()


def question_of(prompt: str) -> str:
    """The last user turn of a rendered ChatML prompt (what the fake model 'reads')."""
    return prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def fake_generator(answers: dict, calls: list | None = None):
    """A GenerateFn answering from a table keyed by question; records the batch sizes it saw."""
    def fn(prompts):
        if calls is not None:
            calls.append(len(prompts))
        return [answers[question_of(p)] for p in prompts]
    return fn


GSM_ITEMS = [
    {"id": "a", "question": "Q1: 3 apples + 4 apples?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"id": "b", "question": "Q2: 10 - 4?", "answer": "6"},
    {"id": "c", "question": "Q3: 1,000 + 80?", "answer": "#### 1,080"},
    {"id": "d", "question": "Q4: 2 * 9?", "answer": "#### 18"},
    {"id": "e", "question": "Q5: 5 / 5?", "answer": "#### 1"},
]
GSM_REPLIES = {
    "Q1: 3 apples + 4 apples?": "3 + 4 = 7.\nThe answer is 7.",             # right
    "Q2: 10 - 4?": "The answer is 5.",                                      # wrong
    "Q3: 1,000 + 80?": "So she has $1,080 in total.",                       # right (last number)
    "Q4: 2 * 9?": "I do not know.",                                         # no answer
    "Q5: 5 / 5?": Completion("Let us think about 5 divided by", 8, "length"),  # truncated
}


# ------------------------------------------------------------------------------------------
# Scoring with an injected generation function
# ------------------------------------------------------------------------------------------

def test_gsm8k_runner_exact_accuracy_with_fake_generation(tok):
    calls: list[int] = []
    res = run_task("gsm8k", GSM_ITEMS, tok, fake_generator(GSM_REPLIES, calls), batch_size=2)
    assert [r["id"] for r in res] == ["a", "b", "c", "d", "e"]  # input order despite sorting
    assert [r["correct"] for r in res] == [True, False, True, False, False]
    assert [r["error_kind"] for r in res] == [None, "wrong_answer", None, "no_answer", "truncated"]
    assert [r["extracted"] for r in res] == ["7", "5", "1080", None, "5"]
    assert [r["gold"] for r in res] == ["7", "6", "1080", "18", "1"]
    assert calls == [2, 2, 1]
    assert res[4]["n_generated_tokens"] == 8 and res[4]["truncated"]
    assert res[0]["prompt"] == chat_prompt(tok, GSM_ITEMS[0]["question"])
    assert res[0]["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_answers_are_read_after_the_think_block(tok):
    items = [{"question": "How many?", "answer": "#### 18"}]
    reply = "Step: 6 * 2 = 12\n#### 12 then add 6.\n</think>\n\nThe answer is 18."
    res = run_task("gsm8k", items, tok, fake_generator({"How many?": reply}), enable_thinking=True)
    assert res[0]["correct"] and res[0]["extracted"] == "18"
    assert res[0]["prediction"] == reply  # the report keeps the whole completion
    assert res[0]["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    assert answer_text("no think block 5") == "no think block 5"


def test_fewshot_exemplars_precede_the_question(tok):
    shots = gsm8k.exemplars(GSM_ITEMS[:1])
    assert shots[1]["content"] == "3+4=7\nThe answer is 7."  # calculator marks stripped
    prompt = chat_prompt(tok, "Q?", system="Be brief.", exemplars=shots)
    assert prompt.index("Be brief.") < prompt.index("Q1: 3 apples") < prompt.index("Q?")
    assert question_of(prompt) == "Q?"


def test_math_runner_scores_per_subject(tok):
    items = [
        {"id": "m1", "problem": "P1", "answer": "\\frac{1}{2}", "subject": "Algebra", "level": 2},
        {"id": "m2", "problem": "P2", "answer": "3", "subject": "Geometry", "level": 5},
        {"id": "m3", "problem": "P3", "answer": "(1,2)", "subject": "Algebra", "level": 3},
    ]
    replies = {"P1": "so $\\boxed{0.5}$", "P2": "$\\boxed{4}$", "P3": "The answer is $(1, 2)$."}
    res = run_task("math", items, tok, fake_generator(replies))
    assert [r["correct"] for r in res] == [True, False, True]
    assert [r["category"] for r in res] == ["Algebra", "Geometry", "Algebra"]
    assert [r["level"] for r in res] == [2, 5, 3]


def test_commonsense_generation_runner(tok):
    recs = [
        {"id": "p0", "dataset": "piqa", "choices": ["x", "y"], "label": 1, "gold": "solution2",
         "instruction": "I0", "prompt": "Question: q\nAnswer:"},
        {"id": "b0", "dataset": "boolq", "choices": ["true", "false"], "label": 0, "gold": "true",
         "instruction": "I1", "prompt": "Question: q?\nAnswer:"},
        {"id": "p1", "dataset": "piqa", "choices": ["x", "y"], "label": 0, "gold": "solution1",
         "instruction": "I2", "prompt": "Question: q\nAnswer:"},
    ]
    replies = {"I0": "the correct answer is solution2", "I1": "the correct answer is false",
               "I2": "hmm"}
    res = run_task("commonsense", recs, tok, fake_generator(replies))
    assert [r["correct"] for r in res] == [True, False, False]
    assert [r["category"] for r in res] == ["piqa", "boolq", "piqa"]
    assert res[2]["error_kind"] == "no_answer"


def test_generation_accuracy_for_training_restores_mode(tok, tiny):
    out = generation_accuracy(tiny, tok, GSM_ITEMS, generate_fn=fake_generator(GSM_REPLIES))
    assert out["accuracy"] == pytest.approx(2 / 5)
    assert (out["correct"], out["n"], out["no_answer"], out["truncated"]) == (2, 5, 1, 1)
    tiny.train()
    try:
        real = generation_accuracy(tiny, tok, GSM_ITEMS[:2], max_new_tokens=3, batch_size=2)
        assert tiny.training  # the trainer gets its model back in train mode
        assert real["n"] == 2 and 0 <= real["accuracy"] <= 1 and real["mean_answer_tokens"] <= 3
    finally:
        tiny.eval()


def test_model_generate_fn_matches_direct_generation(tok, tiny):
    prompts = [chat_prompt(tok, q) for q in ("hello there", "a much longer question, is it?")]
    fn = model_generate_fn(tiny, tok, SamplingParams(max_new_tokens=6))
    batched = fn(prompts)
    for p, c in zip(prompts, batched):
        alone = generate(tiny, tok, [tok.encode(p)], SamplingParams(max_new_tokens=6))[0]
        assert c.text == alone.text and c.finish_reason == alone.finish_reason


def test_speculative_benchmark_gives_the_plain_answers_and_reports_acceptance(tmp_path, tok):
    """run_benchmarks with a draft model (the model itself): the same greedy items as without,
    batched, and the summary carries the acceptance rate and tokens per target forward."""
    from model.speculative import Speculation
    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # std 0.2: the default init answers one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{k: it[k] for k in ("question", "answer")}
                                               for it in GSM_ITEMS])
    spec = Speculation(draft_model=model, draft_tokens=3, draft_p_min=0)
    texts = {}
    for name, speculation in (("plain", None), ("draft", spec)):
        summaries = run_benchmarks(model, tok, ["gsm8k"], tmp_path / name, data={"gsm8k": gsm},
                                   batch_size=3, params=SamplingParams(max_new_tokens=24),
                                   log=None, speculation=speculation)
        texts[name] = [it["prediction"] for it in read_items(tmp_path / name / "gsm8k.items.jsonl")]
    assert texts["draft"] == texts["plain"] and len(set("".join(texts["plain"]))) > 5
    reported = summaries["gsm8k"]["meta"]["speculation"]
    assert reported["accepted"] == reported["drafted"] == spec.stats.drafted > 0
    assert reported["tokens_per_forward"] == round(spec.stats.tokens_per_forward, 3) > 3


# ------------------------------------------------------------------------------------------
# Likelihoods against independent hand computations
# ------------------------------------------------------------------------------------------

def reference_logprob(model, ids: list[int], first: int) -> float:
    """Sum of log P(ids[t] | ids[:t]) for t >= first, from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))


def test_continuation_logprobs_equal_hand_computation(tok, tiny):
    requests = [("Question: what is red?\nAnswer:", " an apple"),
                ("The cat sat on the", " mat"),
                ("A", " very long continuation with several more tokens in it"),
                ("The cat sat on the", " hat")]
    got = continuation_logprobs(tiny, tok, requests, batch_size=3)  # padding in the first batch
    for (ctx, cont), (lp, n) in zip(requests, got):
        c_ids = [tok.bos_id] + tok.encode(ctx)
        x_ids = tok.encode(cont)
        assert n == len(x_ids)
        assert lp == pytest.approx(reference_logprob(tiny, c_ids + x_ids, len(c_ids)), abs=1e-4)


def test_loglik_runner_picks_the_best_choice(tok, tiny):
    recs = [{"id": f"r{i}", "dataset": "piqa", "choices": ch, "label": 0,
             "prompt": f"Question: {q}\nAnswer:"}
            for i, (q, ch) in enumerate([("open a jar", ["twist the lid", "eat the jar"]),
                                         ("dry hair", ["use a towel", "use water please now"])])]
    res = run_commonsense_loglik(recs, tiny, tok, batch_size=2)
    for rec, r in zip(recs, res):
        ctx = [tok.bos_id] + tok.encode(rec["prompt"])
        ref = []
        for c in rec["choices"]:
            x = tok.encode(" " + c)
            ref.append((reference_logprob(tiny, ctx + x, len(ctx)), len(x)))
        assert r["logprobs"] == pytest.approx([s for s, _ in ref], abs=1e-4)
        assert r["extracted"] == max(range(2), key=lambda i: ref[i][0])
        assert r["correct_token"] == (max(range(2), key=lambda i: ref[i][0] / ref[i][1]) == 0)


TEXT = ("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 "
        "Numbers: 3.14159, 2.71828; and some more words to make a few windows.")


def test_perplexity_equals_exp_mean_nll_by_hand(tok, tiny):
    ids = [tok.bos_id] + tok.encode(TEXT)
    with torch.no_grad():
        logp = torch.log_softmax(tiny(torch.tensor([ids])).logits[0].double(), -1)
    nll = [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    res = perplexity(tiny, tok, TEXT, max_length=512)
    assert res.tokens == len(ids) - 1 and res.windows == 1
    assert res.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert res.bits_per_byte == pytest.approx(sum(nll) / math.log(2) / len(TEXT.encode()),
                                              rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(8, 3), (8, 7), (4, 3)])
def test_sliding_window_perplexity_scores_each_token_once(tok, tiny, max_length, stride):
    ids = [tok.bos_id] + tok.encode(TEXT)
    n = len(ids)
    targets = [t for _, end, first in _windows(n, max_length, stride) for t in range(first, end)]
    assert targets == list(range(1, n))
    # Independent of the batching: each window alone, unpadded, reads the tokens it owns (the
    # ones before the first window end beyond them).
    ends = [min(max_length, n)]
    while ends[-1] < n:
        ends.append(min(ends[-1] + stride, n))
    nll = 0.0
    for k, end in enumerate(ends):
        start = max(0, end - max_length)
        first = 1 if k == 0 else ends[k - 1]
        nll -= reference_logprob(tiny, ids[start:end], first - start)
    res = perplexity(tiny, tok, TEXT, max_length=max_length, stride=stride, batch_size=3)
    assert res.tokens == n - 1
    assert res.nll_sum == pytest.approx(nll, rel=1e-5)


# ------------------------------------------------------------------------------------------
# A full run on a tiny random checkpoint: four report files, one set of numbers
# ------------------------------------------------------------------------------------------

def check_report_consistency(out: Path, name: str) -> dict:
    summary = json.loads((out / f"{name}.summary.json").read_text())
    items = read_items(out / f"{name}.items.jsonl")
    with open(out / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    md = (out / f"{name}.md").read_text()
    assert summary["n"] == len(items) == len(rows)
    acc = sum(it["correct"] for it in items) / len(items)
    assert summary["accuracy"] == pytest.approx(acc)
    assert sum(r["correct"] == "True" for r in rows) == summary["correct"]
    assert f"**Accuracy: {100 * acc:.2f}%** ({summary['correct']} / {summary['n']})" in md
    for cat, row in summary["per_category"].items():
        group = [it for it in items if it["category"] == cat]
        assert row["accuracy"] == pytest.approx(sum(it["correct"] for it in group) / len(group))
        assert f"| {cat} | {row['n']} | {row['correct']} | {100 * row['accuracy']:.2f}% |" in md
    for it in items:
        for key in ("prompt", "prediction", "extracted", "gold", "correct", "error_kind"):
            assert key in it
    chars = sum(len(it["prediction"]) for it in items) / len(items)
    assert summary["mean_answer_chars"] == pytest.approx(chars)
    return summary


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(tiny, d)
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_checkpoint_run_writes_consistent_reports(tmp_path, tiny_dir, tok):
    from inference import load_for_inference
    model, tokenizer = load_for_inference(tiny_dir, device="cpu", dtype="fp32")
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{k: it[k] for k in ("question", "answer")}
                                               for it in GSM_ITEMS])
    math_file = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "type": "Algebra",
         "level": "Level 1"},
        {"problem": "2+2?", "answer": "4", "subject": "Prealgebra", "level": 2}])
    cs = write_jsonl(tmp_path / "piqa.jsonl", [
        {"id": f"piqa/test/{i}", "dataset": "piqa", "question": q, "choices": ch, "label": lb,
         "gold": f"solution{lb + 1}", "instruction": f"Please choose: {q}",
         "prompt": f"Question: {q}\nAnswer:"}
        for i, (q, ch, lb) in enumerate([("open jar", ["twist", "bite"], 0),
                                          ("dry hair", ["water", "towel"], 1),
                                          ("cut bread", ["knife", "spoon"], 0)])])
    text = tmp_path / "wiki.txt"
    text.write_text(TEXT * 3)
    out = tmp_path / "reports"
    summaries = run_benchmarks(
        model, tokenizer, ["gsm8k", "math", "commonsense", "commonsense_ll", "ppl"], out,
        data={"gsm8k": gsm, "math": math_file, "commonsense": cs, "ppl": text}, limit=4,
        batch_size=2, params=SamplingParams(max_new_tokens=5), ppl_max_length=32, log=None)
    for name in ("gsm8k", "math", "commonsense", "commonsense_ll"):
        s = check_report_consistency(out, name)
        assert summaries[name]["accuracy"] == s["accuracy"]
    assert json.loads((out / "gsm8k.summary.json").read_text())["n"] == 4  # --limit
    items = read_items(out / "gsm8k.items.jsonl")
    assert all(it["n_generated_tokens"] <= 5 for it in items)
    assert all(it["error_kind"] == "truncated" for it in items if it["finish_reason"] == "length"
               and not it["correct"])
    ll = json.loads((out / "commonsense_ll.summary.json").read_text())
    assert 0 <= ll["meta"]["accuracy_token_norm"] <= 1
    ppl = json.loads((out / "ppl.summary.json").read_text())
    assert ppl["ppl"] == pytest.approx(math.exp(ppl["nll_sum"] / ppl["tokens"]))
    assert (out / "ppl.md").is_file()


def test_loaders_accept_alternative_fields(tmp_path):
    m = math_task.load(write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "p", "solution": "x \\boxed{\\frac{1}{2}} y", "type": "Algebra",
         "level": "Level 4"}]))
    assert m[0]["answer"] == "\\frac{1}{2}" and m[0]["subject"] == "Algebra" and m[0]["level"] == 4
    g = gsm8k.load(write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": 5}] * 3), 2)
    assert len(g) == 2 and g[0]["answer"] == "5" and g[1]["id"] == "gsm8k/1"
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    assert load_texts(texts) == ["a", "b"]


def test_resolve_data_takes_paths_only_from_the_caller(tmp_path):
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": 5}])
    assert resolve_data(["gsm8k", "commonsense_ll"], {"gsm8k": gsm, "commonsense": tmp_path}) == {
        "gsm8k": gsm, "commonsense_ll": tmp_path}   # commonsense_ll reads the commonsense data
    with pytest.raises(BenchmarkDataError, match=r"^math: no data given; pass --data math=PATH$"):
        resolve_data(["gsm8k", "math"], {"gsm8k": gsm})
    with pytest.raises(FileNotFoundError, match="pass --data ppl=PATH"):   # still one for callers
        resolve_data(["ppl"], {"ppl": tmp_path / "absent.txt"})
    with pytest.raises(UnknownBenchmarkError, match="unknown benchmark 'mmlu'"):
        resolve_data(["mmlu"], {"mmlu": gsm})


# ------------------------------------------------------------------------------------------
# Shared data (skipped where ../shared/data is absent)
# ------------------------------------------------------------------------------------------

def test_shared_gsm8k_and_math_load():
    g = gsm8k.load(shared_path("gsm8k", "test.jsonl"), limit=3)
    assert len(g) == 3 and "####" in g[0]["answer"]
    m = math_task.load(shared_path("math", "math500_test.jsonl"), limit=3)
    assert len(m) == 3 and all(x["answer"] and x["subject"] for x in m)


def test_shared_commonsense_folder_loads_every_set_with_per_set_limit():
    recs = commonsense.load(shared_path("commonsense_llm_adapters"), limit=2)
    sets = {r["dataset"] for r in recs}
    assert len(sets) == 8 and len(recs) == 16
    assert all(r["instruction"] and r["choices"] for r in recs)


# ------------------------------------------------------------------------------------------
# Expert backends: evaluation by generation whatever runs the experts
# ------------------------------------------------------------------------------------------

def test_lora_adapter_is_merged_on_load(tmp_path, tiny_dir, tok):
    from inference import load_for_inference
    from model.io import load_pretrained
    from model.lora import apply_lora, save_adapter
    adapted = load_pretrained(tiny_dir)
    apply_lora(adapted, "all", rank=4, alpha=8)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)  # B = 0 would make the adapter a no-op
    save_adapter(adapted, tmp_path / "adapter")
    merged, _ = load_for_inference(tiny_dir, tmp_path / "adapter", "cpu", "fp32")
    base, _ = load_for_inference(tiny_dir, None, "cpu", "fp32")
    x = torch.tensor([tok.encode("hello world, how are you")])
    with torch.no_grad():
        want = adapted.eval()(x).logits
        assert torch.allclose(merged(x).logits, want, atol=1e-4)
        assert not torch.allclose(base(x).logits, want, atol=1e-3)


def test_cpu_expert_backend_generates_like_torch(tmp_path, tok):
    pytest.importorskip("offload.experts")
    from inference import load_for_inference
    torch.manual_seed(0)
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny-moe")), tmp_path / "moe")
    prompts = [chat_prompt(tok, q) for q in ("What is 2+2?", "Count to three, slowly.")]
    params = SamplingParams(max_new_tokens=6)
    texts = {}
    for backend in ("torch", "cpu"):
        model, _ = load_for_inference(tmp_path / "moe", None, "cpu", "fp32", moe_backend=backend)
        texts[backend] = [c.text for c in model_generate_fn(model, tok, params)(prompts)]
    assert texts["cpu"] == texts["torch"]  # same maths, experts only live elsewhere


def _kt_usable() -> tuple[bool, str]:
    if importlib.util.find_spec("offload.experts") is None:
        return False, "offload/experts.py not present"
    from offload.experts import kt_inference_status  # evaluation needs forward kernels only
    return kt_inference_status()


@pytest.mark.parametrize("backend", ["cpu", "kt"])
def test_bench_runs_with_offloaded_experts(tmp_path, backend):
    """The CLI evaluates by generation whatever runs the experts (kt-kernel in a subprocess: a
    kernel crash must not take the test session down)."""
    if importlib.util.find_spec("offload.experts") is None:
        pytest.skip("offload/experts.py not present yet")
    if backend == "kt" and not _kt_usable()[0]:
        pytest.skip(f"kt backend unavailable: {_kt_usable()[1]}")
    torch.manual_seed(0)
    ckpt = tmp_path / "moe"
    save_pretrained(MiniMindLM(MiniMindConfig.from_preset("tiny-moe")), ckpt)
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{k: it[k] for k in ("question", "answer")}
                                               for it in GSM_ITEMS[:2]])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval_model.py"), "--model", str(ckpt), "--moe_backend",
         backend, "--bench", "gsm8k", "--data", str(gsm), "--max_new_tokens", "4", "--out",
         str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "gsm8k.summary.json").read_text())
    assert summary["n"] == 2 and summary["meta"]["moe_backend"] == backend
