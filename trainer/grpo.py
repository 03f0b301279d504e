"""RL with verifiable rewards: prompts and the GRPO / DAPO / CISPO losses, as the loop's
`loss_fn(model, batch) -> (loss, metrics)`.

Scope: reading prompts with gold answers (SFT conversations up to the last assistant turn,
GSM8K, MATH, commonsense eval records, registry names), `PromptDataset` (what the loop's sampler
draws from), `GRPOSettings`, `GRPOConfig` (the RL stages' options), `policy_loss` (the three
objectives, pure), `rollout_loss` (the objective on one scored rollout), `GRPOLoss`, which schedules the
rollouts (trainer/rollout.py: sampling, rewards, advantages, old and reference log-probs) and
carries the step timings, and what train_grpo.py and train_agent.py share (`policy_reference`,
`fit_rollouts`). The
references for the KL term are trainer/reference.py's.

Notation: for prompt q, G completions o_1..o_G with rewards r_i; per token t of o_i the ratio
ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | ...) (π_old = the policy that sampled).

References (maths only, no code taken):
- GRPO, Shao et al. 2024 (DeepSeekMath), eq. 3: advantage Â_i = (r_i - mean(r)) / std(r) over the
  group, and
      J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ Â_i, clip(ρ, 1-ε, 1+ε) Â_i) - β D_KL ],
  with the per-token KL estimator D_KL = π_ref/π_θ - log(π_ref/π_θ) - 1 (Schulman's k3, eq. 4).
- DAPO, Yu et al. 2025, eq. 8-11: clip(ρ, 1-ε_low, 1+ε_high) with ε_high > ε_low ("clip-higher",
  0.2 / 0.28), token-level normalisation 1/Σ_i|o_i| Σ_i Σ_t (long replies weigh by their
  tokens), and dynamic sampling: groups whose rewards are all equal (no signal) are dropped.
- CISPO, MiniMax-M1 2025, eq. 4-5: REINFORCE with the importance weight clipped and detached,
      J = 1/Σ_i|o_i| Σ_i Σ_t sg(clip(ρ, 1-ε_low, 1+ε_high)) Â_i log π_θ(o_{i,t}),
  so every token keeps its gradient (PPO/GRPO's clip zeroes it) and only the weight is bounded.
  MiniMind's default loss.

Design (how this fits the one loop): a loop "batch" is a set of prompt indices. The loss_fn
has them rolled out (G completions per prompt, scored) and returns the policy loss on the
result; the loop does backward, clipping and the optimizer step.
μ inner updates: the same rollout is reused for μ consecutive optimizer steps (old log-probs
cached at the first); the prompts the sampler hands in at the other μ-1 steps are not rolled
out (TRL repeats the batch instead; our sampler has no repeat). With μ = 1 (the default, as in
TRL and MiniMind) π_old is the current policy and ρ = 1 with the right gradient.
Bit-exact resume: rollout seeds are a function of the step (trainer/rollout.py), so checkpoints
must fall on rollout boundaries (steps that are multiples of μ).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dataset.chat import generation_prompt_ids
from dataset.convert._io import iter_records
from dataset.jsonl import DataError
from tasks import rl_prompt
from trainer.adapters import FinetuningChoice
from trainer.config import option
from trainer.losses import add_aux_loss, token_logps
from trainer.rewards import RewardMix, RewardSpecError
from trainer.rollout import RolloutBatch, Rollouts, RolloutSettings, SampleLog

LOSS_TYPES = ("grpo", "dapo", "cispo")
# (ε_low, ε_high) per loss when none is given: GRPO's symmetric 0.2 (PPO's), DAPO's clip-higher
# 0.2 / 0.28, CISPO's no lower bound and a loose upper one (it bounds a weight, not a gradient).
DEFAULT_CLIP = {"grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "cispo": (1.0, 4.0)}


@dataclass(frozen=True)
class GRPOSettings:
    """What defines the objective and the rollouts (train_grpo.py fills it in)."""

    loss_type: str = "cispo"
    group_size: int = 8            # G completions per prompt
    beta: float = 0.0              # KL penalty weight (0 = none)
    eps_low: float = 0.2
    eps_high: float = 0.2
    inner_updates: int = 1         # μ
    scale_rewards: bool = True     # divide by the group's std (GRPO); off = Dr. GRPO's mean-only
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    enable_thinking: bool = False

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare a group), got {self.group_size}")
        _ = self.rollout   # building it checks the sampling parameters
        if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"beta, eps_low, eps_high must be >= 0, got {self.beta}, "
                             f"{self.eps_low}, {self.eps_high}")
        if self.inner_updates < 1:
            raise ValueError(f"inner_updates must be >= 1, got {self.inner_updates}")

    @property
    def rollout(self) -> RolloutSettings:
        """What the rollouts need: sampling, advantages, DAPO's dropping of flat groups, and the
        sampling policy's log-probs when μ > 1 updates reuse them."""
        return RolloutSettings(self.group_size, self.max_new_tokens, self.temperature, self.top_p,
                               self.scale_rewards, drop_flat_groups=self.loss_type == "dapo",
                               old_logps=self.inner_updates > 1)


# ---------------------------------------------------------------------- prompts
def open_prompt(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """A conversation's prompt without a gold answer (for a reward model to judge): its turns up
    to the last assistant reply, or all of them when it ends with a user turn."""
    turns = obj.get("conversations") or []
    last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=len(turns))
    prompt = list(turns[:last])
    if not prompt or prompt[-1].get("role") != "user":
        return None
    return {"messages": prompt, "task": None, "gold": None}


def load_prompts(paths: Sequence[str], dataset_dir: str = "", seed: int = 0,
                 require_gold: bool = True) -> tuple[list[dict], int]:
    """(prompt records, number of records skipped for having no gold answer) of files or, with
    `dataset_dir`, registry names (their SFT conversations). With `require_gold` False (rewards
    that need no gold: a reward model, length) conversations without one are kept as
    `open_prompt`s, gold None."""
    out: list[dict] = []
    skipped = 0
    if dataset_dir:
        from dataset.registry import load_named_records
        _, recs = load_named_records(list(paths), dataset_dir, seed=seed)
        pairs = [(r.where, r.data) for r in recs]
    else:
        pairs = [(where, obj) for p in paths for where, obj in iter_records(p)]
    for where, obj in pairs:
        rec = rl_prompt(obj, where)
        if rec is None and not require_gold:
            rec = open_prompt(obj)
        if rec is None:
            skipped += 1
        else:
            out.append(rec)
    if not out:
        raise DataError(f"{', '.join(paths)}: no prompt with a gold answer (GSM8K '#### n', "
                        "a \\boxed{} answer, or a commonsense label)")
    return out, skipped


class PromptDataset(Dataset):
    """Prompt records with their token ids; an item is its own index (the loss_fn rolls it out).

    Prompts longer than `budget` tokens lose their oldest exchanges (dataset.chat's rule).
    """

    def __init__(self, records: Sequence[dict], tokenizer: Any, budget: int,
                 enable_thinking: bool = False) -> None:
        self.records = list(records)
        self.prompt_ids = [generation_prompt_ids(tokenizer, r["messages"], enable_thinking, budget)
                           for r in self.records]
        for r in self.records:
            r["thinking"] = enable_thinking

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"prompt_index": torch.tensor(i)}


# ---------------------------------------------------------------------- the stage's options
def rl_problems(cfg: Any, stage: str, per_rollout: str) -> list[str]:
    """What an RL stage's config (GRPO, PPO, agent) must satisfy: valid settings and reward spec,
    room for prompts, no validation loss, no sharding, and checkpoints on rollout boundaries
    (`per_rollout` names the option counting optimizer steps per rollout)."""
    err = []
    try:
        cfg.settings()
        RewardMix.from_spec(cfg.reward)
    except (ValueError, RewardSpecError) as exc:
        err.append(str(exc))
    if cfg.max_new_tokens >= cfg.seq_len:
        err.append(f"max_new_tokens ({cfg.max_new_tokens}) must be < seq_len ({cfg.seq_len}): "
                   "prompts need room")
    if cfg.eval_data_path or cfg.eval_fraction:
        err.append(f"{stage} has no validation loss: score held-out questions with --eval_gen_data")
    if cfg.parallel == "fsdp":     # each rank samples its own lengths: forwards out of step
        err.append(f"parallel fsdp: {stage}'s rollouts generate a different number of tokens per "
                   "rank, which a sharded model cannot; use --parallel ddp")
    k = getattr(cfg, per_rollout)
    if k > 1 and (not cfg.max_steps or cfg.max_steps % k or cfg.save_every % k):
        err.append(f"{per_rollout} {k}: max_steps (> 0) and save_every must be multiples of it "
                   "(a checkpoint holds no half-used rollout)")
    return err


@dataclass
class RLOptions(FinetuningChoice):
    """What every RL stage (GRPO, PPO, agent) asks for: prompts, rewards and sampling; lr `0`
    means "the default for this setup" (1e-5 full or freeze, 1e-4 LoRA)."""

    lr: float = option(0.0, "peak lr (0 = 1e-5 full or freeze, 1e-4 with finetuning_type lora)")
    weight_decay: float = 0.0
    seq_len: int = option(512, "prompt + completion tokens (prompts keep their last turns)")
    reward: str = option("correctness:1.0,format:0.1", "rewards and weights: correctness, format, "
                         "length, reward_model:PATH[:WEIGHT] (a train_reward.py folder; with no "
                         "correctness/format, prompts need no gold answer)")
    max_new_tokens: int = option(256, "completion budget per rollout")
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout nucleus sampling")
    think: bool = option(False, "prompts open a <think> block (reasoning models)")
    sample_every: int = option(0, "steps between rollout samples written to rollouts.jsonl (0 = log_every)")

    def __post_init__(self) -> None:
        if self.lr == 0:
            self.lr = 1e-4 if self.use_lora else 1e-5


@dataclass
class GRPOConfig(RLOptions):
    """train_grpo.py's options (train_agent.py adds its own); `0` for eps_low / eps_high means
    "the default for this loss"."""

    out_dir: str = "out/grpo"
    batch_size: int = option(4, "prompts per micro-batch per process (each sampled group_size times)")
    loss: str = option("cispo", "grpo (DeepSeekMath), dapo (clip-higher, token-level, flat groups "
                       "dropped) or cispo (clipped stop-gradient IS weights; MiniMind's)",
                       choices=LOSS_TYPES)
    group_size: int = option(8, "completions sampled per prompt (G)")
    beta: float = option(0.0, "KL penalty weight to the reference policy (0 = off)")
    track_kl: bool = option(True, "compute the reference's log-probs to log kl even when beta is 0")
    eps_low: float = option(0.0, "lower clip ε (0 = 0.2; cispo: 1.0, no lower bound)")
    eps_high: float = option(0.0, "upper clip ε (0 = 0.2 grpo, 0.28 dapo, 4.0 cispo)")
    inner_updates: int = option(1, "μ: optimizer steps per rollout (checkpoints fall on multiples)")
    scale_rewards: bool = option(True, "divide advantages by the group's reward std (off = Dr. GRPO)")

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = DEFAULT_CLIP.get(self.loss, (0.2, 0.2))
        self.eps_low, self.eps_high = self.eps_low or low, self.eps_high or high

    def _problems(self) -> list[str]:
        return super()._problems() + rl_problems(self, "GRPO", "inner_updates")

    def settings(self) -> GRPOSettings:
        return GRPOSettings(self.loss, self.group_size, self.beta, self.eps_low, self.eps_high,
                                 self.inner_updates, self.scale_rewards, self.max_new_tokens,
                                 self.temperature, self.top_p, self.think)



# ---------------------------------------------------------------------- the objective
def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distribution over the masked positions (no grad)."""
    with torch.no_grad():   # only the completion positions: [M, V], not a float copy of [N, T, V]
        picked = logits[:, :-1][mask > 0].float()
        if picked.shape[0] == 0:
            return logits.new_zeros((), dtype=torch.float32)
        logp = torch.log_softmax(picked, dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, settings: GRPOSettings, ref_logps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of `settings.loss_type` as a loss to minimise (see the module docstring).

    logps, old_logps, ref_logps, mask: [N, T] (mask 1 on completion tokens); advantages [N].
    Returns (loss, {"clip_frac", "kl"}): clip_frac = share of tokens whose ratio the clip
    touched (GRPO/DAPO: where clipping removes the gradient; CISPO: where the weight is capped);
    kl = mean k3 estimate of KL(π_θ ‖ π_ref) (absent without a reference).
    """
    s = settings
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    lo, hi = 1.0 - s.eps_low, 1.0 + s.eps_high
    if s.loss_type == "cispo":
        weight = ratio.clamp(min=lo, max=hi).detach()
        per_token = -weight * adv * logps
        clipped = (ratio < lo) | (ratio > hi)
    else:
        surrogate = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
        per_token = -surrogate
        clipped = ((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1.0            # k3 >= 0, unbiased for KL(π_θ ‖ π_ref)
        per_token = per_token + s.beta * kl
    n_tokens = mask.sum().clamp(min=1.0)
    if s.loss_type == "grpo":   # 1/G Σ_i 1/|o_i| Σ_t
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        loss = per_seq.mean()
    else:                       # 1/Σ|o_i| Σ_i Σ_t
        loss = (per_token * mask).sum() / n_tokens
    stats = {"clip_frac": ((clipped.float() * mask).sum() / n_tokens).detach()}
    if ref_logps is not None:   # without a reference there is no KL to log (not a KL of 0)
        stats["kl"] = ((kl * mask).sum() / n_tokens).detach()
    return loss, stats


def rollout_loss(model: nn.Module, batch: RolloutBatch, settings: GRPOSettings
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(loss, metrics) of the policy on one scored rollout: `policy_loss` on its current
    log-probs plus its MoE aux loss; metrics add clip_frac, kl and entropy to the rollout's.

    Without the sampling policy's log-probs (μ = 1) π_old is the current policy: ρ = 1, with the
    gradient of ρ.
    """
    out = model(input_ids=batch.input_ids)
    logps = token_logps(out.logits, batch.input_ids)
    old = batch.old_logps if batch.old_logps is not None else logps.detach()
    loss, stats = policy_loss(logps, old, batch.advantages, batch.action_mask, settings, batch.ref_logps)
    metrics: dict[str, Any] = {**batch.metrics, **stats}
    loss = add_aux_loss(loss, out, metrics)
    metrics["entropy"] = masked_entropy(out.logits, batch.action_mask)
    return loss, metrics


# ---------------------------------------------------------------------- the stage's loss_fn
class GRPOLoss:
    """`loss_fn(model, batch)` for trainer.loop.fit, plus `after_step` (timings, samples file).

    batch: {"prompt_index": [B]} from PromptDataset. Every μ-th step a micro-batch's prompts are
    rolled out (`rollouts`, B x G completions scored into a RolloutBatch), and that batch is kept
    for the μ - 1 steps after it; each call then returns `rollout_loss` on it. The step in
    progress (hence the rollout seed) counts from `start_step`, the step fit resumes at. Metrics:
    the rollout's and rollout_loss's, and about the previous step update_tok_s and gen_share
    (share of step time spent generating). `samples` (main process only) gets the completions.
    """

    def __init__(self, settings: GRPOSettings, rollouts: Rollouts, grad_accum: int = 1,
                 start_step: int = 0, samples: SampleLog | None = None) -> None:
        if rollouts.settings != settings.rollout:
            raise ValueError(f"the rollouts sample with {rollouts.settings}, but the loss's settings "
                             f"want {settings.rollout}")
        self.s, self.rollouts, self.grad_accum, self.start_step = settings, rollouts, grad_accum, start_step
        self.samples = samples
        self.calls = 0
        self.cache: dict[int, RolloutBatch] = {}   # per micro-batch, for the μ updates that reuse it
        # timing of the current step (rollout part) and what the last finished step measured
        self.t_step: float | None = None
        self.step_gen_s, self.step_update_tokens = 0.0, 0
        self.last_timing: dict[str, float] = {}

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.t_step is None:
            self.t_step = time.perf_counter()
        micro = self.calls % self.grad_accum
        step = self.start_step + self.calls // self.grad_accum    # the step in progress
        self.calls += 1
        if step % self.s.inner_updates == 0 or micro not in self.cache:
            indices = [int(i) for i in batch["prompt_index"].tolist()]
            self.cache[micro] = fresh = self.rollouts(model, indices, step, micro)
            self.step_gen_s += fresh.seconds
            if self.samples is not None:
                self.samples.add(fresh.samples)
        rollout = self.cache[micro]
        loss, metrics = rollout_loss(model, rollout, self.s)
        self.step_update_tokens += int(rollout.input_ids.numel())
        metrics.update(self.last_timing)
        return loss, metrics

    def after_step(self, model: nn.Module, step: int) -> None:
        """Step timings (reported with the next step's metrics) and the samples file."""
        now = time.perf_counter()
        if self.t_step is not None:
            total = now - self.t_step
            update_s = max(total - self.step_gen_s, 1e-9)
            self.last_timing = {"update_tok_s": self.step_update_tokens / update_s,
                                "gen_share": self.step_gen_s / max(total, 1e-9)}
        self.t_step, self.step_gen_s, self.step_update_tokens = now, 0.0, 0
        if self.samples is not None:
            self.samples.flush(step)


# ---------------------------------------------------------------------- what the RL stages share
def policy_reference(cfg: GRPOConfig, model: nn.Module, env: Any) -> Any:
    """The KL reference of `cfg` (None when neither beta nor track_kl asks for one):
    trainer.stage.reference_model's (LoRA: adapters off; else a frozen copy)."""
    from trainer.stage import reference_model
    return reference_model(model, cfg, env) if cfg.beta > 0 or cfg.track_kl else None


def rl_setup(cfg: Any) -> tuple[Any, Any, RewardMix, PromptDataset, nn.Module]:
    """(env, tokenizer, rewards, prompts, model) of an RL stage (GRPO, PPO): the process group,
    the rewards of `--reward`, the prompts they can score, and the policy on its device."""
    from trainer import distributed as dist
    from trainer.stage import build_model, load_tokenizer
    env = dist.init_distributed(cfg.device)
    if env.is_main and not cfg.init_from:
        print("[warn] no --init_from: RL on a randomly initialised model rarely earns a reward", flush=True)
    tokenizer = load_tokenizer(cfg)
    rewards = RewardMix.from_spec(cfg.reward, tokenizer=tokenizer, device=env.device)
    prompts = prompt_dataset(cfg, tokenizer, rewards, env)
    return env, tokenizer, rewards, prompts, build_model(cfg, tokenizer).to(env.device)


def prompt_dataset(cfg: Any, tokenizer: Any, rewards: RewardMix, env: Any) -> PromptDataset:
    """The stage's prompts (`cfg.data_path` / `dataset_dir`), each with room for
    `cfg.max_new_tokens`; a gold answer is required only when a reward asks for one."""
    records, skipped = load_prompts(cfg.data_path, cfg.dataset_dir, cfg.seed, require_gold=rewards.needs_gold)
    prompts = PromptDataset(records, tokenizer, cfg.seq_len - cfg.max_new_tokens, cfg.think)
    if env.is_main:
        print(f"[data] {len(prompts)} prompts ({skipped} records without a "
              f"{'gold answer' if rewards.needs_gold else 'user turn'} skipped)", flush=True)
    return prompts


def fit_rollouts(model: nn.Module, prompts: Dataset, rollouts: Rollouts, cfg: GRPOConfig,
                 env: Any, tokenizer: Any) -> Any:
    """Train on `rollouts` of `prompts` with the loop (GRPOLoss, the samples file, resume) and
    return fit's result: the part train_grpo.py and train_agent.py share."""
    from pathlib import Path

    from trainer.checkpoint import resolve_resume, verify_checkpoint
    from trainer.loop import fit
    from trainer.stage import fit_args, generation_hooks
    samples = SampleLog(Path(cfg.out_dir) / "rollouts.jsonl", cfg.sample_every or cfg.log_every) \
        if env.is_main else None
    # the step fit resumes at: rollout seeds are a function of the step (trainer/rollout.py)
    resume = resolve_resume(cfg.resume, cfg.out_dir, log=lambda *_: None)
    loss = GRPOLoss(cfg.settings(), rollouts, cfg.grad_accum,
                    start_step=verify_checkpoint(resume)["step"] if resume else 0, samples=samples)
    args = fit_args(model, cfg)
    args["after_step"] = [*args.get("after_step", []), loss.after_step]
    return fit(model, prompts, loss, cfg, eval_hooks=generation_hooks(cfg, tokenizer), **args)
