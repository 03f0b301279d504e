"""GRPO's rollouts: sampling completions of the prompts, scoring them, and handing the loss a batch.

Scope: `RolloutSettings` (how to sample and what the batch must carry); `sample_groups` (G
completions per prompt in one batched KV-cache decode); `group_advantages`; `repetition_rate`;
`Rollouts`, which turns a micro-batch of prompt indices into a `RolloutBatch`: rewards
(trainer/rewards.py), group-relative advantages, DAPO's dropping of groups without signal, and the
old-policy and reference log-probs the loss compares against; and `SampleLog`, a few completions
appended to a JSONL file every so many steps. The objective on a `RolloutBatch` is trainer/grpo.py's.

Sampling runs the plain module (no DDP bookkeeping) in eval mode under no_grad. Under torchrun
each rank rolls out its own prompts: a group never spans ranks.
Bit-exact resume: each rollout's sampling seed is a hash of (seed, rank, step, micro-batch), so a
run resumed at step s samples exactly what the uninterrupted run sampled there (the global RNG is
not used: other code draws from it between a restore and the first step).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from model.generate import SamplingParams, generate_tokens
from trainer import distributed as dist
from trainer.losses import token_logps
from trainer.reference import ReferenceLogits, inference
from trainer.rewards import RewardMix, correctness_reward


@dataclass(frozen=True)
class RolloutSettings:
    """How completions are sampled and scored, and which log-probs the batch carries
    (trainer.grpo.GRPOSettings.rollout derives them from the stage's settings)."""

    group_size: int = 8            # G completions per prompt (GRPO needs >= 2; PPO may use 1)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    scale_rewards: bool = True     # divide by the group's std (GRPO); off = Dr. GRPO's mean-only
    drop_flat_groups: bool = False  # DAPO's dynamic sampling: groups with equal rewards do not train
    old_logps: bool = False        # keep the sampling policy's log-probs (μ > 1: π_old is not π_θ)

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.temperature <= 0:
            raise ValueError(f"rollout temperature must be > 0 (RL samples), got {self.temperature}")
        SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                       top_p=self.top_p)   # its own range checks


# ---------------------------------------------------------------------- sampling
@dataclass
class Rollout:
    """G completions per prompt, as one right-padded [N, T] batch (N = prompts x G, group-major)."""

    input_ids: torch.Tensor        # prompt + completion (+ pad)
    action_mask: torch.Tensor      # [N, T-1] float: 1 where target t+1 is a completion token
    completions: list[list[int]]   # generated ids (the stop token included when produced)
    finished: list[bool]           # ended on a stop token
    seconds: float
    logps: torch.Tensor | None = None  # [N, T-1] log π of each action token as sampled (from
                                       # the decode's untempered logits; 0 off the mask)


def sample_groups(model: nn.Module, prompts: Sequence[Sequence[int]], settings: RolloutSettings,
                  seed: int, stop_ids: Sequence[int], pad_id: int) -> Rollout:
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
    if group_size == 1:     # nothing to compare with (PPO's rollouts): no group signal
        return torch.zeros_like(rewards), torch.zeros(r.shape[0])
    std = r.std(dim=1)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (std.unsqueeze(1) + eps)
    return adv.flatten(), std


def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it (0 = no repeats;
    a looping reply approaches 1)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------- scored batches
class PromptSource(Protocol):
    """What rollouts read from the prompts (trainer.grpo.PromptDataset): per prompt, its record
    (messages, task, gold, ...: the rewards' context) and its generation-prompt token ids."""

    records: Sequence[Mapping[str, Any]]
    prompt_ids: Sequence[Sequence[int]]


@dataclass
class RolloutBatch:
    """One micro-batch's scored rollout, the rows that train, on the policy's device.

    When every group was dropped, one row with a zero action mask stands in: each DDP rank must
    still run a (zero-weight) backward, or the gradient all-reduce would wait forever.
    """

    input_ids: torch.Tensor          # [n, T] prompt + completion (+ pad)
    action_mask: torch.Tensor        # [n, T-1] 1 where target t+1 is a completion token
    advantages: torch.Tensor         # [n] group-relative (GRPO)
    rewards: torch.Tensor            # [n] each row's total reward (PPO builds its own advantages)
    old_logps: torch.Tensor | None   # [n, T-1] of the sampling policy; None unless settings.old_logps
    ref_logps: torch.Tensor | None   # [n, T-1] of the reference; None without one
    metrics: dict[str, float]        # means over all the completions (dropped groups included)
    samples: list[dict]              # one per completion, for the samples file
    seconds: float                   # spent generating


class Rollouts:
    """Micro-batches of prompt indices -> `RolloutBatch`es.

    `tokenizer` gives the stop token (`eos_id`), the pad id and `decode` (the rewards read text).
    `reference(policy, input_ids) -> logits` (trainer/reference.py) adds reference log-probs.
    Metrics (means over the completions): reward, reward_std (within-group), accuracy
    (correctness), reward/<name>, response_len, repetition (4-gram), truncated,
    frac_groups_dropped, rollout_tok_s.
    """

    def __init__(self, prompts: PromptSource, rewards: RewardMix, settings: RolloutSettings,
                 tokenizer: Any, reference: ReferenceLogits | None = None, seed: int = 0,
                 rank: int = 0) -> None:
        self.prompts, self.rewards, self.settings, self.reference = prompts, rewards, settings, reference
        self.stop_ids, self.pad_id, self.decode = (tokenizer.eos_id,), tokenizer.pad_id, tokenizer.decode
        self.seed, self.rank = seed, rank

    def seed_for(self, step: int, micro: int) -> int:
        """The sampling seed of one micro-batch's rollout: a function of (seed, rank, step, micro)."""
        key = f"{self.seed},{self.rank},{step},{micro}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:7], "little")

    def sample(self, model: nn.Module, indices: Sequence[int], seed: int
               ) -> tuple[Rollout, list[str], list[dict[str, Any]]]:
        """(the rollout, each completion's text for the rewards, what else the rewards' context
        holds per completion). One reply per row here; trainer/agent.py's multi-turn rollouts
        override this."""
        prompts = [self.prompts.prompt_ids[i] for i in indices]
        ro = sample_groups(model, prompts, self.settings, seed, self.stop_ids, self.pad_id)
        texts = [self.decode(c[:-1] if f else c) for c, f in zip(ro.completions, ro.finished)]
        return ro, texts, [{} for _ in texts]

    def extra_metrics(self, extras: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Metrics of the per-completion extras ``sample`` returned (none here)."""
        return {}

    def __call__(self, model: nn.Module, indices: Sequence[int], step: int, micro: int) -> RolloutBatch:
        s, G = self.settings, self.settings.group_size
        device = next(dist.unwrap(model).parameters()).device
        ro, texts, extras = self.sample(model, indices, self.seed_for(step, micro))
        rewards, parts, correct, reps, samples = [], {}, [], [], []
        for k, comp in enumerate(ro.completions):
            rec = self.prompts.records[indices[k // G]]
            body = comp[:-1] if ro.finished[k] else comp
            text = texts[k]
            ctx = {**rec, "completion_tokens": len(comp), "max_new_tokens": s.max_new_tokens,
                   "truncated": not ro.finished[k], **extras[k]}
            total, values = self.rewards.score(text, ctx)
            rewards.append(total)
            for name, v in values.items():
                parts.setdefault(name, []).append(v)
            if rec.get("gold") is not None:   # open-ended prompts (reward model only) have none
                correct.append(values["correctness"] if "correctness" in values
                               else correctness_reward(text, ctx))
            reps.append(repetition_rate(body))
            samples.append({"prompt": rec["messages"][-1]["content"],
                            "completion": text, "reward": total,
                            "correct": correct[-1] if rec.get("gold") is not None else None,
                            "gold": rec.get("gold"), "tokens": len(comp), "finished": ro.finished[k],
                            **extras[k]})
        r = torch.tensor(rewards, dtype=torch.float32)
        adv, std = group_advantages(r, G, s.scale_rewards)
        keep_group = std > 0 if s.drop_flat_groups else torch.ones_like(std, dtype=torch.bool)
        rows = [k for k in range(len(rewards)) if bool(keep_group[k // G])]
        n_tokens = sum(len(c) for c in ro.completions)
        metrics = {"reward": float(r.mean()), "reward_std": float(std.mean()),
                   "accuracy": sum(correct) / max(len(correct), 1),
                   "response_len": n_tokens / len(rewards), "repetition": sum(reps) / len(reps),
                   "truncated": sum(not f for f in ro.finished) / len(rewards),
                   "frac_groups_dropped": 1.0 - float(keep_group.float().mean()),
                   "rollout_tok_s": n_tokens / max(ro.seconds, 1e-9),
                   **{f"reward/{n}": sum(v) / len(v) for n, v in parts.items()},
                   **self.extra_metrics(extras)}
        train_rows = rows or [0]      # all dropped: a zero-weight row keeps DDP's ranks in step
        ids = ro.input_ids[train_rows].to(device)
        mask = ro.action_mask[train_rows].to(device) * (1.0 if rows else 0.0)
        old = ref = None
        if s.old_logps:
            plain = dist.unwrap(model)
            with inference(plain):
                old = token_logps(plain(input_ids=ids).logits, ids)
        if self.reference is not None:
            ref = token_logps(self.reference(model, ids), ids)
        return RolloutBatch(ids, mask, adv[train_rows].to(device), r[train_rows].to(device), old, ref,
                            metrics, samples, ro.seconds)


# ---------------------------------------------------------------------- samples file
@dataclass
class SampleLog:
    """Every `every` steps (0 = never), the first `per_log` completions rolled out during the step,
    appended to the JSONL file `path`; one process writes it. A degenerate loop shows there."""

    path: Path
    every: int
    per_log: int = 4
    pending: list[dict] = field(default_factory=list)
    fresh: bool = True             # nothing flushed yet in this process: truncate first

    def add(self, samples: Sequence[dict]) -> None:
        self.pending += samples

    def flush(self, step: int) -> None:
        """After optimizer step `step`: write this step's samples when it is due, then forget them."""
        if self.fresh:
            self._truncate(step)
            self.fresh = False
        if self.every and step % self.every == 0 and self.pending:
            with open(self.path, "a", encoding="utf-8") as fh:
                for rec in self.pending[:self.per_log]:
                    fh.write(json.dumps({"step": step, **rec}, ensure_ascii=False) + "\n")
        self.pending = []

    def _truncate(self, step: int) -> None:
        """On (re)start, drop samples logged at or after this step: a resumed run logs them again."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) < step:
                    keep.append(line)
            except ValueError:
                continue
        from common.atomic import atomic_write_text
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))
