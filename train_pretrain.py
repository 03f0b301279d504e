r"""Stage 1, pretraining: next-token prediction on plain text ({"text": ...} JSONL).

    python train_pretrain.py --data_path data/synthetic/pretrain.jsonl --model_preset tiny \
        --max_steps 2000 --eval_fraction 0.01 --eval_every 200 --save_every 500
    torchrun --nproc_per_node=2 train_pretrain.py ...      # same flags, data sharded over ranks
    python train_pretrain.py --resume ...                  # continue from the newest checkpoint

Documents are packed into seq_len blocks (every token trained, no padding), each wrapped as
<|im_start|> text <|im_end|> like MiniMind. All options: `--help`, or a YAML file via `--config`.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import run_cli
from dataset.lm_dataset import make_collate
from trainer import distributed as dist
from trainer.config import TrainConfig, option, parse_config
from trainer.loop import fit
from trainer.losses import lm_loss
from trainer.stage import build_model, finish, fit_args, generation_hooks, load_data, load_tokenizer


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining options (defaults after MiniMind: lr 5e-4, cosine to 10 %, bf16)."""

    out_dir: str = "out/pretrain"
    lr: float = 5e-4
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 0
    packed: bool = option(True, "pack documents into seq_len blocks (else one padded document per row)")


def main() -> None:
    cfg = parse_config(PretrainConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    tokenizer = load_tokenizer(cfg)
    train, evals = load_data(cfg, "pretrain", tokenizer, env, mode="packed" if cfg.packed else "padded")
    model = build_model(cfg, tokenizer)
    result = fit(model, train, lm_loss, cfg, eval_data=evals, collate_fn=make_collate(tokenizer.pad_id),
                 eval_hooks=generation_hooks(cfg, tokenizer), **fit_args(model, cfg))
    finish(model, cfg, env, result)


if __name__ == "__main__":
    run_cli(main)
