"""RL with verifiable rewards (GRPO / DAPO / CISPO) on prompts with gold answers.

    python train_grpo.py --init_from out/sft/final --data_path data/gsm8k_train.jsonl --max_steps 200
    python train_grpo.py ... --loss grpo --beta 0.04          # DeepSeekMath's GRPO with a KL penalty
    python train_grpo.py ... --loss dapo                       # clip-higher, token-level, drop flat groups
    python train_grpo.py ... --finetuning_type lora            # adapters; KL reference = adapters off
    python train_grpo.py ... --reward correctness:1.0,format:0.1,length:0.1
    torchrun --nproc_per_node=2 train_grpo.py ...              # each rank rolls out its own prompts

Prompts: SFT conversations up to their last assistant turn (gold = that reply's `#### n` or
\\boxed{}), GSM8K / MATH / commonsense eval files, or registry names with --dataset_dir. Each
step samples group_size completions of batch_size prompts (one batched KV-cache decode), scores
them (trainer/rewards.py; rollouts in trainer/rollout.py), and updates on group-relative
advantages (trainer/grpo.py).
Logged every log_every steps: reward, reward_std, accuracy, kl, entropy, response_len, clip_frac,
frac_groups_dropped, repetition, rollout_tok_s, update_tok_s, gen_share; every sample_every steps
a few completions go to out_dir/rollouts.jsonl. --eval_gen_data scores held-out questions.

Defaults: CISPO (MiniMind's default), G = 8, μ = 1 (TRL's and MiniMind's), β = 0 (KL still logged
when track_kl), temperature 1.0, lr 1e-5 full / 1e-4 LoRA, no weight decay (TRL's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import run_cli
from offload.experts import offload_experts
from trainer import distributed as dist
from trainer import grpo
from trainer.adapters import FinetuningChoice
from trainer.checkpoint import resolve_resume, verify_checkpoint
from trainer.config import option, parse_config
from trainer.loop import fit
from trainer.reference import adapter_reference, frozen_copy, frozen_reference
from trainer.rewards import RewardMix, RewardSpecError
from trainer.rollout import Rollouts, SampleLog
from trainer.stage import build_model, finish, fit_args, generation_hooks, load_tokenizer


@dataclass
class GRPOConfig(FinetuningChoice):
    """GRPO options; `0` for lr / eps_low / eps_high means "the default for this setup"."""

    out_dir: str = "out/grpo"
    lr: float = option(0.0, "peak lr (0 = 1e-5 full, 1e-4 with finetuning_type lora)")
    weight_decay: float = 0.0
    seq_len: int = option(512, "prompt + completion tokens (prompts keep their last turns)")
    batch_size: int = option(4, "prompts per micro-batch per process (each sampled group_size times)")
    loss: str = option("cispo", "grpo (DeepSeekMath), dapo (clip-higher, token-level, flat groups "
                       "dropped) or cispo (clipped stop-gradient IS weights; MiniMind's)",
                       choices=grpo.LOSS_TYPES)
    group_size: int = option(8, "completions sampled per prompt (G)")
    beta: float = option(0.0, "KL penalty weight to the reference policy (0 = off)")
    track_kl: bool = option(True, "compute the reference's log-probs to log kl even when beta is 0")
    eps_low: float = option(0.0, "lower clip ε (0 = 0.2; cispo: 1.0, no lower bound)")
    eps_high: float = option(0.0, "upper clip ε (0 = 0.2 grpo, 0.28 dapo, 4.0 cispo)")
    inner_updates: int = option(1, "μ: optimizer steps per rollout (checkpoints fall on multiples)")
    scale_rewards: bool = option(True, "divide advantages by the group's reward std (off = Dr. GRPO)")
    reward: str = option("correctness:1.0,format:0.1", "rewards and weights: correctness, format, length")
    max_new_tokens: int = option(256, "completion budget per rollout")
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout nucleus sampling")
    think: bool = option(False, "prompts open a <think> block (reasoning models)")
    sample_every: int = option(0, "steps between rollout samples written to rollouts.jsonl (0 = log_every)")

    def __post_init__(self) -> None:
        if self.lr == 0:
            self.lr = 1e-4 if self.use_lora else 1e-5
        low, high = grpo.DEFAULT_CLIP.get(self.loss, (0.2, 0.2))
        self.eps_low, self.eps_high = self.eps_low or low, self.eps_high or high

    def _problems(self) -> list[str]:
        err = super()._problems()
        if self.parallel == "fsdp":     # each rank samples its own lengths: forwards out of step
            err.append("parallel fsdp: GRPO's rollouts generate a different number of tokens per "
                       "rank, which a sharded model cannot; use --parallel ddp")
        try:
            self.settings()
            RewardMix.from_spec(self.reward)
        except (ValueError, RewardSpecError) as exc:
            err.append(str(exc))
        if self.max_new_tokens >= self.seq_len:
            err.append(f"max_new_tokens ({self.max_new_tokens}) must be < seq_len ({self.seq_len}): "
                       "prompts need room")
        if self.eval_data_path or self.eval_fraction:
            err.append("GRPO has no validation loss: score held-out questions with --eval_gen_data")
        mu = self.inner_updates
        if mu > 1 and (not self.max_steps or self.max_steps % mu or self.save_every % mu):
            err.append(f"inner_updates {mu}: max_steps (> 0) and save_every must be multiples of it "
                       "(a checkpoint holds no half-used rollout)")
        return err

    def settings(self) -> grpo.GRPOSettings:
        return grpo.GRPOSettings(self.loss, self.group_size, self.beta, self.eps_low, self.eps_high,
                                 self.inner_updates, self.scale_rewards, self.max_new_tokens,
                                 self.temperature, self.top_p, self.think)


def main() -> None:
    cfg = parse_config(GRPOConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    if env.is_main and not cfg.init_from:
        print("[warn] no --init_from: RL on a randomly initialised model rarely earns a reward", flush=True)
    tokenizer = load_tokenizer(cfg)
    records, skipped = grpo.load_prompts(cfg.data_path, cfg.dataset_dir, cfg.seed)
    prompts = grpo.PromptDataset(records, tokenizer, cfg.seq_len - cfg.max_new_tokens, cfg.think)
    if env.is_main:
        print(f"[data] {len(prompts)} prompts with gold answers ({skipped} records without one skipped)",
              flush=True)
    model = build_model(cfg, tokenizer).to(env.device)
    settings = cfg.settings()

    reference = None
    if cfg.beta > 0 or cfg.track_kl:
        if cfg.use_lora:
            reference = adapter_reference
        else:
            ref = frozen_copy(model)
            if cfg.expert_backend() != "torch":   # the frozen reference runs its experts in torch
                offload_experts(ref, "torch")
            reference = frozen_reference(ref.to(env.device))

    rollouts = Rollouts(prompts, RewardMix.from_spec(cfg.reward), settings.rollout, tokenizer, reference,
                        seed=cfg.seed, rank=env.rank)
    samples = SampleLog(Path(cfg.out_dir) / "rollouts.jsonl", cfg.sample_every or cfg.log_every) \
        if env.is_main else None
    # the step fit resumes at: rollout seeds are a function of the step (trainer/rollout.py)
    resume = resolve_resume(cfg.resume, cfg.out_dir, log=lambda *_: None)
    loss = grpo.GRPOLoss(settings, rollouts, cfg.grad_accum,
                         start_step=verify_checkpoint(resume)["step"] if resume else 0, samples=samples)
    args = fit_args(model, cfg)
    args["after_step"] = [*args.get("after_step", []), loss.after_step]
    result = fit(model, prompts, loss, cfg, eval_hooks=generation_hooks(cfg, tokenizer), **args)
    finish(model, cfg, env, result, adapter=cfg.use_lora)


if __name__ == "__main__":
    run_cli(main)
