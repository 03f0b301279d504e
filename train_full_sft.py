"""Stage 2, full supervised fine-tuning on chat data ({"conversations": [...]} JSONL).

    python train_full_sft.py --init_from out/pretrain/final --data_path data/synthetic/sft.jsonl \
        --max_steps 1000 --eval_fraction 0.02 --eval_every 100
    torchrun --nproc_per_node=2 train_full_sft.py ...      # same flags, data sharded over ranks

Conversations are rendered with the tokenizer's ChatML template; the loss covers the assistant
replies only (labels -100 elsewhere) and is averaged over all supervised tokens of a step, so short
and long answers weigh by their tokens. The model's shape comes from init_from's config.json.
All options: `--help`, or a YAML file via `--config`.
"""
from __future__ import annotations

from dataclasses import dataclass

from dataset.lm_dataset import make_collate
from trainer import distributed as dist
from trainer.config import TrainConfig, parse_config
from trainer.loop import fit
from trainer.losses import lm_loss
from trainer.stage import build_model, export_final, load_data, load_tokenizer, summary


@dataclass
class SFTConfig(TrainConfig):
    """Full-SFT options (defaults after MiniMind: lr 1e-5 for a pretrained 26M+ model, bf16)."""

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
    result = fit(model, train, lm_loss, cfg, eval_data=evals, collate_fn=make_collate(tokenizer.pad_id))
    export_final(model, cfg, env)
    if env.is_main:
        print(summary(result), flush=True)
    dist.cleanup()


if __name__ == "__main__":
    main()
