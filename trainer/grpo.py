"""RL with verifiable rewards: prompts, batched rollouts, group-relative advantages, and the
GRPO / DAPO / CISPO losses, as the loop's `loss_fn(model, batch) -> (loss, metrics)`.

Scope: reading prompts with gold answers (SFT conversations up to the last assistant turn,
GSM8K, MATH, commonsense eval records, registry names), `PromptDataset` (what the loop's sampler
draws from), `rollout` (G samples per prompt in one KV-cache batch), `group_advantages`,
`policy_loss` (the three objectives, pure), the references for the KL term, and `GRPOLoss`, which
ties them together and carries the per-step metrics and the rollout samples file.

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
samples G completions per prompt with the plain module in eval mode under no_grad, scores them,
and returns the policy loss on them; the loop does backward, clipping and the optimizer step.
μ inner updates: the same rollout is reused for μ consecutive optimizer steps (old log-probs
cached at the first); the prompts the sampler hands in at the other μ-1 steps are not rolled
out (TRL repeats the batch instead; our sampler has no repeat). With μ = 1 (the default, as in
TRL and MiniMind) π_old is the current policy and ρ = 1 with the right gradient.
Bit-exact resume: each rollout's sampling seed is a hash of (seed, rank, step, micro-batch),
so a run resumed at step s samples exactly what the uninterrupted run sampled there (the global
RNG is not used: other code draws from it between a restore and the first step); checkpoints
must fall on rollout boundaries (steps that are multiples of μ).
Under torchrun each rank rolls out its own prompts: a group never spans ranks.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dataset.chat import generation_prompt_ids
from dataset.convert._io import iter_records
from dataset.jsonl import DataError
from model.generate import SamplingParams, generate_tokens
from tasks import rl_prompt
from trainer import distributed as dist
from trainer.dpo import inference
from trainer.rewards import RewardMix, correctness_reward

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
        if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"beta, eps_low, eps_high must be >= 0, got {self.beta}, "
                             f"{self.eps_low}, {self.eps_high}")
        if self.inner_updates < 1:
            raise ValueError(f"inner_updates must be >= 1, got {self.inner_updates}")
        if self.temperature <= 0:
            raise ValueError(f"rollout temperature must be > 0 (RL samples), got {self.temperature}")
        SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                       top_p=self.top_p)   # its own range checks


# ---------------------------------------------------------------------- prompts
def load_prompts(paths: Sequence[str], dataset_dir: str = "", seed: int = 0) -> tuple[list[dict], int]:
    """(prompt records, number of records skipped for having no gold answer) of files or, with
    `dataset_dir`, registry names (their SFT conversations)."""
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


# ---------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """G completions per prompt, as one right-padded [N, T] batch (N = prompts x G, group-major)."""

    input_ids: torch.Tensor        # prompt + completion (+ pad)
    action_mask: torch.Tensor      # [N, T-1] float: 1 where target t+1 is a completion token
    completions: list[list[int]]   # generated ids (the stop token included when produced)
    finished: list[bool]           # ended on a stop token
    seconds: float


def rollout(model: nn.Module, prompts: Sequence[Sequence[int]], settings: GRPOSettings, seed: int,
            stop_ids: Sequence[int], pad_id: int) -> Rollout:
    """Sample `group_size` completions of every prompt in one batched KV-cache decode.

    Row k's seed is seed + k, so its sample does not depend on the batch it shares. Runs the plain
    module in eval mode (no dropout; no DDP bookkeeping).
    """
    t0 = time.perf_counter()
    G = settings.group_size
    rows = [list(p) for p in prompts for _ in range(G)]
    params = [SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                             top_p=settings.top_p, seed=(seed + k) % 2**62, stop_token_ids=tuple(stop_ids))
              for k in range(len(rows))]
    completions: list[list[int]] = [[] for _ in rows]
    plain = dist.unwrap(model)
    with inference(plain):
        for step in generate_tokens(plain, rows, params):
            for k, tok in enumerate(step):
                if tok is not None:
                    completions[k].append(tok)
    stops = set(stop_ids)
    finished = [bool(c) and c[-1] in stops for c in completions]
    length = max(len(p) + len(c) for p, c in zip(rows, completions))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length - 1)
    for k, (p, c) in enumerate(zip(rows, completions)):
        ids[k, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[k, len(p) - 1:len(p) - 1 + len(c)] = 1.0    # position t predicts token t+1
    return Rollout(ids, mask, completions, finished, time.perf_counter() - t0)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â [N], per-group std [N/G]): Â_i = (r_i - mean_group) / (std_group + eps) (GRPO), or
    r_i - mean_group when not `scale` (Dr. GRPO). std is the sample std (n-1), as TRL's."""
    r = rewards.view(-1, group_size)
    std = r.std(dim=1)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (std.unsqueeze(1) + eps)
    return adv.flatten(), std


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(input_ids[:, t+1] | ≤ t) for t < T-1, [N, T-1] float32 (fused cross-entropy)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


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
    kl = mean k3 estimate of KL(π_θ ‖ π_ref) (0 without a reference).
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
    stats = {"clip_frac": ((clipped.float() * mask).sum() / n_tokens).detach(),
             "kl": ((kl * mask).sum() / n_tokens).detach()}
    return loss, stats


def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it (0 = no repeats;
    a looping reply approaches 1)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------- references
# reference(model, input_ids) -> logits of the reference policy (no grad)
ReferenceFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def adapter_reference(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The policy with its LoRA adapters switched off: the base model, with no second copy."""
    from model.lora import disable_lora
    plain = dist.unwrap(model)
    with inference(plain), disable_lora(plain):
        return plain(input_ids=input_ids).logits


def frozen_reference(ref_model: nn.Module) -> ReferenceFn:
    """A frozen copy of the initial policy (full fine-tuning)."""
    def reference(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        with inference(ref_model):
            return ref_model(input_ids=input_ids).logits
    return reference


# ---------------------------------------------------------------------- the stage's loss_fn
@dataclass
class _Cached:
    """One micro-batch's rollout, kept for the μ updates that reuse it."""

    rollout: Rollout
    rows: list[int]                # rows that train (DAPO drops zero-signal groups)
    advantages: torch.Tensor       # [len(rows)]
    old_logps: torch.Tensor | None  # [len(rows), T-1]; None when μ = 1 (π_old = π_θ)
    ref_logps: torch.Tensor | None
    metrics: dict[str, float]
    samples: list[dict]


class GRPOLoss:
    """`loss_fn(model, batch)` for trainer.loop.fit, plus `after_step` (timings, samples file).

    batch: {"prompt_index": [B]} from PromptDataset. Per call: a rollout of B x G completions
    (every μ-th step), rewards, advantages, then the loss on the policy's current log-probs.
    Metrics (means over the step's completions unless said): reward, reward_std (within-group),
    accuracy (correctness), reward/<name>, kl, entropy, response_len, clip_frac,
    frac_groups_dropped, repetition (4-gram), truncated, rollout_tok_s; and, about the previous
    step, update_tok_s and gen_share (share of step time spent generating).
    """

    def __init__(self, dataset: PromptDataset, rewards: RewardMix, settings: GRPOSettings,
                 stop_ids: Sequence[int], pad_id: int, grad_accum: int = 1,
                 reference: ReferenceFn | None = None, decode: Callable[[list[int]], str] = str,
                 samples_path: str | Path | None = None, sample_every: int = 0,
                 samples_per_log: int = 4, is_main: bool = True, seed: int = 0, rank: int = 0,
                 start_step: int = 0) -> None:
        self.dataset, self.rewards, self.s = dataset, rewards, settings
        self.stop_ids, self.pad_id, self.grad_accum = tuple(stop_ids), pad_id, grad_accum
        self.reference, self.decode = reference, decode
        self.samples_path = Path(samples_path) if samples_path else None
        self.sample_every, self.samples_per_log = sample_every, samples_per_log
        self.is_main, self.seed, self.rank, self.start_step = is_main, seed, rank, start_step
        self.calls = 0
        self.cache: dict[int, _Cached] = {}
        # timing of the current step (rollout part) and what the last finished step measured
        self.t_step: float | None = None
        self.step_gen_s, self.step_gen_tokens, self.step_update_tokens = 0.0, 0, 0
        self.last_timing: dict[str, float] = {}
        self.pending_samples: list[dict] = []
        self.first_hook = True

    # ------------------------------------------------------------------ rollout + scoring
    def rollout_seed(self, step: int, micro: int) -> int:
        """The sampling seed of one micro-batch's rollout: a function of (seed, rank, step, micro)."""
        key = f"{self.seed},{self.rank},{step},{micro}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:7], "little")

    def _roll(self, model: nn.Module, indices: list[int], seed: int) -> _Cached:
        s, G = self.s, self.s.group_size
        device = next(dist.unwrap(model).parameters()).device
        prompts = [self.dataset.prompt_ids[i] for i in indices]
        ro = rollout(model, prompts, s, seed, self.stop_ids, self.pad_id)
        rewards, parts, correct, reps, samples = [], {}, [], [], []
        for k, comp in enumerate(ro.completions):
            rec = self.dataset.records[indices[k // G]]
            body = comp[:-1] if ro.finished[k] else comp
            text = self.decode(body)
            ctx = {**rec, "completion_tokens": len(comp), "max_new_tokens": s.max_new_tokens,
                   "truncated": not ro.finished[k]}
            total, values = self.rewards.score(text, ctx)
            rewards.append(total)
            for name, v in values.items():
                parts.setdefault(name, []).append(v)
            correct.append(values["correctness"] if "correctness" in values
                           else correctness_reward(text, ctx))
            reps.append(repetition_rate(body))
            samples.append({"prompt": rec["messages"][-1]["content"],
                            "completion": text, "reward": total, "correct": correct[-1],
                            "gold": rec["gold"], "tokens": len(comp), "finished": ro.finished[k]})
        r = torch.tensor(rewards, dtype=torch.float32)
        adv, std = group_advantages(r, G, s.scale_rewards)
        keep_group = std > 0 if s.loss_type == "dapo" else torch.ones_like(std, dtype=torch.bool)
        rows = [k for k in range(len(rewards)) if bool(keep_group[k // G])]
        n_tokens = sum(len(c) for c in ro.completions)
        metrics = {"reward": float(r.mean()), "reward_std": float(std.mean()),
                   "accuracy": sum(correct) / len(correct),
                   "response_len": n_tokens / len(rewards), "repetition": sum(reps) / len(reps),
                   "truncated": sum(not f for f in ro.finished) / len(rewards),
                   "frac_groups_dropped": 1.0 - float(keep_group.float().mean()),
                   "rollout_tok_s": n_tokens / max(ro.seconds, 1e-9),
                   **{f"reward/{n}": sum(v) / len(v) for n, v in parts.items()}}
        self.step_gen_s += ro.seconds
        train_rows = rows or [0]      # all dropped: a zero-weight row keeps DDP's ranks in step
        ids = ro.input_ids[train_rows].to(device)
        old = ref = None
        plain = dist.unwrap(model)
        if s.inner_updates > 1:
            with inference(plain):
                old = token_logps(plain(input_ids=ids).logits, ids)
        if self.reference is not None:
            ref = token_logps(self.reference(model, ids), ids)
        return _Cached(ro, rows, adv[train_rows].to(device), old, ref, metrics, samples)

    # ------------------------------------------------------------------ the loss
    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.t_step is None:
            self.t_step = time.perf_counter()
        micro = self.calls % self.grad_accum
        step = self.start_step + self.calls // self.grad_accum    # the step in progress
        self.calls += 1
        if step % self.s.inner_updates == 0 or micro not in self.cache:
            indices = [int(i) for i in batch["prompt_index"].tolist()]
            self.cache[micro] = self._roll(model, indices, self.rollout_seed(step, micro))
            self.pending_samples += self.cache[micro].samples
        c = self.cache[micro]
        device = c.advantages.device
        train_rows = c.rows or [0]
        ids = c.rollout.input_ids[train_rows].to(device)
        mask = c.rollout.action_mask[train_rows].to(device) * (1.0 if c.rows else 0.0)
        out = model(input_ids=ids)
        logps = token_logps(out.logits, ids)
        old = c.old_logps if c.old_logps is not None else logps.detach()
        loss, stats = policy_loss(logps, old, c.advantages, mask, self.s, c.ref_logps)
        aux = getattr(out, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            loss = loss + aux
        self.step_update_tokens += int(ids.numel())
        metrics: dict[str, Any] = {**c.metrics, **stats, "entropy": masked_entropy(out.logits, mask)}
        metrics.update(self.last_timing)
        return loss, metrics

    # ------------------------------------------------------------------ after each optimizer step
    def after_step(self, model: nn.Module, step: int) -> None:
        """Step timings (reported with the next step's metrics) and, every `sample_every` steps,
        a few completions appended to the samples JSONL (a degenerate loop shows there)."""
        now = time.perf_counter()
        if self.t_step is not None:
            total = now - self.t_step
            update_s = max(total - self.step_gen_s, 1e-9)
            self.last_timing = {"update_tok_s": self.step_update_tokens / update_s,
                                "gen_share": self.step_gen_s / max(total, 1e-9)}
        self.t_step, self.step_gen_s, self.step_update_tokens = now, 0.0, 0
        if self.samples_path is not None and self.is_main:
            if self.first_hook:
                self._truncate(step)
            if self.sample_every and step % self.sample_every == 0 and self.pending_samples:
                with open(self.samples_path, "a", encoding="utf-8") as fh:
                    for rec in self.pending_samples[:self.samples_per_log]:
                        fh.write(json.dumps({"step": step, **rec}, ensure_ascii=False) + "\n")
        self.first_hook = False
        self.pending_samples = []

    def _truncate(self, step: int) -> None:
        """On (re)start, drop samples logged at or after this step: a resumed run logs them again."""
        if not self.samples_path.exists():
            return
        keep = []
        for line in self.samples_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) < step:
                    keep.append(line)
            except ValueError:
                continue
        from common.atomic import atomic_write_text
        atomic_write_text(self.samples_path, "".join(k + "\n" for k in keep))
