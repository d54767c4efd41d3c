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
from omegaconf import DictConfig, OmegaConf

from ..common.errors import ConfigError, first_line, task_wrapper
from ..common.io import atomic_write_bytes
from .manifest import MANIFEST, Manifest
from .rundir import check_not_foreign, check_writable

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


def _job_count(config: DictConfig) -> int | None:
    """How many jobs Hydra's basic sweeper will launch (None for other sweepers or sweeps it cannot count)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # noqa: BLE001 - e.g. glob() sweeps need Hydra's config loader: count unknown
        return None


def _viewer_on(config: DictConfig) -> bool:
    return config.hydra.mode == RunMode.MULTIRUN and bool(OmegaConf.select(config, "viewer.enabled", default=True))


class SweepManifest(Callback):
    """Hydra callback: after each multirun job (where it ran), add its images or failure to the sweep dir;
    keeps the sweep dir's viewer (index.html, outputs/viewer.py) current while jobs run."""

    def __init__(self) -> None:
        self._watchers: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # submitit pickles the job (callbacks included) to requeue it: a watcher's thread and lock stay behind
        return {**self.__dict__, "_watchers": {}}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _viewer_on(config):
            from .viewer import start_sweep

            _quietly(start_sweep, _sweep_dir(config), _job_count(config))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _viewer_on(config):
            return
        from .viewer import SweepWatcher

        job_dir = Path(config.get("output_dir") or config.hydra.runtime.output_dir).resolve()
        num = int(config.hydra.job.num)
        watcher = _quietly(SweepWatcher, _sweep_dir(config), num, job_dir, list(config.hydra.overrides.task))
        if watcher is not None:
            self._watchers[num] = watcher

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
        watcher = self._watchers.pop(int(config.hydra.job.num), None)
        if watcher is not None:
            _quietly(watcher.close)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rebuild(_sweep_dir(config))
        if _viewer_on(config):
            from .viewer import end_sweep

            _quietly(end_sweep, _sweep_dir(config))


def _quietly(fn: Any, *args: Any) -> Any:
    """Run a viewer update; a failure is a warning (the viewer never fails a sweep)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("viewer: %s", first_line(exc))
        return None


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
    check_writable(out, "--output")  # a file or a read-only place: one line, not a raw OSError
    check_not_foreign(out, "--output")
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


def _merged_viewer(out: Path, entries: list[dict]) -> None:
    """The merged dir's viewer (thumbnails stay beside each run dir's PNGs; missing ones are made now)."""
    import time

    from .thumbs import ensure_thumbs
    from .viewer import progress, write_viewer

    ensure_thumbs(out, entries)
    write_viewer(out, entries, progress("done", len(entries), len(entries), time.time()))


@task_wrapper("t2i-merge")
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
    ap.add_argument("--verbose", action="store_true", help="show the traceback of an unexpected error")
    args = ap.parse_args(argv)
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
    _merged_viewer(out, entries)
    extra = f" ({dups} duplicate keys skipped)" if dups else ""
    print(f"t2i-merge: {len(entries)} images from {len(dirs)} run dirs{extra} -> {out / MANIFEST}"
          + (f", {len(grids)} grid(s) in {out / 'grids'}" if grids else "") + f", viewer {out / 'index.html'}")
    return 0


def main() -> None:
    sys.exit(merge_main())


if __name__ == "__main__":
    main()
