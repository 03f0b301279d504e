"""Crash-safe checkpoints.

Scope: write, verify, find, load and prune checkpoint folders; the model files come from model.io,
what is written here is the resume state, the checksums, the marker and the rotation. Layout:

    out_dir/checkpoints/step_000123/
        model.safetensors   } a model folder, exactly as model.io.save_pretrained writes it (fp32,
        config.json         } tied lm_head stored once): model.io.load_pretrained loads a checkpoint
        trainer_state.json          } the resume state (trainer.resume_state): optimizer,
        trainer_state.safetensors   } schedule, GradScaler, every RNG state per rank, data
                                      position, step, wandb run id, best validation loss; JSON
                                      and safetensors, never pickle, so loading a checkpoint
                                      from someone else runs no code (older checkpoints'
                                      trainer_state.pt is read with weights_only=True)
        <extra files>       e.g. adapter weights from a stage's on_save callback
        COMPLETE            written last: JSON with the step and the sha256 + size of every file

A run that trains a subset of a frozen base loaded from a folder (LoRA: fit's `trainable` with
`init_from`) writes no copy of the base: in place of the model folder,

        trainable.safetensors   the trainable parameters and the persistent buffers (fp32)
                                that no other file of the checkpoint holds (the LoRA adapter
                                file does hold the adapters: they are stored once, there)
        base.json               {path, scheme, sha256, config_sha256, weights_sha256, config,
                                trainable_elsewhere}: the frozen base it applies to, and which
                                file holds which trainable tensor

and resume reloads the base from its folder (the stage's build_model does) after checking that
the folder still has the same content: `sha256` covers each tensor's name, dtype, shape and
values and the parsed config.json, not the files' bytes, so re-saving or re-sharding the base
(or a safetensors header written in another key order) keeps it the same base. The hash reads
every byte of the base's weights once per process (cached by path, size and mtime), not once
per save. base.json files of older checkpoints (no `scheme`) hold the files' sha256 and are
checked that way.
    out_dir/checkpoints/latest   name of the newest complete checkpoint (pointer file)
    out_dir/checkpoints/best     JSON {name, val_loss} of the best one by validation loss

Every file is written to a temporary name, fsynced and `os.replace`d, and the folder is fsynced, so a
crash leaves either a complete checkpoint or a folder without COMPLETE, which resume skips. A
write that fails (disk full, unwritable folder) removes the checkpoint's folder and raises
common.errors.WriteError; `resume_hint_on_write_error` adds the checkpoint to resume from.
Pointer files (not symlinks) because a rename is atomic everywhere and symlinks are not portable.

Test hook: the environment variable MINIMIND_CKPT_FAULT="exit:<file>" makes the writer exit the
process half-way through writing <file>; "enospc:<file>" makes that write fail half-way with
OSError(ENOSPC), as on a full disk; "sleep:<file>:<seconds>" makes it pause before <file>.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as safetensors_load
from torch import nn

from common.atomic import atomic_path, fsync_dir
from common.errors import UserError, WriteError, writing
# The model part of a checkpoint is a model folder, written and read by model.io alone (tied
# lm_head stored once, strict loading, clear errors). load_weights and weights_bytes are
# re-exported: trainer/loop.py, trainer/adapters.py and train_dpo.py import them from here.
from model.io import CONFIG_NAME, WEIGHTS_NAME, config_bytes, load_weights, weights_bytes  # noqa: F401
from model.io import load_state_dict_file, stable_safetensors_bytes
from model.lora import native_lora_key
from trainer import resume_state

CKPT_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE_NAMES = (resume_state.JSON_NAME, resume_state.TENSORS_NAME)
BASE_NAME = "base.json"
TRAINABLE_NAME = "trainable.safetensors"
FAULT_ENV = "MINIMIND_CKPT_FAULT"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt (one line at the CLI, like the
    common.errors it sits beside; still a RuntimeError for old callers)."""


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
    """common.atomic's temp file + fsync + rename, plus the crash-injection hook the tests use."""
    fault = _fault_point(path.name)
    if fault and fault.startswith("sleep"):
        time.sleep(float(fault.split(":")[1]))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if fault in ("exit", "enospc"):
            fh.write(data[: len(data) // 2])
            fh.flush()
            if fault == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os._exit(17)  # simulate a crash mid-write: the temp file stays behind, as after a kill
        fh.write(data)


# ---------------------------------------------------------------------- the frozen base
_FINGERPRINTS: dict[tuple, dict[str, Any]] = {}
SCHEME = "tensors-sha256/1"     # base.json's fingerprint: content, not file bytes
_CHUNK = 64 << 20


def _file_sha256(path: Path, chunk: int = _CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _tensor_digests(file: Path, into: dict[str, str]) -> None:
    """sha256 of each tensor of a safetensors file: its dtype, shape and raw bytes, read from
    the file in chunks (no tensor is built). Header order and metadata play no part."""
    with open(file, "rb") as fh:
        try:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            entries = sorted((k, v) for k, v in header.items() if k != "__metadata__")
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(f"{file}: unreadable safetensors header ({exc})") from None
        for name, info in entries:
            begin, end = info["data_offsets"]
            digest = hashlib.sha256(json.dumps([info["dtype"], info["shape"]]).encode())
            fh.seek(8 + n + begin)
            left = end - begin
            while left > 0:
                block = fh.read(min(_CHUNK, left))
                if not block:
                    raise CheckpointError(f"{file}: truncated ({name} ends past the file)")
                digest.update(block)
                left -= len(block)
            into[name] = digest.hexdigest()


def _content_fingerprint(base: Path, names: list[str]) -> dict[str, Any]:
    """{scheme, sha256, config_sha256, weights_sha256} of a base folder by content. A tensor is
    the same wherever it is stored (one file or shards), so re-saving the base changes nothing."""
    try:
        config = json.loads((base / CONFIG_NAME).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{base / CONFIG_NAME}: invalid JSON ({exc})") from None
    tensors: dict[str, str] = {}
    for name in names:
        if name.endswith(".safetensors"):
            _tensor_digests(base / name, tensors)
    conf = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    weights = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()
    return {"scheme": SCHEME, "config_sha256": conf, "weights_sha256": weights,
            "sha256": hashlib.sha256(f"{conf}:{weights}".encode()).hexdigest()}


def _bytes_fingerprint(base: Path, names: list[str]) -> dict[str, Any]:
    """The fingerprint of older checkpoints' base.json: every file's bytes."""
    files = {name: {"bytes": (base / name).stat().st_size, "sha256": _file_sha256(base / name)}
             for name in names}
    return {"sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
            "files": files}


def base_fingerprint(base_dir: str | os.PathLike, scheme: str = SCHEME) -> dict[str, Any]:
    """{path, scheme, sha256, ...}: the fingerprint of a base model folder (config.json and every
    *.safetensors file), by content (`SCHEME`) or, for older checkpoints (scheme ""), by bytes.
    Hashed once per process: later calls reuse it while no file's size or mtime changed
    (sha256 reads ~0.8 GB/s on one core: ~80 s for a 60 GB base, once)."""
    base = Path(base_dir).resolve()
    names = sorted(p.name for p in base.glob("*.safetensors")) + [CONFIG_NAME]
    stats = []
    for name in names:
        try:
            st = (base / name).stat()
        except FileNotFoundError:
            raise CheckpointError(f"{base / name}: base model file not found") from None
        stats.append((name, st.st_size, st.st_mtime_ns))
    key = (str(base), scheme, tuple(stats))
    if key not in _FINGERPRINTS:
        how = _content_fingerprint if scheme == SCHEME else _bytes_fingerprint
        _FINGERPRINTS[key] = {"path": str(base), **how(base, names)}
    return _FINGERPRINTS[key]


def base_reference(base_dir: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """What base.json holds: the base folder's fingerprint and the model config."""
    return {**base_fingerprint(base_dir), "config": model.config.to_dict()}


def check_base(ckpt: Path, base_dir: str | os.PathLike | None) -> None:
    """A checkpoint without base weights resumes only onto the very base it was trained on."""
    ref = json.loads((ckpt / BASE_NAME).read_text())
    if base_dir is None:
        raise CheckpointError(f"{ckpt}: holds no base weights; resume it with --init_from "
                              f"{ref['path']} (the base it was trained on)")
    have = base_fingerprint(base_dir, ref.get("scheme", ""))
    if have["sha256"] != ref["sha256"]:
        if "scheme" in ref:
            parts = {"config.json": "config_sha256", "the weights' values": "weights_sha256"}
            changed = [what for what, k in parts.items() if ref.get(k) != have[k]]
        else:
            changed = sorted(n for n in set(ref["files"]) | set(have["files"])
                             if ref["files"].get(n) != have["files"].get(n))
        raise CheckpointError(f"{have['path']}: base model differs from the one {ckpt} was trained "
                              f"on ({ref['path']}; changed: {', '.join(changed)})")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of the state a run changes: parameters with requires_grad and persistent buffers."""
    state = model.state_dict()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    names += [n for n, _ in model.named_buffers() if n in state]
    return {n: state[n].detach().to("cpu", torch.float32 if state[n].is_floating_point()
                                     else state[n].dtype).contiguous() for n in names}


def _split_trainable(state: dict[str, torch.Tensor], extra_files: dict[str, bytes]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(what trainable.safetensors must hold, {name: other file}): a trainable tensor that another
    safetensors file of the checkpoint already holds under its name with the same values (the
    LoRA adapter file) is stored there only, not twice."""
    elsewhere: dict[str, str] = {}
    for fname, data in extra_files.items():
        if fname.endswith(".safetensors"):
            for key, t in safetensors_load(data).items():
                name = native_lora_key(key)
                if name in state and name not in elsewhere and torch.equal(t, state[name]):
                    elsewhere[name] = fname
    return {k: v for k, v in state.items() if k not in elsewhere}, elsewhere


def _load_trainable(ckpt: Path, model: nn.Module, elsewhere: dict[str, str]) -> None:
    file = ckpt / TRAINABLE_NAME
    state = load_state_dict_file(file)
    for fname in sorted(set(elsewhere.values())):
        if Path(fname).name != fname:      # base.json names files of this folder, nothing else
            raise CheckpointError(f"{ckpt / BASE_NAME}: trainable_elsewhere names {fname!r}, "
                                  "not a file of the checkpoint")
        held = {native_lora_key(k): v for k, v in load_state_dict_file(ckpt / fname).items()}
        state.update({k: held[k] for k, f in elsewhere.items() if f == fname and k in held})
    want = trainable_state(model)
    if state.keys() != want.keys():
        missing, unexpected = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
        raise CheckpointError(f"{file}: trainable tensors do not match the model (other LoRA "
                              f"settings?): missing {missing[:3]}, unexpected {unexpected[:3]}")
    bad = [n for n in state if state[n].shape != want[n].shape]
    if bad:
        raise CheckpointError(f"{file}: {bad[0]} has shape {tuple(state[bad[0]].shape)}, the model "
                              f"{tuple(want[bad[0]].shape)}")
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------- save
def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, trainer_state: dict[str, Any],
                    keep_last: int, val_loss: float | None = None,
                    extra_files: dict[str, bytes] | None = None,
                    base_dir: str | os.PathLike | None = None) -> Path:
    """Write a complete checkpoint for `step`, update the pointers, prune old ones; returns its folder.

    Call on the main rank only, with the plain (unwrapped) model. `base_dir`: the folder the
    frozen parameters were loaded from; they are then referenced (base.json), not written.
    """
    root = checkpoint_root(out_dir)
    ckpt = root / f"step_{step:06d}"
    if base_dir is None:
        files = {WEIGHTS_NAME: weights_bytes(model), CONFIG_NAME: config_bytes(model.config)}
    else:
        own, elsewhere = _split_trainable(trainable_state(model), extra_files or {})
        ref = {**base_reference(base_dir, model), "trainable_elsewhere": elsewhere}
        files = {TRAINABLE_NAME: stable_safetensors_bytes(own, {"format": "pt"}),
                 BASE_NAME: json.dumps(ref, indent=2, sort_keys=True).encode()}
    files.update(zip(STATE_NAMES, resume_state.encode(trainer_state)))
    files.update(extra_files or {})
    _open_folder(ckpt)
    return _complete(out_dir, ckpt, step, files, {}, keep_last, val_loss)


def _open_folder(ckpt: Path) -> None:
    with writing(ckpt):
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / MARKER).unlink(missing_ok=True)      # re-saving a step: mark it incomplete first


def _complete(out_dir: str | os.PathLike, ckpt: Path, step: int, files: dict[str, bytes],
              written: dict[str, dict[str, Any]], keep_last: int, val_loss: float | None) -> Path:
    """Write `files` into `ckpt`, then COMPLETE listing them and the `written` ones (already on
    disk: {name: {sha256, bytes}}), then the pointers; prune. A failed write removes the folder."""
    root = checkpoint_root(out_dir)
    try:
        manifest = dict(written)
        for name, data in files.items():
            atomic_write(ckpt / name, data)
            manifest[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        marker = {"step": step, "val_loss": val_loss, "created": time.time(), "files": manifest}
        atomic_write(ckpt / MARKER, json.dumps(marker, indent=2).encode())
    except WriteError:
        # disk full or unwritable: a folder without COMPLETE is useless and may hold most of a
        # checkpoint's size on the very disk that is full
        shutil.rmtree(ckpt, ignore_errors=True)
        raise
    fsync_dir(ckpt)
    atomic_write(root / "latest", ckpt.name.encode())
    if val_loss is not None and val_loss == val_loss:        # not NaN
        best = read_best(out_dir)
        if best is None or val_loss < best[1] or best[0].name == ckpt.name:
            atomic_write(root / "best", json.dumps({"name": ckpt.name, "val_loss": val_loss}).encode())
    fsync_dir(root)
    prune_checkpoints(out_dir, keep_last)
    return ckpt


# ---------------------------------------------------------------------- sharded (--parallel fsdp)
SHARDS_DIR = "sharded"


def shards_dir(ckpt: str | os.PathLike) -> Path:
    """The DCP folder of a sharded checkpoint: each rank's `__<rank>_0.distcp` and `.metadata`."""
    return Path(ckpt) / SHARDS_DIR


def is_sharded_checkpoint(ckpt: str | os.PathLike) -> bool:
    return shards_dir(ckpt).is_dir()


def file_digests(folder: Path, pattern: str) -> dict[str, dict[str, Any]]:
    """{"<folder name>/<file>": {sha256, bytes}} of the files of `folder` matching `pattern`,
    named as COMPLETE lists them (relative to the checkpoint folder)."""
    return {f"{folder.name}/{p.name}": {"sha256": _file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.glob(pattern)) if p.is_file()}


def save_sharded_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module,
                            trainer_state: dict[str, Any], keep_last: int,
                            write_shards: Any, is_main: bool, barrier: Any,
                            val_loss: float | None = None,
                            extra_files: dict[str, bytes] | None = None,
                            base_dir: str | os.PathLike | None = None) -> Path | None:
    """A sharded checkpoint, called on every rank:

        step_000123/sharded/      weights + optimizer state, one file per rank (DCP); with a
                                  frozen base (`base_dir`) only the trainable part, as base.json says
        config.json, trainer_state.json/.safetensors (no optimizer: it is in the shards),
        base.json (frozen base), <extra files>, COMPLETE (last, listing every file above)

    `write_shards(folder) -> {name: {sha256, bytes}}` is the collective that writes the shards
    (trainer.distributed.save_sharded, which this module does not import). Until the main rank
    writes COMPLETE, after every rank's shards are on disk, resume skips the folder: a crash
    mid-save leaves the previous checkpoint the one to load. Returns the folder on the main rank.
    """
    ckpt = checkpoint_root(out_dir) / f"step_{step:06d}"
    if is_main:
        _open_folder(ckpt)
        shutil.rmtree(shards_dir(ckpt), ignore_errors=True)    # an earlier, unfinished attempt
    barrier()
    written = write_shards(shards_dir(ckpt))
    if not is_main:
        return None
    files = {CONFIG_NAME: config_bytes(model.config)}
    if base_dir is not None:
        files[BASE_NAME] = json.dumps({**base_reference(base_dir, model), "trainable_elsewhere": {}},
                                      indent=2, sort_keys=True).encode()
    files.update(zip(STATE_NAMES, resume_state.encode(trainer_state)))
    files.update(extra_files or {})
    return _complete(out_dir, ckpt, step, files, written, keep_last, val_loss)


def read_sharded_state(ckpt: str | os.PathLike, base_dir: str | os.PathLike | None,
                       verify_base: bool = True) -> dict[str, Any]:
    """The trainer state of a sharded checkpoint (the weights and optimizer are read by
    trainer.distributed.load_sharded); checks its frozen base first, as load_checkpoint does."""
    ckpt = Path(ckpt)
    if (ckpt / BASE_NAME).exists() and verify_base:
        check_base(ckpt, base_dir)
    return resume_state.read(ckpt)


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


def load_checkpoint(ckpt: str | os.PathLike, model: nn.Module, verify: bool = True,
                    base_dir: str | os.PathLike | None = None,
                    verify_base: bool = True) -> dict[str, Any]:
    """Load weights into `model` and return the trainer state (tensors on CPU).

    A checkpoint without base weights needs `model` to hold its base already (loaded from
    `base_dir`, whose fingerprint must match: `verify_base`, which other ranks than the main one
    skip, so a 60 GB base is hashed by the main process alone) and refills only the
    trainable part.
    """
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    if (ckpt / BASE_NAME).exists():
        if verify_base:
            check_base(ckpt, base_dir)
        ref = json.loads((ckpt / BASE_NAME).read_text())
        _load_trainable(ckpt, model, ref.get("trainable_elsewhere", {}))
    else:
        load_weights(ckpt, model)
    return resume_state.read(ckpt)


# ---------------------------------------------------------------------- a write that failed
def last_complete_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint with its COMPLETE marker (not re-hashed: resume verifies it)."""
    done = [p for p in list_checkpoints(out_dir) if (p / MARKER).exists()]
    return done[-1] if done else None


@contextlib.contextmanager
def resume_hint_on_write_error(out_dir: str | os.PathLike) -> Iterator[None]:
    """A WriteError (disk full, unwritable folder) raised inside gets what to resume from, so the
    run ends with one line: the path, the error and the last complete checkpoint."""
    try:
        yield
    except WriteError as exc:
        if exc.hinted:
            raise
        ckpt = last_complete_checkpoint(out_dir)
        hint = (f"last complete checkpoint: {ckpt} (free space, then rerun with --resume auto)"
                if ckpt else "no complete checkpoint to resume from")
        err = WriteError(f"{exc}; {hint}")
        err.errno, err.hinted = exc.errno, True
        raise err from exc
