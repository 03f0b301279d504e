"""Preference optimisation (DPO / hinge / IPO / SimPO / ORPO) on {"chosen": [...], "rejected": [...]} JSONL.

    python train_dpo.py --init_from out/sft/final --data_path data/synthetic/dpo.jsonl --max_steps 300
    python train_dpo.py ... --finetuning_type lora      # adapters; reference = base (adapters off)
    python train_dpo.py ... --precompute_ref           # reference log-probs once, no second model
    python train_dpo.py ... --loss simpo               # reference-free
    python train_dpo.py ... --loss orpo                # reference-free: SFT NLL + β·odds-ratio term
    python train_dpo.py ... --finetuning_type freeze --freeze_trainable_layers 2
    torchrun --nproc_per_node=2 train_dpo.py ...

Reference model: with LoRA the policy itself with adapters disabled (no copy); else a frozen deep
copy of the initial weights, or (--precompute_ref) a table of reference log-probs computed before
training. Logged: loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins.

Defaults that learn (MiniMind's lr 4e-8 leaves the loss at 0.693): lr 5e-6 for full fine-tuning,
5e-5 with LoRA (adapters start at zero and need ~10x more), β 0.1 on summed log-probs. At these
settings rewards/margins grows within the first hundred steps; if accuracy rises while both
rewards fall fast, lower lr or add --sft_weight 0.1..1 to keep the chosen answers likely.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from common.errors import run_cli
from dataset.lm_dataset import make_collate
from trainer import distributed as dist
from trainer import dpo
from trainer.adapters import FinetuningChoice
from trainer.config import option, parse_config, problems_of
from trainer.loop import fit, make_autocast
from trainer.stage import (build_model, finish, fit_args, generation_hooks, load_data, load_tokenizer,
                           reference_model)


@dataclass
class DPOConfig(FinetuningChoice):
    """DPO options; `0` for lr or beta means "the default for this setup" (resolved on parse)."""

    out_dir: str = "out/dpo"
    lr: float = option(0.0, "peak lr (0 = 5e-6 full, 5e-5 with finetuning_type lora)")
    seq_len: int = 512
    batch_size: int = option(8, "preference pairs per micro-batch per process")
    epochs: float = 1.0
    loss: str = option("sigmoid", "sigmoid (DPO), hinge, ipo, simpo or orpo (the last two "
                       "reference-free)", choices=dpo.LOSS_TYPES)
    beta: float = option(0.0, "β (0 = 0.1 for sigmoid/hinge/ipo/orpo, 2.0 for simpo); ORPO's λ")
    label_smoothing: float = option(0.0, "conservative DPO: assumed label-noise rate ε in [0, 0.5)")
    simpo_gamma: float = option(1.0, "SimPO target reward margin γ")
    sft_weight: float = option(0.0, "weight of an NLL term on the chosen answers (0 = off)")
    precompute_ref: bool = option(False, "compute reference log-probs once before training")

    def __post_init__(self) -> None:
        if self.lr == 0:
            self.lr = 5e-5 if self.use_lora else 5e-6
        if self.beta == 0:
            self.beta = dpo.DEFAULT_BETA.get(self.loss, 0.1)

    def _problems(self) -> list[str]:
        return super()._problems() + problems_of(self.settings)

    def settings(self) -> dpo.PreferenceSettings:
        return dpo.PreferenceSettings(self.loss, self.beta, self.label_smoothing, self.simpo_gamma,
                                      self.sft_weight)


def main() -> None:
    cfg = parse_config(DPOConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    if env.is_main and not cfg.init_from:
        print("[warn] no --init_from: preference-tuning a randomly initialised model", flush=True)
    tokenizer = load_tokenizer(cfg)
    train, evals = load_data(cfg, "dpo", tokenizer, env)
    model = build_model(cfg, tokenizer).to(env.device)   # init_from's weights: also the reference's
    collate = make_collate(tokenizer.pad_id)
    settings = cfg.settings()

    reference = None
    if settings.needs_reference and cfg.precompute_ref:
        table = functools.partial(dpo.precompute_reference_logps, model, collate_fn=collate, env=env,
                                  batch_size=cfg.batch_size,   # the loop's autocast: step 0 matches
                                  autocast=make_autocast(env.device.type, cfg.dtype))
        train = dpo.WithReferenceLogps(train, table(train))
        evals = {name: dpo.WithReferenceLogps(ds, table(ds)) for name, ds in evals.items()}
        collate, reference = dpo.collate_with_reference(collate), dpo.precomputed_reference
    elif settings.needs_reference:
        reference = dpo.reference_logps(reference_model(model, cfg, env))

    result = fit(model, train, dpo.make_dpo_loss(settings, reference), cfg, eval_data=evals,
                 collate_fn=collate, eval_hooks=generation_hooks(cfg, tokenizer), **fit_args(model, cfg))
    finish(model, cfg, env, result, adapter=cfg.use_lora)


if __name__ == "__main__":
    run_cli(main)
