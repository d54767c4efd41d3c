"""Thumbnails for the viewer: a small JPEG beside each PNG (`thumbs/<stem>.jpg`), made by the writer threads."""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..common.io import atomic_write_bytes

log = logging.getLogger(__name__)
THUMB_DIR = "thumbs"
THUMB_SIZE = 256  # longest side in pixels: sharp at 128 CSS px on a 2x screen, ~10 kB per image
QUALITY = 82


def thumb_rel(file: str) -> str:
    """The thumbnail of an image, as a path relative to the same folder as `file` (which may be relative)."""
    head, name = posixpath.split(file.replace("\\", "/"))
    return posixpath.join(head, THUMB_DIR, posixpath.splitext(name)[0] + ".jpg")


def encode_thumb(image: Any, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of `image` shrunk to fit `size`×`size` (never enlarged)."""
    from PIL import Image

    im = image.convert("RGB")
    if max(im.size) > size:
        im = im.copy()
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()


def save_thumb(image: Any, base: Path, file: str, size: int = THUMB_SIZE) -> None:
    """Write the thumbnail of `image` (saved as `base/file`) atomically."""
    path = Path(base) / thumb_rel(file)
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, encode_thumb(image, size))


class ThumbWriter:
    """The writer threads' hook: one thumbnail per saved PNG. A failure is logged once and never stops a run
    (the viewer falls back to the PNG)."""

    def __init__(self, base: Path, size: int = THUMB_SIZE) -> None:
        self.base = Path(base)
        self.size = size
        self._warned = False

    def __call__(self, image: Any, entry: dict) -> None:
        try:
            save_thumb(image, self.base, entry["file"], self.size)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("viewer: cannot write thumbnails (%s); the viewer shows the full PNGs", exc)


def ensure_thumbs(base: Path, entries: Iterable[dict], size: int = THUMB_SIZE) -> int:
    """Make the missing thumbnails of `entries` (files relative to `base`) from their PNGs; returns how many."""
    from PIL import Image

    made = 0
    for entry in entries:
        png = Path(base) / entry["file"]
        if (Path(base) / thumb_rel(entry["file"])).is_file() or not png.is_file():
            continue
        try:
            with Image.open(png) as im:
                save_thumb(im, base, entry["file"], size)
            made += 1
        except (OSError, ValueError) as exc:
            log.warning("viewer: no thumbnail for %s (%s)", png, exc)
    return made
