"""Saving and loading model folders.

A model folder is ``model.safetensors`` (fp32 master weights, whatever dtype the model trained
in) + ``config.json``, each written atomically (model/atomic.py): a crash mid-save leaves either
the old file or the new one, never half.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, atomic_write_bytes
from .config import MiniMindConfig
from .errors import ModelFolderError, ModelNotFoundError
from .model import MiniMindLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32, contiguous, CPU tensors; a tied lm_head is dropped (safetensors refuses aliases)."""
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_pretrained(model: MiniMindLM, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state_dict_for_save(model), str(tmp), metadata={"format": "pt"})
    atomic_write_bytes(out_dir / CONFIG_NAME, _config_bytes(model.config))
    return out_dir


def _config_bytes(config: MiniMindConfig) -> bytes:
    import json
    return (json.dumps(config.to_dict(), indent=2) + "\n").encode()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{path}: unreadable or corrupt safetensors file ({e})") from None


def load_pretrained(model_dir: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> MiniMindLM:
    """Builds the model from ``config.json`` and loads the weights with ``strict=True``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"{model_dir}: model folder not found")
    config = MiniMindConfig.from_json(model_dir / CONFIG_NAME)
    model = MiniMindLM(config)
    sd = load_state_dict_file(model_dir / WEIGHTS_NAME)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelFolderError(f"{model_dir / WEIGHTS_NAME}: weights do not match config.json: {e}") from None
    return model.to(device=device, dtype=dtype)


def load_tokenizer(model_dir: str | Path):
    """The folder's own tokenizer when it has one (tokenizer.json), else the shipped default."""
    from .tokenizer import Tokenizer
    model_dir = Path(model_dir)
    return Tokenizer.from_dir(model_dir if (model_dir / "tokenizer.json").is_file() else None)


def load_for_inference(model_dir: str | Path, lora: str | Path | None = None,
                       device: str = "auto", dtype: str = "auto", moe_backend: str = "torch"):
    """``(model, tokenizer)`` from a model folder, ready to generate: the one loader behind
    eval_model.py, the server, the web demo and the converter.

    ``device`` auto is CUDA when present, else CPU; ``dtype`` is a name or auto (model.precision;
    the choice is logged on stderr). A LoRA adapter is merged in fp32 before the cast, so bf16
    rounding happens once, on the merged weight, and the result is a plain model (no LoRA
    modules: inference costs what the base costs). ``moe_backend`` other than ``torch`` hands
    the routed experts to ``model.offload.offload_experts`` last, after the merge, so offloaded
    experts carry the adapter too.
    """
    import sys
    import warnings

    from .precision import resolve_device, resolve_precision
    model = load_pretrained(model_dir, device="cpu")
    if lora:
        from .lora import load_adapter, merged_model
        load_adapter(model, lora)
        model = merged_model(model)
    dev = resolve_device(device)
    precision = resolve_precision(dtype, dev)
    print(f"[load] {precision.describe()}", file=sys.stderr)
    model = model.to(device=dev, dtype=precision.dtype).eval()
    if moe_backend != "torch" and not model.config.use_moe:
        warnings.warn(f"--moe_backend {moe_backend}: the model has no experts; ignored")
    elif moe_backend != "torch":
        from .offload import offload_experts
        # Forward-only kernels where kt has them: faster than the training kernels, no LoRA buffers.
        kt = {"kt_mode": "inference"} if moe_backend == "kt" else {}
        model = offload_experts(model, backend=moe_backend, **kt) or model
    return model, load_tokenizer(model_dir)
