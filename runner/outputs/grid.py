"""Labelled XY comparison grids of a run dir's manifest (A1111's "X/Y plot"): one per value of the other swept
axes, split into pages so no grid is huge, and every image in exactly one grid cell under labels that tell it apart.

Images that agree on every grid axis (same prompt with two negative prompts, one LoRA set at two per-adapter
scales, a LoRA file retrained under the same name, ...) would share a cell: the fields that tell them apart are
added as page axes (shown in the grid's title), down to the file name if nothing else differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, did_you_mean
from ..common.io import TMP_SUFFIX, atomic_write_bytes
from ..common.paths import slug
from ..config import GridConfig
from ..plan import AXES
from .manifest import Manifest

log = logging.getLogger(__name__)
GRID_AXES = (*AXES, "negative_prompt", "model")
AUTO_AXES = tuple(a for a in GRID_AXES if a != "negative_prompt")  # it goes with its prompt: not picked alone
DETAIL_AXES = ("lora_files", "model_build", "file")  # tell apart what the grid axes cannot; `file` always can
GRID_DIR = "grids"
GRID_KEY = "t2i-grid"  # PNG iTXt key of the grid's JSON description
GRID_VERSION = 2
MIN_FONT = 6
NAME_MAX = 100  # characters of a grid file name before `.png`


def check_axes(grid: GridConfig, labels: tuple[str, ...] = ()) -> None:
    """Reject an unknown `grid.x` / `grid.y` (before any image is generated); `labels`: the run's own label axes
    (outputs/writer.py `manifest_line`)."""
    valid = (*GRID_AXES, *labels)
    for name in ("x", "y"):
        value = getattr(grid, name)
        if value is not None and value not in valid:
            raise ConfigError(f"grid.{name}={value!r} is not an axis{did_you_mean(value, valid)}; valid: "
                              f"{', '.join(valid)}")
    if grid.x is not None and grid.x == grid.y:
        raise ConfigError(f"grid.x and grid.y are both {grid.x!r}; pick two different axes")


def _set_name(entry: dict) -> str:
    """The LoRA set by adapter names with their own scales (`A+B@0`); older records rebuild it from the weights."""
    if entry.get("lora_set_name"):
        return entry["lora_set_name"]
    loras = entry.get("loras") or []
    if not loras:
        return "nolora"
    mult = entry.get("lora_scale")
    parts = []
    for lo in loras:
        own = lo.get("scale", 1.0) / mult if mult not in (None, 0) else 1.0
        parts.append((lo.get("name") or "lora") + ("" if round(own, 6) == 1 else f"@{own:g}"))
    return "+".join(parts)


def axis_value(entry: dict, axis: str) -> Any:
    """The value of `axis` for one manifest entry (LoRA sets by adapter names, the model by its name)."""
    if axis == "lora_set":
        return _set_name(entry)
    if axis == "model":
        return (entry.get("model") or {}).get("name")
    if axis == "negative_prompt":
        return entry.get("negative_prompt") or ""
    if axis == "prompt" and entry.get("prompt_sr") is not None:
        return entry.get("prompt_sr_base")  # the prompt before Prompt S/R: its own axis shows the value
    if axis == "lora_files":
        return "+".join(f"{lo.get('name')}:{str(lo.get('sha256'))[:10]}" for lo in entry.get("loras") or []) or "-"
    if axis == "model_build":
        m = entry.get("model") or {}
        return " ".join(str(v)[:10] for v in (m.get("hash"), m.get("config_hash"), m.get("dtype")) if v)
    return entry.get(axis)


def value_label(axis: str, value: Any) -> str:
    """Readable `axis: value` text (A1111's terms for the defaults: Clip skip 1 is the last layer)."""
    if value is None:
        text = {"scheduler": "default", "schedule": "default", "clip_skip": "1", "width": "native",
                "height": "native"}.get(axis, "-")
    elif axis == "negative_prompt" and value == "":
        text = "(none)"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"{axis}: {text}"


def _ordered(values: list[Any]) -> list[Any]:
    """Distinct values: numbers ascending (None first), anything else in order of first appearance."""
    distinct = list(dict.fromkeys(values))
    if all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in distinct):
        return sorted(distinct, key=lambda v: (v is not None, v or 0))
    return distinct


def _distinct(entries: list[dict], axis: str) -> int:
    values = (axis_value(e, axis) for e in entries)
    return len({v for v in values if v is not None or axis != "lora_scale"})


def _swept(entries: list[dict], axes: tuple[str, ...] = GRID_AXES) -> list[str]:
    """The axes with more than one value among `entries` (lora_scale None, i.e. no LoRA, does not count)."""
    return [a for a in axes if _distinct(entries, a) > 1]


def _follows_model(entries: list[dict], axis: str) -> bool:
    """True if every model of `entries` has one value of `axis` (a per-model setting, not a swept axis)."""
    values: dict[str, set] = {}
    for e in entries:
        values.setdefault(json.dumps(axis_value(e, "model")), set()).add(json.dumps(axis_value(e, axis)))
    return all(len(v) == 1 for v in values.values())


def _follows_labels(entries: list[dict], labels: list[str], axis: str) -> bool:
    """True if the values of the label axes `labels` decide `axis` (one value of it for each of theirs)."""
    seen: dict[str, str] = {}
    for e in entries:
        key = json.dumps([axis_value(e, a) for a in labels])
        value = json.dumps(axis_value(e, axis))
        if seen.setdefault(key, value) != value:
            return False
    return True


def pick_axes(entries: list[dict], x: str | None, y: str | None) -> tuple[str | None, str | None]:
    """`grid.x`/`grid.y`, filling a null one with the last swept axes (those with more than one value)."""
    free = [a for a in _swept(entries, AUTO_AXES) if a not in (x, y)]
    if _distinct(entries, "model") > 1:  # settings that differ only with the models' defaults belong to the model
        free = [a for a in free if a == "model" or not _follows_model(entries, a)]
    if x is None and free:
        x = free.pop()
    if y is None and free:
        y = free.pop()
    return x, y


def _collisions(entries: list[dict], axes: list[str]) -> int:
    """How many entries share all of `axes`' values with an earlier one (they would share a grid cell)."""
    return len(entries) - len({tuple(axis_value(e, a) for a in axes) for e in entries})


def tell_apart(entries: list[dict], axes: list[str]) -> list[str]:
    """The extra axes (fewest, in order: the other grid axes, then LoRA file hashes, the model's build, the file
    name) that give every entry its own combination of values."""
    extra: list[str] = []
    left = _collisions(entries, axes)
    for cand in [a for a in GRID_AXES if a not in axes] + list(DETAIL_AXES):
        if not left:
            break
        fewer = _collisions(entries, axes + extra + [cand])
        if fewer < left:
            extra.append(cand)
            left = fewer
    return extra


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (long words are split)."""
    lines: list[str] = []
    for word in text.split() or [""]:
        while font.getlength(word) > width and len(word) > 1:
            cut = 1
            while cut < len(word) - 1 and font.getlength(word[: cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


@dataclass
class _Layout:
    font: Any
    cell: tuple[int, int]
    title: list[str]
    cols: list[list[str]]
    rows: list[list[str]]
    left: int
    top: int
    line_h: int
    pad: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + len(self.cols) * self.cell[0], self.top + len(self.rows) * self.cell[1]


def _layout(cell: tuple[int, int], font_size: int, title: str, cols: list[str], rows: list[str]) -> _Layout:
    from PIL import ImageFont

    font = ImageFont.load_default(size=font_size)
    ascent, descent = font.getmetrics()
    line_h, pad = ascent + descent + 1, max(2, font_size // 2)
    cw, ch = cell
    col_lines = [_wrap(t, font, max(8, cw - 2 * pad)) for t in cols]
    row_w = max(cw, 10 * font_size) - 2 * pad
    max_lines = max(1, (ch - 2 * pad) // line_h)
    row_lines = []
    for t in rows:
        lines = _wrap(t, font, row_w)
        if len(lines) > max_lines:
            lines = [*lines[: max_lines - 1], lines[max_lines - 1] + "..."]
        row_lines.append(lines)
    widest = max((font.getlength(line) for lines in row_lines for line in lines), default=0)
    left = int(widest) + 2 * pad if rows and rows != [""] else 0
    title_lines = _wrap(title, font, max(8, left + len(cols) * cw - 2 * pad)) if title else []
    header = max((len(lines) for lines in col_lines), default=0) * line_h + 2 * pad if cols != [""] else 0
    top = header + (len(title_lines) * line_h + 2 * pad if title_lines else 0)
    return _Layout(font, cell, title_lines, col_lines, row_lines, left, top, line_h, pad)


def _fit(cell: tuple[int, int], font_size: int, max_size: int, title: str, cols: list[str],
         rows: list[str]) -> _Layout:
    """Shrink cells and font together until the grid fits in `max_size` (then labels stay in proportion)."""
    lay = _layout(cell, font_size, title, cols, rows)
    for _ in range(8):
        scale = max_size / max(lay.size)
        if scale >= 1:
            break
        if lay.cell == (1, 1):
            break
        factor = scale if _ == 0 else scale * 0.97
        cell = (max(1, int(lay.cell[0] * factor)), max(1, int(lay.cell[1] * factor)))
        font_size = max(MIN_FONT, int(font_size * factor))
        lay = _layout(cell, font_size, title, cols, rows)
    return lay


def _draw_lines(draw: Any, lay: _Layout, lines: list[str], box: tuple[int, int, int, int]) -> None:
    """Draw `lines` centred in `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    y = y0 + (y1 - y0 - len(lines) * lay.line_h) // 2
    for line in lines:
        w = lay.font.getlength(line)
        draw.text((x0 + (x1 - x0 - w) / 2, y), line, fill=(0, 0, 0), font=lay.font)
        y += lay.line_h


@dataclass
class Page:
    """One grid image: a block of rows x columns of one group (one value of each page axis)."""

    name: str
    x: str | None
    y: str | None
    xs: list[Any]
    ys: list[Any]
    fixed: dict[str, Any]
    cells: list[list[dict | None]]
    page: tuple[int, int]  # (number, of)


def _tile(path: Path, size: tuple[int, int]) -> Any:
    """The image at `path`, fitted into `size` keeping its aspect ratio (None if it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = min(size[0] / im.width, size[1] / im.height)
            if scale >= 1 and im.width <= size[0] and im.height <= size[1]:
                return im.copy()
            fit = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            return im.resize(fit, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except (OSError, ValueError) as exc:
        log.warning("grid: cannot read %s (%s); its cell is left blank", path, exc)
        return None


def render_grid(run_dir: Path, page: Page, grid: GridConfig, pool: ThreadPoolExecutor | None = None
                ) -> tuple[Any, dict]:
    """One labelled grid image (rows = y values, columns = x values) and its JSON description."""
    from PIL import Image, ImageDraw

    present = [e for row in page.cells for e in row if e is not None]
    cell = (max(int(e.get("width") or 64) for e in present), max(int(e.get("height") or 64) for e in present))
    font_size = grid.font_size or max(10, min(cell) // 12)
    title = ", ".join(value_label(a, v) for a, v in page.fixed.items())
    if page.page[1] > 1:
        title = f"{title} (page {page.page[0]} of {page.page[1]})".strip()
    cols = [value_label(page.x, v) for v in page.xs] if page.x else [""]
    rows = [value_label(page.y, v) for v in page.ys] if page.y else [""]
    lay = _fit(cell, font_size, grid.max_size, title, cols, rows)
    width, height = lay.size
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    cw, ch = lay.cell
    if lay.title:
        _draw_lines(draw, lay, lay.title, (0, 0, width, len(lay.title) * lay.line_h + 2 * lay.pad))
    header_top = lay.top - (max(len(c) for c in lay.cols) * lay.line_h + 2 * lay.pad if page.x else 0)
    for c, lines in enumerate(lay.cols if page.x else []):
        _draw_lines(draw, lay, lines, (lay.left + c * cw, header_top, lay.left + (c + 1) * cw, lay.top))
    for r, lines in enumerate(lay.rows if page.y else []):
        _draw_lines(draw, lay, lines, (0, lay.top + r * ch, lay.left, lay.top + (r + 1) * ch))
    spots = [(r, c, e) for r, row in enumerate(page.cells) for c, e in enumerate(row) if e is not None]
    load = (pool.map if pool is not None else map)(lambda s: _tile(run_dir / s[2]["file"], (cw, ch)), spots)
    for (r, c, _), tile in zip(spots, load, strict=True):
        if tile is not None:
            x0, y0 = lay.left + c * cw + (cw - tile.width) // 2, lay.top + r * ch + (ch - tile.height) // 2
            canvas.paste(tile, (x0, y0))
    if max(canvas.size) > grid.max_size:  # labels alone are wider than max_size: shrink everything
        s = grid.max_size / max(canvas.size)
        size = (max(1, round(width * s)), max(1, round(height * s)))
        canvas = canvas.resize(size, Image.Resampling.LANCZOS)
    info = {
        "grid_version": GRID_VERSION, "x": page.x, "y": page.y, "fixed": page.fixed,
        "x_values": page.xs if page.x else [], "y_values": page.ys if page.y else [],
        "x_labels": cols if page.x else [], "y_labels": rows if page.y else [],
        "cell_size": [cw, ch], "origin": [lay.left, lay.top], "size": list(canvas.size),
        "font_size": lay.font.size, "page": list(page.page),
        "scale": round(cw / cell[0], 4) if canvas.size == (width, height) else None,
        "cells": [[e["file"] if e else None for e in row] for row in page.cells],
    }
    return canvas, info


def _save(image: Any, path: Path, info: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_itxt(GRID_KEY, json.dumps(info, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    atomic_write_bytes(path, buf.getvalue())


def read_grid_info(path: str | Path) -> dict | None:
    """The JSON description stored in a grid PNG (None if absent)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    return json.loads(text[GRID_KEY]) if GRID_KEY in text else None


def _name(fixed: dict[str, Any], page: tuple[int, int], digest: bool = False) -> str:
    """`grid_seed-1_steps-4` (whole words; a short hash when the values do not fit), `_p2` for later pages."""
    parts = [f"{slug(a, 16)}-{slug(value_label(a, v).split(': ', 1)[1], 40)}" for a, v in fixed.items()]
    name = "_".join(["grid", *parts])
    if len(name) > NAME_MAX or digest:
        tag = hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:8]
        keep = ["grid"]
        for part in parts:
            if len("_".join([*keep, part])) + 9 > NAME_MAX:
                break
            keep.append(part)
        name = "_".join([*keep, tag])
    return name + (f"_p{page[0]}" if page[1] > 1 else "")


def _chunks(values: list[Any], size: int) -> list[list[Any]]:
    return [values[i : i + size] for i in range(0, len(values), size)] or [[]]


def plan_pages(entries: list[dict], grid: GridConfig) -> list[Page]:
    """Every grid page of `entries` (each entry in exactly one cell of one page)."""
    x, y = pick_axes(entries, grid.x, grid.y)
    others = [a for a in _swept(entries, AUTO_AXES) if a not in (x, y)]
    if "model" in (x, y):  # a model's own settings (steps, size … of its group) travel with it: no split
        others = [a for a in others if not _follows_model(entries, a)]
    labels = [a for a in (x, y) if a and any(a in (e.get("label_axes") or ()) for e in entries)]
    if labels:  # a run's own label axis (t2i-train's step) decides what goes with it (each step's LoRA): no split
        others = [a for a in others if not _follows_labels(entries, labels, a)]
    others += tell_apart(entries, [a for a in (x, y) if a] + others)
    x_values = _ordered([axis_value(e, x) for e in entries]) if x else [None]
    y_values = _ordered([axis_value(e, y) for e in entries]) if y else [None]
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault(tuple(axis_value(e, a) for a in others), []).append(e)
    pages: list[Page] = []
    for values, members in groups.items():
        fixed = dict(zip(others, values, strict=True))
        where = {(axis_value(e, x) if x else None, axis_value(e, y) if y else None): e for e in members}
        here_x, here_y = {k[0] for k in where}, {k[1] for k in where}
        xs, ys = [v for v in x_values if v in here_x], [v for v in y_values if v in here_y]
        cw = max(int(e.get("width") or 64) for e in members)
        ch = max(int(e.get("height") or 64) for e in members)
        shrink = min(1.0, grid.min_cell / min(cw, ch))  # cells never below min_cell (or the image, if smaller)
        per_row = max(1, int(grid.max_size * 0.9 // max(1, int(cw * shrink))))
        per_col = max(1, int(grid.max_size * 0.9 // max(1, int(ch * shrink))))
        blocks = [(bx, by) for by in _chunks(ys, per_col) for bx in _chunks(xs, per_row)]
        for n, (bx, by) in enumerate(blocks, start=1):
            cells = [[where.get((vx, vy)) for vx in bx] for vy in by]
            if any(c is not None for row in cells for c in row):
                pages.append(Page(_name(fixed, (n, len(blocks))), x, y, bx, by, fixed, cells, (n, len(blocks))))
    names = [p.name for p in pages]
    for p in pages:  # values that differ only in what a file name cannot hold: add their hash
        if names.count(p.name) > 1:
            p.name = _name(p.fixed, p.page, digest=True)
    return pages


def _source(run_dir: Path, page: Page, grid: GridConfig) -> str:
    """A digest of what a page shows (files and their modification times, labels, layout settings)."""
    files = [[e["file"] if e else None for e in row] for row in page.cells]
    mtimes = [os.stat(run_dir / f).st_mtime_ns for row in files for f in row if f]
    blob = [GRID_VERSION, files, mtimes, page.x, page.y, page.xs, page.ys, page.fixed, list(page.page),
            grid.max_size, grid.font_size, grid.min_cell]
    return hashlib.sha256(json.dumps(blob, default=str).encode()).hexdigest()


def write_grids(run_dir: str | Path, grid: GridConfig, entries: list[dict] | None = None) -> list[Path]:
    """Write `run_dir/grids/*.png` covering every image in the run dir's manifest; returns the grids of the run dir
    (a page whose images and labels did not change since it was written is not drawn again)."""
    run_dir = Path(run_dir)
    if entries is None:
        entries = Manifest(run_dir).entries()
    check_axes(grid, tuple(dict.fromkeys(a for e in entries for a in e.get("label_axes") or ())))
    by_file = {e["file"]: e for e in entries if (run_dir / e["file"]).is_file()}
    entries = sorted(by_file.values(), key=lambda e: (str(e.get("run_dir", "")), e.get("index", 0), e["file"]))
    out_dir = run_dir / GRID_DIR
    pages = plan_pages(entries, grid) if entries else []
    if pages:
        out_dir.mkdir(exist_ok=True)
    for tmp in out_dir.glob(f".*{TMP_SUFFIX}") if out_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)
    written: list[Path] = []
    drawn = 0
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for page in pages:
            path = out_dir / f"{page.name}.png"
            source = _source(run_dir, page, grid)
            try:
                same = path.is_file() and (read_grid_info(path) or {}).get("source") == source
            except (OSError, ValueError):
                same = False
            if not same:
                image, info = render_grid(run_dir, page, grid, pool)
                _save(image, path, {**info, "source": source})
                drawn += 1
            written.append(path)
    for old in out_dir.glob("grid*.png") if out_dir.is_dir() else []:
        if old not in written:
            old.unlink(missing_ok=True)
    log.info("grids: %d page(s) in %s (%d drawn, %d unchanged)", len(written), out_dir, drawn, len(written) - drawn)
    return written
