"""PPO (upstream MiniMind's train_ppo.py, TRL's PPOTrainer) on prompts, with verifiable rewards
or a reward model.

    python train_ppo.py --init_from out/sft/final --data_path data/gsm8k_train.jsonl --max_steps 200
    python train_ppo.py ... --reward reward_model:out/reward/final     # open-ended prompts, RM score
    python train_ppo.py ... --finetuning_type lora     # adapters + value head; reference = adapters off
    python train_ppo.py ... --target_kl 0.02           # stop a rollout's epochs early past 1.5x this
    torchrun --nproc_per_node=2 train_ppo.py ...       # each rank rolls out its own prompts

Prompts as in train_grpo.py (SFT conversations up to their last assistant turn, GSM8K / MATH /
commonsense eval files, registry names). Each rollout samples samples_per_prompt completions per
prompt (one batched KV-cache decode, trainer/rollout.py), scores them (trainer/rewards.py), and
trains ppo_epochs optimizer steps on it (trainer/ppo.py): per-token rewards with a KL penalty to
the reference, GAE from a value head on the policy's own hidden states, the clipped policy and
value losses. out_dir/final is the policy (a plain model folder, or the LoRA adapter folder) with
the critic beside it as value_head.safetensors.
Logged: score, reward, accuracy, kl, non_score_reward, value, return, policy_loss, value_loss,
clip_frac, value_clip_frac, approx_kl, early_stop, entropy, response_len, rollout_tok_s, gen_share.

Defaults: TRL's PPO (γ 1, λ 0.95, ε 0.2, ε_v 0.2, vf_coef 0.1, kl_coef 0.05, 4 epochs per
rollout); lr 1e-5 full / 1e-4 LoRA, no weight decay.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import run_cli
from trainer import distributed as dist
from trainer import grpo, ppo
from trainer import reward_model as rm
from trainer.checkpoint import resolve_resume, verify_checkpoint
from trainer.config import option, parse_config
from trainer.loop import fit
from trainer.rollout import Rollouts, SampleLog
from trainer.stage import finish, fit_args, generation_hooks, reference_model


@dataclass
class PPOConfig(grpo.RLOptions):
    """PPO options (prompts, rewards, sampling and lr: grpo.RLOptions)."""

    out_dir: str = "out/ppo"
    batch_size: int = option(8, "prompts per micro-batch per process")
    samples_per_prompt: int = option(1, "completions sampled per prompt")
    ppo_epochs: int = option(4, "optimizer steps per rollout (checkpoints fall on multiples)")
    cliprange: float = option(0.2, "ε: clip of the policy ratio")
    cliprange_value: float = option(0.2, "ε_v: clip of the value update")
    vf_coef: float = option(0.1, "weight of the value loss")
    gamma: float = option(1.0, "discount over reply tokens")
    lam: float = option(0.95, "GAE λ")
    kl_coef: float = option(0.05, "β: per-token KL penalty to the reference in the reward (0 = none)")
    target_kl: float = option(0.0, "early stop: a rollout's remaining epochs are skipped once the "
                              "approx KL to the sampling policy exceeds 1.5x this (0 = never)")

    def _problems(self) -> list[str]:
        err = super()._problems() + grpo.rl_problems(self, "PPO", "ppo_epochs")
        if self.compile:   # the critic reads hidden states through a per-call hook
            err.append("compile: PPO's critic reads hidden states through a hook; run it uncompiled")
        return err

    def settings(self) -> ppo.PPOSettings:
        return ppo.PPOSettings(self.ppo_epochs, self.cliprange, self.cliprange_value, self.vf_coef,
                               self.gamma, self.lam, self.kl_coef, self.target_kl,
                               self.samples_per_prompt, self.max_new_tokens, self.temperature, self.top_p)


def main() -> None:
    cfg = parse_config(PPOConfig, description=__doc__)
    env, tokenizer, rewards, prompts, model = grpo.rl_setup(cfg)
    settings = cfg.settings()
    reference = reference_model(model, cfg, env) if cfg.kl_coef > 0 else None
    head = rm.add_value_head(model)        # the critic: zero at the start, so V = 0 everywhere

    rollouts = Rollouts(prompts, rewards, settings.rollout, tokenizer, reference, seed=cfg.seed, rank=env.rank)
    samples = SampleLog(Path(cfg.out_dir) / "rollouts.jsonl", cfg.sample_every or cfg.log_every) \
        if env.is_main else None
    # the step fit resumes at: rollout seeds are a function of the step (trainer/rollout.py)
    resume = resolve_resume(cfg.resume, cfg.out_dir, log=lambda *_: None)
    loss = ppo.PPOLoss(settings, rollouts, cfg.grad_accum,
                       start_step=verify_checkpoint(resume)["step"] if resume else 0, samples=samples)
    args = fit_args(model, cfg)
    if "trainable" in args:                # lora / freeze: the value head trains as well
        args["trainable"] = [*args["trainable"], *head.parameters()]
    args["after_step"] = [*args.get("after_step", []), loss.after_step]
    result = fit(model, prompts, loss, cfg, eval_hooks=generation_hooks(cfg, tokenizer), **args)
    with rm.detached_head(dist.unwrap(model)):   # the policy alone: a plain model / adapter folder
        finish(model, cfg, env, result, adapter=cfg.use_lora)
    if env.is_main:
        rm.save_value_head(head, Path(cfg.out_dir) / "final")


if __name__ == "__main__":
    run_cli(main)
