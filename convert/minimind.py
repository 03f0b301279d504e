"""Upstream MiniMind checkpoints: a ``.pth`` state dict already uses our parameter names (we keep
MiniMind's and Qwen3's), so importing one is loading it strictly into the config it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common.errors import ModelNotFoundError
from model.config import MiniMindConfig
from model.model import MiniMindLM

from .hf import IGNORED_KEY, ConversionError, load_into_model

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


def load_minimind_pth(path: str | Path, config: MiniMindConfig) -> MiniMindLM:
    """An upstream MiniMind ``.pth`` state dict (already our names; often fp16) as an fp32 model.

    ``torch.load(weights_only=True)`` never unpickles code. DDP's ``module.`` and
    torch.compile's ``_orig_mod.`` prefixes are stripped; everything else must match strictly.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: checkpoint not found")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path}: expected a flat state dict of tensors")
    clean: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not IGNORED_KEY.search(key):
            clean[key] = value.float()
    return load_into_model(config, clean, str(path))


def resolve_config(preset: str | None = None, config_json: str | Path | None = None,
                   **overrides: Any) -> MiniMindConfig:
    """A config from a preset name or a config.json (exactly one)."""
    if (preset is None) == (config_json is None):
        raise ConversionError("give exactly one of a preset name or a config.json")
    if preset is not None:
        return MiniMindConfig.from_preset(preset, **overrides)
    data = json.loads(Path(config_json).read_text())
    return MiniMindConfig.from_dict({**data, **overrides}, source=str(config_json))

