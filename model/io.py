"""The model folder, both ways: the one writer and the one reader of ``model.safetensors`` +
``config.json``, used by ``save_pretrained``, by training checkpoints (trainer/checkpoint.py adds
its own files around these two) and by every loader.

The folder:
  ``config.json``        ``MiniMindConfig.to_dict()`` as JSON: the model needs no sizes from
                         the command line.
  ``model.safetensors``  the state dict, floating tensors in fp32 whatever dtype the model ran
                         in. Tensors that share storage (the tied ``lm_head``) are stored ONCE,
                         under the non-``lm_head`` name (``model.embed_tokens.weight``, as MiniMind
                         and HF Hub files do: safetensors refuses aliases), and the header's
                         metadata records ``{"format": "pt", "tied": '{"lm_head.weight":
                         "model.embed_tokens.weight"}'}``.
Reading restores the aliases listed in the metadata; a tensor the file lacks but the model ties
to one it has is filled from its twin (files without the metadata: older model.io folders, HF
exports); a tied pair stored twice must hold equal tensors. Then ``load_state_dict(strict=True)``.
Every failure is a ``common.errors`` error naming the file. Each file is written atomically
(common/atomic.py): a crash mid-save leaves the old file or the new one, never half.

Byte-stable: the same tensors and config always give the same bytes. safetensors (0.8) writes
the header's ``__metadata__`` in the order of a Rust HashMap, which changes from one process to
the next, so every safetensors file the project writes goes through ``canonical_header``: the
header JSON re-serialised with sorted keys (data order, offsets and alignment unchanged).
config.json is written with sorted keys too. Anything that fingerprints files (a checkpoint's
manifest, a LoRA checkpoint's reference to its base) then sees one model as one model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from safetensors.torch import save as _safetensors_bytes
from torch import nn

from common.atomic import atomic_path, atomic_write_bytes, new_folder
from common.errors import ModelFolderError, ModelNotFoundError

from .config import MiniMindConfig
from .model import MiniMindLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TIED_KEY = "tied"   # safetensors metadata: JSON {alias: stored name}


# ---------------------------------------------------------------------- write
def header_bytes(header: dict) -> bytes:
    """A safetensors file's first bytes for `header` (tensor entries and ``__metadata__``): the
    8-byte little-endian length, then the JSON with sorted keys, space-padded so the data starts
    8-byte aligned (as the format requires)."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def canonical_header(data: bytes) -> tuple[bytes, int]:
    """(canonical header bytes, length of the header `data` starts with): see the module docstring."""
    n = int.from_bytes(data[:8], "little")
    return header_bytes(json.loads(data[8:8 + n])), 8 + n


def stable_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``safetensors.torch.save`` with the canonical header: equal inputs, equal bytes."""
    data = _safetensors_bytes(tensors, metadata=metadata)
    head, old = canonical_header(data)
    return b"".join((head, memoryview(data)[old:]))    # one copy of the tensors, not two


def stable_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` (streamed to disk: no second copy in memory) with the
    canonical header, fixed in place (a different length, e.g. other JSON escaping, rewrites it)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:    # its I/O errors are not OSErrors: make them one (disk full)
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    with open(path, "rb+") as fh:
        n = int.from_bytes(fh.read(8), "little")
        head, old = canonical_header(n.to_bytes(8, "little") + fh.read(n))
        if len(head) == old:
            fh.seek(0)
            fh.write(head)
            return
        fh.seek(old)
        rest = fh.read()
        fh.seek(0)
        fh.write(head + rest)
        fh.truncate()


def _storage_key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def weights_payload(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the weights file: fp32 CPU copies, each shared tensor once."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[tuple, str] = {}
    for name in sorted(state, key=lambda n: n.startswith("lm_head")):  # lm_head is the alias
        t = state[name]
        if (key := _storage_key(t)) in stored:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        tensors[name] = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous()
    return tensors, {"format": "pt", TIED_KEY: json.dumps(aliases)}


def weights_bytes(model: nn.Module) -> bytes:
    """The weights file as bytes (checkpoints hash and write it themselves)."""
    tensors, metadata = weights_payload(model)
    return stable_safetensors_bytes(tensors, metadata)


def config_bytes(config: MiniMindConfig) -> bytes:
    return (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def save_pretrained(model: MiniMindLM, out_dir: str | Path) -> Path:
    """Writes the weights file and config.json into ``out_dir``; returns it."""
    with new_folder(out_dir) as out_dir:     # a failed first save leaves no half folder
        with atomic_path(out_dir / WEIGHTS_NAME) as tmp:   # streamed: no second copy in memory
            tensors, metadata = weights_payload(model)
            stable_save_file(tensors, tmp, metadata)
        atomic_write_bytes(out_dir / CONFIG_NAME, config_bytes(model.config))
    return out_dir


# ---------------------------------------------------------------------- read
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, with the aliases its metadata lists put back."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
        aliases = json.loads(meta.get(TIED_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{path}: unreadable or corrupt safetensors file ({e})") from None
    for alias, name in aliases.items():
        if name not in state:
            raise ModelFolderError(f"{path}: metadata ties {alias} to {name}, which the file lacks")
        state[alias] = state[name]
    return state


def _fill_ties(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Give every name of a tied group in `model` the one tensor the file holds for it."""
    groups: dict[tuple, list[str]] = {}
    for name, t in model.state_dict().items():
        groups.setdefault(_storage_key(t), []).append(name)
    for names in groups.values():
        have = [n for n in names if n in state]
        if len(names) < 2 or not have:
            continue
        for n in have[1:]:
            if state[n] is not state[have[0]] and not torch.equal(state[n], state[have[0]]):
                raise ModelFolderError(f"{file}: {have[0]} and {n} are tied in the model "
                                       "(tie_word_embeddings) but differ in the file")
        for n in names:
            state.setdefault(n, state[have[0]])


def load_weights(path: str | Path, model: nn.Module, strict: bool = True) -> None:
    """Loads a model folder's weights (or the weights file itself) into ``model``, by the rules
    in the module docstring. ``model`` may carry LoRA modules or offloaded experts, as long as
    its state dict names are the file's."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: model folder not found")
    file = path / WEIGHTS_NAME if path.is_dir() else path
    state = load_state_dict_file(file)
    _fill_ties(model, state, file)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # shape mismatches: torch's message names each tensor
        detail = " ".join(str(e).split())
        raise ModelFolderError(f"{file}: weights do not match the model: {detail}") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        hint = ""
        if any(".lora_" in k for k in result.unexpected_keys):
            hint = (" (the file holds LoRA adapter tensors: a LoRA training checkpoint; load "
                    "its base model's folder with lora=<this folder>)")
        raise ModelFolderError(f"{file}: weights do not match the model{hint}: missing "
                               f"{_some(result.missing_keys)}; unexpected {_some(result.unexpected_keys)}")


def _some(keys: list[str], n: int = 4) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more if keys else "none"


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def read_config(model_dir: str | Path) -> MiniMindConfig:
    """The folder's config.json (model sizes without the weights)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"{model_dir}: model folder not found")
    return MiniMindConfig.from_json(model_dir / CONFIG_NAME)


def load_pretrained(model_dir: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> MiniMindLM:
    """Builds the model from ``config.json`` and loads the weights strictly."""
    model = MiniMindLM(read_config(model_dir))
    load_weights(model_dir, model)
    return model.to(device=device, dtype=dtype)


def load_tokenizer(model_dir: str | Path):
    """The folder's own tokenizer when it has one (tokenizer.json), else the shipped default."""
    from .tokenizer import Tokenizer
    model_dir = Path(model_dir)
    return Tokenizer.from_dir(model_dir if (model_dir / "tokenizer.json").is_file() else None)

