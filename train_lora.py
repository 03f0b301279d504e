r"""LoRA fine-tuning on chat data: a frozen base model plus trainable low-rank adapters.

    python train_lora.py --init_from out/sft/final --data_path data/synthetic/sft.jsonl \
        --lora_rank 16 --lora_target all --max_steps 500
    python train_lora.py --config lora.yaml     # LLaMA-Factory keys: lora_rank, lora_alpha,
                                                # lora_dropout, lora_target, use_rslora
    torchrun --nproc_per_node=2 train_lora.py ...

Same data and loss as full SFT (assistant tokens only); only the adapters train. out_dir/final gets
adapter_model.safetensors + adapter_config.json (naming its base; model.lora.load_adapter reads
them), as does every checkpoint: PEFT's format where PEFT has an exact equivalent (load it with
PeftModel.from_pretrained on `scripts/convert_model.py export` of the base), else ours (expert
adapters; the run says so); --merge_on_save adds out_dir/final_merged/, a plain model folder.
The adapter plumbing (options, attach, export) lives in trainer/adapters.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import run_cli
from dataset.lm_dataset import make_collate
from trainer import distributed as dist
from trainer.adapters import LoRAOptions
from trainer.config import parse_config
from trainer.loop import fit
from trainer.losses import lm_loss
from trainer.stage import build_model, finish, fit_args, generation_hooks, load_data, load_tokenizer


@dataclass
class LoRATrainConfig(LoRAOptions):
    """LoRA-SFT options. lr 1e-4 as MiniMind: adapters start at zero and are small, so they
    take a ~10x larger lr than full SFT (1e-5). No weight decay: it would pull the adapters
    back to the base model, and LoRA's low rank already regularises."""

    out_dir: str = "out/lora"
    lr: float = 1e-4
    weight_decay: float = 0.0
    seq_len: int = 512
    batch_size: int = 16
    epochs: float = 2.0

    def _problems(self) -> list[str]:
        return super()._problems() + ([] if self.init_from else
                                      ["LoRA trains adapters on a base model: pass --init_from MODEL_DIR"])


def main() -> None:
    cfg = parse_config(LoRATrainConfig, description=__doc__)
    env = dist.init_distributed(cfg.device)
    tokenizer = load_tokenizer(cfg)
    train, evals = load_data(cfg, "sft", tokenizer, env)
    model = build_model(cfg, tokenizer)
    result = fit(model, train, lm_loss, cfg, eval_data=evals, collate_fn=make_collate(tokenizer.pad_id),
                 eval_hooks=generation_hooks(cfg, tokenizer), **fit_args(model, cfg))
    finish(model, cfg, env, result, adapter=True)


if __name__ == "__main__":
    run_cli(main)
