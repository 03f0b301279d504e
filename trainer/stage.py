"""Set-up shared by the stage scripts (train_pretrain.py, train_full_sft.py, ...).

Scope: tokenizer, the finished model (fresh from a preset, or init_from's weights; then the
stage's transforms: LoRA, then expert offload), datasets (files or
registry names, per-dataset validation sets, an optional hold-out split) built once on rank 0
while the other ranks wait and then read the token cache, the evaluation hooks handed to fit
(generation accuracy on `eval_gen_data`) and the final model export. What differs between stages
(data kind, loss, trainable parameters, defaults) stays in the scripts.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from dataset.lm_dataset import load_files, split_train_eval
from dataset.registry import load_named_datasets
from model.config import MiniMindConfig
from model.io import save_pretrained
from model.model import MiniMindLM
from model.tokenizer import Tokenizer
from offload.experts import kt_experts, offload_experts, refresh_kt_lora
from trainer import checkpoint as ckpt_io
from trainer import distributed as dist
from trainer.adapters import (FinetuningChoice, LoRAOptions, add_lora, export_adapter, freeze_trainable,
                              lora_fit_args)
from trainer.checkpoint import load_weights
from trainer.config import ConfigError, TrainConfig
from trainer.loop import EvalHook, FitResult
from trainer.reference import ReferenceLogits, adapter_reference, frozen_copy, frozen_reference
from trainer.rng import seed_everything


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The tokenizer of `--tokenizer_dir`, or the shipped default."""
    return Tokenizer.from_dir(cfg.tokenizer_dir or None)


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> MiniMindLM:
    """The finished model a stage trains, the one owner of its initial weights: shaped by
    init_from's config.json and holding its weights (else a fresh, seeded preset model), then
    transformed from outside: LoRA adapters when the stage trains them (`cfg.use_lora`), then
    the routed experts handed to cfg's expert backend (`offload_for_training`).

    fit() only replaces these weights when it resumes from a checkpoint (which holds the
    transformed model's state, adapters included). `fit_args` gives what fit needs for the
    transforms applied here.
    """
    if cfg.init_from:
        config = MiniMindConfig.from_json(Path(cfg.init_from) / "config.json")
    else:
        # A fresh model's vocabulary is its tokenizer's: a preset's 6400 rows would leave a
        # smaller trained tokenizer's extra rows untrained (and cost lm_head time every step).
        config = MiniMindConfig.from_preset(cfg.model_preset, vocab_size=tokenizer.vocab_size)
    if cfg.seq_len > config.max_position_embeddings:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                          f"{config.max_position_embeddings}")
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens, model only {config.vocab_size}")
    seed_everything(cfg.seed)          # same initial weights on every rank and every rerun
    model = MiniMindLM(config)
    if cfg.init_from:
        load_weights(cfg.init_from, model)
    if isinstance(cfg, LoRAOptions) and cfg.use_lora:
        add_lora(model, cfg)
    offload_for_training(model, cfg)
    return model


def offload_for_training(model: MiniMindLM, cfg: TrainConfig) -> None:
    """The expert-offload transform: routed experts to cfg's backend (moe_backend / use_kt).

    After LoRA (the kt kernel runs the expert adapters) and before fit's optimizer reads
    requires_grad: under kt the base expert weights freeze (the kernel holds a bf16 copy it never
    updates), so only expert LoRA trains there. LoRA the kernel cannot run (dropout, mixed
    ranks) is refused on the first forward, before any native call.
    """
    if cfg.expert_backend() == "torch":
        return
    offload_experts(model, cfg.expert_backend(), options=cfg.kt_options())
    if kt_experts(model) and int(os.environ.get("RANK", "0")) == 0:
        lora = any(layer.lora_settings() for layer in kt_experts(model))
        print(f"[train] routed experts run in kt-kernel ({cfg.kt.kt_backend}); their base weights "
              f"are frozen{', expert LoRA trains' if lora else ' (no expert LoRA: they do not train)'}",
              flush=True)


def _refresh_kt(model: nn.Module, step: int) -> None:
    refresh_kt_lora(model)      # kt keeps its own packed copy of the adapters




def fit_args(model: MiniMindLM, cfg: TrainConfig) -> dict[str, Any]:
    """fit's keyword arguments for the transforms build_model applied: with LoRA, `trainable`
    (the adapters) and `on_save` (adapter files in every checkpoint); with freeze, `trainable`
    (the chosen layers: checkpoints then hold them and a reference to init_from); with kt experts,
    `after_step` = the kernel's LoRA refresh after each optimizer step; {} for a plain model."""
    args: dict[str, Any] = {}
    if isinstance(cfg, LoRAOptions) and cfg.use_lora:
        args["trainable"], args["on_save"] = lora_fit_args(model, cfg)
    if isinstance(cfg, FinetuningChoice) and cfg.use_freeze:
        args["trainable"] = freeze_trainable(model, cfg)   # checkpoints: these + base.json
    if kt_experts(model):
        args["after_step"] = [_refresh_kt]
    return args


def reference_model(model: MiniMindLM, cfg: TrainConfig, env: dist.DistEnv) -> ReferenceLogits:
    """The frozen initial policy a preference or RL loss compares against: with LoRA the policy
    itself with its adapters off (no copy); else (full, freeze) a frozen copy of the weights as
    they are now, on env.device, its routed experts back in torch."""
    if isinstance(cfg, LoRAOptions) and cfg.use_lora:
        return adapter_reference
    ref = frozen_copy(model)
    if cfg.expert_backend() != "torch":
        offload_experts(ref, "torch")
    return frozen_reference(ref.to(env.device))


def _load(cfg: TrainConfig, kind: str, names: list[str], tokenizer: Tokenizer,
          options: dict[str, Any]) -> Dataset:
    if cfg.dataset_dir:
        ds = load_named_datasets(names, tokenizer, cfg.seq_len, dataset_dir=cfg.dataset_dir,
                                 seed=cfg.seed, skip_bad_records=cfg.skip_bad_records, **options)
        if ds.kind != kind:
            raise ConfigError(f"{','.join(names)}: {ds.kind} data, but this stage trains on {kind} data")
        return ds
    return load_files(kind, names, tokenizer, cfg.seq_len, skip_bad_records=cfg.skip_bad_records, **options)


def load_data(cfg: TrainConfig, kind: str, tokenizer: Tokenizer, env: dist.DistEnv,
              **options: Any) -> tuple[Dataset, dict[str, Dataset]]:
    """(train set, {name: validation set}); `options` go to the dataset builder (mode, ...)."""
    if not cfg.data_path:
        raise ConfigError("no training data: pass --data_path FILE... "
                          "(e.g. make some with `python -m dataset.synthetic --out data/synthetic`)")
    options = {**cfg.data_options(kind), **options}
    # rank 0 tokenizes and fills the cache, the others read it; a full disk is one line
    with dist.main_process_first(env), ckpt_io.resume_hint_on_write_error(cfg.out_dir):
        train = _load(cfg, kind, cfg.data_path, tokenizer, options)
        evals = {Path(p).name.split(".")[0]: _load(cfg, kind, [p], tokenizer, options)
                 for p in cfg.eval_data_path}
    if env.is_main and hasattr(train, "stats"):
        print(f"[data] train: {train.stats}", flush=True)
    if cfg.eval_fraction:
        train, evals["holdout"] = split_train_eval(train, cfg.eval_fraction, seed=cfg.seed)
    return train, evals


def generation_hooks(cfg: TrainConfig, tokenizer: Tokenizer) -> list[EvalHook]:
    """fit's eval_hooks for `eval_gen_data`: greedy GSM8K-style accuracy on its first
    `eval_gen_samples` questions, logged as `val_gen_accuracy` (+ no-answer / truncated counts).

    Lives here, not in the loop, so trainer/loop.py never imports the evaluation package. Each
    evaluation decodes eval_gen_samples x eval_gen_max_new_tokens tokens: keep both small.
    """
    if not cfg.eval_gen_data:
        return []
    from evaluation.runner import generation_accuracy
    from tasks import gsm8k
    items = gsm8k.load(cfg.eval_gen_data, limit=cfg.eval_gen_samples)
    if not items:
        raise ConfigError(f"eval_gen_data {cfg.eval_gen_data!r} holds no questions")

    def hook(model: nn.Module) -> Mapping[str, float]:
        res = generation_accuracy(dist.unwrap(model), tokenizer, items,
                                  max_new_tokens=cfg.eval_gen_max_new_tokens,
                                  enable_thinking=cfg.eval_gen_thinking,
                                  batch_size=min(cfg.batch_size, len(items)) or 1)
        return {"val_gen_accuracy": res["accuracy"], "val_gen_no_answer": res["no_answer"] / res["n"],
                "val_gen_truncated": res["truncated"] / res["n"]}
    return [hook]


def export_final(model: MiniMindLM, cfg: TrainConfig, env: dist.DistEnv) -> Path:
    """Write the trained model to out_dir/final (model.safetensors + config.json) on rank 0."""
    out = Path(cfg.out_dir) / "final"
    if env.is_main:
        save_pretrained(dist.unwrap(model), out)
        print(f"[done] model saved to {out}", flush=True)
    dist.barrier()
    return out


def summary(result: FitResult) -> str:
    """One line on how a run ended."""
    parts = [f"{result.step} steps, {result.samples_seen} samples"]
    if result.train_loss is not None:
        parts.append(f"train loss {result.train_loss:.4f}")
    if result.best_val_loss is not None:
        parts.append(f"best val loss {result.best_val_loss:.4f}")
    if result.skipped_steps:
        parts.append(f"{result.skipped_steps} non-finite steps skipped")
    return "[done] " + ", ".join(parts) + (f"; last checkpoint {result.checkpoint}" if result.checkpoint else "")


def finish(model: MiniMindLM, cfg: TrainConfig, env: dist.DistEnv, result: FitResult,
           adapter: bool = False) -> None:
    """A stage's last lines: export out_dir/final (the LoRA adapter folder when `adapter`, else
    the whole model), print how the run ended, leave the process group."""
    # disk full: one line. A sharded (fsdp) model is gathered first: `final` is a plain folder.
    with ckpt_io.resume_hint_on_write_error(cfg.out_dir), dist.full_params(model):
        if adapter:
            export_adapter(model, cfg, env)
        else:
            export_final(model, cfg, env)
    if env.is_main:
        print(summary(result), flush=True)
    dist.cleanup()
