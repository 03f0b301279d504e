"""RL with verifiable rewards (GRPO / DAPO / CISPO) on prompts with gold answers.

    python train_grpo.py --init_from out/sft/final --data_path data/gsm8k_train.jsonl --max_steps 200
    python train_grpo.py ... --loss grpo --beta 0.04          # DeepSeekMath's GRPO with a KL penalty
    python train_grpo.py ... --loss dapo                       # clip-higher, token-level, drop flat groups
    python train_grpo.py ... --finetuning_type lora            # adapters; KL reference = adapters off
    python train_grpo.py ... --reward correctness:1.0,format:0.1,length:0.1
    python train_grpo.py ... --reward reward_model:out/reward/final     # a learned reward, no gold
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

from common.errors import run_cli
from trainer import grpo
from trainer.config import parse_config
from trainer.grpo import GRPOConfig
from trainer.rollout import Rollouts
from trainer.stage import finish


def main() -> None:
    cfg = parse_config(GRPOConfig, description=__doc__)
    env, tokenizer, rewards, prompts, model = grpo.rl_setup(cfg)
    rollouts = Rollouts(prompts, rewards, cfg.settings().rollout, tokenizer,
                        grpo.policy_reference(cfg, model, env), seed=cfg.seed, rank=env.rank)
    result = grpo.fit_rollouts(model, prompts, rollouts, cfg, env, tokenizer)
    finish(model, cfg, env, result, adapter=cfg.use_lora)


if __name__ == "__main__":
    run_cli(main)
