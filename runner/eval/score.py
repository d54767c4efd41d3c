"""Score a run dir, merged dir or multirun sweep dir: every image that lacks a line of the current scorer
signature gets one (resumable; an interrupted evaluation keeps its finished batches)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config.schema import EvalConfig
from . import baseline as bl
from . import store
from .scorers import SCORERS, Session, check_eval

log = logging.getLogger(__name__)
CHUNK = 64  # images decoded and scored together (each scorer batches within by eval.batch_size)


@dataclass
class Plan:
    """What an evaluation of one folder will do, decided before anything is written."""

    folder: Path
    entries: list[dict]
    todo: dict[str, list[dict]] = field(default_factory=dict)  # scorer -> entries to score
    missing_baselines: list[dict] = field(default_factory=list)


def read_entries(folder: Path) -> list[dict]:
    from ..outputs.viewer import folder_source

    entries, _, _ = folder_source(Path(folder))
    return entries


def plan(folder: Path, session: Session, entries: list[dict] | None = None) -> Plan:
    entries = read_entries(folder) if entries is None else entries
    lines = store.read_lines(folder)
    p = Plan(Path(folder), entries)
    for s in session.active:
        have = store.done(lines, s.name, session.signature(s))
        mine = [e for e in entries if e["key"] not in have and (not s.baseline or bl.has_loras(e))]
        if mine:
            p.todo[s.name] = mine
    if "lora_effect" in p.todo:
        p.missing_baselines = bl.missing(p.todo["lora_effect"], bl.find(entries, folder))
    return p


def check_plans(plans: list[Plan], cfg: EvalConfig, generate: bl.Generate | None) -> None:
    """Every folder's baselines can be had before any folder is scored (nothing half-written)."""
    bl.check(sum(len(p.missing_baselines) for p in plans), cfg.make_baseline, generate)


def execute(p: Plan, session: Session, generate: bl.Generate | None = None,
            progress: Callable[[int], None] | None = None) -> int:
    """Score what `p` found missing; returns the number of lines written."""
    from PIL import Image

    if p.missing_baselines and generate is not None:
        bl.make(p.missing_baselines, p.folder, generate)
    base = bl.find(p.entries, p.folder) if "lora_effect" in p.todo else {}
    written = 0
    for s in session.active:
        todo = [e for e in p.todo.get(s.name, []) if not s.baseline or bl.settings_key(e) in base]
        sig = session.signature(s)
        for i in range(0, len(todo), CHUNK):
            chunk = todo[i:i + CHUNK]
            images = [Image.open(p.folder / e["file"]).convert("RGB") for e in chunk]
            refs = [base[bl.settings_key(e)] for e in chunk] if s.baseline else []
            base_images = [Image.open(p.folder / b["file"]).convert("RGB") for b in refs] if s.baseline else None
            values = session.score(s, chunk, images, base_images)
            lines = [store.make_line(e, s.name, sig, v, **({"baseline": {"file": b["file"], "made": bool(
                b.get("made"))}} if s.baseline else {})) for e, v, b in zip(chunk, values, refs or chunk,
                                                                             strict=True)]
            store.append(p.folder, lines)
            written += len(lines)
            if progress is not None:
                progress(len(lines))
    return written


def evaluate(folders: list[Path], cfg: EvalConfig, device: str, metrics: list[str] | None = None,
             generate: bl.Generate | None = None, say: Callable[[str], None] = print) -> dict[Path, int]:
    """Check, load, plan every folder, then score them: {folder: lines written}."""
    names = check_eval(cfg, metrics)
    session = Session(cfg, names, device, say).load()
    from .summary import summarize, write_viewer_metrics

    plans = [plan(f, session) for f in folders]
    check_plans(plans, cfg, generate)
    written = {}
    for p in plans:
        written[p.folder] = execute(p, session, generate)
        write_viewer_metrics(summarize(p.folder, cfg))  # the viewer's metric columns, current
    return written


__all__ = ["SCORERS", "evaluate", "plan", "execute"]
