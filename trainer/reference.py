"""Reference models: the frozen policy a DPO or GRPO loss compares against, and a distillation teacher.

Scope: `inference` (a gradient-free, dropout-free forward that puts the module's mode back),
`frozen_copy` (the full-fine-tuning reference), and the two ways of getting reference logits
behind one signature, `reference(policy, input_ids, **inputs) -> logits`: `frozen_reference` runs
a separate frozen model, `adapter_reference` runs the policy itself with its LoRA adapters switched
off (the base model, with no second copy). Each stage turns the logits into what its loss needs
(DPO: summed response log-probs; GRPO: per-token log-probs; distillation: the teacher's
distributions).

The "eval mode for a block" part is evaluation.perplexity.eval_mode, the one owner of it: the
evaluation package is below trainer/ (it never imports trainer), so both can use it.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch
from torch import nn

from evaluation.perplexity import eval_mode
from trainer import distributed as dist

# reference(policy, input_ids, **model inputs) -> the reference model's logits (no grad)
ReferenceLogits = Callable[..., torch.Tensor]


@contextlib.contextmanager
def inference(module: nn.Module) -> Iterator[nn.Module]:
    """No autograd and eval mode (no dropout) for a reference/teacher/rollout pass; restores the mode.

    no_grad rather than inference_mode: the outputs meet trainable tensors in the loss, and
    inference tensors may not be saved for backward.
    """
    with eval_mode(module), torch.no_grad():
        yield module


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen, in eval mode (the full-fine-tuning reference)."""
    ref = copy.deepcopy(dist.unwrap(model))
    return ref.requires_grad_(False).eval()


def frozen_reference(ref_model: nn.Module) -> ReferenceLogits:
    """Reference logits from a separate frozen model (a `frozen_copy`, or a teacher) on the
    policy's device; the policy argument is ignored."""
    def reference(model: nn.Module, input_ids: torch.Tensor, **inputs: Any) -> torch.Tensor:
        with inference(ref_model):
            return ref_model(input_ids=input_ids, **inputs).logits
    return reference


def adapter_reference(model: nn.Module, input_ids: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """Reference logits = the policy with its LoRA adapters switched off: no second copy.

    Runs the plain module, not the DDP wrapper: a gradient-free forward must not take part in
    DDP's bookkeeping (and needs no buffer broadcast).
    """
    from model.lora import disable_lora  # the model package's LoRA helpers; only this path needs them
    plain = dist.unwrap(model)
    with inference(plain), disable_lora(plain):
        return plain(input_ids=input_ids, **inputs).logits
