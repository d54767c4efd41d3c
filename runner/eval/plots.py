"""The evaluation plots, PNG and SVG, with matplotlib (the `eval` extra; without it only the table and eval.md):
each metric against LoRA weight (one line per set, at its last checkpoint), against training step (one line per
set, at the weight nearest 1) when the run has checkpoints, and the trade-off scatter of clip_t against clip_i /
dino / lora_effect with its Pareto front (labelled). Legends sit outside the axes at a fixed place: a 10,000-image
sweep plots in well under a second."""

from __future__ import annotations

import importlib.util
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..common.io import atomic_write_bytes

FORMATS = ("png", "svg")
LAYOUT = {"left": 0.1, "right": 0.7, "bottom": 0.13, "top": 0.9}  # the legend sits right of the axes


def _save(fig: Any, base: Path) -> list[Path]:
    out = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        # fixed metadata and hash salt: the same scores give the same bytes
        meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
        fig.savefig(buf, format=fmt, dpi=100, metadata=meta)
        path = base.with_suffix(f".{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        out.append(path)
    return out


def _lines(ax: Any, series: dict[str, list[tuple[float, float, float]]], xlabel: str, ylabel: str) -> None:
    for label, pts in series.items():
        pts.sort()
        xs, ys, sd = [p[0] for p in pts], [p[1] for p in pts], [p[2] or 0.0 for p in pts]
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=label)
        ax.fill_between(xs, [y - d for y, d in zip(ys, sd, strict=True)], [y + d for y, d in zip(ys, sd, strict=True)],
                        color=line.get_color(), alpha=0.15, linewidth=0)  # ± one standard deviation
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        _legend(ax)


def _legend(ax: Any) -> None:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def write_plots(s: Any, out: Path) -> tuple[list[Path], str | None]:
    """Write the plots of summary `s` into `out`; returns (files, a note when matplotlib is absent)."""
    if importlib.util.find_spec("matplotlib") is None:
        return [], "plots skipped: matplotlib is not installed (pip install 't2i-runner[eval]')"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "t2i-eval"
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    rows = [r for r in s.rows if isinstance(r.weight, float)]
    lora_rows = [r for r in rows if r.set != "nolora"]
    steps = {r.step for r in lora_rows if r.step is not None}
    last = {}  # each set's last checkpoint, and the weight nearest 1 (the step plot's)
    for r in lora_rows:
        last[r.set] = max(last.get(r.set, -1), r.step if r.step is not None else -1)
    weights = sorted({r.weight for r in lora_rows}, key=lambda w: (abs(w - 1.0), -w))
    for col in s.columns:
        by_w: dict[str, list] = defaultdict(list)
        for r in lora_rows:
            if r.mean(col) is not None and (r.step if r.step is not None else -1) == last[r.set]:
                by_w[r.set + (f" (step {r.step})" if r.step is not None else "")].append(
                    (r.weight, r.mean(col), r.std(col)))
        base = next((r for r in rows if r.set == "nolora" and r.mean(col) is not None), None)
        if by_w:
            fig, ax = plt.subplots(figsize=(7.5, 4))
            _lines(ax, by_w, "LoRA weight", col)
            if base is not None:
                ax.axhline(base.mean(col), color="grey", linestyle="--", label="no LoRA")
                _legend(ax)
            ax.set_title(f"{col} vs LoRA weight")
            fig.subplots_adjust(**LAYOUT)  # fixed margins: tight_layout draws the figure once more
            files += _save(fig, out / f"{col}_vs_weight")
            plt.close(fig)
        if len(steps) > 1:
            by_s: dict[str, list] = defaultdict(list)
            for r in lora_rows:
                if r.step is not None and r.mean(col) is not None and r.weight == weights[0]:
                    by_s[r.set].append((r.step, r.mean(col), r.std(col)))
            fig, ax = plt.subplots(figsize=(7.5, 4))
            _lines(ax, by_s, "training step", col)
            ax.set_title(f"{col} vs training step (weight {weights[0]:g})")
            fig.subplots_adjust(**LAYOUT)  # fixed margins: tight_layout draws the figure once more
            files += _save(fig, out / f"{col}_vs_step")
            plt.close(fig)
    for x, front in s.fronts.items():
        pts = [r for r in s.rows if r.mean("clip_t") is not None and r.mean(x) is not None]
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        ax.scatter([r.mean(x) for r in pts], [r.mean("clip_t") for r in pts], color="tab:blue", s=12,
                   label="set x weight x step")
        for r in front:
            ax.annotate(r.label, (r.mean(x), r.mean("clip_t")), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        f = sorted(front, key=lambda r: r.mean(x))
        ax.plot([r.mean(x) for r in f], [r.mean("clip_t") for r in f], color="tab:red", marker="s",
                label="Pareto front")
        ax.set_xlabel(x)
        ax.set_ylabel("clip_t")
        ax.set_title(f"trade-off: clip_t vs {x}")
        ax.grid(alpha=0.3)
        _legend(ax)
        fig.subplots_adjust(**LAYOUT)  # fixed margins: tight_layout draws the figure once more
        files += _save(fig, out / f"tradeoff_clip_t_vs_{x}")
        plt.close(fig)
    return files, None
