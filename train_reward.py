"""Reward model (LLaMA-Factory's `rm` stage) on {"chosen": [...], "rejected": [...]} JSONL.

    python train_reward.py --init_from out/sft/final --data_path data/synthetic/dpo.jsonl \
        --eval_data_path data/synthetic/dpo_test.jsonl --max_steps 200
    python train_reward.py ... --finetuning_type lora     # adapters + the value head train
    python train_grpo.py ... --reward reward_model:out/reward/final        # RL on its score

A scalar value head on the model (trainer/reward_model.py) scores a conversation by its value at
the last token; the Bradley–Terry loss -log σ(r_chosen - r_rejected) trains it, on the same data
DPO reads (files or registry entries with `ranking: true`). Each evaluation logs
val/<set>/rm/accuracy, the pairwise accuracy on held-out pairs (--eval_data_path or
--eval_fraction). out_dir/final is a model folder (the body, LoRA merged) plus
value_head.safetensors; trainer.reward_model.load_reward_model loads it back, and GRPO takes it
as `--reward reward_model:PATH`. init_from may be a reward model folder: its head is kept.

Defaults: lr 1e-5 (LLaMA-Factory's reward-model examples), 1e-4 with LoRA; the lm_head gets no
gradient (only the value head reads the hidden states) and stays frozen.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import run_cli
from dataset.lm_dataset import make_collate
from trainer import distributed as dist
from trainer import reward_model as rm
from trainer.adapters import FinetuningChoice
from trainer.config import option, parse_config
from trainer.loop import fit
from trainer.stage import build_model, fit_args, load_data, load_tokenizer, summary


@dataclass
class RewardConfig(FinetuningChoice):
    """Reward-model options; lr `0` means "the default for this setup" (resolved on parse)."""

    out_dir: str = "out/reward"
    lr: float = option(0.0, "peak lr (0 = 1e-5 full or freeze, 1e-4 with finetuning_type lora)")
    seq_len: int = 512
    batch_size: int = option(8, "preference pairs per micro-batch per process")
    epochs: float = 1.0
    center_rewards_coefficient: float = option(0.0, "TRL's: + c·(r_c + r_r)² keeps the rewards' mean "
                                               "near 0 (e.g. 0.01; 0 = off)")

    def __post_init__(self) -> None:
        if self.lr == 0:
            self.lr = 1e-4 if self.use_lora else 1e-5

    def _problems(self) -> list[str]:
        err = super()._problems()
        if self.center_rewards_coefficient < 0:
            err.append(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
        if self.compile:   # token_values hooks the final norm per call: dynamo would recompile each time
            err.append("compile: the reward stage reads hidden states through a hook; run it uncompiled")
        if self.eval_gen_data:
            err.append("eval_gen_data: a reward model does not generate; use --eval_data_path pairs")
        return err


def main() -> None:
    cfg = parse_config(RewardConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    tokenizer = load_tokenizer(cfg)
    train, evals = load_data(cfg, "dpo", tokenizer, env)
    model = build_model(cfg, tokenizer)
    if cfg.init_from and rm.is_reward_model(cfg.init_from):
        rm.load_value_head(model, cfg.init_from)
    head = rm.add_value_head(model)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.requires_grad_(False)   # no gradient reaches it (DDP would wait for one)
    args = fit_args(model, cfg)
    if "trainable" in args:                   # lora / freeze: the head trains as well
        args["trainable"] = [*args["trainable"], *head.parameters()]
    result = fit(model, train, rm.make_reward_loss(cfg.center_rewards_coefficient), cfg, eval_data=evals,
                 collate_fn=make_collate(tokenizer.pad_id), **args)
    if env.is_main:
        out = rm.save_reward_model(model, f"{cfg.out_dir}/final")
        print(f"[done] reward model saved to {out}", flush=True)
        print(summary(result), flush=True)
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    run_cli(main)
