r"""Stage 2, supervised fine-tuning on chat data ({"conversations": [...]} JSONL): full or LoRA.

    python train_full_sft.py --init_from out/pretrain/final --data_path data/synthetic/sft.jsonl \
        --max_steps 1000 --eval_fraction 0.02 --eval_every 100
    python train_full_sft.py --config examples/gsm8k_sft.yaml     # LLaMA-Factory-style YAML
    torchrun --nproc_per_node=2 train_full_sft.py ...      # same flags, data sharded over ranks

Conversations are rendered with the tokenizer's ChatML template; the loss covers the assistant
replies only (labels -100 elsewhere) and is averaged over all supervised tokens of a step, so short
and long answers weigh by their tokens. The model's shape comes from init_from's config.json.
LLaMA-Factory's data options: `--packing` (several conversations per seq_len row, attention kept
inside each and positions restarting: every conversation trains as if alone, with far less
padding), `--train_on_prompt`, `--mask_history`; the same flags work in train_lora.py and
train_distillation.py.

`finetuning_type: lora` (LLaMA-Factory's key) trains adapters instead, exactly as train_lora.py
does (lora_rank, lora_alpha, lora_target, ...; out_dir/final is then an adapter). MoE experts on
kt-kernel (`use_kt: true`): the kernel holds the routed experts' base weights frozen, so full SFT
trains everything else (attention, router, shared experts, embeddings) and the routed experts not
at all, while `finetuning_type: lora` with lora_target covering the experts adapts them too (what
LLaMA-Factory-KT requires). `eval_gen_data` adds generation accuracy to each evaluation.
All options: `--help`, or a YAML file via `--config`.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import run_cli
from dataset.lm_dataset import make_collate
from trainer import distributed as dist
from trainer.adapters import FinetuningChoice
from trainer.config import option, parse_config
from trainer.loop import fit
from trainer.losses import lm_loss
from trainer.stage import build_model, finish, fit_args, generation_hooks, load_data, load_tokenizer


@dataclass
class SFTConfig(FinetuningChoice):
    """SFT options (defaults after MiniMind: lr 1e-5 for a pretrained 26M+ model, bf16; with
    finetuning_type lora set lr ~1e-4, as train_lora.py does)."""

    out_dir: str = "out/sft"
    lr: float = 1e-5
    seq_len: int = 512
    batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 2.0


def main() -> None:
    cfg = parse_config(SFTConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    if env.is_main and not cfg.init_from and not cfg.resume:
        print("[warn] no --init_from: fine-tuning a randomly initialised model", flush=True)
    tokenizer = load_tokenizer(cfg)
    train, evals = load_data(cfg, "sft", tokenizer, env)
    model = build_model(cfg, tokenizer)
    result = fit(model, train, lm_loss, cfg, eval_data=evals, collate_fn=make_collate(tokenizer.pad_id),
                 eval_hooks=generation_hooks(cfg, tokenizer), **fit_args(model, cfg))
    finish(model, cfg, env, result, adapter=cfg.use_lora)


if __name__ == "__main__":
    run_cli(main)
