"""`manifest.jsonl`: one JSON line per image file of a run dir, the run dir's source of truth (resume, grids, merge).

A line is appended only after its file is in place (atomic rename), so a line always names a complete file; the
file name is unique in the run dir and never reused. Reading is O(1) per line: no image is decoded.
Writers that share a run dir serialise appends and rewrites with the run dir's lock (outputs/rundir.py).
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from ..common.io import atomic_write_bytes

MANIFEST = "manifest.jsonl"


def png_complete(path: Path) -> bool:
    """True if the PNG exists and decodes fully (a slow, full check; resume does not need it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decode failure means incomplete
        return False


def dumps(entry: dict) -> str:
    """One manifest line: strict JSON (a non-finite number, which JSON has no form for, is written as null, so no
    reader — ours, the viewer's, jq — ever meets `Infinity`)."""
    try:
        return json.dumps(entry, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_finite(entry), ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"


def _finite(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def loads(line: str) -> object:
    """A JSON line read strictly: `NaN`/`Infinity` (which Python reads but JSON has not) raise ValueError."""
    return json.loads(line, parse_constant=_no_constant)


def parse_lines(data: bytes) -> list[dict]:
    """The valid manifest lines of `data` (a torn, foreign or non-JSON line is skipped; every other is kept)."""
    out = []
    for line in data.decode("utf-8", errors="replace").split("\n"):  # JSON strings hold no raw newline
        if not line:
            continue
        try:
            entry = loads(line)  # `NaN`/`Infinity`: not a line of ours
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("file"), str) and "key" in entry:
            out.append(entry)
    return out


def one_per_file(entries: Iterable[dict]) -> list[dict]:
    """One line per file: the last one written for it (the file holds what was written last), in the order the
    files first appear."""
    last: dict[str, dict] = {}
    for e in entries:
        last[e["file"]] = e  # a dict keeps a key's first position and takes its latest value
    return list(last.values())


class Tail:
    """Reads the lines appended to a file since the last read (by any process); a rewritten file is read anew."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ino: int | None = None
        self._offset = 0

    def skip(self) -> None:
        """Treat everything in the file now as read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._ino, self._offset = None, 0
            return
        with open(self.path, "rb") as f:  # up to the last whole line, like read()
            f.seek(max(0, st.st_size - 1))
            whole = st.st_size if f.read(1) == b"\n" else None
        if whole is None:
            whole = self.path.read_bytes().rfind(b"\n") + 1
        self._ino, self._offset = st.st_ino, whole

    def read(self) -> tuple[list[dict], bool]:
        """(new lines, whether the file was rewritten and these are all of its lines)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            rewritten = self._offset > 0
            self._ino, self._offset = None, 0
            return [], rewritten
        rewritten = self._ino is not None and (st.st_ino != self._ino or st.st_size < self._offset)
        if rewritten or self._ino is None:
            self._ino, self._offset = st.st_ino, 0
        if st.st_size == self._offset:
            return [], rewritten
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(st.st_size - self._offset)
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        return parse_lines(data[:end]), rewritten


class Manifest:
    """The run dir's manifest file: read it, append one line, rewrite it atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST
        self._lock = threading.Lock()

    def entries(self) -> list[dict]:
        """One valid line per file (a torn last line from a killed process is skipped)."""
        try:
            return one_per_file(parse_lines(self.path.read_bytes()))
        except FileNotFoundError:
            return []

    def recover(self, present: set[str] | None = None) -> list[dict]:
        """The lines whose file is in the run dir, one per file; rewrites the manifest when that drops anything
        (lines of deleted files, duplicate lines, a torn last line). `present`: the run dir's file names, when
        the caller has listed them already. O(1) per line: completeness is guaranteed by the atomic rename."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        if present is None:
            present = {d.name for d in os.scandir(self.run_dir)}
        raw = parse_lines(data)
        kept = [e for e in one_per_file(raw) if e["file"] in present]
        if len(kept) != data.count(b"\n") or (data and not data.endswith(b"\n")):
            self.rewrite(kept)
        return kept

    def rewrite(self, entries: Iterable[dict]) -> None:
        """Replace the manifest by `entries` atomically (the caller holds the run dir's lock)."""
        with self._lock:
            atomic_write_bytes(self.path, "".join(dumps(e) for e in entries).encode("utf-8"))

    def append(self, entry: dict) -> None:
        """Append one line, durably (the caller holds the run dir's lock when others may write too)."""
        append_line(self.path, dumps(entry), self._lock)


def append_line(path: Path, line: str, lock: threading.Lock | None = None) -> None:
    """Append `line` to `path` and fsync; a torn last line left by a killed process is ended first, so the new
    line stays whole."""
    data = line.encode("utf-8")
    with lock or threading.Lock():
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            if os.write(fd, data) != len(data):  # a full disk may take part of it: the line is not there
                raise OSError(errno.ENOSPC, f"short write to {path}")
            os.fsync(fd)
        finally:
            os.close(fd)
