"""What the stages that train LoRA adapters share (train_lora.py, and train_full_sft.py /
train_dpo.py with `finetuning_type: lora`): the adapter options, attaching adapters to a loaded
base, and saving adapters in checkpoints and at the end.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from model.lora import apply_lora, export_merged, lora_parameters, save_adapter
from trainer import distributed as dist
from trainer.checkpoint import load_weights
from trainer.config import TrainConfig, option


@dataclass
class LoRAOptions(TrainConfig):
    """Adapter options, named as in LLaMA-Factory so its YAML keys work unchanged."""

    lora_rank: int = option(16, "adapter rank r (MiniMind: 16)")
    lora_alpha: float = option(0.0, "scale numerator: s = alpha/r (0 = 2*rank, LLaMA-Factory's default)")
    lora_dropout: float = option(0.0, "dropout on the adapter input")
    lora_target: str = option("all", "'all' (every Linear but lm_head/router), 'all_attention', "
                            "or comma-separated module names such as q_proj,v_proj")
    use_rslora: bool = option(False, "rank-stabilised scaling s = alpha/sqrt(r)")
    merge_on_save: bool = option(False, "also write out_dir/final_merged: base + adapters folded in")

    def _problems(self) -> list[str]:
        bad = self.lora_rank < 0 or (self.lora_alpha or 0.0) < 0 or not 0.0 <= self.lora_dropout < 1.0
        got = f"{self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}"
        return super()._problems() + ([f"need lora_rank, lora_alpha >= 0, lora_dropout in [0, 1); got {got}"]
                                      if bad else [])


@dataclass
class FinetuningChoice(LoRAOptions):
    """Stages that train either every weight or adapters (SFT, DPO), switched as in LLaMA-Factory."""

    finetuning_type: str = option("full", "full: every weight trains; lora: adapters only "
                                "(lora_* options, out_dir/final = the adapter)", choices=("full", "lora"))

    @property
    def use_lora(self) -> bool:
        return self.finetuning_type == "lora"

    def _problems(self) -> list[str]:
        err = super()._problems()
        if self.finetuning_type not in ("full", "lora"):
            err.append(f"finetuning_type must be full or lora, got {self.finetuning_type!r}")
        if self.use_lora and self.lora_rank < 1:
            err.append("finetuning_type lora needs lora_rank >= 1")
        return err


def base_name(cfg: TrainConfig) -> str | None:
    """What adapter_config.json records as the base model: init_from's absolute path."""
    return str(Path(cfg.init_from).resolve()) if cfg.init_from else None


def adapter_files(model: nn.Module, base: str | None) -> dict[str, bytes]:
    """The adapter's two files as bytes (for checkpoints, which write them atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(dist.unwrap(model), tmp, base_model=base)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def attach_lora(model: nn.Module, cfg: LoRAOptions
                ) -> tuple[list[nn.Parameter], TrainConfig, Callable[[nn.Module, int], dict[str, bytes]]]:
    """Load the base weights, add adapters; returns (trainable, the cfg for fit, on_save).

    fit gets `init_from=''`: it would load init_from strictly into the *adapted* model and miss
    the lora_A/lora_B keys. Resume is unaffected: checkpoints hold the adapted model's state."""
    if cfg.init_from:
        load_weights(cfg.init_from, model)
    alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
    apply_lora(model, cfg.lora_target, cfg.lora_rank, alpha, cfg.lora_dropout, cfg.use_rslora)
    base = base_name(cfg)
    on_save = lambda m, step: adapter_files(m, base)  # noqa: E731
    return lora_parameters(model), dataclasses.replace(cfg, init_from=""), on_save


def export_adapter(model: nn.Module, cfg: LoRAOptions, env: dist.DistEnv) -> Path:
    """out_dir/final = the adapter (+ out_dir/final_merged with --merge_on_save), on rank 0."""
    out = Path(cfg.out_dir) / "final"
    if env.is_main:
        save_adapter(dist.unwrap(model), out, base_model=base_name(cfg))
        print(f"[done] adapter saved to {out}", flush=True)
        if cfg.merge_on_save:
            merged = export_merged(dist.unwrap(model), out.with_name("final_merged"))
            print(f"[done] merged model saved to {merged}", flush=True)
    dist.barrier()
    return out
