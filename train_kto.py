"""KTO on unpaired feedback: {"conversations": [...], "label": true|false} JSONL.

    python train_kto.py --init_from out/sft/final --data_path data/synthetic/kto.jsonl --max_steps 300
    python train_kto.py ... --finetuning_type lora      # adapters; reference = base (adapters off)
    python train_kto.py ... --desirable_weight 1.33    # when desirable samples are scarcer
    torchrun --nproc_per_node=2 train_kto.py ...

Each sample is one completion and whether it is desirable (LLaMA-Factory's `kto_tag`; registry
entries with a kto_tag column read the same way). The loss (trainer/kto.py, after the KTO paper
and TRL) pushes desirable completions above and undesirable ones below a reference point: the
policy's KL to the reference, estimated on each batch's mismatched prompt/completion pairs.
Logged: kl, rewards/chosen, rewards/rejected, rewards/margins (implicit rewards β·log π/π_ref).
`python -m dataset.synthetic` writes kto.jsonl, its DPO pairs unpaired.

Reference model as train_dpo.py's: the policy with its adapters off under LoRA, else a frozen
copy of the initial weights. Defaults as train_dpo.py (β 0.1, lr 5e-6 full / 5e-5 LoRA);
batch_size >= 2 so that the mismatched pairs are really mismatched.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import run_cli
from dataset.lm_dataset import make_kto_collate
from trainer import distributed as dist
from trainer import dpo, kto
from trainer.adapters import FinetuningChoice
from trainer.config import option, parse_config, problems_of
from trainer.loop import fit
from trainer.stage import (build_model, finish, fit_args, generation_hooks, load_data, load_tokenizer,
                           reference_model)


@dataclass
class KTOConfig(FinetuningChoice):
    """KTO options; `0` for lr means "the default for this setup" (resolved on parse)."""

    out_dir: str = "out/kto"
    lr: float = option(0.0, "peak lr (0 = 5e-6 full or freeze, 5e-5 with finetuning_type lora)")
    seq_len: int = 512
    batch_size: int = option(8, "samples per micro-batch per process (their completions, rotated "
                             "by one, make the KL estimate's mismatched pairs)")
    epochs: float = 1.0
    beta: float = option(0.1, "β")
    desirable_weight: float = option(1.0, "λ_D, weight of desirable samples (LLaMA-Factory: kto_chosen_weight)")
    undesirable_weight: float = option(1.0, "λ_U, weight of undesirable samples (kto_rejected_weight)")
    sft_weight: float = option(0.0, "weight of an NLL term on the desirable completions (0 = off)")

    def __post_init__(self) -> None:
        if self.lr == 0:
            self.lr = 5e-5 if self.use_lora else 5e-6

    def _problems(self) -> list[str]:
        return super()._problems() + problems_of(self.settings)

    def settings(self) -> kto.KTOSettings:
        return kto.KTOSettings(self.beta, self.desirable_weight, self.undesirable_weight, self.sft_weight)


def main() -> None:
    cfg = parse_config(KTOConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    if env.is_main and not cfg.init_from:
        print("[warn] no --init_from: KTO on a randomly initialised model", flush=True)
    if env.is_main and cfg.batch_size < 2:
        print("[warn] batch_size 1: each KL pair is the sample itself, not a mismatched one", flush=True)
    tokenizer = load_tokenizer(cfg)
    train, evals = load_data(cfg, "kto", tokenizer, env)
    model = build_model(cfg, tokenizer).to(env.device)   # init_from's weights: also the reference's
    reference = dpo.reference_logps(reference_model(model, cfg, env))
    result = fit(model, train, kto.make_kto_loss(cfg.settings(), reference), cfg, eval_data=evals,
                 collate_fn=make_kto_collate(tokenizer.pad_id, cfg.seq_len),
                 eval_hooks=generation_hooks(cfg, tokenizer), **fit_args(model, cfg))
    finish(model, cfg, env, result, adapter=cfg.use_lora)


if __name__ == "__main__":
    run_cli(main)
