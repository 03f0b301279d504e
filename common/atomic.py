"""Atomic file writes, used by every writer in the project (weights, configs, data, reports).

A file is written to a temporary name in the same folder, fsynced and renamed over the target,
then the folder is fsynced: a crash at any moment leaves either the old file or the new one,
never half of one. Standard library only, so data tools can use it without importing torch.

A write that fails (disk full, read-only or unwritable folder) raises common.errors.WriteError
naming the target: one line at the command line, no traceback; the temporary file is removed.
`new_folder` does the same for a folder of such files: one this call created goes again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from common.errors import writing


def fsync_dir(path: str | Path) -> None:
    """Persist a rename: the directory entry must reach the disk too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside ``path``; on success fsyncs it and renames it over ``path``."""
    path = Path(path)
    with writing(path, path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with writing(path, tmp):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """Yields `path` (created if absent) for a writer to fill; if the writer fails, a folder
    this call created is removed, so a full disk leaves no half-written folder behind. A folder
    that existed before keeps its files (each written atomically: old or new, never half)."""
    path = Path(path)
    existed = path.is_dir()
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8, newlines written as given (no platform translation)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
