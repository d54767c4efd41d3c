"""The training set: a folder of images with captions (same-name .txt, metadata.jsonl or one prompt)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, first_line
from .config import DataConfig

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


def _jsonl_captions(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path} line {n} is not valid JSON ({exc})") from exc
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise ConfigError(f"{path} line {n} needs string fields file_name and text")
        out[row["file_name"]] = row["text"]
    return out


def _check_image(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        raise ConfigError(f"data.dir: {path.name} is not a readable image ({first_line(exc)}); fix or remove it"
                          ) from exc


def scan(cfg: DataConfig) -> list[Example]:
    """Every image of `cfg.dir` with its caption; each image is decoded once to catch broken files."""
    folder = Path(cfg.dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.dir={cfg.dir!r} is not a folder; give the folder of training images")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    if not images:
        raise ConfigError(f"data.dir={cfg.dir!r} has no images ({', '.join(IMAGE_EXT)})")
    meta = folder / METADATA
    if cfg.captions == "jsonl" and not meta.is_file():
        raise ConfigError(
            f"data.captions=jsonl but {meta} does not exist; write one line per image: "
            '{"file_name": ..., "text": ...}'
        )
    jsonl = _jsonl_captions(meta) if cfg.captions in ("auto", "jsonl") and meta.is_file() else {}
    fallback = (cfg.caption or "").strip() or None
    out = []
    for path in images:
        _check_image(path)
        txt = path.with_suffix(".txt")
        caption: str | None
        if cfg.captions == "fixed":
            caption = fallback
        elif cfg.captions == "jsonl" or path.name in jsonl:
            caption = jsonl.get(path.name)
        elif txt.is_file():
            caption = txt.read_text(encoding="utf-8-sig").strip()
        else:
            caption = None
        if caption is None and cfg.captions == "auto":
            caption = fallback
        if not caption:
            where = {"txt": f"{txt.name} is missing or empty", "jsonl": f"it is not in {METADATA}"}.get(
                cfg.captions, f"no {txt.name}, no {METADATA} entry and no data.caption"
            )
            raise ConfigError(f"caption missing for {path.name}: {where}; add it or set data.caption='...'")
        out.append(Example(path, caption))
    return out


def load_pixels(example: Example, size: int, crop: str, flip: bool, gen: Any):
    """The image as a (3, size, size) tensor in [-1, 1]: resize the short side, crop, maybe flip."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(example.path) as im:
        im = im.convert("RGB")
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BILINEAR)
    if crop == "random":
        left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def sample_order(n: int, seed: int, position: int, count: int) -> list[int]:
    """Indices of examples `position .. position+count-1` in a stream of seeded per-epoch shuffles."""
    import torch

    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(position + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.extend(perm[offset : offset + count - len(out)])
    return out
