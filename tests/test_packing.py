"""SFT packing: bin packing, the block-diagonal mask, and a packed batch training exactly what its
conversations train alone (the independent reference: each conversation's own unpacked forward)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import train_distillation
import train_lora
from dataset import synthetic
from dataset.lm_dataset import IGNORE_INDEX, collate, load_files, pack_lengths
from model.config import MiniMindConfig
from model.io import save_pretrained
from model.model import KVCache, MiniMindLM, attention_mask_for
from model.tokenizer import Tokenizer
from trainer.config import ConfigError, TrainConfig
from trainer.distill import make_distill_loss
from trainer.losses import batch_weight, lm_loss

pytestmark = pytest.mark.usefixtures("one_thread_private_cache")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir()


def conversation(k: int) -> dict:
    """Short conversations of varied lengths (12-70 tokens), one with a system prompt and two turns."""
    user = {"role": "user", "content": f"What is {k} plus {k * 3}?" + " Please explain." * (k % 4)}
    reply = {"role": "assistant", "content": f"{k} + {3 * k} = {4 * k}." + " Yes." * (k % 5 * 3)}
    msgs = [user, reply]
    if k == 3:
        msgs = [{"role": "system", "content": "Be brief."}, user, reply,
                {"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": f"{8 * k}."}]
    return {"conversations": msgs}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing") / "sft.jsonl"
    synthetic.write_jsonl([conversation(k) for k in range(12)], path)
    return path


def tiny(seed: int = 0, **overrides) -> MiniMindLM:
    torch.manual_seed(seed)
    return MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0, **overrides)).eval()


def naive_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Reference: scan every bin for the fullest one that still fits (O(n * bins))."""
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        room = [(capacity - sum(lengths[j] for j in b), k) for k, b in enumerate(bins)]
        fits = [(r, k) for r, k in room if r >= lengths[i]]
        if fits:
            bins[min(fits)[1]].append(i)
        else:
            bins.append([i])
    return bins


def test_pack_lengths_is_best_fit_decreasing():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 65, size=int(rng.integers(1, 60))).tolist()
        bins = pack_lengths(lengths, 64)
        assert bins == naive_best_fit_decreasing(lengths, 64)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    with pytest.raises(ValueError, match="capacity"):
        pack_lengths([65], 64)


def test_block_diagonal_mask_matches_hand_built():
    doc = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask, is_causal = attention_mask_for(None, 6, 0, torch.device("cpu"), doc)
    expected_row0 = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],   # padding sees only itself: never a fully masked row
    ], dtype=torch.bool)
    assert not is_causal and mask.shape == (2, 1, 6, 6)
    assert torch.equal(mask[0, 0], expected_row0)
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    # positions restart per document (RoPE is relative, so the logits alone would not show it)
    model, seen = tiny(), []
    rotary = model.model.rotary.forward
    model.model.rotary.forward = lambda pos, dtype: seen.append(pos) or rotary(pos, dtype)
    model(torch.ones(2, 6, dtype=torch.long), document_ids=doc)
    assert seen[0].tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    cache = KVCache(tiny().config, 1, 8)
    cache.pos = 2
    with pytest.raises(ValueError, match="KV cache"):
        tiny()(torch.ones(1, 2, dtype=torch.long), kv_cache=cache, document_ids=torch.ones(1, 2))


def test_packed_rows_hold_each_conversation_once(tok, sft_file):
    # train_on_prompt: every token is a label, so the boundary between conversations shows
    plain = load_files("sft", sft_file, tok, 128, train_on_prompt=True)
    packed = load_files("sft", sft_file, tok, 128, packing=True, train_on_prompt=True)
    # deterministic: a fresh build (no cache) gives the cached rows, so resume by sample count holds
    again = load_files("sft", sft_file, tok, 128, packing=True, train_on_prompt=True, use_cache=False)
    assert len(packed) < len(plain) and packed.stats.documents == len(plain)
    assert packed.stats.packing_efficiency == pytest.approx(
        plain.stats.tokens / (len(packed) * 128))
    assert "efficiency" in str(packed.stats)
    seen = []
    for r in range(len(packed)):
        row, twin = packed[r], again[r]
        assert all(torch.equal(row[k], twin[k]) for k in row)
        assert len(row["input_ids"]) <= 128
        docs = row["document_ids"]
        for d in docs.unique().tolist():
            part = {k: v[docs == d] for k, v in row.items()}
            match = [i for i in range(len(plain)) if torch.equal(plain[i]["input_ids"], part["input_ids"])]
            assert len(match) == 1
            seen += match
            want = plain[match[0]]["labels"].clone()
            want[0] = IGNORE_INDEX     # never a target; alone it is not one either (no predecessor)
            assert torch.equal(part["labels"], want)
    assert sorted(seen) == list(range(len(plain)))


def split_documents(batch: dict) -> list[dict]:
    """Each conversation of a packed batch as its own batch of one (no padding, no document_ids)."""
    doc = batch["document_ids"]
    return [{k: v[None, r][:, doc[r] == d] for k, v in batch.items() if k != "document_ids"}
            for r in range(len(doc)) for d in doc[r].unique().tolist() if d]


def test_packed_batch_gives_each_documents_own_loss_and_gradient(tok, sft_file):
    plain = load_files("sft", sft_file, tok, 128)
    packed = load_files("sft", sft_file, tok, 128, packing=True)
    rows = [r for r in range(len(packed)) if packed[r]["document_ids"].max() >= 2][:1] + [len(packed) - 1]
    batch = collate([packed[r] for r in rows], tok.pad_id)
    assert (batch["document_ids"][1] == 0).any()          # the second row is right-padded
    docs = split_documents(batch)
    assert len(docs) >= 3
    for d in docs:
        assert any(torch.equal(d["input_ids"][0], plain[i]["input_ids"]) for i in range(len(plain)))

    model = tiny()
    with torch.no_grad():
        packed_logits = model(batch["input_ids"], document_ids=batch["document_ids"]).logits
        mixed_logits = model(batch["input_ids"]).logits          # plain causal over the whole row
        at = 0
        for d in docs[: batch["document_ids"][0].max()]:       # the documents of row 0, in order
            n = d["input_ids"].shape[1]
            alone = model(d["input_ids"]).logits[0]
            torch.testing.assert_close(packed_logits[0, at : at + n], alone, atol=2e-5, rtol=1e-4)
            at += n
    # the mask and the restarted positions make it equal: attending across documents differs
    assert not torch.allclose(mixed_logits[0, at - 1], packed_logits[0, at - 1], atol=1e-3)

    def summed(b):   # sum over supervised tokens: the loop's normalisation across micro-batches
        model.zero_grad()
        loss, _ = lm_loss(model, b)
        (loss * batch_weight(b)).backward()
        return (loss * batch_weight(b)).detach(), [p.grad.clone() for p in model.parameters()]

    packed_sum, packed_grads = summed(batch)
    parts = [summed(d) for d in docs]
    assert batch_weight(batch) == sum(batch_weight(d) for d in docs)
    torch.testing.assert_close(packed_sum, sum(p[0] for p in parts), atol=1e-4, rtol=1e-5)
    for k, g in enumerate(packed_grads):
        torch.testing.assert_close(g, sum(p[1][k] for p in parts), atol=1e-5, rtol=1e-3)


def test_distillation_teacher_sees_the_packing(tok, sft_file):
    packed = load_files("sft", sft_file, tok, 128, packing=True)
    row = collate([packed[1]], tok.pad_id)
    assert row["document_ids"].max() >= 2
    teacher, student = tiny(1), tiny(2)
    loss_fn = make_distill_loss(teacher, alpha=0.3, temperature=2.0)
    with torch.no_grad():
        total, _ = loss_fn(student, row)
        total = total * batch_weight(row)
        parts = 0.0
        for doc in split_documents(row):
            loss, _ = loss_fn(student, doc)
            parts = parts + loss * batch_weight(doc)
    torch.testing.assert_close(total, parts, atol=1e-4, rtol=1e-5)


def test_packing_is_an_option_of_sft_data_only():
    cfg = TrainConfig(packing=True, mask_history=True)
    assert cfg.data_options("sft") == {"packing": True, "train_on_prompt": False, "mask_history": True}
    with pytest.raises(ConfigError, match="--packing, --mask_history: options of SFT data.*dpo"):
        cfg.data_options("dpo")
    assert TrainConfig().data_options("pretrain") == {}


@pytest.mark.parametrize("module", [train_lora, train_distillation])
def test_lora_and_distillation_train_packed(module, sft_file, tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    save_pretrained(tiny(), base)
    model_args = (["--init_from", str(base)] if module is train_lora
                  else ["--teacher_path", str(base), "--model_preset", "tiny"])
    monkeypatch.setattr(sys, "argv", [
        module.__file__, "--device", "cpu", "--dtype", "fp32", "--no-progress", "--no-plot",
        "--peak_tflops", "1", "--seq_len", "128", "--batch_size", "2", "--max_steps", "2",
        "--log_every", "1", "--data_path", str(sft_file), "--out_dir", str(tmp_path / "out"),
        "--packing", *model_args])
    module.main()
    out = capsys.readouterr().out
    assert "packed 12 conversations into 7 rows" in out and "efficiency" in out
    assert "[done] 2 steps" in out
