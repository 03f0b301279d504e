"""White-box knowledge distillation as pure functions.

Scope: the loss α·CE(student, labels) + (1-α)·T²·KL(p_teacher^T ‖ p_student^T) over the supervised
tokens of an SFT batch, the vocabulary check, and `make_distill_loss`, the loop's
`loss_fn(model, batch) -> (loss, metrics)` that runs the frozen teacher inside it (so the loop's
autocast covers the teacher too). Black-box distillation (teacher-generated SFT data) lives in
dataset/generate_sft.py (its command: scripts/generate_sft_data.py).

Reference (maths only): Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
Network": soften both distributions with temperature T; the T² factor keeps the soft-target
gradients on the scale of the hard-label ones when T changes. KL(teacher ‖ student) is the
"forward" KL: the student must cover every token the teacher gives mass to.

Only supervised positions count (labels != -100 after the shift): prompts and padding are not
what the student is taught to say, and their teacher distributions carry no signal we train on.
Positions are masked arithmetically (no boolean indexing), so the loss needs no host sync.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from trainer.losses import IGNORE_INDEX, LossFn, add_aux_loss, packing_inputs, shift_labels
from trainer.reference import frozen_reference


class VocabMismatchError(UserError, ValueError):
    """Teacher and student predict over different vocabularies: their distributions cannot be compared."""


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    """Raise VocabMismatchError with what to do about it."""
    if student_vocab != teacher_vocab:
        raise VocabMismatchError(
            f"teacher vocabulary ({teacher_vocab} tokens) differs from the student's "
            f"({student_vocab}): white-box distillation compares the two next-token distributions "
            "token by token, so both models must use the same tokenizer and vocab_size. Use a "
            "teacher with the student's tokenizer, or distil black-box: generate SFT data with "
            "scripts/generate_sft_data.py and train the student with train_full_sft.py.")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
             ) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) per position: [..., V] logits -> [...] in fp32."""
    check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 1.5, ignore_index: int = IGNORE_INDEX
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl): loss = α·ce + (1-α)·T²·kl, each a mean over supervised next-token positions.

    student_logits, teacher_logits [B, S, V]; labels [B, S] aligned with input_ids (shifted here).
    A batch without supervised tokens gives 0 (not NaN). α = 1 is plain SFT; α = 0 pure distillation.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} cover different positions")
    targets = shift_labels(labels, ignore_index)
    mask = (targets != ignore_index).float()
    count = mask.sum().clamp(min=1.0)
    ce = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten(),
                         ignore_index=ignore_index, reduction="sum") / count
    kl = (token_kl(student_logits, teacher_logits, temperature) * mask).sum() / count
    return alpha * ce + (1.0 - alpha) * temperature ** 2 * kl, ce, kl


def make_distill_loss(teacher: nn.Module, alpha: float = 0.5, temperature: float = 1.5) -> LossFn:
    """`loss_fn(student, batch) -> (loss, metrics)` for trainer.loop.fit on SFT batches.

    The teacher runs in eval mode without autograd, under whatever autocast the loop set up. Its
    MoE aux loss is ignored; the student's is added (it is part of the student's objective).
    """
    teacher_logits_of = frozen_reference(teacher.requires_grad_(False))

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, labels, packed = batch["input_ids"], batch["labels"], packing_inputs(batch)
        # the same per-conversation attention and positions as the student
        teacher_logits = teacher_logits_of(model, ids, **packed)
        out = model(input_ids=ids, **packed)
        loss, ce, kl = distillation_loss(out.logits, teacher_logits, labels, alpha, temperature)
        metrics: dict[str, Any] = {"ce_loss": ce.detach(), "kl": kl.detach()}
        return add_aux_loss(loss, out, metrics), metrics

    return loss_fn
