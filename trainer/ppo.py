"""PPO for language models (train_ppo.py): one model as actor and critic, per-token rewards with a
KL penalty to the reference, GAE, the clipped policy and value losses, `ppo_epochs` updates per
rollout and an early stop on the KL to the sampling policy; as the loop's
`loss_fn(model, batch) -> (loss, metrics)`.

Notation: a rollout is N completions (prompt + sampled reply, right-padded to T tokens); position t
of a row predicts token t+1, and `mask[t] = 1` where that token is part of the reply (the
positions an action is taken at). π_old = the policy that sampled, π_ref = the frozen initial
policy, V = the critic.

References (maths only, no code taken):
- PPO, Schulman et al. 2017, eq. 7: L^CLIP = E_t[min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε) A_t)] with
  ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t); eq. 9 adds the value loss c_1 (V_θ(s_t) - R_t)².
- GAE, Schulman et al. 2016, eq. 16: δ_t = r_t + γ V(s_{t+1}) - V(s_t),
  A_t = Σ_l (γλ)^l δ_{t+l}, and the value target (return) R_t = A_t + V(s_t).
- Rewards (Ziegler et al. 2019 sec. 2.2, Stiennon et al. 2020 eq. 1, Ouyang et al. 2022 eq. 2):
  r_t = -β (log π_old(a_t) - log π_ref(a_t)) on every reply token, plus the sequence's score
  (trainer/rewards.py: verifiable rewards or a reward model) on its last token.
- Value clipping (OpenAI baselines' ppo2, TRL's PPOTrainer): the value loss is
  ½ max((V - R)², (V_old + clip(V - V_old, -ε_v, ε_v) - R)²).
- Advantages are whitened over the rollout's reply tokens (TRL's `masked_whiten`).
- Early stop (OpenAI Spinning Up's PPO): once the mean approximate KL to π_old,
  E[(ρ - 1) - log ρ] (Schulman's k3), exceeds 1.5 × target_kl, the rest of that rollout's epochs
  are skipped and the next step samples afresh.

Design (how it fits the one loop, like trainer/grpo.py): a loop batch is a set of prompt indices;
every `ppo_epochs` steps (or right after an early stop) a micro-batch's prompts are rolled out
(trainer/rollout.py: sampling, scores, reference log-probs), the sampling policy's log-probs and
values are taken in one no-grad forward, and rewards, advantages and returns are computed once;
the following steps reuse them. One step = one optimizer update on the whole rollout (one
minibatch per epoch). The critic is a value head on the policy's own final hidden states
(TRL's AutoModelForCausalLMWithValueHead, trainer/reward_model.py's `v_head`), so it trains with
full fine-tuning, LoRA and freeze alike. The KL coefficient is fixed (an adaptive controller
would be state outside the checkpoint; a fixed β keeps resume bit-exact).
Bit-exact resume: rollout seeds are a function of the step, and checkpoints fall on multiples of
ppo_epochs, where the uninterrupted run samples afresh too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from trainer import distributed as dist
from trainer.grpo import masked_entropy
from trainer.losses import add_aux_loss, token_logps
from trainer.reference import inference
from trainer.reward_model import token_values
from trainer.rollout import RolloutBatch, Rollouts, RolloutSettings, SampleLog


@dataclass(frozen=True)
class PPOSettings:
    """What defines the objective and the rollouts (train_ppo.py fills it in). Defaults: TRL's
    PPO (γ 1, λ 0.95, ε 0.2, ε_v 0.2, vf_coef 0.1, 4 epochs; kl_coef 0.05)."""

    ppo_epochs: int = 4            # optimizer steps per rollout
    cliprange: float = 0.2         # ε of the policy ratio
    cliprange_value: float = 0.2   # ε_v of the value update
    vf_coef: float = 0.1           # c_1: weight of the value loss
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05          # β of the per-token KL penalty in the reward
    target_kl: float = 0.0         # early stop when approx KL to π_old > 1.5 × this (0 = never)
    samples_per_prompt: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
        for name in ("cliprange", "cliprange_value", "vf_coef", "kl_coef", "target_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        _ = self.rollout   # its own checks of the sampling parameters

    @property
    def rollout(self) -> RolloutSettings:
        """Sampling only: PPO's advantages come from the critic, not from the group, and the
        sampling policy's log-probs are taken together with its values (PPOLoss)."""
        return RolloutSettings(self.samples_per_prompt, self.max_new_tokens, self.temperature,
                               self.top_p, scale_rewards=False, drop_flat_groups=False, old_logps=False)


# ---------------------------------------------------------------------- the maths (pure)
def token_rewards(scores: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                  mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r [N, T-1], per-token KL estimate [N, T-1]): -β (log π_old - log π_ref) on every reply
    token, plus each row's score on its last reply token. Without a reference there is no penalty."""
    kl = (old_logps - ref_logps) * mask if ref_logps is not None else torch.zeros_like(mask)
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)   # last reply position
    has_reply = mask.sum(1) > 0
    rewards[torch.arange(len(scores)), last] += scores * has_reply
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each [N, T-1], zero off the mask. A reply's positions are one
    contiguous run per row (right padding), its last state has no successor (V = 0 after it)."""
    N, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_value = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running * nxt) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population std), zero elsewhere."""
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
             mask: torch.Tensor, s: PPOSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """pg + vf_coef · vf, each a mean over the reply tokens (see the module docstring).

    Returns (loss, {policy_loss, value_loss, clip_frac, value_clip_frac, approx_kl}); approx_kl
    is the k3 estimate of KL(π_old ‖ π_θ) the early stop reads.
    """
    n = mask.sum().clamp(min=1.0)
    mean = lambda x: (x * mask).sum() / n   # noqa: E731
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - s.cliprange, 1 + s.cliprange))
    clipped_v = old_values + (values - old_values).clamp(-s.cliprange_value, s.cliprange_value)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (clipped_v - returns) ** 2)
    policy, value = mean(pg), mean(vf)
    with torch.no_grad():
        stats = {"policy_loss": policy.detach(), "value_loss": value.detach(),
                 "clip_frac": mean(((ratio - 1).abs() > s.cliprange).float()),
                 "value_clip_frac": mean(((values - old_values).abs() > s.cliprange_value).float()),
                 "approx_kl": mean((ratio - 1) - log_ratio)}
    return policy + s.vf_coef * value, stats


# ---------------------------------------------------------------------- a scored rollout
@dataclass
class PPOBatch:
    """One micro-batch's rollout with everything the epochs over it reuse."""

    rollout: RolloutBatch
    old_logps: torch.Tensor    # [N, T-1] of the sampling policy
    old_values: torch.Tensor   # [N, T-1]
    advantages: torch.Tensor   # [N, T-1] whitened
    returns: torch.Tensor      # [N, T-1]
    metrics: dict[str, float]


def prepare(model: nn.Module, ro: RolloutBatch, s: PPOSettings) -> PPOBatch:
    """The sampling policy's log-probs and values (one no-grad forward), the rewards, GAE."""
    mask = ro.action_mask
    plain = dist.unwrap(model)
    with inference(plain):
        values, out = token_values(plain, ro.input_ids, logits_to_keep=0)
        old_logps = token_logps(out.logits, ro.input_ids)
    old_values = values[:, :-1] * mask
    rewards, kl = token_rewards(ro.rewards, old_logps, ro.ref_logps, mask, s.kl_coef)
    adv, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
    n = mask.sum().clamp(min=1.0)
    metrics = {**ro.metrics, "score": float(ro.rewards.mean()),
               "non_score_reward": float((-s.kl_coef * kl).sum() / len(mask)),
               "value": float((old_values * mask).sum() / n), "return": float((returns * mask).sum() / n)}
    if ro.ref_logps is not None:   # logged as GRPO logs it: k3 per reply token (>= 0; the penalty's k1 is not)
        delta = (ro.ref_logps - old_logps) * mask
        metrics["kl"] = float(((delta.exp() - delta - 1) * mask).sum() / n)
    return PPOBatch(ro, old_logps, old_values, masked_whiten(adv, mask), returns, metrics)


def update_loss(model: nn.Module, b: PPOBatch, s: PPOSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """(loss, metrics) of the current policy and critic on a prepared rollout."""
    ids, mask = b.rollout.input_ids, b.rollout.action_mask
    values, out = token_values(model, ids, logits_to_keep=0)
    logps = token_logps(out.logits, ids)
    loss, stats = ppo_loss(logps, b.old_logps, values[:, :-1] * mask, b.old_values, b.advantages,
                           b.returns, mask, s)
    metrics: dict[str, Any] = {**b.metrics, **stats}
    loss = add_aux_loss(loss, out, metrics)
    metrics["entropy"] = masked_entropy(out.logits, mask)
    return loss, metrics


# ---------------------------------------------------------------------- the stage's loss_fn
class PPOLoss:
    """`loss_fn(model, batch)` for trainer.loop.fit, plus `after_step` (timings, samples file).

    batch: {"prompt_index": [B]} (trainer.grpo.PromptDataset). A micro-batch is rolled out when
    the step in progress is a multiple of ppo_epochs, or when the previous update on its rollout
    went past the early-stop KL; otherwise its cached rollout is reused. The step in progress
    counts from `start_step`, the step fit resumes at (rollout seeds depend on it).
    """

    def __init__(self, settings: PPOSettings, rollouts: Rollouts, grad_accum: int = 1,
                 start_step: int = 0, samples: SampleLog | None = None) -> None:
        if rollouts.settings != settings.rollout:
            raise ValueError(f"the rollouts sample with {rollouts.settings}, but PPO wants {settings.rollout}")
        self.s, self.rollouts, self.grad_accum, self.start_step = settings, rollouts, grad_accum, start_step
        self.samples = samples
        self.calls = 0
        self.cache: dict[int, PPOBatch] = {}
        self.stop: set[int] = set()             # micro-batches whose rollout hit the KL limit
        self.t_step: float | None = None
        self.step_gen_s = 0.0
        self.last_timing: dict[str, float] = {}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.t_step is None:
            self.t_step = time.perf_counter()
        micro = self.calls % self.grad_accum
        step = self.start_step + self.calls // self.grad_accum
        self.calls += 1
        fresh = step % self.s.ppo_epochs == 0 or micro not in self.cache or micro in self.stop
        if fresh:
            indices = [int(i) for i in batch["prompt_index"].tolist()]
            ro = self.rollouts(model, indices, step, micro)
            self.cache[micro] = prepare(model, ro, self.s)
            self.stop.discard(micro)
            self.step_gen_s += ro.seconds
            if self.samples is not None:
                self.samples.add(ro.samples)
        loss, metrics = update_loss(model, self.cache[micro], self.s)
        if self.s.target_kl and float(metrics["approx_kl"]) > 1.5 * self.s.target_kl:
            self.stop.add(micro)
        metrics["early_stop"] = float(micro in self.stop)
        metrics.update(self.last_timing)
        return loss, metrics

    def after_step(self, model: nn.Module, step: int) -> None:
        """Step timings (with the next step's metrics) and the samples file."""
        now = time.perf_counter()
        if self.t_step is not None:
            self.last_timing = {"gen_share": self.step_gen_s / max(now - self.t_step, 1e-9)}
        self.t_step, self.step_gen_s = now, 0.0
        if self.samples is not None:
            self.samples.flush(step)
