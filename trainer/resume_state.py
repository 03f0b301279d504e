"""The resume state of a checkpoint without pickle: tensors in safetensors, the rest in JSON.

Scope: turn the trainer state (optimizer, schedule, GradScaler, every rank's RNG states, data
position, wandb id, config) into two files and back, and read the pickled `trainer_state.pt` of
older checkpoints without running any code.

    trainer_state.json          the state tree; each tensor is {"$tensor": "<name>"}, each NumPy
                                array {"$ndarray": "<name>"}; tuples, dicts with non-string keys
                                (the optimizer's parameter indices) and non-finite floats are
                                tagged too, so loading gives back exactly what was saved
    trainer_state.safetensors   the tensors, named by their path in the tree ("optimizer/state/0/exp_avg")

Why not torch.save: unpickling runs whatever code the file names, and a resume from someone
else's checkpoint is ordinary practice. Reading JSON and safetensors runs none. Old checkpoints
hold `trainer_state.pt`; it is read with ``torch.load(weights_only=True)`` and an allow-list of
the NumPy types the RNG state needs (an array and its dtype), so a pickle that asks for anything
else (os.system, builtins.exec, ...) is refused before any of it runs.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from common.errors import UserError
from model.io import stable_safetensors_bytes

JSON_NAME = "trainer_state.json"
TENSORS_NAME = "trainer_state.safetensors"
LEGACY_NAME = "trainer_state.pt"
FORMAT = "minimind-resume-state/1"


class ResumeStateError(UserError, ValueError):
    """A resume state that cannot be read, or that a careful reader refuses (one line at the CLI)."""


# ---------------------------------------------------------------------- encode
def encode(state: Any) -> tuple[bytes, bytes]:
    """(JSON bytes, safetensors bytes) of a state tree made of dicts, lists, tuples, str, int,
    float, bool, None, tensors and NumPy arrays. Anything else is a bug of the caller (TypeError)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()

    def tensor_ref(t: torch.Tensor, path: str) -> str:
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:          # safetensors refuses two names on one storage
            t = t.clone()
        seen.add(key)
        tensors[path] = t
        return path

    def walk(obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"$float": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return {"$tensor": tensor_ref(obj, path)}
        if isinstance(obj, np.ndarray):
            return {"$ndarray": tensor_ref(torch.from_numpy(np.ascontiguousarray(obj)), path)}
        if isinstance(obj, np.generic):
            return walk(obj.item(), path)
        if isinstance(obj, tuple):
            return {"$tuple": [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in obj):
                return {k: walk(v, f"{path}/{k}") for k, v in obj.items()}
            return {"$items": [[walk(k, f"{path}/key{i}"), walk(v, f"{path}/{k}")]
                               for i, (k, v) in enumerate(obj.items())]}
        raise TypeError(f"resume state: cannot store {type(obj).__name__} at {path or '/'}")

    tree = {"format": FORMAT, "state": walk(state, "")}
    text = json.dumps(tree, indent=1, allow_nan=False) + "\n"   # dict order is part of the state
    return text.encode(), stable_safetensors_bytes(tensors, {"format": "pt"})


# ---------------------------------------------------------------------- decode
def decode(json_data: bytes, tensor_data: bytes, where: Path) -> Any:
    """The state tree back from the two files' bytes; `where` names them in errors."""
    try:
        tree = json.loads(json_data)
        tensors = safetensors_load(tensor_data)
    except (ValueError, SafetensorError) as exc:
        raise ResumeStateError(f"{where}: unreadable resume state ({exc})") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise ResumeStateError(f"{where / JSON_NAME}: not a resume state of this format "
                               f"(format {tree.get('format') if isinstance(tree, dict) else None!r}, "
                               f"expected {FORMAT!r})")

    def tensor(name: Any) -> torch.Tensor:
        if name not in tensors:
            raise ResumeStateError(f"{where / JSON_NAME}: refers to tensor {name!r}, which "
                                   f"{TENSORS_NAME} lacks")
        return tensors[name]

    def walk(obj: Any) -> Any:
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if len(obj) == 1:
            (tag, val), = obj.items()
            if tag == "$tensor":
                return tensor(val)
            if tag == "$ndarray":
                return tensor(val).numpy()
            if tag == "$tuple":
                return tuple(walk(v) for v in val)
            if tag == "$items":
                return {walk(k): walk(v) for k, v in val}
            if tag == "$float":
                return float(val)
        return {k: walk(v) for k, v in obj.items()}

    try:
        return walk(tree.get("state"))
    except (TypeError, ValueError) as exc:      # a hand-edited or damaged tree
        raise ResumeStateError(f"{where / JSON_NAME}: malformed resume state ({exc})") from None


def _allowed_numpy() -> list:
    """What a pickled NumPy array needs: the reconstructor, the array and dtype classes. The
    reconstructor is listed under both module names (NumPy 2 moved numpy.core to numpy._core)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:      # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8, np.int32, np.float32)}
    return [np.ndarray, np.dtype, _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            *dtypes]


def load_legacy(file: Path) -> Any:
    """An older checkpoint's pickled `trainer_state.pt`, read without running code."""
    try:
        with torch.serialization.safe_globals(_allowed_numpy()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"global ([\w.]+)", str(exc))
        what = found.group(1) if found else "an object outside the allow-list"
        raise ResumeStateError(
            f"{file}: refused: unpickling it would call {what}, which no resume state needs (a "
            "tampered or foreign file); nothing from it was run. Resume only checkpoints you "
            "trust, or start fresh without --resume") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise ResumeStateError(f"{file}: unreadable resume state ({' '.join(str(exc).split())})") from None


def read(ckpt: Path) -> dict[str, Any]:
    """The resume state of checkpoint folder `ckpt` ({} when it has none)."""
    if (ckpt / JSON_NAME).exists():
        return decode((ckpt / JSON_NAME).read_bytes(), (ckpt / TENSORS_NAME).read_bytes()
                      if (ckpt / TENSORS_NAME).exists() else b"", ckpt)
    if (ckpt / LEGACY_NAME).exists():
        return load_legacy(ckpt / LEGACY_NAME)
    return {}
