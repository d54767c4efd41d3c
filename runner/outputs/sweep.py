"""Sweep-level outputs: a Hydra callback writing `sweep_manifest.jsonl`; `t2i-merge` for shard run dirs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.utils import JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from ..common.errors import ConfigError, first_line
from ..common.io import atomic_write_bytes
from .manifest import MANIFEST, Manifest

log = logging.getLogger(__name__)
SWEEP_MANIFEST = "sweep_manifest.jsonl"
PARTS_DIR = ".t2i-sweep"  # one part file per job; sweep_manifest.jsonl is rebuilt from them


class JobFailed(CompactHydraException):
    """A multirun job failed; `str(self)` is its one-line reason (Hydra prints it without a traceback)."""


def _lines(entries: list[dict]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in entries).encode("utf-8")


def job_lines(sweep_dir: Path, job_dir: Path, num: int, overrides: list[str],
              error: str | None) -> list[dict]:
    """Every image of one job dir's manifest (file relative to the sweep dir), then a line for its failure."""
    base = {"job": num, "job_dir": os.path.relpath(job_dir, sweep_dir), "overrides": overrides}
    out = []
    for entry in sorted(Manifest(job_dir).entries(), key=lambda e: (e.get("index", 0), e["file"])):
        if (job_dir / entry["file"]).is_file():
            file = os.path.relpath(job_dir / entry["file"], sweep_dir)
            out.append({**entry, **base, "status": "ok", "file": file})
    if error is not None:
        out.append({**base, "status": "failed", "error": error})
    return out


def record_job(sweep_dir: Path, num: int, lines: list[dict]) -> Path:
    """Store one job's lines and rebuild `sweep_manifest.jsonl` from every job's lines, in job order."""
    parts = sweep_dir / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(parts / f"job-{num:06d}.jsonl", _lines(lines))
    return rebuild(sweep_dir)


def rebuild(sweep_dir: Path) -> Path:
    """Concatenate the job part files into `sweep_manifest.jsonl` (atomically, under a lock)."""
    parts = sweep_dir / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    with FileLock(parts / "lock"):  # jobs of a submitit sweep may finish at the same moment
        blob = b"".join(p.read_bytes() for p in sorted(parts.glob("job-*.jsonl")))
        atomic_write_bytes(sweep_dir / SWEEP_MANIFEST, blob)
    return sweep_dir / SWEEP_MANIFEST


def _error_text(exc: Any) -> str:
    if isinstance(exc, JobFailed):
        return str(exc)
    text = first_line(exc)
    return type(exc).__name__ if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def _sweep_dir(config: DictConfig) -> Path:
    return Path(config.hydra.runtime.cwd, str(config.hydra.sweep.dir)).resolve()


class SweepManifest(Callback):
    """Hydra callback: after each multirun job (where it ran), add its images or failure to the sweep dir."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        failed = job_return.status == JobStatus.FAILED
        value = job_return._return_value  # reading `.return_value` would re-raise a failure
        if not failed and isinstance(value, dict) and value.get("output_dir"):
            job_dir = Path(value["output_dir"])
        else:
            job_dir = Path(config.get("output_dir") or config.hydra.runtime.output_dir)
        overrides = list(job_return.overrides or [])
        error = _error_text(value) if failed else None
        path = record_job(_sweep_dir(config), int(config.hydra.job.num), job_lines(
            _sweep_dir(config), job_dir.resolve(), int(config.hydra.job.num), overrides, error))
        log.info("sweep summary: %s", path)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rebuild(_sweep_dir(config))


def run_dirs_of(paths: list[Path]) -> list[Path]:
    """Run dirs (holding manifest.jsonl) among `paths`; a sweep dir gives its subdirs that are run dirs."""
    found: list[Path] = []
    for p in paths:
        subdirs = sorted((d for d in p.iterdir() if (d / MANIFEST).is_file()) if p.is_dir() else [],
                         key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
        found.extend(subdirs or ([p] if (p / MANIFEST).is_file() else []))
    return found


def own_images(folder: Path) -> int:
    """How many images `folder`'s manifest lists as its own (lines that are not a merge's references)."""
    return sum(1 for e in Manifest(folder).entries() if "run_dir" not in e)


def merge(run_dirs: list[Path], out: Path) -> tuple[list[dict], int]:
    """Write one manifest in `out` of all run dirs' images (first of a key wins); return it, duplicates.

    `out` may hold an earlier merge (replaced), never a run dir's own images (ConfigError)."""
    mine = own_images(out) if (out / MANIFEST).is_file() else 0
    if mine:
        raise ConfigError(f"--output {out} is a run dir with {mine} image(s) of its own; merging into it would "
                          "mix its manifest with other dirs' lines: give it as an input and --output a new folder")
    out.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict] = {}
    duplicates = 0
    for d in run_dirs:
        for entry in Manifest(d).entries():
            path = d / entry["file"]
            if not path.is_file():
                continue
            if entry["key"] in merged:
                duplicates += 1
                continue
            rel = {"file": os.path.relpath(path, out), "run_dir": os.path.relpath(d, out)}
            merged[entry["key"]] = {**entry, **rel}
    entries = sorted(merged.values(), key=lambda e: (e["run_dir"], e.get("index", 0), e["file"]))
    atomic_write_bytes(out / MANIFEST, _lines(entries))
    return entries, duplicates


def merge_main(argv: list[str] | None = None) -> int:
    """`t2i-merge`: gather shard (or multirun job) run dirs into one manifest and grid."""
    from ..config import GridConfig
    from .grid import write_grids

    ap = argparse.ArgumentParser(prog="t2i-merge", description=merge_main.__doc__)
    ap.add_argument("dirs", nargs="+", type=Path, help="run dirs, or a sweep dir whose subdirs are run dirs")
    ap.add_argument("-o", "--output", type=Path, help="where to write manifest.jsonl and grids/ "
                                                      "(default: the single dir given)")
    ap.add_argument("--x", help="grid column axis (default: auto)")
    ap.add_argument("--y", help="grid row axis (default: auto)")
    ap.add_argument("--max-size", type=int, default=GridConfig.max_size, help="largest grid side in pixels")
    ap.add_argument("--no-grid", action="store_true", help="write only the merged manifest")
    args = ap.parse_args(argv)
    try:
        if args.output is None and len(args.dirs) != 1:
            raise ConfigError("give --output when merging several dirs")
        out = (args.output or args.dirs[0]).resolve()
        dirs = [d.resolve() for d in run_dirs_of(args.dirs)]
        if not dirs:
            raise ConfigError(f"no run dir (with {MANIFEST}) in {', '.join(map(str, args.dirs))}")
        if out in dirs:
            raise ConfigError(f"--output {out} is one of the run dirs; choose another folder")
        grid = GridConfig(enabled=not args.no_grid, x=args.x, y=args.y, max_size=args.max_size)
        if grid.enabled:
            from .grid import check_axes

            check_axes(grid)
        entries, dups = merge(dirs, out)
        grids = write_grids(out, grid, entries) if grid.enabled else []
    except ConfigError as exc:
        print(f"t2i-merge: error: {exc}", file=sys.stderr)
        return 2
    extra = f" ({dups} duplicate keys skipped)" if dups else ""
    print(f"t2i-merge: {len(entries)} images from {len(dirs)} run dirs{extra} -> {out / MANIFEST}"
          + (f", {len(grids)} grid(s) in {out / 'grids'}" if grids else ""))
    return 0


def main() -> None:
    sys.exit(merge_main())


if __name__ == "__main__":
    main()
