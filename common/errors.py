"""The error boundary of every entry point: a user's mistake is one line, a bug a traceback.

Raise a `UserError` subclass for anything the person running the script has to fix — an invalid
option (trainer.config.ConfigError), a malformed data line (dataset.jsonl.DataError, reading
"file:line: what is wrong"), a missing model folder (ModelNotFoundError), an unknown preset, an
incompatible adapter. Each script ends with

    if __name__ == "__main__":
        run_cli(main)

and `run_cli` turns a UserError into ONE line, `error: <message>`, on stderr and exit status 2
(argparse's status for bad usage). Any other exception is a bug and keeps its traceback.
A write the system refuses (disk full, read-only or unwritable folder) is a `WriteError`, a
UserError too: `writing(path)` turns the OSError into one, naming the path.
`--debug` anywhere on the command line (removed before the script's parser sees it) or
MINIMIND_DEBUG=1 shows the traceback of user errors too.

The error types keep their old bases (ValueError, FileNotFoundError) next to UserError, so
library callers' `except ValueError` still works. This module lives in model/, the bottom layer
that dataset/, trainer/, serving/ and scripts/ already import, and imports nothing itself.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MINIMIND_DEBUG"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user must fix (options, data, paths); shown without a traceback."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model or adapter folder, or a file it needs (config.json, weights), does not exist."""


class ModelFolderError(UserError, ValueError):
    """A model or adapter folder whose files are unusable (invalid config.json, corrupt weights,
    weights that do not fit the config) or an adapter that does not fit the model."""


class WriteError(UserError, OSError):
    """A file or folder could not be written: disk full, quota, read-only or unwritable folder.
    Not a bug, so one line (the path and the system's reason), no traceback. `hinted` marks a
    message that already says what to resume from (trainer.checkpoint.resume_hint)."""

    hinted = False


@contextlib.contextmanager
def writing(path: str | Path, *own: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a WriteError naming it. An error about
    another file (a source being copied, say: its `filename` is neither `path`, its folder, nor
    one of `own` or inside it) passes unchanged: it is not a write failure."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        if exc.filename is not None:
            name, target = Path(exc.filename), Path(path)
            owned = [Path(p) for p in own]
            if name not in (target, target.parent) and not any(name == p or p in name.parents
                                                                for p in owned):
                raise
        err = WriteError(f"{path}: cannot write: {exc.strerror or exc}")
        err.errno = exc.errno
        raise err from exc


def one_line(exc: BaseException) -> str:
    """The message on one line: a multi-line list ("problems:\\n  - a\\n  - b") becomes "problems: a; b"."""
    lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def debug_requested(argv: list[str] | None = None) -> bool:
    """Whether tracebacks were asked for: `--debug` in argv or MINIMIND_DEBUG set (not 0/'')."""
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's `main()` behind the boundary (see the module docstring); exits on a UserError."""
    debug = debug_requested()
    sys.argv[1:] = [a for a in sys.argv[1:] if a != DEBUG_FLAG]
    try:
        main()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
