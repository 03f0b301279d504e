"""Training configuration: one typed dataclass, the command line and YAML files generated from it.

Scope: `TrainConfig` (every option of the shared loop, with its help text), `parse_config` (CLI +
`--config file.yaml`; CLI overrides the file, the file overrides the dataclass defaults) and
`TrainConfig.validate()`, the single place where incompatible options are rejected before any work
starts. A stage script extends the options by subclassing:

    @dataclass
    class PretrainConfig(TrainConfig):
        lr: float = 5e-4                                     # a new default
        packed: bool = option(True, "pack documents into blocks")   # a new option

    cfg = parse_config(PretrainConfig)

Design after litgpt's signature-generated CLI; booleans are `--flag/--no-flag`, never ints.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from common.errors import UserError
from offload.experts import KTOptions


class ConfigError(UserError, ValueError):
    """An invalid or inconsistent training configuration (raised before any work starts)."""


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with help text; `extra` (e.g. choices, const) goes to argparse."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def problems_of(build: Callable[[], Any]) -> list[str]:
    """[] when `build()` (a stage's settings object, validated in its constructor) succeeds, else
    its ValueError's message: how a stage's `_problems` reports its loss settings."""
    try:
        build()
    except ValueError as exc:
        return [str(exc)]
    return []


@dataclass
class TrainConfig:
    """Options of the shared training loop (`trainer.loop.fit`). Defaults suit a tiny CPU run."""

    # --- where things go / where they come from
    out_dir: str = option("out/run", "run folder: checkpoints/, metrics.jsonl, loss_curve.png")
    model_preset: str = option("tiny", "model preset name (model.config.PRESETS) for a fresh model")
    init_from: str = option("", "checkpoint or model folder to take initial weights from ('' = fresh)")
    tokenizer_dir: str = option("", "tokenizer folder ('' = the shipped default)")
    data_path: list[str] = option([], "training data: MiniMind-format files, or dataset names "
                                "when --dataset_dir holds a dataset_info.json")
    eval_data_path: list[str] = option([], "validation data (files or names); each is evaluated separately")
    eval_fraction: float = option(0.0, "hold this fraction of the training data out for validation")
    dataset_dir: str = option("", "folder with a LLaMA-Factory dataset_info.json ('' = files only)")
    seq_len: int = option(256, "maximum tokens per sample")
    # SFT data (train_full_sft, train_lora, train_distillation); LLaMA-Factory's names
    packing: bool = option(False, "pack several conversations into each seq_len row; attention "
                         "stays inside each conversation and positions restart (neat_packing)")
    train_on_prompt: bool = option(False, "supervise the prompt tokens (system, user, tool turns) too")
    mask_history: bool = option(False, "supervise only the last assistant reply; truncation drops "
                              "the oldest exchanges first")

    # --- batch and optimisation
    batch_size: int = option(8, "samples per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "cosine floor as a fraction of lr (MiniMind: 0.1)")
    warmup_steps: int = option(0, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only; no decay on norms/biases/embeddings)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    max_steps: int = option(0, "optimizer steps (0 = derive from epochs)")
    epochs: float = option(1.0, "passes over the training data when max_steps is 0")

    # --- numerics and hardware
    dtype: str = option("auto", "autocast dtype; weights and optimizer stay fp32 (auto = bf16 where "
                        "the hardware runs it natively, fp16 + GradScaler on a GPU without bf16, "
                        "else fp32)", choices=("auto", "fp32", "bf16", "fp16"))
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    seed: int = option(1337, "seed for data order, initialisation and dropout")
    num_workers: int = option(0, "DataLoader worker processes")
    compile: bool = option(False, "torch.compile the model")
    parallel: str = option("ddp", "several processes (torchrun): ddp replicates the model on every "
                           "rank; fsdp shards weights, gradients and optimizer state (FSDP2, per "
                           "block) and writes sharded checkpoints", choices=("ddp", "fsdp"))
    reshard_after_forward: bool = option(True, "fsdp: free each block's gathered weights after its "
                                         "forward (less memory, one more all-gather in backward)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward "
                                            "instead of keeping them (less memory, ~1/3 more compute)")
    peak_tflops: float = option(0.0, "peak TFLOP/s for MFU (0 = table lookup on GPU, quick matmul probe on CPU)")

    # --- evaluation, logging, checkpoints
    log_every: int = option(10, "optimizer steps between log lines (the only host syncs of the loop)")
    eval_every: int = option(0, "optimizer steps between evaluations (0 = only at the end if eval data)")
    eval_batches: int = option(20, "batches of batch_size per evaluation and validation set "
                                "(split over ranks: the same samples for any world size)")
    save_every: int = option(0, "optimizer steps between checkpoints (0 = only the final one)")
    keep_last: int = option(3, "complete checkpoints to keep (the best by validation loss is kept too)")
    resume: str = option("", "'' = fresh start; 'auto' (or bare --resume) = newest complete checkpoint "
                       "in out_dir, fresh if none; or a checkpoint folder", const="auto")
    wandb: str = option("off", "Weights & Biases logging", choices=("off", "online", "offline"))
    wandb_project: str = option("minimind-forge", "wandb project name")
    run_name: str = option("", "run name for logs ('' = the out_dir name)")
    nan_policy: str = option("stop", "non-finite loss: stop (checked at log/save time, no per-step sync) "
                           "or skip the update (one host sync per step)", choices=("stop", "skip"))
    skip_bad_records: bool = option(False, "skip (and count) malformed data records instead of "
                                  "stopping at the first one")
    progress: bool = option(True, "show a tqdm progress bar on the main process")
    plot: bool = option(True, "write loss_curve.png at the end (needs matplotlib)")
    eval_gen_data: str = option("", "GSM8K-style JSONL ({question, answer}): at each evaluation the "
                              "main process also scores greedy generation on it (val_gen_accuracy)")
    eval_gen_samples: int = option(32, "questions of eval_gen_data scored per evaluation (its first N)")
    eval_gen_max_new_tokens: int = option(256, "answer budget per question in generation evaluation")
    eval_gen_thinking: bool = option(False, "generation evaluation opens <think> first (as eval_model.py "
                                   "--think): for models trained on reasoning_content")

    # --- where the routed experts of an MoE model run (offload/experts.py); LLaMA-Factory-KT's keys
    moe_backend: str = option("torch", "routed experts: torch (with the model), cpu (CPU memory), "
                            "kt (kt-kernel's CPU kernels; same as use_kt)", choices=("torch", "cpu", "kt"))
    use_kt: bool = option(False, "run the routed experts in kt-kernel (KTransformers' CPU MoE "
                        "kernels): base expert weights freeze, expert LoRA trains in the kernel")
    # Embedded: its fields (kt_backend, kt_num_threads, ...) are flat CLI flags and YAML keys.
    kt: KTOptions = field(default_factory=KTOptions, metadata={"embedded": True})

    # ------------------------------------------------------------------ derived values
    def device_type(self) -> str:
        """'cuda' | 'mps' | 'cpu' after resolving `device='auto'` (no distributed set-up needed)."""
        if self.device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                return "mps"
            return "cpu"
        return self.device.split(":")[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain flat dict (tuples become lists, embedded options inlined) for JSON, YAML and
        wandb: the keys a YAML file for `--config` uses."""
        flat: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self).items():
            flat.update(v if isinstance(v, dict) and _is_embedded(type(self), k) else {k: v})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}

    def expert_backend(self) -> str:
        """Where routed experts run: 'kt' when use_kt (LLaMA-Factory-KT's switch), else moe_backend."""
        return "kt" if self.use_kt else self.moe_backend

    def kt_options(self) -> KTOptions:
        """`self.kt` as the trainer runs it: kt_chunk_tokens 0 means one kernel call per
        micro-batch (batch_size * seq_len tokens; a chunked forward is recomputed in backward)."""
        return dataclasses.replace(self.kt, kt_chunk_tokens=self.kt.kt_chunk_tokens
                                   or self.batch_size * self.seq_len)

    def model_config(self) -> Any:
        """The `MiniMindConfig` a stage builds: init_from's config.json, else the preset."""
        from model.config import MiniMindConfig
        if self.init_from:
            return MiniMindConfig.from_json(Path(self.init_from) / "config.json")
        return MiniMindConfig.from_preset(self.model_preset)

    def data_options(self, kind: str) -> dict[str, Any]:
        """The dataset builder's options for a stage that trains on `kind` data: the SFT options
        above for SFT data; for other data any of them set is a ConfigError (the stage would
        silently ignore it)."""
        sft = {"packing": self.packing, "train_on_prompt": self.train_on_prompt,
               "mask_history": self.mask_history}
        if kind == "sft":
            return sft
        if any(sft.values()):
            on = ", ".join(f"--{k}" for k, v in sft.items() if v)
            hint = " (pretraining packs with --packed)" if kind == "pretrain" else ""
            raise ConfigError(f"{on}: options of SFT data, but this stage trains on {kind} data{hint}")
        return {}

    # ------------------------------------------------------------------ the one validation place
    def validate(self, has_eval_data: bool | None = None, model_config: Any = None) -> None:
        """Raise ConfigError listing every problem; called by parse_config and by fit().

        has_eval_data: whether validation data exists (fit() knows; None = infer from the paths).
        model_config: the model actually trained (fit() knows; None = `self.model_config()`): the
        expert-backend checks need its shape.
        """
        if has_eval_data is None:
            has_eval_data = bool(self.eval_data_path or self.eval_fraction or self.eval_gen_data)
        errors = self._problems() + self._expert_problems(model_config)
        if self.eval_every > 0 and not has_eval_data:
            errors.append("eval_every > 0 needs validation data: set eval_data_path, eval_fraction "
                          "or eval_gen_data")
        if errors:
            raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(errors))

    def _problems(self) -> list[str]:
        """The checks; a subclass extends them with `return super()._problems() + [...]`."""
        err: list[str] = []
        positive = ("batch_size", "seq_len", "log_every", "eval_batches", "keep_last",
                    "eval_gen_samples", "eval_gen_max_new_tokens")
        err += [f"{name} must be >= 1, got {getattr(self, name)}" for name in positive
                if getattr(self, name) < 1]
        if self.grad_accum < 1:
            err.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        nonneg = ("warmup_steps", "max_steps", "eval_every", "save_every", "num_workers",
                  "grad_clip", "weight_decay", "peak_tflops")
        err += [f"{name} must be >= 0, got {getattr(self, name)}" for name in nonneg
                if getattr(self, name) < 0]
        if not self.lr > 0:
            err.append(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.eval_fraction < 1.0:
            err.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            err.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            err.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_steps == 0 and not self.epochs > 0:
            err.append("set max_steps > 0 or epochs > 0")
        if self.max_steps and self.warmup_steps > self.max_steps:
            err.append(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        for name in ("dtype", "wandb", "nan_policy", "moe_backend", "parallel"):
            choices = _field_meta(type(self), name).get("choices", ())
            if getattr(self, name) not in choices:
                err.append(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        err += self._device_problems() + self._fsdp_problems()
        try:
            self.kt.validate()        # field-level; the shape checks are in _expert_problems
        except ValueError as exc:
            err.append(str(exc))
        if self.dataset_dir and not (Path(self.dataset_dir) / "dataset_info.json").is_file():
            err.append(f"dataset_dir: no dataset_info.json in {self.dataset_dir!r}")
        for name in ("data_path", "eval_data_path"):   # names are resolved later via dataset_dir
            err += [f"{name}: no such file {p!r}" for p in getattr(self, name)
                    if not self.dataset_dir and not Path(p).exists()]
        from trainer.checkpoint import is_sharded_checkpoint   # as model.config below: here only
        if self.init_from and not Path(self.init_from).exists():
            err.append(f"init_from: no such folder {self.init_from!r}")
        elif self.init_from and is_sharded_checkpoint(self.init_from):
            err.append(f"init_from: {self.init_from!r} is a sharded (--parallel fsdp) checkpoint: "
                       "continue it with --resume, or start from the run's final/ model folder")
        from model.config import PRESETS  # model code: imported here only, as in model_config()
        if not self.init_from and self.model_preset not in PRESETS:
            err.append(f"model_preset: unknown preset {self.model_preset!r} "
                       f"(one of: {', '.join(sorted(PRESETS))})")
        if self.resume not in ("", "auto") and not Path(self.resume).is_dir():
            err.append(f"resume: no such checkpoint folder {self.resume!r} (use 'auto' for the newest)")
        if self.eval_gen_data and not Path(self.eval_gen_data).is_file():
            err.append(f"eval_gen_data: no such file {self.eval_gen_data!r}")
        return err

    def _expert_problems(self, model_config: Any = None) -> list[str]:
        """Expert-backend checks, all before any kernel exists: kt-kernel crashes the process
        (no Python error) on shapes it does not support, so offload/experts.py's checks run here."""
        if self.use_kt and self.moe_backend not in ("torch", "kt"):
            return [f"use_kt is true but moe_backend is {self.moe_backend!r}: pick one"]
        backend = self.expert_backend()
        if backend == "torch":
            return []
        switch = "use_kt" if self.use_kt else f"moe_backend={backend}"
        if model_config is None:
            try:
                model_config = self.model_config()
            except (OSError, ValueError):
                return []      # a missing init_from or unknown preset is reported on its own
        if not model_config.use_moe:
            return [(f"{switch} offloads MoE experts, but the model is dense (use_moe false): pick "
                     "an MoE preset (e.g. --model_preset tiny-moe) or an MoE init_from")]
        if backend != "kt":
            return []
        from offload.experts import check_kt_config, kt_status
        ok, reason = kt_status(self.kt.kt_backend)
        err = [] if ok else [f"{switch}: {reason}"]
        if self.kt.kt_mode == "inference":
            err.append(f"{switch}: kt_mode 'inference' runs forward-only kernels; training needs "
                       "kt_mode auto or sft")
        try:
            self.kt.validate()
        except ValueError:
            return err                # reported by _problems
        try:
            check_kt_config(model_config.hidden_size, model_config.moe_intermediate_size,
                            model_config.num_experts, model_config.num_experts_per_tok,
                            self.kt_options())
        except ValueError as exc:
            err.append(f"{switch}: {exc}")
        return err

    def _fsdp_problems(self) -> list[str]:
        """What --parallel fsdp cannot shard or run; refused, never quietly run as DDP."""
        if self.parallel != "fsdp":
            return []
        err = []
        if self.dtype == "fp16":
            err.append("parallel fsdp: dtype fp16 needs a sharded GradScaler, which this trainer "
                       "does not have; use --dtype bf16 or fp32")
        if self.expert_backend() == "kt":
            err.append("parallel fsdp: kt-kernel holds its own unsharded copy of the expert weights; "
                       "use --moe_backend torch (or cpu on a CPU run), or --parallel ddp")
        if self.expert_backend() == "cpu" and self.device_type() != "cpu":
            err.append(f"parallel fsdp: moe_backend cpu keeps experts in CPU memory, outside the "
                       f"{self.device_type()} device mesh FSDP shards over; use --moe_backend torch "
                       "or --parallel ddp")
        if self.eval_gen_data:
            err.append("parallel fsdp: eval_gen_data generates on the main process alone, which a "
                       "sharded model cannot do; evaluate the final model with eval_model.py")
        return err

    def _device_problems(self) -> list[str]:
        """Checks that depend on the hardware this process will run on."""
        kind = self.device_type()
        if kind not in ("cpu", "cuda", "mps"):
            return [f"device must be auto, cpu, cuda[:N] or mps, got {self.device!r}"]
        if kind == "cuda" and not torch.cuda.is_available():
            return [f"device {self.device!r} requested but CUDA is not available"]
        if self.dtype == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
            return ["this GPU has no bf16 support; use --dtype auto, fp16 (GradScaler) or fp32"]
        return []


# ---------------------------------------------------------------------- CLI / YAML generation
def _field_meta(cls: type, name: str) -> dict[str, Any]:
    return dict(next(f.metadata for f in dataclasses.fields(cls) if f.name == name))


def _is_embedded(cls: type, name: str) -> bool:
    return bool(_field_meta(cls, name).get("embedded"))


def _flat_fields(cls: type) -> list[tuple[dataclasses.Field, Any, str | None]]:
    """(field, type hint, embedding field name or None) for every option, an embedded
    dataclass's fields (TrainConfig.kt: KTOptions) inlined: they are flat flags and YAML keys."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[dataclasses.Field, Any, str | None]] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("embedded"):
            sub = typing.get_type_hints(hints[f.name])
            out += [(g, sub[g.name], f.name) for g in dataclasses.fields(hints[f.name])]
        else:
            out.append((f, hints[f.name], None))
    return out


def _build(cls: type[TrainConfig], options: dict[str, Any]) -> TrainConfig:
    """`cls(**options)` with the embedded options' flat keys gathered into their dataclass."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, dict[str, Any]] = {}
    for f, _, owner in _flat_fields(cls):
        if owner is not None and f.name in options:
            groups.setdefault(owner, {})[f.name] = options.pop(f.name)
    return cls(**options, **{k: hints[k](**v) for k, v in groups.items()})


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` / Optional[X] -> X (None is given on the command line as 'none')."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the stage's docstring keeps its own line breaks."""


def _add_argument(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    """One flag per field; its kind (bool / list / tuple / scalar) follows the type hint."""
    meta = dict(f.metadata)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kw: dict[str, Any] = {"help": f"{meta.pop('help', '')} (default: {default!r})",
                          "default": argparse.SUPPRESS, "dest": f.name}
    tp = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is list:
        kw.update(nargs="*", type=args[0] if args else str)
    elif origin is tuple:
        kw.update(nargs=len(args), type=args[0])
    else:
        kw["type"] = tp
        if "const" in meta:
            kw.update(nargs="?", const=meta.pop("const"))
        if "choices" in meta:
            kw["choices"] = meta.pop("choices")
    parser.add_argument(f"--{f.name}", **kw)


def build_parser(cls: type[TrainConfig] = TrainConfig, description: str | None = None
                 ) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field plus `--config file.yaml`."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of options (CLI flags override it)")
    for f, hint, _ in _flat_fields(cls):
        _add_argument(parser, f, hint)
    return parser


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the field's type (lists to tuples, ints to floats, ...)."""
    tp = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        return None
    if tp is bool:
        return value if isinstance(value, bool) else _parse_bool(str(value))
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items] if args else list(items)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot read {value!r} as {tp.__name__}") from exc
    return value


def load_yaml_options(path: str | os.PathLike, cls: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """Read a YAML mapping of options; an unknown key is an error that names it."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    hints = {f.name: hint for f, hint, _ in _flat_fields(cls)}
    names = list(hints)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            raise ConfigError(f"{path}: unknown option {key!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        out[key] = _coerce(value, hints[key], key)
    return out


def parse_config(cls: type[TrainConfig] = TrainConfig, argv: Sequence[str] | None = None,
                 description: str | None = None, validate: bool = True) -> TrainConfig:
    """Defaults < YAML file (`--config`) < command-line flags; validated unless told not to."""
    parser = build_parser(cls, description)
    ns = vars(parser.parse_args(argv))
    yaml_path = ns.pop("config")
    options = load_yaml_options(yaml_path, cls) if yaml_path else {}
    hints = {f.name: hint for f, hint, _ in _flat_fields(cls)}
    options.update({k: _coerce(v, hints[k], k) for k, v in ns.items()})
    cfg = _build(cls, options)
    if validate:
        cfg.validate()
    return cfg
