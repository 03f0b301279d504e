"""What the stages that train part of a base share (train_lora.py, and train_full_sft.py /
train_dpo.py / ... with `finetuning_type: lora` or `freeze`): the adapter options, the LoRA
transform that trainer.stage.build_model applies to the loaded base, saving adapters in
checkpoints and at the end, and freeze fine-tuning's choice of trainable layers.

Freeze (LLaMA-Factory's `finetuning_type: freeze`): only the last N decoder layers train (first N
for N < 0), optionally only some modules of them, plus named modules outside the layers. As with
LoRA, fit is given those parameters as `trainable`, so every checkpoint holds them alone plus a
reference to the base folder (trainer/checkpoint.py); out_dir/final is a whole model folder, as
LLaMA-Factory writes for freeze.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from common.errors import UserError

from convert.peft import peft_incompatibility, save_peft_adapter
from model.lora import apply_lora, export_merged, lora_parameters, save_adapter
from trainer import distributed as dist
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

    @property
    def use_lora(self) -> bool:
        """Whether the stage trains adapters (always here; FinetuningChoice makes it a choice)."""
        return True

    def _problems(self) -> list[str]:
        err = super()._problems()
        if self.lora_rank < 0 or (self.lora_alpha or 0.0) < 0 or not 0.0 <= self.lora_dropout < 1.0:
            err.append("need lora_rank, lora_alpha >= 0, lora_dropout in [0, 1); got "
                       f"{self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}")
        if self.use_lora and self.lora_rank < 1:
            err.append("LoRA training needs lora_rank >= 1")
        if self.use_lora and self.merge_on_save and self.parallel == "fsdp":
            err.append("merge_on_save with parallel fsdp: the merge reads the sharded weights on "
                       "one rank; merge afterwards (scripts/convert_model.py export --model BASE "
                       "--lora OUT_DIR/final --out DIR writes the merged model)")
        return err


FINETUNING_TYPES = ("full", "lora", "freeze")


@dataclass
class FinetuningChoice(LoRAOptions):
    """Stages that train every weight, adapters or the last layers (SFT, DPO, ...), switched and
    named as in LLaMA-Factory (its `freeze_*` keys work unchanged)."""

    finetuning_type: str = option("full", "full: every weight trains; lora: adapters only "
                                "(lora_* options, out_dir/final = the adapter); freeze: only the "
                                "freeze_* layers/modules", choices=FINETUNING_TYPES)
    freeze_trainable_layers: int = option(2, "freeze: train the last N decoder layers (N < 0: the first |N|)")
    freeze_trainable_modules: str = option("all", "freeze: modules of those layers that train: 'all' "
                                         "or comma-separated names such as mlp,self_attn or q_proj")
    freeze_extra_modules: str = option("", "freeze: comma-separated modules outside the layers that "
                                     "also train (embed_tokens, norm, lm_head)")

    @property
    def use_lora(self) -> bool:
        return self.finetuning_type == "lora"

    @property
    def use_freeze(self) -> bool:
        return self.finetuning_type == "freeze"

    def _problems(self) -> list[str]:
        err = super()._problems()
        if self.finetuning_type not in FINETUNING_TYPES:
            err.append(f"finetuning_type must be one of {FINETUNING_TYPES}, got {self.finetuning_type!r}")
        if self.use_freeze and self.freeze_trainable_layers == 0:
            err.append("freeze_trainable_layers must not be 0 (N > 0: the last N layers, N < 0: the first)")
        if self.use_freeze and not self.init_from:
            err.append("finetuning_type freeze trains part of a base model: pass --init_from MODEL_DIR")
        return err


def _names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


def freeze_trainable(model: nn.Module, cfg: FinetuningChoice) -> list[nn.Parameter]:
    """The parameters freeze fine-tuning trains (LLaMA-Factory's `_setup_freeze_tuning`): every
    parameter of the chosen decoder layers whose module path holds one of
    `freeze_trainable_modules` ('all' = the whole layer), plus the modules outside the layers
    named by `freeze_extra_modules`. A name that matches nothing is a UserError naming it."""
    plain = dist.unwrap(model)
    n_layers = len(plain.model.layers)
    k = cfg.freeze_trainable_layers
    if abs(k) > n_layers:
        raise UserError(f"freeze_trainable_layers: {k}, but the model has {n_layers} layers")
    layers = range(n_layers - k, n_layers) if k > 0 else range(-k)
    wanted = _names(cfg.freeze_trainable_modules)
    chosen: dict[int, nn.Parameter] = {}

    def take(module: nn.Module) -> None:
        chosen.update((id(p), p) for p in module.parameters())

    for i in layers:
        layer = plain.model.layers[i]
        if wanted == ["all"]:
            take(layer)
            continue
        for name in wanted:
            hits = [m for path, m in layer.named_modules() if name in path.split(".")]
            if not hits:
                have = sorted({p.split(".")[-1] for p, _ in layer.named_modules() if p})
                raise UserError(f"freeze_trainable_modules: layer {i} has no module {name!r} "
                                f"(it has: {', '.join(have)})")
            for m in hits:
                take(m)
    for name in _names(cfg.freeze_extra_modules):
        hits = [m for path, m in plain.named_modules()
                if name in path.split(".") and ".layers." not in f".{path}."]
        if not hits:
            raise UserError(f"freeze_extra_modules: the model has no module {name!r} outside its "
                            "layers (try embed_tokens, norm, lm_head)")
        for m in hits:
            take(m)
    return list(chosen.values())


def base_name(cfg: TrainConfig) -> str | None:
    """What adapter_config.json records as the base model: init_from's absolute path."""
    return str(Path(cfg.init_from).resolve()) if cfg.init_from else None


def adapter_files(model: nn.Module, base: str | None, peft_format: bool) -> dict[str, bytes]:
    """The adapter's two files as bytes (for checkpoints, which write them atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        save = save_peft_adapter if peft_format else save_adapter
        save(dist.unwrap(model), tmp, base_model=base)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def add_lora(model: nn.Module, cfg: LoRAOptions) -> None:
    """The LoRA transform: adapters (B = 0, so the model still equals its base) on cfg's targets.
    Applied by trainer.stage.build_model after the base weights are loaded."""
    alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
    apply_lora(model, cfg.lora_target, cfg.lora_rank, alpha, cfg.lora_dropout, cfg.use_rslora)


def lora_fit_args(model: nn.Module, cfg: LoRAOptions
                  ) -> tuple[list[nn.Parameter], Callable[[nn.Module, int], dict[str, bytes]]]:
    """What fit needs for an adapted model: (trainable = the adapters, on_save = their files,
    in the format the final adapter gets)."""
    base, peft = base_name(cfg), peft_incompatibility(dist.unwrap(model)) is None
    return lora_parameters(model), lambda m, step: adapter_files(m, base, peft)


def export_adapter(model: nn.Module, cfg: LoRAOptions, env: dist.DistEnv) -> Path:
    """out_dir/final = the adapter (+ out_dir/final_merged with --merge_on_save), on rank 0.

    In PEFT's format wherever that is exact (``convert.peft.peft_incompatibility``): PEFT's
    ``PeftModel.from_pretrained`` then loads it on the transformers export of the base, and our
    ``load_adapter`` still checks the base (fingerprint in the safetensors metadata). Elsewhere
    (expert adapters) in our native format, and the output says why.
    """
    out = Path(cfg.out_dir) / "final"
    if env.is_main:
        plain = dist.unwrap(model)
        reason = peft_incompatibility(plain)
        save = save_peft_adapter if reason is None else save_adapter
        save(plain, out, base_model=base_name(cfg))
        print(f"[done] adapter saved to {out} (PEFT format: PeftModel.from_pretrained loads it on "
              "the base exported by scripts/convert_model.py export)" if reason is None else
              f"[done] adapter saved to {out} in the native minimind-lora format: {reason}; "
              "load it with --lora, or merge it (--merge_on_save)", flush=True)
        if cfg.merge_on_save:
            merged = export_merged(plain, out.with_name("final_merged"))
            print(f"[done] merged model saved to {merged}", flush=True)
    dist.barrier()
    return out
