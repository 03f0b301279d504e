"""Evaluation hooks in fit(): generation accuracy on `eval_gen_data` logged at each evaluation."""
import json
import sys

import pytest
import torch

import train_full_sft
from dataset import synthetic
from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from tests.trainer_driver import RandomRows
from trainer.config import ConfigError, TrainConfig
from trainer.loop import fit
from trainer.losses import lm_loss
from trainer.rng import seed_everything
from trainer.stage import generation_hooks

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cfg_for(tmp_path, **kw) -> TrainConfig:
    base = {"out_dir": str(tmp_path / "run"), "dtype": "fp32", "device": "cpu", "seq_len": 16,
            "batch_size": 4, "max_steps": 4, "log_every": 2, "progress": False, "plot": False,
            "peak_tflops": 1.0, "lr": 1e-3}
    return TrainConfig(**{**base, **kw})


def gsm8k_file(tmp_path, n: int = 6):
    """GSM8K-format questions ({question, answer ending in '#### n'}) from the synthetic test split."""
    return synthetic.write_jsonl(({"question": p.question, "answer": p.solution}
                                  for p in synthetic.test_set(n, seed=0)), tmp_path / "gsm8k.jsonl")


def test_hooks_run_at_each_evaluation_in_eval_mode_without_grad(tmp_path):
    """fit calls each hook at every evaluation (no validation set needed), logs what it returns,
    and hands it the model in eval mode under no_grad; training mode comes back afterwards."""
    seed_everything(0)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    seen: list[tuple[bool, bool]] = []

    def hook(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return {"val_probe": 0.25 * len(seen)}

    res = fit(model, RandomRows(16, 16, 6400), lm_loss, cfg_for(tmp_path, eval_every=2),
              eval_hooks=[hook])
    logged = [(r["step"], r["val_probe"]) for r in rows(tmp_path / "run" / "metrics.jsonl")
              if "val_probe" in r]
    assert logged == [(2, 0.25), (4, 0.5)]
    assert seen == [(False, False), (False, False)] and model.training
    assert res.val == {"val_probe": 0.5} and res.best_val_loss is None


def test_eval_gen_data_without_hooks_is_an_error(tmp_path):
    """A stage that does not pass hooks must not silently ignore eval_gen_data."""
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    with pytest.raises(ConfigError, match="eval_gen_data"):
        fit(model, RandomRows(8, 16, 6400), lm_loss,
            cfg_for(tmp_path, eval_gen_data=str(gsm8k_file(tmp_path))))
    with pytest.raises(ConfigError, match="eval_gen_data: no such file"):
        cfg_for(tmp_path, eval_gen_data=str(tmp_path / "missing.jsonl")).validate()


def test_generation_hook_scores_with_the_gsm8k_scorer(tmp_path, monkeypatch):
    """The hook feeds the first eval_gen_samples questions through the real GSM8K prompt and
    scorer: a generator that answers every question right scores 1.0, one that never answers 0.0."""
    path = gsm8k_file(tmp_path, n=6)
    items = rows(path)
    gold = {it["question"]: it["answer"].rsplit("####", 1)[1].strip() for it in items}
    from evaluation import runner

    def fake_fn(right: bool):
        def make(model, tokenizer, params):
            def fn(prompts):
                out = []
                for p in prompts:
                    q = next(q for q in gold if q in p)
                    out.append(runner.Completion(f"The answer is {gold[q]}." if right else "no idea", 5))
                return out
            return fn
        return make

    tokenizer = Tokenizer.from_dir(None)
    model = MiniMindLM(MiniMindConfig.from_preset("tiny"))
    cfg = cfg_for(tmp_path, eval_gen_data=str(path), eval_gen_samples=4)
    for right, expected in ((True, 1.0), (False, 0.0)):
        monkeypatch.setattr(runner, "model_generate_fn", fake_fn(right))
        (hook,) = generation_hooks(cfg, tokenizer)
        out = hook(model)
        assert out["val_gen_accuracy"] == expected
        assert out["val_gen_no_answer"] == (0.0 if right else 1.0)
    assert generation_hooks(cfg_for(tmp_path), tokenizer) == []


def test_sft_run_logs_generation_accuracy(tmp_path, monkeypatch):
    """train_full_sft.py end to end: eval_gen_data makes every evaluation log val_gen_accuracy
    from real greedy decoding of the model being trained. The last evaluation's numbers must
    equal evaluation's scorer run afresh on the exported final model and the same first
    eval_gen_samples questions (a stale model, other items or a mixed-up key would differ)."""
    sft = synthetic.write_jsonl(synthetic.sft_conversations(32, seed=0), tmp_path / "sft.jsonl")
    out = tmp_path / "sft"
    monkeypatch.setattr(sys, "argv", [
        "train_full_sft.py", "--no-progress", "--no-plot", "--peak_tflops", "1", "--model_preset", "tiny",
        "--data_path", str(sft), "--out_dir", str(out), "--max_steps", "4", "--batch_size", "4",
        "--seq_len", "128", "--lr", "1e-3", "--log_every", "2", "--eval_every", "2",
        "--eval_gen_data", str(gsm8k_file(tmp_path)), "--eval_gen_samples", "3",
        "--eval_gen_max_new_tokens", "12", "--dtype", "fp32"])
    gsm8k = tmp_path / "gsm8k.jsonl"
    train_full_sft.main()
    gen = [r for r in rows(out / "metrics.jsonl") if "val_gen_accuracy" in r]
    assert [r["step"] for r in gen] == [2, 4]
    from evaluation.runner import generation_accuracy
    from model.io import load_pretrained
    from tasks.gsm8k import load
    final = load_pretrained(out / "final").eval()
    items = load(str(gsm8k), limit=3)
    assert len(items) == 3
    ref = generation_accuracy(final, Tokenizer.from_dir(None), items, max_new_tokens=12, batch_size=3)
    assert gen[-1]["val_gen_accuracy"] == ref["accuracy"]
    assert gen[-1]["val_gen_no_answer"] == ref["no_answer"] / 3
    assert gen[-1]["val_gen_truncated"] == ref["truncated"] / 3
