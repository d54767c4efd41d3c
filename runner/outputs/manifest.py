"""`manifest.jsonl`: one JSON line per finished image, the run dir's source of truth (resume, grids, merge)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ..common.io import TMP_SUFFIX, atomic_write_bytes

MANIFEST = "manifest.jsonl"


def png_complete(path: Path) -> bool:
    """True if the PNG exists and decodes fully."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decode failure means incomplete
        return False


class Manifest:
    """Append-only JSON lines, one per finished image; a line is written only after its file is in place."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST
        self._lock = threading.Lock()

    def entries(self) -> list[dict]:
        """Valid lines (a torn last line from a killed process is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "file" in entry and "key" in entry:
                out.append(entry)
        return out

    def recover(self, verify: bool = True) -> dict[str, dict]:
        """Done images by key; drops lines whose file is missing or broken, removes temp files, rewrites cleanly."""
        for tmp in self.run_dir.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
        done: dict[str, dict] = {}
        entries = self.entries()
        for entry in entries:
            path = self.run_dir / entry["file"]
            if entry["key"] in done or not path.is_file() or (verify and not png_complete(path)):
                continue
            done[entry["key"]] = entry
        if self.path.is_file() and len(done) != len(self.path.read_text(encoding="utf-8").splitlines()):
            text = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in done.values())
            atomic_write_bytes(self.path, text.encode("utf-8"))
        return done

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
