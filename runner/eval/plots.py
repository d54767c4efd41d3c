"""The evaluation plots, PNG and SVG, with matplotlib (the `eval` extra; without it only the table and eval.md):
each metric against LoRA weight (one line per set and checkpoint step), against training step (one line per set
and weight) when the run has checkpoints, and the trade-off scatter of clip_t against clip_i / dino / lora_effect
with its Pareto front."""

from __future__ import annotations

import importlib.util
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..common.io import atomic_write_bytes

FORMATS = ("png", "svg")


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
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                    capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")


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
    for col in s.columns:
        by_w: dict[str, list] = defaultdict(list)
        for r in lora_rows:
            if r.mean(col) is not None:
                by_w[r.set + (f" step {r.step}" if r.step is not None else "")].append((r.weight, r.mean(col),
                                                                                        r.std(col)))
        base = next((r for r in rows if r.set == "nolora" and r.mean(col) is not None), None)
        if by_w:
            fig, ax = plt.subplots(figsize=(6, 4))
            _lines(ax, by_w, "LoRA weight", col)
            if base is not None:
                ax.axhline(base.mean(col), color="grey", linestyle="--", label="no LoRA")
                ax.legend(fontsize="small")
            ax.set_title(f"{col} vs LoRA weight")
            fig.tight_layout()
            files += _save(fig, out / f"{col}_vs_weight")
            plt.close(fig)
        if len(steps) > 1:
            by_s: dict[str, list] = defaultdict(list)
            for r in lora_rows:
                if r.step is not None and r.mean(col) is not None:
                    by_s[f"{r.set} w={r.weight:g}"].append((r.step, r.mean(col), r.std(col)))
            fig, ax = plt.subplots(figsize=(6, 4))
            _lines(ax, by_s, "training step", col)
            ax.set_title(f"{col} vs training step")
            fig.tight_layout()
            files += _save(fig, out / f"{col}_vs_step")
            plt.close(fig)
    for x, front in s.fronts.items():
        pts = [r for r in s.rows if r.mean("clip_t") is not None and r.mean(x) is not None]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter([r.mean(x) for r in pts], [r.mean("clip_t") for r in pts], color="tab:blue", label="set x weight")
        for r in pts:
            ax.annotate(r.label, (r.mean(x), r.mean("clip_t")), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        f = sorted(front, key=lambda r: r.mean(x))
        ax.plot([r.mean(x) for r in f], [r.mean("clip_t") for r in f], color="tab:red", marker="s",
                label="Pareto front")
        ax.set_xlabel(x)
        ax.set_ylabel("clip_t")
        ax.set_title(f"trade-off: clip_t vs {x}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        files += _save(fig, out / f"tradeoff_clip_t_vs_{x}")
        plt.close(fig)
    return files, None
