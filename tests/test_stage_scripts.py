"""train_pretrain.py -> train_full_sft.py end to end on synthetic data (in-process, tiny model)."""
import json
import sys

import pytest
import torch

import train_full_sft
import train_pretrain
from dataset import synthetic
from model.io import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


def run_script(module, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, "--no-progress", "--peak_tflops", "1", *args])
    module.main()


def test_pretrain_then_sft(tmp_path, monkeypatch):
    data = tmp_path / "data"
    synthetic.write_jsonl(synthetic.pretrain_texts(200, seed=0), data / "pretrain.jsonl")
    synthetic.write_jsonl(synthetic.sft_conversations(64, seed=0), data / "sft.jsonl")
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    run_script(train_pretrain, monkeypatch, "--data_path", str(data / "pretrain.jsonl"), "--out_dir", str(pre),
               "--max_steps", "8", "--batch_size", "4", "--seq_len", "64", "--lr", "3e-3",
               "--eval_fraction", "0.1", "--eval_every", "4", "--eval_batches", "2", "--log_every", "4")
    rows = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] and any("val/holdout/loss" in r for r in rows)
    assert (pre / "final" / "model.safetensors").exists()

    run_script(train_full_sft, monkeypatch, "--init_from", str(pre / "final"), "--out_dir", str(sft),
               "--data_path", str(data / "sft.jsonl"), "--max_steps", "4", "--batch_size", "4",
               "--seq_len", "128", "--lr", "1e-3", "--log_every", "2")
    start, end = load_pretrained(pre / "final"), load_pretrained(sft / "final")
    assert not torch.equal(start.lm_head.weight, end.lm_head.weight)
    assert (sft / "loss_curve.png").exists()


def test_fresh_model_takes_its_vocabulary_from_the_tokenizer(tmp_path, monkeypatch):
    """A 512-token tokenizer gives a fresh preset model 512 embedding rows, not the preset's 6400."""
    from model import tokenizer_train
    texts = synthetic.pretrain_texts(200, seed=0)
    tok_dir = tmp_path / "tok"
    tokenizer_train.save(tokenizer_train.train(texts, vocab_size=512), tok_dir)
    synthetic.write_jsonl(texts, tmp_path / "pretrain.jsonl")
    run_script(train_pretrain, monkeypatch, "--data_path", str(tmp_path / "pretrain.jsonl"),
               "--tokenizer_dir", str(tok_dir), "--out_dir", str(tmp_path / "pre"), "--max_steps", "1",
               "--batch_size", "2", "--seq_len", "32", "--log_every", "1")
    model = load_pretrained(tmp_path / "pre" / "final")
    assert model.config.vocab_size == 512
    assert model.model.embed_tokens.weight.shape == (512, model.config.hidden_size)
