"""trainer/distill.py: the KD loss against a hand computation, zero KL for identical models,
supervised positions only, a clear vocabulary error, and a student that moves toward its teacher."""
import math

import pytest
import torch

from dataset import synthetic
from dataset.lm_dataset import load_files, make_collate
from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from trainer.config import TrainConfig
from trainer.distill import VocabMismatchError, distillation_loss, make_distill_loss, token_kl
from trainer.loop import fit


def test_loss_matches_hand_computation():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 0]])     # positions 0 and 1 predict tokens 1 and 0
    alpha, T = 0.3, 2.0

    def softmax(x):
        e = [math.exp(v / T) for v in x]
        return [v / sum(e) for v in e]

    ce = kl = 0.0
    for pos, target in ((0, 1), (1, 0)):
        ce += -math.log(softmax([v * T for v in s[0, pos].tolist()])[target])   # T = 1 for CE
        p, q = softmax(t[0, pos].tolist()), softmax(s[0, pos].tolist())
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce, kl = ce / 2, kl / 2
    loss, got_ce, got_kl = distillation_loss(s, t, labels, alpha, T)
    assert got_ce.item() == pytest.approx(ce, abs=1e-6)
    assert got_kl.item() == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * kl, abs=1e-6)


def test_kl_is_zero_when_teacher_is_student():
    logits = torch.randn(2, 6, 50) * 3
    labels = torch.randint(0, 50, (2, 6))
    loss, ce, kl = distillation_loss(logits, logits.clone(), labels, alpha=0.5, temperature=1.5)
    assert kl.abs().item() < 1e-6
    assert loss.item() == pytest.approx(0.5 * ce.item(), abs=1e-6)


def test_only_supervised_positions_count_and_empty_batch_is_zero():
    s, t = torch.randn(1, 5, 11), torch.randn(1, 5, 11)
    labels = torch.tensor([[-100, -100, 4, 7, -100]])   # positions 1 and 2 are supervised
    base = distillation_loss(s, t, labels)[0]
    t2 = t.clone()
    t2[0, [0, 3, 4]] = torch.randn(3, 11) * 10                # change only unsupervised positions
    assert torch.equal(distillation_loss(s, t2, labels)[0], base)
    none = torch.full((1, 5), -100)
    assert distillation_loss(s, t, none)[0].item() == 0.0


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(VocabMismatchError, match="same tokenizer and vocab_size"):
        token_kl(torch.randn(2, 10), torch.randn(2, 12))
    with pytest.raises(ValueError, match="alpha"):
        logits = torch.randn(1, 2, 4)
        distillation_loss(logits, logits, torch.zeros(1, 2, dtype=torch.long), alpha=2.0)


def test_student_moves_toward_teacher(tmp_path):
    """Pure distillation (alpha 0) through the real loop: KL(teacher || student) falls."""
    path = tmp_path / "sft.jsonl"
    synthetic.write_jsonl(synthetic.sft_conversations(16, seed=0), path)
    tok = Tokenizer.from_dir()
    ds = load_files("sft", path, tok, 64, use_cache=False)
    collate = make_collate(tok.pad_id)
    torch.manual_seed(1)
    teacher = MiniMindLM(MiniMindConfig.from_preset("tiny-moe", dropout=0.0))   # MoE teacher, dense student
    torch.manual_seed(2)
    student = MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0))
    batch = collate([ds[i] for i in range(len(ds))])
    loss_fn = make_distill_loss(teacher, alpha=0.0, temperature=1.0)

    def kl() -> float:
        with torch.no_grad():
            return loss_fn(student.eval(), batch)[1]["kl"].item()

    before = kl()
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), device="cpu", dtype="fp32", batch_size=4, max_steps=12,
                      lr=3e-3, log_every=6, progress=False, peak_tflops=1.0)
    fit(student, ds, loss_fn, cfg, collate_fn=collate)
    after = kl()
    assert after < 0.7 * before, (before, after)
    assert not any(p.requires_grad for p in teacher.parameters())
