"""Labelled XY comparison grids of a run dir's manifest (A1111's "X/Y plot"), one per other-axes value."""

from __future__ import annotations

import io
import json
import logging
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
GRID_AXES = (*AXES, "model")
GRID_DIR = "grids"
GRID_KEY = "t2i-grid"  # PNG iTXt key of the grid's JSON description
MIN_FONT = 6


def check_axes(grid: GridConfig) -> None:
    """Reject an unknown `grid.x` / `grid.y` (before any image is generated)."""
    for name in ("x", "y"):
        value = getattr(grid, name)
        if value is not None and value not in GRID_AXES:
            raise ConfigError(f"grid.{name}={value!r} is not an axis{did_you_mean(value, GRID_AXES)}; valid: "
                              f"{', '.join(GRID_AXES)}")
    if grid.x is not None and grid.x == grid.y:
        raise ConfigError(f"grid.x and grid.y are both {grid.x!r}; pick two different axes")


def axis_value(entry: dict, axis: str) -> Any:
    """The value of `axis` for one manifest entry (LoRA sets by adapter names, the model by its name)."""
    if axis == "lora_set":
        names = [lo.get("name") or "lora" for lo in entry.get("loras") or []]
        return "+".join(names) if names else "nolora"
    if axis == "model":
        return (entry.get("model") or {}).get("name")
    return entry.get(axis)


def value_label(axis: str, value: Any) -> str:
    """Readable `axis: value` text."""
    if value is None:
        text = "default" if axis == "scheduler" else "-"
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


def _swept(entries: list[dict]) -> list[str]:
    """The axes with more than one value among `entries` (lora_scale None, i.e. no LoRA, does not count)."""
    def distinct(axis: str) -> int:
        values = (axis_value(e, axis) for e in entries)
        return len({json.dumps(v) for v in values if v is not None or axis != "lora_scale"})

    return [a for a in GRID_AXES if distinct(a) > 1]


def _follows_model(entries: list[dict], axis: str) -> bool:
    """True if every model of `entries` has one value of `axis` (a per-model setting, not a swept axis)."""
    values: dict[str, set] = {}
    for e in entries:
        values.setdefault(json.dumps(axis_value(e, "model")), set()).add(json.dumps(axis_value(e, axis)))
    return all(len(v) == 1 for v in values.values())


def pick_axes(entries: list[dict], x: str | None, y: str | None) -> tuple[str | None, str | None]:
    """`grid.x`/`grid.y`, filling a null one with the last swept axes (those with more than one value)."""
    free = [a for a in _swept(entries) if a not in (x, y)]
    if x is None and free:
        x = free.pop()
    if y is None and free:
        y = free.pop()
    return x, y


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


def render_grid(run_dir: Path, cells: list[list[dict | None]], x: str | None, y: str | None,
                x_values: list, y_values: list, fixed: dict[str, Any], grid: GridConfig) -> tuple[Any, dict]:
    """One labelled grid image (rows = y values, columns = x values) and its JSON description."""
    from PIL import Image, ImageDraw, ImageOps

    present = [e for row in cells for e in row if e is not None]
    cell = (max(int(e.get("width") or 64) for e in present), max(int(e.get("height") or 64) for e in present))
    font_size = grid.font_size or max(10, min(cell) // 12)
    title = ", ".join(value_label(a, v) for a, v in fixed.items())
    cols = [value_label(x, v) for v in x_values] if x else [""]
    rows = [value_label(y, v) for v in y_values] if y else [""]
    lay = _fit(cell, font_size, grid.max_size, title, cols, rows)
    width, height = lay.size
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    cw, ch = lay.cell
    if lay.title:
        _draw_lines(draw, lay, lay.title, (0, 0, width, len(lay.title) * lay.line_h + 2 * lay.pad))
    header_top = lay.top - (max(len(c) for c in lay.cols) * lay.line_h + 2 * lay.pad if x else 0)
    for c, lines in enumerate(lay.cols if x else []):
        _draw_lines(draw, lay, lines, (lay.left + c * cw, header_top, lay.left + (c + 1) * cw, lay.top))
    for r, lines in enumerate(lay.rows if y else []):
        _draw_lines(draw, lay, lines, (0, lay.top + r * ch, lay.left, lay.top + (r + 1) * ch))
    for r, row in enumerate(cells):
        for c, entry in enumerate(row):
            if entry is None:
                continue
            try:
                with Image.open(run_dir / entry["file"]) as im:
                    tile = ImageOps.contain(im.convert("RGB"), (cw, ch), Image.Resampling.LANCZOS)
            except (OSError, ValueError) as exc:
                log.warning("grid: cannot read %s (%s); its cell is left blank", entry["file"], exc)
                continue
            x0, y0 = lay.left + c * cw + (cw - tile.width) // 2, lay.top + r * ch + (ch - tile.height) // 2
            canvas.paste(tile, (x0, y0))
    if max(canvas.size) > grid.max_size:  # labels alone are wider than max_size: shrink everything
        s = grid.max_size / max(canvas.size)
        size = (max(1, round(width * s)), max(1, round(height * s)))
        canvas = canvas.resize(size, Image.Resampling.LANCZOS)
    info = {
        "grid_version": 1, "x": x, "y": y, "fixed": fixed,
        "x_values": x_values if x else [], "y_values": y_values if y else [],
        "x_labels": cols if x else [], "y_labels": rows if y else [],
        "cell_size": [cw, ch], "origin": [lay.left, lay.top], "size": list(canvas.size),
        "font_size": lay.font.size,
        "scale": round(cw / cell[0], 4) if canvas.size == (width, height) else None,
        "cells": [[e["file"] if e else None for e in row] for row in cells],
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


def write_grids(run_dir: str | Path, grid: GridConfig, entries: list[dict] | None = None) -> list[Path]:
    """Write `run_dir/grids/*.png` for every image in the run dir's manifest; returns the paths written."""
    check_axes(grid)
    run_dir = Path(run_dir)
    if entries is None:
        entries = Manifest(run_dir).entries()
    by_key = {e["key"]: e for e in entries if (run_dir / e["file"]).is_file()}
    entries = sorted(by_key.values(), key=lambda e: (e.get("index", 0), e["file"]))
    x, y = pick_axes(entries, grid.x, grid.y)
    if not entries or (x is None and y is None):
        return []
    others = [a for a in _swept(entries) if a not in (x, y)]
    if "model" in (x, y):  # a model's own settings (steps, size … of its group) travel with it: no split
        others = [a for a in others if not _follows_model(entries, a)]
    x_values = _ordered([axis_value(e, x) for e in entries]) if x else [None]
    y_values = _ordered([axis_value(e, y) for e in entries]) if y else [None]
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(json.dumps([axis_value(e, a) for a in others]), []).append(e)
    out_dir = run_dir / GRID_DIR
    out_dir.mkdir(exist_ok=True)
    for tmp in out_dir.glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
    written: list[Path] = []
    for n, members in enumerate(groups.values()):
        fixed = {a: axis_value(members[0], a) for a in others}
        xs = [v for v in x_values if any(axis_value(e, x) == v for e in members)] if x else [None]
        ys = [v for v in y_values if any(axis_value(e, y) == v for e in members)] if y else [None]
        cells: list[list[dict | None]] = [[None] * len(xs) for _ in ys]
        for e in members:
            r = ys.index(axis_value(e, y)) if y else 0
            c = xs.index(axis_value(e, x)) if x else 0
            if cells[r][c] is None:
                cells[r][c] = e
            else:
                log.warning("grid: %s and %s share a cell; showing the first", cells[r][c]["file"], e["file"])
        image, info = render_grid(run_dir, cells, x, y, xs, ys, fixed, grid)
        name = "grid" if not fixed else f"grid_{n:03d}_" + "_".join(
            f"{slug(a, 12)}-{slug(value_label(a, v).split(': ', 1)[1], 24)}" for a, v in fixed.items())
        path = out_dir / f"{name[:120]}.png"
        _save(image, path, info)
        written.append(path)
    for old in out_dir.glob("grid*.png"):
        if old not in written:
            old.unlink(missing_ok=True)
    log.info("wrote %d grid(s) to %s", len(written), out_dir)
    return written
