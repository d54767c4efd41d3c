"""Atomic file writes: a temp name beside the target, fsync, then rename (never a half-written file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write `data` to a temp name beside `path`, fsync, then rename over it.

    With `overwrite=False` an existing `path` is never replaced (FileExistsError): the temp file is hard-linked
    into place, which fails atomically if the name is taken (a plain existence check where links do not work)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _place_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if path.exists():
            raise FileExistsError(errno.EEXIST, "will not overwrite an existing file", str(path)) from None
        os.replace(tmp, path)
