"""Run-dir outputs: atomic PNG writes off the generating thread, and `manifest.jsonl` as the source of truth."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from .metadata import pnginfo

log = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp name beside `path`, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_png(image: Any, path: Path, record: dict) -> None:
    """Encode `image` with its metadata chunks and write it atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo(record))
    atomic_write_bytes(path, buf.getvalue())


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


class ImageWriter:
    """Encodes and writes PNGs in background threads (bounded queue), then appends their manifest lines."""

    def __init__(self, run_dir: Path, manifest: Manifest, threads: int = 2, depth: int = 16, on_done=None) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = manifest
        self.on_done = on_done
        self.error: BaseException | None = None
        self._closed = False
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._threads = [threading.Thread(target=self._work, name=f"png-writer-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            image, entry = item
            try:
                if self.error is None:
                    save_png(image, self.run_dir / entry["file"], entry)
                    self.manifest.append(entry)
                    if self.on_done is not None:
                        self.on_done(entry)
            except BaseException as exc:  # noqa: BLE001 - reported to the generating thread
                self.error = exc
            finally:
                self._q.task_done()

    def submit(self, image: Any, entry: dict) -> None:
        """Queue one image (blocks while the queue is full); raises a writer error promptly."""
        if self.error is not None:
            raise self.error
        self._q.put((image, entry))

    def close(self) -> None:
        """Wait for every queued image, stop the threads, and raise the first write error if any (once)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise self.error
