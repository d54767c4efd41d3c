"""The training set: a folder of images with captions (same-name .txt, metadata.jsonl or one prompt).

Subfolders named `N_name` (kohya's layout) repeat their images N times per epoch; other subfolders once. Images
are read as a user expects: EXIF orientation applied, CMYK/palette/alpha/16-bit converted to 8-bit RGB; a corrupt
or too-small image is skipped with one warning line each and a count (an error only when nothing is left)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, first_line
from .config import DataConfig

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
_REPEATS = re.compile(r"^(\d+)_.+")
log = logging.getLogger(__name__)


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


def _problem(path: Path, min_size: int) -> str | None:
    """Why an image cannot be trained on (unreadable, too small), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        return f"not a readable image ({first_line(exc)})"
    if min(size) < min_size:
        return f"{size[0]}x{size[1]} is smaller than data.min_size={min_size}"
    return None


def _folders(root: Path) -> list[tuple[Path, int]]:
    """The image folders and their repeats: the root (1) and its subfolders (`N_name`: N, else 1)."""
    out = [(root, 1)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _REPEATS.match(sub.name)
        out.append((sub, int(m.group(1)) if m else 1))
    return out


def scan(cfg: DataConfig) -> list[Example]:
    """Every usable image of `cfg.dir` (and its subfolders, repeated) with its caption."""
    folder = Path(cfg.dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.dir={cfg.dir!r} is not a folder; give the folder of training images")
    out: list[Example] = []
    skipped: list[str] = []
    found = 0
    for sub, repeats in _folders(folder):
        images = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
        found += len(images)
        usable = []
        for path in images:
            why = _problem(path, cfg.min_size)
            if why:
                skipped.append(f"{path.relative_to(folder)}: {why}")
            else:
                usable.append(path)
        examples = _captioned(cfg, sub, usable)
        out += [e for e in examples for _ in range(repeats)]
    if not found:
        raise ConfigError(f"data.dir={cfg.dir!r} has no images ({', '.join(IMAGE_EXT)})")
    if not out:
        raise ConfigError(f"data.dir={cfg.dir!r}: none of its {found} images can be used ({skipped[0]})")
    for line in skipped:
        log.warning("data.dir: skipping %s", line)
    if skipped:
        log.warning("data.dir: skipped %d of %d images", len(skipped), found)
    return out


def _captioned(cfg: DataConfig, folder: Path, images: list[Path]) -> list[Example]:
    """`images` of one folder with their captions (its own metadata.jsonl, same-name .txt, or data.caption)."""
    meta = folder / METADATA
    if cfg.captions == "jsonl" and images and not meta.is_file():
        raise ConfigError(
            f"data.captions=jsonl but {meta} does not exist; write one line per image: "
            '{"file_name": ..., "text": ...}'
        )
    jsonl = _jsonl_captions(meta) if cfg.captions in ("auto", "jsonl") and meta.is_file() else {}
    fallback = (cfg.caption or "").strip() or None
    out = []
    for path in images:
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
        out.append(Example(path, _with_trigger(caption, cfg.trigger)))
    return out


def _with_trigger(caption: str, trigger: str | None) -> str:
    if not trigger:
        return caption
    if "[trigger]" in caption:
        return caption.replace("[trigger]", trigger)
    return f"{trigger}, {caption}"


def training_caption(caption: str, cfg: DataConfig, gen: Any) -> str:
    """The caption a sample trains on this time: maybe dropped, tags maybe shuffled (first keep_tokens kept)."""
    import torch

    if cfg.caption_dropout and float(torch.rand((), generator=gen)) < cfg.caption_dropout:
        return ""
    if not cfg.shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    keep, rest = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    order = torch.randperm(len(rest), generator=gen).tolist()
    return ", ".join(keep + [rest[i] for i in order])


def open_rgb(path: Path):
    """The image as 8-bit RGB the way a viewer shows it: EXIF orientation applied, CMYK/palette/alpha/16-bit
    converted (16-bit scaled down, not clipped)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            bg = Image.new("RGB", im.size, "white")  # transparent areas on white, as kohya and A1111 do
            rgba = im.convert("RGBA")
            bg.paste(rgba, mask=rgba.getchannel("A"))
            return bg
        return im.convert("RGB")


def load_pixels(example: Example, size: int | tuple[int, int], crop: str, flip: bool, gen: Any):
    """The image as a (3, H, W) tensor in [-1, 1]: resize to cover `size` (a side, or width x height), crop the
    overhang (centre or random), maybe flip."""
    import numpy as np
    import torch
    from PIL import Image

    im = open_rgb(example.path)
    tw, th = (size, size) if isinstance(size, int) else size
    scale = max(tw / im.width, th / im.height)
    w, h = max(tw, round(im.width * scale)), max(th, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BILINEAR)
    if crop == "random":
        left = int(torch.randint(0, w - tw + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - th + 1, (1,), generator=gen))
    else:
        left, top = (w - tw) // 2, (h - th) // 2
    im = im.crop((left, top, left + tw, top + th))
    if draw_flip(flip, gen):
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def draw_flip(flip: bool, gen: Any) -> bool:
    """Whether a sample is flipped (one draw from `gen` when `flip` is on, after the crop's draws)."""
    import torch

    return flip and bool(torch.rand((), generator=gen) < 0.5)


def bucket_size(width: int, height: int, side: int, factor: int) -> tuple[int, int]:
    """The bucket (width, height) of a `width` x `height` image at resolution `side`: about side^2 pixels at the
    image's aspect ratio, both multiples of `factor`, so only a sliver is cropped (never the subject)."""
    aspect = width / height
    bw = max(factor, round(side * aspect**0.5 / factor) * factor)
    bh = max(factor, round(side / aspect**0.5 / factor) * factor)
    return bw, bh


def bucket_items(examples: list[Example], sides: list[int], factor: int) -> list[tuple[int, tuple[int, int]]]:
    """(example index, bucket size) for every example at every resolution of `sides`."""
    from PIL import Image, ImageOps

    out = []
    for i, e in enumerate(examples):
        with Image.open(e.path) as im:
            w, h = ImageOps.exif_transpose(im).size
        out += [(i, bucket_size(w, h, side, factor)) for side in sides]
    return out


def bucket_batch(items: list[tuple[int, tuple[int, int]]], seed: int, batch_size: int, number: int
                 ) -> list[tuple[int, tuple[int, int]]]:
    """Batch `number` of a stream of seeded epochs; each batch holds items of one bucket (shuffled inside each
    bucket, then the batch order shuffled), so the stream at any batch is a function of the seed alone."""
    import torch

    groups: dict[tuple[int, int], list[int]] = {}
    for k, (_, size) in enumerate(items):
        groups.setdefault(size, []).append(k)
    per_epoch = sum(-(-len(g) // batch_size) for g in groups.values())
    epoch, offset = divmod(number, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for size in sorted(groups):
        g = groups[size]
        order = [g[j] for j in torch.randperm(len(g), generator=gen).tolist()]
        batches += [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    pick = batches[torch.randperm(len(batches), generator=gen).tolist()[offset]]
    return [items[k] for k in pick]


def sample_order(n: int, seed: int, position: int, count: int) -> list[int]:
    """Indices of examples `position .. position+count-1` in a stream of seeded per-epoch shuffles."""
    import torch

    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(position + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.extend(perm[offset : offset + count - len(out)])
    return out
