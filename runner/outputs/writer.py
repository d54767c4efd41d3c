"""PNG writing off the generating thread: atomic files first, then their manifest lines."""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..common.io import atomic_write_bytes
from .metadata import pnginfo
from .rundir import Claim, RunDir

log = logging.getLogger(__name__)


def save_png(image: Any, path: Path, record: dict, overwrite: bool = False) -> None:
    """Encode `image` with its metadata chunks and write it atomically; an existing file is replaced only with
    `overwrite` (an image regenerated in place, same key)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo(record))
    atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)


def manifest_line(record: dict, claim: Claim, labels: dict | None = None) -> dict:
    """The manifest line of a written image: its record plus where and when it was written, and the `labels` of
    the run that made it (a tool's own sweep axis, e.g. t2i-train's `step`: a field each, named in `label_axes`;
    not in the PNG, which holds what the image is)."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    named = {**labels, "label_axes": list(labels)} if labels else {}
    return {**record, **named, "file": claim.file, "index": claim.number, "created": created}


class ImageWriter:
    """Encodes and writes PNGs in background threads (bounded queue), then appends their manifest lines."""

    def __init__(self, run_dir: RunDir, threads: int = 2, depth: int = 16, on_done=None, after_save=None,
                 labels: dict | None = None) -> None:
        self.run_dir = run_dir
        self.labels = labels
        self.on_done = on_done
        self.after_save = after_save  # (image, entry) in the writer thread once the PNG is in place: thumbnails
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
            image, record, claim = item
            try:
                if self.error is None:
                    save_png(image, self.run_dir.path / claim.file, record, overwrite=claim.replaces)
                    entry = manifest_line(record, claim, self.labels)
                    if self.after_save is not None:
                        self.after_save(image, entry)
                    self.run_dir.commit(entry, replaces=claim.replaces)
                    if self.on_done is not None:
                        self.on_done(entry)
            except BaseException as exc:  # noqa: BLE001 - reported to the generating thread
                self.error = exc
            finally:
                self._q.task_done()

    def submit(self, image: Any, record: dict, claim: Claim) -> None:
        """Queue one image (blocks while the queue is full); raises a writer error promptly."""
        if self.error is not None:
            raise self.error
        self._q.put((image, record, claim))

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
