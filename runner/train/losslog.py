"""The loss log (`loss.csv`, one row per optimizer step) and its plot (`loss.png`, drawn with Pillow)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..common.io import atomic_write_bytes

FIELDS = ("step", "loss", "lr", "seconds")


def read_rows(path: Path, fields: tuple[str, ...]) -> list[dict[str, float]]:
    """The complete rows of a training CSV log (`fields` as floats); a torn last line from a killed process is
    skipped, and a missing file has none."""
    if not path.is_file():
        return []
    out = []
    for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
        try:
            out.append({k: float(row[k]) for k in fields})
        except (TypeError, ValueError, KeyError):
            continue
    return out


class LossLog:
    """Append-only CSV of (step, loss, lr, seconds); on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, float]]:
        return read_rows(self.path, FIELDS)

    def truncate(self, last_step: int) -> None:
        """Keep only rows up to `last_step` (the checkpoint a resumed run continues from)."""
        rows = [r for r in self.rows() if r["step"] <= last_step]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, float]]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(FIELDS)
        for r in rows:
            writer.writerow([int(r["step"]), repr(r["loss"]), repr(r["lr"]), f"{r['seconds']:.4f}"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, buf.getvalue().encode("utf-8"))

    def append(self, step: int, loss: float, lr: float, seconds: float) -> None:
        if not self.path.is_file():
            self._rewrite([])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{step},{loss!r},{lr!r},{seconds:.4f}\n")
            f.flush()
            os.fsync(f.fileno())


def plot(rows: list[dict[str, float]], path: Path, size: tuple[int, int] = (800, 400)) -> None:
    """Draw loss per step (thin grey) and its running mean (blue) into a PNG, written atomically."""
    from PIL import Image, ImageDraw

    w, h = size
    m = 50  # margin
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([m, 10, w - 10, h - m + 10], outline="black")
    if rows:
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        window = max(1, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1.0
        s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def xy(s: float, v: float) -> tuple[float, float]:
            return m + (s - s0) / (s1 - s0) * (w - m - 10), 10 + (hi - v) / (hi - lo) * (h - m)

        if len(rows) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, losses, strict=True)], fill=(190, 190, 190), width=1)
            draw.line([xy(s, v) for s, v in zip(steps, smooth, strict=True)], fill=(30, 90, 200), width=2)
        draw.text((4, 10), f"{hi:.4g}", fill="black")
        draw.text((4, h - m), f"{lo:.4g}", fill="black")
        draw.text((m, h - m + 16), f"step {int(s0)}", fill="black")
        draw.text((w - 110, h - m + 16), f"step {int(steps[-1])}", fill="black")
    draw.text((w // 2 - 40, h - 20), "training loss", fill="black")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
