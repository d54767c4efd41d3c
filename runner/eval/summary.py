"""The numbers that answer "which LoRA, which weight, which checkpoint": per LoRA set x weight x checkpoint step,
the mean and standard deviation of every metric over prompts and seeds, and the Pareto front of prompt fidelity
(`clip_t`) against subject/style fidelity (`clip_i`, `dino`) and LoRA strength (`lora_effect`), all maximised.

Written as RUN_DIR/eval.md (with the plots of plots.py) and RUN_DIR/viewer-metrics.js (the viewer's metric
columns); `summary_text()` is what `t2i-eval --summary` prints."""

from __future__ import annotations

import functools
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.io import atomic_write_bytes
from ..config.schema import EvalConfig
from . import store
from .models import resolve
from .scorers import SCORERS, models_of, reference_identity

EVAL_MD = "eval.md"
PLOTS_DIR = "eval"
METRICS_JS = "viewer-metrics.js"
METRICS_GLOBAL = "T2I_VIEWER_METRICS"
SUMMARY_JSON = "eval-summary.json"  # the table and fronts alone (t2i-serve's /runs reads it)
NOLORA = "nolora"
# a checkpoint's training step: `name-000400`, `name_step400`, `name-e12`, or a `step-000400/` folder (t2i-train)
_STEP = re.compile(r"(?:^|[-_.])(?:step|steps|epoch|ep|e)?[-_]?(\d+)$", re.I)
_STEP_DIR = re.compile(r"^(?:step|checkpoint|epoch)-?(\d+)$", re.I)
FRONT_X = ("clip_i", "dino", "lora_effect")


def lora_step(lora: dict) -> tuple[str, int | None]:
    """(the adapter's name without its checkpoint step, the step) from its file name or `step-N/` folder."""
    return _name_step(str(lora.get("name") or ""), str(lora.get("file") or lora.get("source") or ""))


@functools.lru_cache(maxsize=4096)
def _name_step(name: str, file: str) -> tuple[str, int | None]:
    path = Path(file)
    m = _STEP.search(path.stem) if path.stem else None
    if m:
        base = _STEP.sub("", name) if _STEP.search(name) else name
        return base or name, int(m.group(1))
    d = _STEP_DIR.match(path.parent.name)
    if d:
        return name, int(d.group(1))
    return name, None


def group_of(entry: dict) -> tuple[str, float | str | None, int | None]:
    """(LoRA set, weight, checkpoint step) of an image; the no-LoRA images are set `nolora`, weight 0."""
    loras = entry.get("loras") or []
    if not loras:
        return NOLORA, 0.0, None
    parts = [lora_step(lo) for lo in loras]
    steps = [s for _, s in parts if s is not None]
    name = "+".join(n for n, _ in parts)
    if entry.get("lora_scale") is not None:
        weight: float | str = float(entry["lora_scale"])
    elif len(loras) == 1:
        weight = float(loras[0].get("scale", 1.0))
    else:
        weight = "/".join(f"{lo.get('scale', 1.0):g}" for lo in loras)
    return name, weight, max(steps) if steps else None


@dataclass
class Row:
    set: str
    weight: float | str | None
    step: int | None
    files: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def mean(self, col: str) -> float | None:
        v = self.values.get(col)
        return sum(v) / len(v) if v else None

    def std(self, col: str) -> float | None:
        """The sample standard deviation over prompts and seeds (0 for one image)."""
        v = self.values.get(col)
        if not v:
            return None
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0

    @property
    def label(self) -> str:
        w = f"{self.weight:g}" if isinstance(self.weight, float) else str(self.weight)
        return self.set + ("" if self.set == NOLORA else f" w={w}") + (f" step={self.step}" if self.step is not None
                                                                       else "")


@dataclass
class Summary:
    folder: Path
    columns: list[str]
    rows: list[Row]
    scores: dict[str, dict[str, float]]  # file -> column -> value
    fronts: dict[str, list[Row]]
    notes: list[str]


def wanted_signature(scorer: str, cfg: EvalConfig | None) -> tuple | None:
    """The signature the current config would write (None: no preference)."""
    if cfg is None:
        return None
    s = SCORERS[scorer]
    key = cfg.lora_effect_space if s.baseline else s.model
    source = models_of(cfg).get(key or "")
    if not source:
        return None
    ref = None
    if s.reference:
        if not cfg.reference_dir or not Path(cfg.reference_dir).expanduser().is_dir():
            return None
        ref = reference_identity(cfg.reference_dir)
    return (s.version, resolve(source)[1], ref)


def pick_lines(lines: list[dict], cfg: EvalConfig | None, notes: list[str]) -> list[dict]:
    """One signature per scorer: the configured one when it has scores, else the latest written (noted)."""
    by: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    latest: dict[str, tuple] = {}
    for ln in lines:
        by[ln["scorer"]][store.sig_of(ln)].append(ln)
        latest[ln["scorer"]] = store.sig_of(ln)
    out = []
    for scorer, sigs in by.items():
        want = wanted_signature(scorer, cfg) if scorer in SCORERS else None
        chosen = want if want in sigs else latest[scorer]
        if len(sigs) > 1:
            notes.append(f"{scorer}: metrics.jsonl holds scores of {len(sigs)} models/versions; this summary uses "
                         f"{chosen[1]} (version {chosen[0]}) only" + ("" if want in sigs else " (the latest)"))
        out += sigs[chosen]
    return out


def summarize(folder: Path, cfg: EvalConfig | None = None, entries: list[dict] | None = None) -> Summary:
    from .score import read_entries

    folder = Path(folder)
    entries = read_entries(folder) if entries is None else entries
    notes: list[str] = []
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for ln in pick_lines(store.read_lines(folder), cfg, notes):
        for col, v in ln["values"].items():
            if isinstance(v, int | float):
                scores[ln["key"]][col] = float(v)
    columns = [c for s in SCORERS.values() for c in s.columns if any(c in v for v in scores.values())]
    rows: dict[tuple, Row] = {}
    by_file: dict[str, dict[str, float]] = {}
    for e in entries:
        g = group_of(e)
        row = rows.setdefault(g, Row(*g))
        row.files.append(e["file"])
        vals = scores.get(e["key"], {})
        if vals:
            by_file[e["file"]] = vals
        for col, v in vals.items():
            row.values[col].append(v)
    ordered = sorted(rows.values(), key=lambda r: (r.set != NOLORA, r.set, r.step if r.step is not None else -1,
                                                    _num(r.weight)))
    fronts = {x: pareto(ordered, "clip_t", x) for x in FRONT_X if x in columns and "clip_t" in columns}
    return Summary(folder, columns, ordered, by_file, fronts, notes)


def _num(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, int | float) else (1, 0.0, str(value))


def pareto(rows: list[Row], a: str, b: str) -> list[Row]:
    """The rows no other row beats on both `a` and `b` means (both maximised), sorted by `a` descending."""
    pts = [(r, r.mean(a), r.mean(b)) for r in rows if r.mean(a) is not None and r.mean(b) is not None]
    front = [r for r, x, y in pts if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for _, x2, y2 in pts)]
    return sorted(front, key=lambda r: -(r.mean(a) or 0.0))


def _cell(row: Row, col: str) -> str:
    m, s = row.mean(col), row.std(col)
    if m is None:
        return "–"
    digits = 2 if abs(m) >= 1 else 4
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table_md(s: Summary) -> str:
    steps = any(r.step is not None for r in s.rows)
    head = ["LoRA set", "weight", *(["step"] if steps else []), "n", *s.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in s.rows:
        w = "–" if r.set == NOLORA else (f"{r.weight:g}" if isinstance(r.weight, float) else str(r.weight))
        step = ["–" if r.step is None else str(r.step)] if steps else []
        n = max((len(v) for v in r.values.values()), default=0)
        lines.append("| " + " | ".join([r.set, w, *step, str(n), *(_cell(r, c) for c in s.columns)]) + " |")
    return "\n".join(lines)


def fronts_md(s: Summary) -> str:
    if not s.fronts:
        return "No Pareto front: it needs clip_t and one of clip_i, dino, lora_effect."
    out = []
    for x, front in s.fronts.items():
        items = "; ".join(f"{r.label} (clip_t {r.mean('clip_t'):.2f}, {x} {r.mean(x):.4f})" for r in front)
        out.append(f"- clip_t vs {x}: {items}")
    return "\n".join(out)


def summary_text(s: Summary) -> str:
    scored = len(s.scores)
    total = sum(len(r.files) for r in s.rows)
    parts = [f"{s.folder}: {scored} of {total} images scored ({', '.join(s.columns) or 'no metrics yet'})",
             *(f"note: {n}" for n in s.notes), "", table_md(s), "", "Pareto front (both maximised):", fronts_md(s)]
    return "\n".join(parts)


def eval_md(s: Summary, plots: list[Path]) -> str:
    rel = [p.relative_to(s.folder).as_posix() for p in plots if p.suffix == ".png"]
    body = [f"# Evaluation of {s.folder.name}", "",
            f"{len(s.scores)} images scored. Mean ± sample standard deviation over prompts and seeds per LoRA set, "
            "weight and checkpoint step (scores: metrics.jsonl).", "", *(f"Note: {n}" for n in s.notes),
            table_md(s), "", "## Pareto front", "",
            "Rows no other row beats on both measures (each maximised: prompt fidelity against subject/style "
            "fidelity or LoRA strength).", "", fronts_md(s), ""]
    if rel:
        body += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in rel), ""]
    return "\n".join(body)


def viewer_metrics(s: Summary) -> dict:
    """The viewer's metric data: per-file scores, the rows (with their files) and the fronts."""
    higher = {c: h for sc in SCORERS.values() for c, h in zip(sc.columns, sc.higher, strict=True)}
    return {
        "columns": s.columns, "higher": {c: higher.get(c, True) for c in s.columns}, "scores": s.scores,
        "rows": [{"label": r.label, "set": r.set, "weight": r.weight, "step": r.step, "files": r.files,
                  "mean": {c: r.mean(c) for c in s.columns}, "std": {c: r.std(c) for c in s.columns}}
                 for r in s.rows],
        "fronts": {x: [r.label for r in f] for x, f in s.fronts.items()},
    }


def write_viewer_metrics(s: Summary) -> Path:
    """RUN_DIR/viewer-metrics.js and eval-summary.json, and the viewer page anew when it is there (a page from
    before metrics existed would not read them)."""
    from ..outputs.viewer import VIEWER_HTML, page_html

    path = s.folder / METRICS_JS
    text = f"window.{METRICS_GLOBAL} = {json.dumps(viewer_metrics(s), allow_nan=False)};\n"  # a script: file://
    atomic_write_bytes(path, text.encode("utf-8"))
    data = viewer_metrics(s)
    small = {k: data[k] for k in ("columns", "higher", "fronts")}
    small["rows"] = [{k: v for k, v in r.items() if k != "files"} | {"n": len(r["files"])} for r in data["rows"]]
    atomic_write_bytes(s.folder / SUMMARY_JSON, json.dumps(small, allow_nan=False).encode("utf-8"))
    page = s.folder / VIEWER_HTML
    if page.is_file() and page.read_bytes() != page_html():
        atomic_write_bytes(page, page_html())
    return path


def write_summary(folder: Path, cfg: EvalConfig | None = None, plots: bool = True) -> str:
    """Write RUN_DIR/eval.md, the plots and viewer-metrics.js; return the text `t2i-eval --summary` prints."""
    s = summarize(folder, cfg)
    made: list[Path] = []
    if plots and s.columns:
        from .plots import write_plots

        made, note = write_plots(s, Path(folder) / PLOTS_DIR)
        if note:
            s.notes.append(note)
    atomic_write_bytes(Path(folder) / EVAL_MD, eval_md(s, made).encode("utf-8"))
    write_viewer_metrics(s)
    where = f"{Path(folder) / EVAL_MD}" + (f", {len(made)} plot files in {Path(folder) / PLOTS_DIR}" if made else "")
    return summary_text(s) + f"\n\nwritten: {where}, {Path(folder) / METRICS_JS}"


def read_summary(folder: Path) -> dict | None:
    """RUN_DIR/eval-summary.json (None when the run has no scores)."""
    try:
        return json.loads((Path(folder) / SUMMARY_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def image_scores(folder: Path, files: list[str | None]) -> list[dict[str, float] | None]:
    """Each file's metric values in RUN_DIR/metrics.jsonl (the latest line per scorer), None where unscored."""
    latest: dict[str, dict[str, float]] = defaultdict(dict)
    for ln in store.read_lines(folder):
        latest[ln["file"]].update({k: v for k, v in ln["values"].items() if isinstance(v, int | float)})
    return [latest.get(f) or None if f else None for f in files]
