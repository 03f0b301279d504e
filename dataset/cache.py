"""On-disk cache of tokenized datasets: memory-mapped ``.npy`` arrays plus a ``meta.json``.

Scope: keys, fingerprints and atomic storage; what the arrays mean is up to ``lm_dataset``.

Key = hash of (format version, content hash of every source file, tokenizer fingerprint, and the
build options — kind, max length, mode, BOS policy, ...). Content hashes (SHA-256 of the bytes)
are what decides a hit; hashing a large corpus on every start would be slow, so the digest is
memoised in ``fingerprints.json`` under (absolute path, size, mtime_ns) — an edited file changes
its mtime and is re-hashed (files modified in the last 2 s are never memoised, so a same-size
rewrite within one timestamp tick cannot alias). Entries are written to a temporary folder and
renamed into place, so a crash never leaves a half-written entry that a later run would trust;
the folder only appears once ``meta.json`` and every array are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_text
from common.errors import writing

CACHE_VERSION = 2  # bump when the meaning of cached arrays changes
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "tokenized"
_PROBE = "Hello, world! 你好，世界。 123 + 4.5 = ?\n\t<think>\n</think> café ÷ 😀"


def default_cache_dir() -> Path:
    """``$MINIMIND_DATA_CACHE`` if set, else ``.cache/tokenized/`` in the repository."""
    env = os.environ.get("MINIMIND_DATA_CACHE")
    return Path(env) if env else DEFAULT_CACHE_DIR


def _stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)


def hash_bytes_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | Path, cache_dir: Path | None = None) -> str:
    """SHA-256 of the file's bytes, memoised by (path, size, mtime) in ``cache_dir``."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = (cache_dir or default_cache_dir()) / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if stamp in memo:
        return memo[stamp]
    digest = hash_bytes_of(path)
    # A file modified within the filesystem's timestamp granularity could change again with the
    # same (size, mtime); only memoise once its mtime is safely in the past (git's "racy" rule).
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return digest
    memo[stamp] = digest
    try:
        atomic_write_text(memo_path, json.dumps(memo, indent=0))
    except OSError:
        pass  # a read-only cache dir only costs a re-hash next time
    return digest


_TOKENIZER_FP: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes when the tokenizer would tokenize or render anything differently.

    Uses ``tokenizer.fingerprint`` when the tokenizer provides one; otherwise hashes the chat
    template, the special ids, every vocabulary entry (decoded) and the encoding of a probe text
    (which catches changed merges). Memoised per tokenizer object.
    """
    own = getattr(tokenizer, "fingerprint", None)
    if isinstance(own, str):
        return own
    try:
        return _TOKENIZER_FP[tokenizer]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256()
    parts = [
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", ""),
        tokenizer.vocab_size,
        tokenizer.pad_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.encode(_PROBE),
    ]
    h.update(_stable_json(parts).encode())
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.decode([i]).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    digest = h.hexdigest()
    try:
        _TOKENIZER_FP[tokenizer] = digest
    except TypeError:
        pass
    return digest


def cache_key(**parts: Any) -> str:
    """A short stable key from named parts (values must be JSON-serialisable)."""
    return hashlib.sha256(_stable_json({"v": CACHE_VERSION, **parts}).encode()).hexdigest()[:32]


@dataclass
class CacheEntry:
    """Loaded arrays (read-only memory maps) and the metadata stored with them."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path


class TokenCache:
    """A folder of entries ``<key>/{meta.json, <name>.npy}``."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def load(self, key: str) -> CacheEntry | None:
        """The entry for ``key``, memory-mapped, or None when absent or unreadable."""
        path = self.dir / key
        try:
            meta = json.loads((path / "meta.json").read_text())
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        except (OSError, ValueError, KeyError):
            return None
        return CacheEntry(arrays, meta, path)

    def save(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> CacheEntry:
        """Write the entry atomically (temp folder + rename) and return it memory-mapped."""
        with writing(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".{key}.", suffix=".tmp"))
        try:
            with writing(self.dir / key, tmp):   # disk full: one line naming the entry
                for name, arr in arrays.items():
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
                full_meta = {**meta, "arrays": sorted(arrays), "version": CACHE_VERSION}
                (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, ensure_ascii=False))
            final = self.dir / key
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished the same entry first; theirs is equivalent.
                if not (final / "meta.json").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = self.load(key)
        if entry is None:
            raise OSError(f"cache entry {self.dir / key} unreadable right after writing")
        return entry
