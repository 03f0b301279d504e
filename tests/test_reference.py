"""trainer/reference.py: the adapter-off reference is the base model even with trained adapters and
leaves the policy as it found it; a frozen reference passes the model inputs on; `inference` gives
gradient-free outputs usable in a loss and puts the mode back, also after an error."""
import copy

import pytest
import torch

from model.config import MiniMindConfig
from model.lora import apply_lora
from model.model import MiniMindLM
from trainer.reference import adapter_reference, frozen_copy, frozen_reference, inference

IDS = torch.tensor([[5, 9, 3, 7, 11, 2], [4, 4, 8, 1, 6, 10]])


def tiny() -> MiniMindLM:
    torch.manual_seed(0)
    return MiniMindLM(MiniMindConfig.from_preset("tiny", vocab_size=64, dropout=0.1))


def test_adapter_reference_is_the_base_model_and_leaves_the_policy_untouched():
    model = tiny()
    base = copy.deepcopy(model).eval()
    apply_lora(model, "all", rank=4, alpha=8)
    with torch.no_grad():   # trained adapters (B starts at zero, which would make this vacuous)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    ref = adapter_reference(model, IDS)
    torch.testing.assert_close(ref, base(input_ids=IDS).logits, rtol=0, atol=1e-6)
    assert not ref.requires_grad
    assert model.training                                  # the mode came back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    assert not torch.allclose(model(input_ids=IDS).logits, ref)   # the adapters are on again


def test_frozen_reference_runs_the_copy_with_the_inputs_it_is_given():
    model = tiny()
    reference = frozen_reference(frozen_copy(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)                              # the policy moves; the copy does not
    doc = torch.tensor([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]])
    fresh = tiny().eval()
    torch.testing.assert_close(reference(model, IDS, document_ids=doc),
                               fresh(input_ids=IDS, document_ids=doc).logits, rtol=0, atol=0)


def test_inference_outputs_meet_trainable_tensors_and_the_mode_comes_back_after_an_error():
    model = tiny().train()
    with inference(model):
        assert not model.training
        ref = model(input_ids=IDS).logits
    w = torch.ones((), requires_grad=True)
    (w * ref).sum().backward()                      # not an inference tensor: backward works
    assert model.training and not ref.requires_grad
    with pytest.raises(RuntimeError, match="boom"), inference(model):
        raise RuntimeError("boom")
    assert model.training
