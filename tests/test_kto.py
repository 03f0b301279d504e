"""trainer/kto.py and KTO data: the loss against a hand computation of the KTO paper's formula,
the KL reference point, the mismatched pairs kto_collate builds, feedback records checked with
file:line, policy == reference giving the loss at r = z, and a few steps that raise the desirable
completions above the undesirable ones."""
import json
import math

import pytest
import torch

from dataset import synthetic
from dataset.jsonl import DataError
from dataset.lm_dataset import IGNORE_INDEX, kto_collate, load_files, make_kto_collate
from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from trainer import dpo, kto
from trainer.config import TrainConfig
from trainer.loop import fit
from trainer.reference import frozen_copy, frozen_reference


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_loss_and_kl_match_hand_computation():
    beta, wd, wu = 0.5, 1.0, 1.5
    logps, ref = torch.tensor([-10.0, -8.0, -6.0]), torch.tensor([-11.0, -7.0, -6.5])
    desirable = torch.tensor([True, False, True])
    # mismatched pairs: log-ratios 0.4 and -0.2 -> mean 0.1; a negative mean clamps to 0
    kl = kto.kl_estimate(torch.tensor([-20.0, -30.0]), torch.tensor([-20.4, -29.8]))
    assert kl.item() == pytest.approx(0.1, abs=1e-6)
    assert kto.kl_estimate(torch.tensor([-20.0]), torch.tensor([-19.0])).item() == 0.0
    settings = kto.KTOSettings(beta, wd, wu)
    losses, rewards = kto.kto_loss(logps, ref, desirable, kl, settings)
    r = [1.0, -1.0, 0.5]
    want = [wd * (1 - sigmoid(beta * (r[0] - 0.1))), wu * (1 - sigmoid(beta * (0.1 - r[1]))),
            wd * (1 - sigmoid(beta * (r[2] - 0.1)))]
    torch.testing.assert_close(losses, torch.tensor(want), rtol=0, atol=1e-6)
    torch.testing.assert_close(rewards, beta * torch.tensor(r))
    with pytest.raises(ValueError, match="beta"):
        kto.KTOSettings(beta=0.0)
    with pytest.raises(ValueError, match="weight"):
        kto.KTOSettings(desirable_weight=-1.0)


def sample(prompt: list[int], completion: list[int], tag: int) -> dict:
    ids = torch.tensor(prompt + completion)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + completion)
    return {"kto_input_ids": ids, "kto_labels": labels, "kto_tag": torch.tensor(tag)}


def test_collate_pairs_each_prompt_with_the_previous_completion():
    batch = kto_collate([sample([1, 2], [3, 4, 5], 1), sample([6], [7], 0), sample([8, 9, 10], [11, 12], 1)],
                        pad_id=0)
    assert batch["kto_tag"].tolist() == [1, 0, 1]
    assert batch["kto_input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 11, 12]]
    # row i: prompt i + completion i-1 (row 0 takes the last one), labels on the completion only
    assert batch["kl_input_ids"].tolist() == [[1, 2, 11, 12], [6, 3, 4, 5], [8, 9, 10, 7]]
    m = IGNORE_INDEX
    assert batch["kl_labels"].tolist() == [[m, m, 11, 12], [m, 3, 4, 5], [m, m, m, 7]]
    cut = kto_collate([sample([1, 2], [3, 4, 5], 1), sample([6, 7, 8], [9, 10, 11], 0)], max_length=4)
    assert cut["kl_input_ids"].tolist() == [[1, 2, 9, 10], [6, 7, 8, 3]]


def test_feedback_records_need_a_boolean_label(tmp_path):
    tok = Tokenizer.from_dir()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"conversations": conv, "label": True}) + "\n"
                    + json.dumps({"conversations": conv, "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: field 'label' must be true"):
        load_files("kto", path, tok, 64, use_cache=False)
    ds = load_files("kto", path, tok, 64, use_cache=False, skip_bad_records=True)
    assert len(ds) == 1 and ds[0]["kto_tag"].item() == 1 and ds.stats.skipped_bad == 1


@pytest.fixture(scope="module")
def feedback(tmp_path_factory):
    """Short toy pairs, unpaired as synthetic.unpaired does it: the answer 'yes' is desirable."""
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    pairs = [{side: [{"role": "user", "content": f"Is {k} a number?"},
                     {"role": "assistant", "content": answer}]
              for side, answer in (("chosen", "yes"), ("rejected", "no"))} for k in range(8)]
    synthetic.write_jsonl(synthetic.unpaired(pairs), path)
    tok = Tokenizer.from_dir()
    ds = load_files("kto", path, tok, 64, use_cache=False)
    assert len(ds) == 16 and [int(ds[i]["kto_tag"]) for i in range(4)] == [1, 0, 1, 0]
    return ds, make_kto_collate(tok.pad_id, 64)


def tiny() -> MiniMindLM:
    torch.manual_seed(0)
    return MiniMindLM(MiniMindConfig.from_preset("tiny", dropout=0.0))


def test_policy_equal_to_reference_sits_at_the_reference_point(feedback):
    """r = 0 and z = 0 for every sample: each loss is its weight times 1 - σ(0) = 1/2."""
    ds, collate = feedback
    model = tiny()
    reference = dpo.reference_logps(frozen_reference(frozen_copy(model)))
    batch = collate([ds[i] for i in range(6)])
    loss, metrics = kto.make_kto_loss(kto.KTOSettings(0.1, 1.0, 3.0), reference)(model, batch)
    n_good = int(batch["kto_tag"].sum())
    assert loss.item() == pytest.approx((0.5 * n_good + 1.5 * (6 - n_good)) / 6, abs=1e-6)
    assert metrics["kl"].item() == 0.0 and metrics["rewards/margins"].item() == 0.0


def test_kto_separates_desirable_from_undesirable(feedback, tmp_path):
    ds, collate = feedback
    model = tiny()
    reference = dpo.reference_logps(frozen_reference(frozen_copy(model)))
    loss_fn = kto.make_kto_loss(kto.KTOSettings(0.1), reference)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), device="cpu", dtype="fp32", batch_size=8,
                      max_steps=16, lr=4e-3, log_every=8, progress=False, peak_tflops=1.0,
                      weight_decay=0.0, plot=False)
    fit(model, ds, loss_fn, cfg, collate_fn=collate)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        _, metrics = loss_fn(model.eval(), batch)
        logps = dpo.sequence_logps(model(batch["kto_input_ids"]).logits, batch["kto_labels"])[0]
        ratio = logps - reference(model, batch["kto_input_ids"], batch["kto_labels"], batch)
    # the records alternate chosen, rejected of one pair: the chosen answer gained more
    accuracy = (ratio[0::2] > ratio[1::2]).float().mean().item()
    assert metrics["rewards/margins"].item() > 0 and accuracy >= 0.75
