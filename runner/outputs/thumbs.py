"""Thumbnails for the viewer, made by the writer threads: JPEGs beside each PNG, `thumbs/<stem>.jpg` (256 px) and
`thumbs/small/<stem>.jpg` (64 px, for cells that show many images at once)."""

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
SMALL_SIZE = 64  # the second tier: a page that draws 1,000 tiles of 20 px decodes 1,000 of these, not 256 px ones
SMALL_DIR = "small"
QUALITY = 82


def thumb_rel(file: str, small: bool = False) -> str:
    """The thumbnail of an image, as a path relative to the same folder as `file` (which may be relative)."""
    head, name = posixpath.split(file.replace("\\", "/"))
    folder = posixpath.join(head, THUMB_DIR, SMALL_DIR) if small else posixpath.join(head, THUMB_DIR)
    return posixpath.join(folder, posixpath.splitext(name)[0] + ".jpg")


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
    """Write both thumbnails of `image` (saved as `base/file`), each atomically."""
    from PIL import Image

    path, small = Path(base) / thumb_rel(file), Path(base) / thumb_rel(file, small=True)
    small.parent.mkdir(parents=True, exist_ok=True)
    data = encode_thumb(image, size)
    atomic_write_bytes(path, data)
    with Image.open(io.BytesIO(data)) as im:  # from the thumbnail: 16x fewer pixels to shrink
        atomic_write_bytes(small, encode_thumb(im, min(size, SMALL_SIZE)))


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


def has_thumbs(base: Path, file: str) -> bool:
    return (Path(base) / thumb_rel(file)).is_file() and (Path(base) / thumb_rel(file, small=True)).is_file()


def ensure_thumbs(base: Path, entries: Iterable[dict], size: int = THUMB_SIZE) -> int:
    """Make the missing thumbnails of `entries` (files relative to `base`) from their PNGs; returns how many."""
    from PIL import Image

    made = 0
    for entry in entries:
        png = Path(base) / entry["file"]
        if has_thumbs(base, entry["file"]) or not png.is_file():
            continue
        try:
            with Image.open(png) as im:
                save_thumb(im, base, entry["file"], size)
            made += 1
        except (OSError, ValueError) as exc:
            log.warning("viewer: no thumbnail for %s (%s)", png, exc)
    return made
