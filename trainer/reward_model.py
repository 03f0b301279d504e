"""Reward model: a scalar value head on our model, the Bradley–Terry pairwise loss, and the model
folder it is saved as and loaded back from.

Scope: `ValueHead` and `add_value_head` (the transform that turns a MiniMindLM into a reward
model, applied from outside as LoRA is), `token_values` (one value per position), `last_scores`
(the value at each sequence's last real token), the Bradley–Terry loss and `make_reward_loss`
(the loop's `loss_fn`, whose metrics give the held-out pairwise accuracy), and
`save_reward_model` / `load_reward_model`.

The design is TRL's `AutoModelForCausalLMWithValueHead`, which LLaMA-Factory's `rm` stage uses:
- the head is `v_head.summary`, a Linear(hidden_size, 1) with bias, on the final-norm hidden
  state of every position; the body keeps its MiniMind/Qwen3 names;
- a sequence's reward is the value at its last non-pad token (LLaMA-Factory's PairwiseTrainer:
  `gather(index = attention_mask.sum(-1) - 1)`);
- loss = -log σ(r_chosen - r_rejected) averaged over pairs (Bradley–Terry; Ouyang et al. 2022,
  eq. 1), plus TRL's optional `center_rewards_coefficient`·mean((r_c + r_r)²) (Eisenstein et al.
  2023), which pins the rewards' mean near 0 (the BT loss only sees differences);
- the folder is a plain model folder (model.safetensors + config.json: the body, loadable as an
  LM) plus `value_head.safetensors` holding `v_head.summary.weight` [1, H] and
  `v_head.summary.bias` [1] (LLaMA-Factory's file name and TRL's tensor names).

The head starts at zero, so an untrained reward model scores every sequence 0 and its first loss
is exactly log 2.

PPO critic: `token_values` already gives the per-token values V(s_t) a critic needs ([B, S], the
value after reading token t). A PPO stage can (a) initialise its critic from a trained reward
model, `load_reward_model(path)` (the usual choice: InstructGPT, TRL, LLaMA-Factory), or (b) share
the policy's body, `add_value_head(policy)` (TRL's one-model actor-critic); either way it reads
values with `token_values` and saves with `save_reward_model`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from common.atomic import atomic_path
from common.errors import ModelFolderError, ModelNotFoundError
from model.io import is_model_folder, load_pretrained, save_pretrained, stable_save_file
from model.model import MiniMindLM
from trainer import distributed as dist
from trainer.dpo import pad_cat
from trainer.losses import LossFn, add_aux_loss

VALUE_HEAD_NAME = "value_head.safetensors"   # LLaMA-Factory's file name
HEAD = "v_head"                               # TRL's attribute: v_head.summary.{weight,bias}


class ValueHead(nn.Module):
    """hidden [..., H] -> value [...]: TRL's ValueHead without its dropout (ours is 0 anyway)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)   # every reward 0 before training: loss log 2
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # fp32 whatever the autocast: rewards are compared and differenced, bf16 would round them
        with torch.autocast(hidden.device.type, enabled=False):
            return self.summary(hidden.float()).squeeze(-1)


def add_value_head(model: nn.Module) -> ValueHead:
    """Give the model a zero value head (`model.v_head`) on its device, or return the one it has."""
    plain = dist.unwrap(model)
    if not hasattr(plain, HEAD):
        device = next(plain.parameters()).device
        plain.add_module(HEAD, ValueHead(plain.config.hidden_size).to(device))
    return getattr(plain, HEAD)


def value_head(model: nn.Module) -> ValueHead:
    plain = dist.unwrap(model)
    if not hasattr(plain, HEAD):
        raise ValueError("the model has no value head: add_value_head(model) or load_reward_model(path)")
    return getattr(plain, HEAD)


def token_values(model: nn.Module, input_ids: torch.Tensor, logits_to_keep: int = 1,
                 **inputs: Any) -> tuple[torch.Tensor, Any]:
    """(values [B, S] fp32, the model's output): the head on the final-norm hidden state of
    every position.

    The hidden states are read by a forward hook on the final norm for this one call, so the
    model file needs no extra output; `logits_to_keep=1` leaves the lm_head (unused by a reward
    model) one position of work; PPO's actor-critic passes 0 for every position's logits.
    `model` may be DDP-wrapped: the forward goes through the wrapper.
    """
    plain = dist.unwrap(model)
    head = value_head(plain)
    hidden: list[torch.Tensor] = []
    handle = plain.model.norm.register_forward_hook(lambda mod, args, out: hidden.append(out))
    try:
        out = model(input_ids=input_ids, logits_to_keep=logits_to_keep, **inputs)
    finally:
        handle.remove()
    return head(hidden[-1]), out


def last_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] value at each row's last real token (right padding: index = mask.sum - 1)."""
    last = attention_mask.long().sum(-1, keepdim=True).clamp(min=1) - 1
    return values.gather(-1, last).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss -log σ(r_c - r_r) + center_coef·(r_c + r_r)² [B] (see the module docstring)."""
    losses = -F.logsigmoid(chosen - rejected)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses


def score_pairs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(chosen scores [B], rejected scores [B], model output) of a DPO-format batch, chosen and
    rejected in one [2B, S] forward."""
    ids, mask = pad_cat([batch["chosen_input_ids"], batch["rejected_input_ids"]],
                        [batch["chosen_attention_mask"], batch["rejected_attention_mask"]], 0)
    values, out = token_values(model, ids)
    chosen, rejected = last_scores(values, mask).chunk(2)
    return chosen, rejected, out


def make_reward_loss(center_coef: float = 0.0) -> LossFn:
    """`loss_fn(model, batch) -> (loss, metrics)` for trainer.loop.fit on DPO-format batches.

    Metrics (means over pairs; on validation sets the loop reports them as val/<set>/rm/...):
    rm/accuracy (share of pairs with r_c > r_r: the pairwise accuracy), rm/margin, rm/chosen,
    rm/rejected.
    """
    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        chosen, rejected, out = score_pairs(model, batch)
        loss = bradley_terry_loss(chosen, rejected, center_coef).mean()
        c, r = chosen.detach(), rejected.detach()
        metrics: dict[str, Any] = {"rm/accuracy": (c > r).float().mean(), "rm/margin": (c - r).mean(),
                                   "rm/chosen": c.mean(), "rm/rejected": r.mean()}
        return add_aux_loss(loss, out, metrics), metrics
    return loss_fn


# ---------------------------------------------------------------------- the model folder
@contextlib.contextmanager
def detached_head(model: nn.Module) -> Iterator[ValueHead]:
    """The model without its head for a moment (so the body saves as a plain LM folder)."""
    head = value_head(model)
    del model._modules[HEAD]
    try:
        yield head
    finally:
        model.add_module(HEAD, head)


def save_reward_model(model: nn.Module, out_dir: str | Path) -> Path:
    """out_dir = the body's model folder (LoRA adapters merged in, if any) + value_head.safetensors."""
    from model.lora import merged_model   # only a LoRA-trained reward model needs it
    out_dir = Path(out_dir)
    plain = dist.unwrap(model)
    with detached_head(plain) as head:
        lora = any(".lora_" in k for k in plain.state_dict())
        save_pretrained(merged_model(plain) if lora else plain, out_dir)
    save_value_head(head, out_dir)
    return out_dir


def save_value_head(head: ValueHead, out_dir: str | Path) -> Path:
    """out_dir/value_head.safetensors (v_head.summary.{weight,bias}, fp32)."""
    tensors = {f"{HEAD}.{k}": v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(Path(out_dir) / VALUE_HEAD_NAME) as tmp:
        stable_save_file(tensors, tmp, {"format": "pt"})   # byte-stable, disk full = one line
    return Path(out_dir) / VALUE_HEAD_NAME


def is_reward_model(path: str | Path) -> bool:
    return is_model_folder(path) and (Path(path) / VALUE_HEAD_NAME).is_file()


def _head_file(path: str | Path) -> Path:
    file = Path(path) / VALUE_HEAD_NAME
    if not file.is_file():
        raise ModelFolderError(f"{path}: not a reward model (no {VALUE_HEAD_NAME}; train one "
                               "with train_reward.py)")
    return file


def load_value_head(model: nn.Module, path: str | Path) -> ValueHead:
    """Give `model` the value head stored in the reward model folder `path` (checked strictly)."""
    file = _head_file(path)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{file}: unreadable safetensors file ({e})") from None
    head = add_value_head(model)
    prefix = f"{HEAD}."
    want = {prefix + k for k in head.state_dict()}
    if set(state) != want:
        raise ModelFolderError(f"{file}: holds {sorted(state)}, a value head needs {sorted(want)}")
    try:
        head.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
    except RuntimeError as e:
        raise ModelFolderError(f"{file}: does not match the model ({' '.join(str(e).split())})") from None
    return head


def load_reward_model(path: str | Path, device: str | torch.device | None = None) -> MiniMindLM:
    """The model of a `save_reward_model` folder with its value head, in eval mode."""
    if not Path(path).is_dir():
        raise ModelNotFoundError(f"{path}: reward model folder not found")
    _head_file(path)
    model = load_pretrained(path)
    load_value_head(model, path)
    return model.to(device).eval()
