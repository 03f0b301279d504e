"""Crash-safe checkpoints.

Scope: write, verify, find, load and prune checkpoint folders; the model files come from model.io,
what is written here is the resume state, the checksums, the marker and the rotation. Layout:

    out_dir/checkpoints/step_000123/
        model.safetensors   } a model folder, exactly as model.io.save_pretrained writes it (fp32,
        config.json         } tied lm_head stored once): model.io.load_pretrained loads a checkpoint
        trainer_state.pt    optimizer, schedule, GradScaler, every RNG state per rank, data position,
                            step, wandb run id, best validation loss
        <extra files>       e.g. adapter weights from a stage's on_save callback
        COMPLETE            written last: JSON with the step and the sha256 + size of every file
    out_dir/checkpoints/latest   name of the newest complete checkpoint (pointer file)
    out_dir/checkpoints/best     JSON {name, val_loss} of the best one by validation loss

Every file is written to a temporary name, fsynced and `os.replace`d, and the folder is fsynced, so a
crash leaves either a complete checkpoint or a folder without COMPLETE, which resume skips.
Pointer files (not symlinks) because a rename is atomic everywhere and symlinks are not portable.

Test hook: the environment variable MINIMIND_CKPT_FAULT="exit:<file>" makes the writer exit the
process half-way through writing <file>; "sleep:<file>:<seconds>" makes it pause before <file>.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.atomic import atomic_path, fsync_dir
from model.errors import UserError
# The model part of a checkpoint is a model folder, written and read by model.io alone (tied
# lm_head stored once, strict loading, clear errors). load_weights and weights_bytes are
# re-exported: trainer/loop.py, trainer/adapters.py and train_dpo.py import them from here.
from model.io import CONFIG_NAME, WEIGHTS_NAME, config_bytes, load_weights, weights_bytes  # noqa: F401

CKPT_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_NAME = "trainer_state.pt"
FAULT_ENV = "MINIMIND_CKPT_FAULT"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt (one line at the CLI, like the
    model.errors it sits beside; still a RuntimeError for old callers)."""


# ---------------------------------------------------------------------- atomic file writing
def _fault_point(name: str) -> str | None:
    """The fault injected for file `name` by the test hook, if any ('exit' or 'sleep:<s>')."""
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, rest = spec.partition(":")
    target, _, arg = rest.partition(":")
    if target != name:
        return None
    return f"{kind}:{arg}" if arg else kind


def atomic_write(path: Path, data: bytes) -> None:
    """model.atomic's temp file + fsync + rename, plus the crash-injection hook the tests use."""
    fault = _fault_point(path.name)
    if fault and fault.startswith("sleep"):
        time.sleep(float(fault.split(":")[1]))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if fault == "exit":
            fh.write(data[: len(data) // 2])
            fh.flush()
            os._exit(17)  # simulate a crash mid-write: the temp file stays behind, as after a kill
        fh.write(data)


# ---------------------------------------------------------------------- save
def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, trainer_state: dict[str, Any],
                    keep_last: int, val_loss: float | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a complete checkpoint for `step`, update the pointers, prune old ones; returns its folder.

    Call on the main rank only, with the plain (unwrapped) model.
    """
    root = checkpoint_root(out_dir)
    ckpt = root / f"step_{step:06d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / MARKER).unlink(missing_ok=True)      # re-saving a step: mark it incomplete first
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    files = {WEIGHTS_NAME: weights_bytes(model), CONFIG_NAME: config_bytes(model.config),
             STATE_NAME: buf.getvalue()}
    files.update(extra_files or {})
    manifest = {}
    for name, data in files.items():
        atomic_write(ckpt / name, data)
        manifest[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    marker = {"step": step, "val_loss": val_loss, "created": time.time(), "files": manifest}
    atomic_write(ckpt / MARKER, json.dumps(marker, indent=2).encode())
    fsync_dir(ckpt)
    atomic_write(root / "latest", ckpt.name.encode())
    if val_loss is not None and val_loss == val_loss:        # not NaN
        best = read_best(out_dir)
        if best is None or val_loss < best[1] or best[0].name == ckpt.name:
            atomic_write(root / "best", json.dumps({"name": ckpt.name, "val_loss": val_loss}).encode())
    fsync_dir(root)
    prune_checkpoints(out_dir, keep_last)
    return ckpt


def read_best(out_dir: str | os.PathLike) -> tuple[Path, float] | None:
    """(folder, val_loss) of the best checkpoint, or None."""
    root = checkpoint_root(out_dir)
    try:
        data = json.loads((root / "best").read_text())
    except (OSError, ValueError):
        return None
    return root / data["name"], float(data["val_loss"])


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders (complete or not), oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and the best one.

    Incomplete folders older than the newest complete one are crash leftovers and go too.
    """
    all_ckpts = list_checkpoints(out_dir)
    complete = [p for p in all_ckpts if (p / MARKER).exists()]
    keep = set(complete[-keep_last:]) if keep_last > 0 else set()
    best = read_best(out_dir)
    if best is not None:
        keep.add(best[0])
    newest = complete[-1] if complete else None
    removed = []
    for p in all_ckpts:
        stale_partial = newest is not None and p not in complete and all_ckpts.index(p) < all_ckpts.index(newest)
        if (p in complete and p not in keep) or stale_partial:
            (p / MARKER).unlink(missing_ok=True)   # a deletion cut short must not look complete
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------- verify / find / load
def verify_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """Check the COMPLETE marker and every listed file's size and sha256; returns the marker."""
    ckpt = Path(ckpt)
    marker_path = ckpt / MARKER
    if not marker_path.exists():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MARKER} marker; "
                              "the run probably died while writing it)")
    try:
        marker = json.loads(marker_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{marker_path}: unreadable marker ({exc})") from exc
    for name, info in marker.get("files", {}).items():
        path = ckpt / name
        if not path.exists():
            raise CheckpointError(f"{path}: listed in {MARKER} but missing")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != {info['bytes']} (truncated?)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != info["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupt file)")
    return marker


def find_latest_checkpoint(out_dir: str | os.PathLike, log=print) -> Path | None:
    """Newest checkpoint that verifies; says which ones it skipped and why."""
    for ckpt in reversed(list_checkpoints(out_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as exc:
            log(f"[checkpoint] skipping {ckpt.name}: {exc}")
    return None


def resolve_resume(resume: str, out_dir: str | os.PathLike, log=print) -> Path | None:
    """The checkpoint to resume from: None for a fresh start ('' or 'auto' with none found).

    An explicitly named folder must verify (no silent fallback to something else).
    """
    if not resume:
        return None
    if resume == "auto":
        ckpt = find_latest_checkpoint(out_dir, log)
        log(f"[checkpoint] resuming from {ckpt}" if ckpt else
            f"[checkpoint] no complete checkpoint in {checkpoint_root(out_dir)}; starting fresh")
        return ckpt
    verify_checkpoint(resume)
    log(f"[checkpoint] resuming from {resume}")
    return Path(resume)


def load_checkpoint(ckpt: str | os.PathLike, model: nn.Module, verify: bool = True) -> dict[str, Any]:
    """Load weights into `model` and return the trainer state (tensors on CPU)."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    load_weights(ckpt, model)
    state_file = ckpt / STATE_NAME
    if not state_file.exists():
        return {}
    return torch.load(state_file, map_location="cpu", weights_only=False)
