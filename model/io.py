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
