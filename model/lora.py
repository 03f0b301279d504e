"""LoRA for MiniMindLM: inject adapters by name, train only them, save/load, merge, export.

Scope: low-rank adapters on ``nn.Linear`` layers (Hu et al. 2021, "LoRA"; rsLoRA scaling from
Kalajdzievski 2023). The maths is PEFT's::

    y = x Wᵀ (+ b) + s · dropout(x) Aᵀ Bᵀ,   A [r, in] ~ kaiming_uniform(a=√5),  B [out, r] = 0,
    s = alpha / r   (rsLoRA: alpha / √r)

so step 0 equals the base model and dropout touches only the adapter's input.

Names: ``LoRALinear`` subclasses ``nn.Linear`` and keeps ``.weight`` where it was, so an adapted
model's state dict is the base keys plus ``<module>.lora_A`` / ``<module>.lora_B``. Base checkpoints
load unchanged and an adapter file holds only those two kinds of key.

Targets: ``"all"`` = every ``nn.Linear`` except ``lm_head`` (tied to ``embed_tokens``: merging into
it would move the input embeddings too, and a vocab-sized adapter is large) and the MoE router
``mlp.gate`` (an adapter there shifts discrete top-k routing against the balance loss, and the
router is only D×E, so a rank-r adapter is nearly as large as the weight: train it fully if
needed). ``"all_attention"`` = q/k/v/o, or MLA's q_proj / q_a_proj / q_b_proj / kv_a_proj_with_mqa /
kv_b_proj / o_proj. Otherwise leaf names or dotted suffixes
(``q_proj``, ``experts.0.up_proj``), comma-separated or as a list; keywords and names combine.

Other layer types (an expert backend that keeps experts outside ``nn.Linear``) join through the
naming contract: parameters ``lora_A`` / ``lora_B`` on the module plus the ``LoRALayer`` protocol.
The helpers below find adapters by those parameters and refuse a module that has them without the
protocol, so ``disable_lora`` can never silently leave an adapter switched on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from common.atomic import atomic_path, atomic_write_bytes, new_folder
from common.errors import ModelFolderError, ModelNotFoundError

from .config import MiniMindConfig
from .io import save_pretrained, stable_save_file
from .model import MiniMindLM

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "minimind-lora"
ADAPTER_FORMAT_VERSION = 1
# Grouped-query attention's q/k/v/o and multi-head latent attention's (DeepSeek) projections.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj",
                     "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
# Leaf names never adapted, with the reason shown in errors (see the module docstring).
NEVER_ADAPTED = {"lm_head": "output head", "gate": "MoE router",
                 "shared_expert_gate": "Qwen2-MoE shared-expert gate (a router, 1 output)"}
# Config fields that do not change what the weights compute; left out of the base fingerprint so an
# adapter trained with dropout 0.1 still loads for inference with dropout 0.
RUNTIME_CONFIG_FIELDS = frozenset({"dropout", "initializer_range", "aux_loss_coef", "aux_loss_kind",
                                   "max_position_embeddings"})
PEFT_PREFIX = "base_model.model."
PEFT_METADATA_KEY = "minimind_adapter"  # our config, stored in a PEFT file's safetensors metadata


@runtime_checkable
class LoRALayer(Protocol):
    """What every module carrying ``lora_A`` / ``lora_B`` parameters must provide."""

    merged: bool  # the adapter is folded into the weight; forward must not add it again
    disabled: bool  # forward computes the base output

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...

    def delta_weight(self) -> torch.Tensor: ...  # s·B@A in fp32, shaped like ``weight``


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``r`` adapter; shares (never copies) the wrapped layer's weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        # nn.Linear.__init__ would allocate and initialise a second weight: take the base's instead,
        # so ties, optimizer references and the parameter name stay what they were.
        nn.Module.__init__(self)
        _check_hparams(rank, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default (nn.Linear's init)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.train(base.training)  # a fresh Dropout is in train mode even inside an eval() model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W += s·B@A, summed in fp32 so a bf16 weight is rounded once, not per term."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact up to rounding: in bf16, merge → unmerge does not give back the same bits."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scale={self.scale:g}, merged={self.merged}")


@dataclass
class LoRAConfig:
    """Settings of an adapted model, kept on it as ``model.lora_config`` for ``save_adapter``."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    targets: list[str] = field(default_factory=list)  # as requested ("all", "q_proj", ...)
    modules: list[str] = field(default_factory=list)  # what they resolved to, in model order

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


def _check_hparams(rank: int, alpha: float, dropout: float) -> None:
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


# --- choosing the layers ------------------------------------------------------------------------

def leaf_name(name: str) -> str:
    return name.rpartition(".")[2]


def _parse_targets(targets: str | Sequence[str]) -> list[str]:
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise ValueError("LoRA targets are empty; use 'all', 'all_attention' or module names")
    return items


def adaptable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and leaf_name(name) not in NEVER_ADAPTED}


def resolve_lora_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full module names ``targets`` selects, in model order; an unmatched target is an error."""
    candidates = adaptable_linears(model)
    chosen: set[str] = set()
    for target in _parse_targets(targets):
        if target == "all":
            hits = list(candidates)
        elif target == "all_attention":
            hits = [n for n in candidates if leaf_name(n) in ATTENTION_TARGETS]
        else:
            hits = [n for n in candidates if n == target or n.endswith("." + target)]
        if not hits:
            available = sorted({leaf_name(n) for n in candidates})
            never = ", ".join(f"{k} ({v})" for k, v in NEVER_ADAPTED.items())
            raise ValueError(f"LoRA target {target!r} matches no module; available: 'all', "
                             f"'all_attention', {available} (never adapted: {never})")
        chosen.update(hits)
    return [n for n in candidates if n in chosen]


def _wrap(model: nn.Module, names: Sequence[str], rank: int, alpha: float, dropout: float,
          use_rslora: bool) -> None:
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout, use_rslora))


def apply_lora(model: nn.Module, targets: str | Sequence[str], rank: int, alpha: float,
               dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Wraps the targeted layers in ``LoRALinear``, freezes everything else; returns their names.

    Nothing is changed when a target matches nothing or the settings are invalid.
    """
    _check_hparams(rank, alpha, dropout)
    if _lora_layers(model):
        raise ValueError("model already has LoRA adapters; apply_lora once per model "
                         "(load_adapter fills an adapted model with saved tensors)")
    names = resolve_lora_targets(model, targets)
    _wrap(model, names, rank, alpha, dropout, use_rslora)
    model.lora_config = LoRAConfig(rank, float(alpha), float(dropout), use_rslora,
                                   _parse_targets(targets), names)
    mark_only_lora_trainable(model)
    return names


# --- parameters, switches, merging --------------------------------------------------------------

def _is_lora_key(name: str) -> bool:
    return leaf_name(name) in ("lora_A", "lora_B")


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "lora_A", None), torch.Tensor):
            if not isinstance(m, LoRALayer):
                raise TypeError(f"{name} ({type(m).__name__}) has lora_A/lora_B but lacks the "
                                "LoRALayer protocol (merged, disabled, merge, unmerge, "
                                "delta_weight)")
            layers.append((name, m))
    return layers


def _require_lora(model: nn.Module, what: str) -> list[tuple[str, LoRALayer]]:
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: model has no LoRA adapters (call apply_lora or load_adapter)")
    return layers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer gets)."""
    return [p for n, p in model.named_parameters() if _is_lora_key(n)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under their full model keys (``...q_proj.lora_A``)."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_key(k)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad only on adapters; stale base gradients are dropped (no optimizer sees them)."""
    _require_lora(model, "mark_only_lora_trainable")
    for name, p in model.named_parameters():
        trainable = _is_lora_key(name)
        p.requires_grad_(trainable)
        if not trainable:
            p.grad = None


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model computes the base output (DPO's frozen reference without a second copy).

    Refuses merged adapters: the base weight is then gone, and silently unmerging and re-merging
    would drift bf16 weights every step.
    """
    layers = _require_lora(model, "disable_lora")
    merged = [name for name, m in layers if m.merged]
    if merged:
        raise RuntimeError(f"disable_lora: adapters are merged into {merged[0]} and "
                           f"{len(merged) - 1} more; call unmerge_lora(model) first")
    previous = [m.disabled for _, m in layers]
    for _, m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for (_, m), was in zip(layers, previous):
            m.disabled = was


def merge_lora(model: nn.Module) -> None:
    """Folds every adapter into its weight (W += s·B@A in fp32, cast back); forward skips them."""
    for _, m in _require_lora(model, "merge_lora"):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in _require_lora(model, "unmerge_lora"):
        m.unmerge()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base keys with adapters folded in; the model itself is left as it is."""
    out = {k: v for k, v in model.state_dict().items() if not _is_lora_key(k)}
    for name, m in _require_lora(model, "merged_state_dict"):
        if not m.merged:
            key = f"{name}.weight"
            out[key] = (out[key].float() + m.delta_weight().to(out[key].device)).to(out[key].dtype)
    return out


def merged_model(model: MiniMindLM) -> MiniMindLM:
    """A plain ``MiniMindLM`` (no LoRA modules) holding the merged weights."""
    ref = next(model.parameters())
    plain = MiniMindLM(model.config).to(device=ref.device, dtype=ref.dtype)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    return plain.train(model.training)


def export_merged(model: MiniMindLM, out_dir: str | Path) -> Path:
    """Writes a model folder that ``model.io.load_pretrained`` loads strictly."""
    return save_pretrained(merged_model(model), out_dir)


# --- saving and loading adapters ----------------------------------------------------------------

def config_fingerprint(config: MiniMindConfig) -> str:
    """sha256 of the config fields that change what the weights compute."""
    data = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_CONFIG_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def adapter_settings(model: nn.Module) -> LoRAConfig:
    _require_lora(model, "save_adapter")
    cfg = getattr(model, "lora_config", None)
    if not isinstance(cfg, LoRAConfig):
        raise ValueError("save_adapter: model has adapters but no lora_config; use apply_lora")
    return cfg


def native_adapter_config(model: nn.Module, settings: LoRAConfig, base_model: str | Path | None) -> dict:
    return {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
            **asdict(settings), "scale": settings.scale,
            "base_model": {"name_or_path": None if base_model is None else str(base_model),
                           "config_sha256": config_fingerprint(model.config),
                           "config": model.config.to_dict()}}


def native_lora_key(key: str) -> str:
    """Our parameter name for an adapter tensor key in either file format: PEFT's
    ``base_model.model.<name>.lora_A.weight`` becomes ``<name>.lora_A``; a native key is returned
    as it is. Checkpoints use it to find the trainable tensors an adapter file already holds."""
    if key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight")):
        return key[len(PEFT_PREFIX):].removesuffix(".weight")
    return key


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | Path | None = None) -> Path:
    """Writes ``adapter_model.safetensors`` (fp32, adapter tensors only) + ``adapter_config.json``
    in our format. PEFT's format (for ``PeftModel.from_pretrained`` on the transformers export of
    the base) is written by ``convert.peft.save_peft_adapter``; ``load_adapter`` reads both."""
    settings = adapter_settings(model)
    return write_adapter_files(out_dir, adapter_tensors(model),
                               native_adapter_config(model, settings, base_model))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under our key names, fp32 on the CPU, as an adapter file stores them."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(model).items()}


def write_adapter_files(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                        metadata: dict[str, str] | None = None) -> Path:
    """The adapter folder's two files, each written atomically (either format)."""
    with new_folder(out_dir) as out_dir:
        with atomic_path(out_dir / ADAPTER_WEIGHTS_NAME) as tmp:
            stable_save_file(tensors, tmp, {"format": "pt", **(metadata or {})})
        atomic_write_bytes(out_dir / ADAPTER_CONFIG_NAME,
                           (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out_dir


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: adapter config not found") from None
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}:{e.lineno}: invalid JSON in adapter config: {e.msg}") from None


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise ModelNotFoundError(f"{path}: adapter weights not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{path}: unreadable or corrupt safetensors file ({e})") from None


def _from_native(raw: dict, path: Path) -> tuple[LoRAConfig, dict | None]:
    if raw.get("format") != ADAPTER_FORMAT or raw.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ModelFolderError(f"{path}: not a {ADAPTER_FORMAT} v{ADAPTER_FORMAT_VERSION} adapter config "
                               f"(format={raw.get('format')!r}, version={raw.get('format_version')!r})")
    try:
        settings = LoRAConfig(int(raw["rank"]), float(raw["alpha"]), float(raw["dropout"]),
                              bool(raw["use_rslora"]), list(raw["targets"]), list(raw["modules"]))
    except KeyError as e:
        raise ModelFolderError(f"{path}: adapter config lacks {e.args[0]!r}") from None
    return settings, raw.get("base_model")


def _from_peft(raw: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path,
               weights_path: Path) -> tuple[LoRAConfig, dict | None, dict[str, torch.Tensor]]:
    plain = {"bias": "none", "use_dora": False, "fan_in_fan_out": False, "lora_bias": False}
    for key, want in plain.items():
        if raw.get(key, want) != want:
            raise ModelFolderError(f"{path}: PEFT option {key}={raw[key]!r} is not supported "
                                   "(plain LoRA only)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if raw.get(key):
            raise ModelFolderError(f"{path}: PEFT option {key}={raw[key]!r} is not supported")
    renamed = {}
    for key, value in tensors.items():
        name = native_lora_key(key)
        if name == key:  # not a PEFT LoRA A/B key
            raise ModelFolderError(f"{weights_path}: unsupported PEFT tensor {key!r}")
        renamed[name] = value
    modules = list(dict.fromkeys(k.rpartition(".")[0] for k in renamed))
    try:
        settings = LoRAConfig(int(raw["r"]), float(raw["lora_alpha"]),
                              float(raw.get("lora_dropout", 0.0)),
                              bool(raw.get("use_rslora", False)), modules, modules)
    except KeyError as e:
        raise ModelFolderError(f"{path}: PEFT adapter config lacks {e.args[0]!r}") from None
    ours = json.loads(metadata[PEFT_METADATA_KEY]) if PEFT_METADATA_KEY in metadata else {}
    return settings, ours.get("base_model"), renamed


def _check_base(model: nn.Module, base: dict, path: Path) -> None:
    if base.get("config_sha256") in (None, config_fingerprint(model.config)):
        return
    # A field newer than the adapter (added to MiniMindConfig after it was saved) changes the
    # fingerprint without changing the model: compare field by field, the missing ones at their
    # defaults, so old adapters keep loading on the bases they were trained on.
    defaults = MiniMindConfig().to_dict()
    want = {**defaults, **(base.get("config") or {})}
    have = model.config.to_dict()
    diffs = [f"{k}: adapter {want.get(k)!r} vs model {have.get(k)!r}"
             for k in sorted(set(want) | set(have))
             if k not in RUNTIME_CONFIG_FIELDS and want.get(k) != have.get(k)]
    if base.get("config") and not diffs:
        return
    raise ModelFolderError(f"{path}: adapter belongs to a different base model "
                           f"({base.get('name_or_path') or 'unnamed'}): "
                           f"{'; '.join(diffs) or 'config fingerprint differs'}")


def _expected_shapes(model: nn.Module, settings: LoRAConfig, path: Path) -> dict[str, tuple]:
    """Adapter key → shape, from the model's current adapters or from the layers to be wrapped."""
    existing = _lora_layers(model)
    if existing:  # resuming into an adapted model: it must hold exactly these adapters
        have = getattr(model, "lora_config", None)
        if not (isinstance(have, LoRAConfig) and have.modules == settings.modules
                and (have.rank, have.alpha, have.use_rslora)
                == (settings.rank, settings.alpha, settings.use_rslora)):
            raise ValueError(f"{path}: model already has different LoRA adapters "
                             f"({len(existing)} layers); load onto the base model")
        if any(m.merged for _, m in existing):
            raise ValueError(f"{path}: the model's adapters are merged; unmerge_lora first")
        return {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    layers = adaptable_linears(model)
    unknown = [n for n in settings.modules if n not in layers]
    if unknown:
        raise ModelFolderError(f"{path}: adapter targets {unknown[0]!r} ({len(unknown)} module(s) in "
                               "all), which this model lacks or never adapts")
    shapes = {}
    for name in settings.modules:
        shapes[f"{name}.lora_A"] = (settings.rank, layers[name].in_features)
        shapes[f"{name}.lora_B"] = (layers[name].out_features, settings.rank)
    return shapes


def _check_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple], path: Path) -> None:
    def few(keys: list[str]) -> str:
        return f"{keys[:3]}{' …' if len(keys) > 3 else ''}"

    missing = [k for k in shapes if k not in tensors]
    unexpected = [k for k in tensors if k not in shapes]
    if missing or unexpected:
        raise ModelFolderError(f"{path}: adapter tensors do not match its config: "
                               f"missing {few(missing)}, unexpected {few(unexpected)}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ModelFolderError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, "
                                   f"the model expects {shape}")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Applies LoRA with the stored settings and loads the tensors; returns the settings.

    Reads our format and PEFT's. A model that already has exactly these adapters (resume) is only
    refilled. Every check runs before the model changes, so a failed load leaves it as it was.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG_NAME, adapter_dir / ADAPTER_WEIGHTS_NAME
    raw = _read_config(cfg_path)
    tensors, metadata = _read_weights(weights_path)
    if "peft_type" in raw:
        if raw["peft_type"] != "LORA":
            raise ModelFolderError(f"{cfg_path}: peft_type {raw['peft_type']!r} is not LORA")
        settings, base, tensors = _from_peft(raw, tensors, metadata, cfg_path, weights_path)
    else:
        settings, base = _from_native(raw, cfg_path)
    try:
        _check_hparams(settings.rank, settings.alpha, settings.dropout)
    except ValueError as e:
        raise ModelFolderError(f"{cfg_path}: {e}") from None
    if base is not None:
        _check_base(model, base, cfg_path)
    shapes = _expected_shapes(model, settings, cfg_path)
    _check_tensors(tensors, shapes, weights_path)

    if not _lora_layers(model):
        _wrap(model, settings.modules, settings.rank, settings.alpha, settings.dropout,
              settings.use_rslora)
        model.lora_config = settings
        mark_only_lora_trainable(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in shapes:
            params[key].copy_(tensors[key])
    return settings
