"""The run viewer: `index.html` (one static page, its JS and CSS inline) plus `viewer-data.js` and
`viewer-status.js` beside it, kept current while a run (or a multirun sweep) writes images.

The data travels as JS files that assign globals because a page opened from file:// may not fetch() the files
beside it, but may load scripts from them; the page re-loads `viewer-status.js` to follow a live run.

`viewer-data.js` is `window.T2I_VIEWER_DATA = {...};` with (format 1):
  format, kind ("run" | "sweep"), title, dir (absolute, for reproduce commands), rev (changes on every write),
  progress {state: running|done|interrupted|failed, planned, done, images, started, updated, jobs, failed_jobs},
  axes [{name, values, labels, baseline, wildcard}]  -- swept axes only, derived from the records
  default {x, y}  -- the axes of the first view (the PNG grids' choice)
  common {record fields equal in every image}, images [{f: file, t: thumbnail (256 px), s: small thumbnail
  (64 px), a: [value index per axis], r: {the record's other fields}}]  -- a record is {...common, ...r, file: f}.
Integers beyond 2**53 (seeds) are written as strings so that JavaScript keeps every digit.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

from ..common.io import atomic_write_bytes
from .grid import GRID_AXES, _ordered, axis_value, pick_axes, value_label
from .manifest import loads
from .record import PROVENANCE
from .thumbs import THUMB_SIZE, ensure_thumbs, has_thumbs, thumb_rel

log = logging.getLogger(__name__)
VIEWER_HTML = "index.html"
DATA_JS = "viewer-data.js"
STATUS_JS = "viewer-status.js"
DATA_FORMAT = 1
ASSETS = Path(__file__).with_name("viewer_assets")
DATA_GLOBAL = "T2I_VIEWER_DATA"
STATUS_GLOBAL = "T2I_VIEWER_STATUS"
# record fields that are never a sweep axis: provenance (outputs/record.py), identity and bookkeeping, or
# folded into a derived axis (loras -> lora_set, lora_scale; overrides -> one axis per overridden key)
NOT_AXES = frozenset({"file", "key", "index", "batch_size", "job", "job_dir", "run_dir", "status", "error",
                      "overrides", "loras", "label_axes", *PROVENANCE})
BASELINE = ("lora_set", "nolora")  # the no-LoRA baseline: its axis and value (outputs/grid.py's label)
WILDCARD = ("lora_scale", None)  # a no-LoRA image has no LoRA scale: it belongs to every scale's column
MAX_JS_INT = 2**53 - 1
STRETCH = 50  # a live rewrite that takes t seconds waits at least STRETCH * t before the next one


# 1. The page and the data files


@cache
def page_html() -> bytes:
    """The viewer page: viewer_assets/index.html with viewer.css and viewer.js inlined (no network, ever)."""
    html = (ASSETS / "index.html").read_text(encoding="utf-8")
    css = (ASSETS / "viewer.css").read_text(encoding="utf-8")
    js = (ASSETS / "viewer.js").read_text(encoding="utf-8")
    metrics = (ASSETS / "metrics.js").read_text(encoding="utf-8")  # RUN_DIR/viewer-metrics.js (runner/eval)
    return html.replace("/*VIEWER_CSS*/", css).replace("/*VIEWER_JS*/", js).replace("/*METRICS_JS*/", metrics
                                                                                     ).encode("utf-8")


_PLAIN = frozenset({str, float, bool, type(None)})


def _js_safe(value: Any) -> Any:
    """`value` with integers JavaScript cannot hold exactly turned into strings."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is int:
        return str(value) if abs(value) > MAX_JS_INT else value
    if kind is dict:
        return {k: v if type(v) in _PLAIN else _js_safe(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [v if type(v) in _PLAIN else _js_safe(v) for v in value]
    return value


def _js(name: str, obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"window.{name} = {text};\n".encode()


def _read_js(path: Path) -> dict | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
        return json.loads(text[text.index("=") + 1:].strip().rstrip(";"))
    except (OSError, ValueError):
        return None


def read_status(folder: Path) -> dict | None:
    """The `{rev, progress}` a viewer's status file holds (None when absent or unreadable)."""
    return _read_js(Path(folder) / STATUS_JS)


def read_data(folder: Path) -> dict | None:
    """The data object of a folder's `viewer-data.js` (None when absent or unreadable)."""
    return _read_js(Path(folder) / DATA_JS)


# 2. Axes: every record field that takes more than one value, derived generically from the records


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _constant(col: list) -> bool:
    """True when every value is the same (and of the same type); an empty column too."""
    return not col or col.count(col[0]) == len(col) and all(type(v) is type(col[0]) for v in col)


def _columns(entries: list[dict]) -> dict[str, list]:
    """Candidate axes and each entry's value: the grid's axes first (same values and labels as the PNG
    grids), then any other scalar record field that varies, then one level into dict fields, then multirun
    overrides. (Fields that do not vary are dropped early: a run dir may hold 10,000 records.)"""
    # the model first: a setting that differs only with the models' defaults (steps, guidance) is then the
    # model's, not an axis of its own that would hide the model axis
    # a run's own label axes (t2i-train's `step`) come next: the LoRA set of each step follows from its step
    labelled = dict.fromkeys(a for e in entries for a in e.get("label_axes") or ())
    cols: dict[str, list] = {a: [axis_value(e, a) for e in entries] for a in ("model", *labelled, *GRID_AXES)}
    loras = [e.get("loras") or [] for e in entries]
    if not _constant(loras):  # finer than lora_set when sets share adapter names (it is dropped otherwise)
        cols["loras"] = [json.dumps([{k: v for k, v in lo.items() if k not in ("scale", "file")} for lo in x],
                                    sort_keys=True) for x in loras]
    nested: list[tuple[str, list]] = []
    for key in dict.fromkeys(k for e in entries for k in e):
        if key in NOT_AXES:
            continue
        col = [e.get(key) for e in entries]
        if _constant(col):
            continue
        if all(_scalar(v) for v in col):
            cols.setdefault(key, col)
        else:
            nested.append((key, col))
    for key, col in nested:
        for sub in dict.fromkeys(k for v in col if isinstance(v, dict) for k in v):
            name = f"{key}.{sub}"
            values = [v.get(sub) if isinstance(v, dict) else None for v in col]
            if name not in cols and all(_scalar(x) for x in values):
                cols[name] = values
    overrides: dict[str, list] = {}
    for n, e in enumerate(entries):
        for text in e.get("overrides") or []:
            key, sep, value = str(text).partition("=")
            if sep and key.lstrip("+~") not in cols:
                overrides.setdefault(key.lstrip("+~"), [None] * len(entries))[n] = value
    cols.update(overrides)
    return cols


def _determined(col: list, combo: list[tuple]) -> bool:
    """True when the axes kept so far (`combo`: each entry's values on them) decide `col`'s value, so that it
    offers no new way to pick images (sampler vs scheduler, model.id vs model, negative prompt vs prompt)."""
    return len(set(zip(combo, map(_hashable, col), strict=True))) == len(set(combo))


def _hashable(value: Any) -> Any:
    return (type(value).__name__, value)  # 1, 1.0 and True stay apart


def viewer_axes(entries: list[dict]) -> tuple[list[dict], list[list[int]]]:
    """The swept axes of `entries` ({name, values, labels, baseline, wildcard}) and each entry's value
    indices. A field that the axes before it decide (sampler vs scheduler) is not an axis of its own."""
    cols = _columns(entries)
    kept: list[str] = []
    combo: list[tuple] = [() for _ in entries]
    for name, col in cols.items():
        if _constant(col):
            continue
        distinct = {_hashable(v) for v in col if (name, v) != WILDCARD}
        if len(distinct) > 1 and not _determined(col, combo):
            kept.append(name)
            combo = [(*c, _hashable(v)) for c, v in zip(combo, col, strict=True)]
    axes, index = [], [[] for _ in entries]
    for name in kept:
        values = _ordered(cols[name])
        if name == BASELINE[0] and BASELINE[1] in values:  # the baseline comes first
            values.remove(BASELINE[1])
            values.insert(0, BASELINE[1])
        position = {_hashable(v): i for i, v in enumerate(values)}
        for n, v in enumerate(cols[name]):
            index[n].append(position[_hashable(v)])
        axes.append({
            "name": name, "values": values, "labels": [value_label(name, v) for v in values],
            "baseline": values.index(BASELINE[1]) if name == BASELINE[0] and BASELINE[1] in values else None,
            "wildcard": values.index(None) if name == WILDCARD[0] and None in values else None,
        })
    return axes, index


# 3. The data of one viewer


def _common(entries: list[dict]) -> dict:
    """Fields with the same value (and type) in every entry."""
    if not entries:
        return {}
    missing = object()
    out = {}
    for k, v in entries[0].items():
        if k != "file" and _constant([e.get(k, missing) for e in entries]):
            out[k] = v
    return out


def build_data(entries: list[dict], folder: Path, progress: dict, kind: str = "run",
               title: str | None = None, rev: int | None = None) -> dict:
    """The `T2I_VIEWER_DATA` object for `entries` (files relative to `folder`)."""
    folder = Path(folder).resolve()
    axes, index = viewer_axes(entries)
    common = _common(entries)
    varying = [k for k in dict.fromkeys(k for e in entries for k in e) if k not in common and k != "file"]
    images = [{"f": e["file"], "t": thumb_rel(e["file"]), "s": thumb_rel(e["file"], small=True), "a": a,
               "r": {k: _js_safe(e[k]) for k in varying if k in e}}
              for e, a in zip(entries, index, strict=True)]
    for a in axes:
        a["values"] = _js_safe(a["values"])
    x, y = pick_axes(entries, None, None)  # the PNG grids' choice is the page's first view
    return {"format": DATA_FORMAT, "kind": kind, "title": title or _title(folder), "dir": str(folder),
            "rev": time.time_ns() // 1000 if rev is None else rev, "progress": {**progress, "images": len(entries)},
            "axes": axes, "default": {"x": x, "y": y}, "common": _js_safe(common), "images": images}


def _title(folder: Path) -> str:
    parts = [p for p in folder.parts if p not in (folder.anchor, "")]
    return "/".join(parts[-3:]) or str(folder)


def write_viewer(folder: Path, entries: list[dict], progress: dict, kind: str = "run",
                 title: str | None = None) -> dict:
    """Write `folder/index.html`, `viewer-data.js` and `viewer-status.js` (each atomically; the data first,
    so a page that sees a new status finds the new data); returns the data written."""
    folder = Path(folder)
    data = build_data(entries, folder, progress, kind, title)
    page = folder / VIEWER_HTML
    html = page_html()
    if not page.is_file() or page.read_bytes() != html:
        atomic_write_bytes(page, html)
    atomic_write_bytes(folder / DATA_JS, _js(DATA_GLOBAL, data))
    atomic_write_bytes(folder / STATUS_JS, _js(STATUS_GLOBAL, {"rev": data["rev"], "progress": data["progress"]}))
    return data


def remove_viewer(folder: Path) -> None:
    """Remove the viewer files (a run that failed before its first image leaves its dir as it was)."""
    for name in (VIEWER_HTML, DATA_JS, STATUS_JS):
        (Path(folder) / name).unlink(missing_ok=True)


def progress(state: str, planned: int | None, done: int, started: float, **extra: Any) -> dict:
    return {"state": state, "planned": planned, "done": done, "started": started, "updated": time.time(), **extra}


# 4. Keeping it current: a throttled writer thread (never the generating thread)


class Throttle:
    """Calls `fn` in its own thread when it is due: after `poke()` (or when `changed()` says so), at most once
    per `interval` seconds, stretched to STRETCH x the last call's duration so that rebuilding a big run dir
    never takes more than 2% of the time (it holds the GIL the generating thread needs); and every `heartbeat`
    seconds anyway, so that the page can tell a live run from a dead one."""

    def __init__(self, fn: Callable[[], None], name: str, interval: float = 1.0, heartbeat: float = 10.0,
                 changed: Callable[[], bool] | None = None) -> None:
        self.fn, self.interval, self.heartbeat, self.changed = fn, interval, heartbeat, changed
        self._dirty = False
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._dirty = True  # the thread looks at it on its next tick; no wake-up per image

    def _loop(self) -> None:
        last, wait = time.monotonic(), self.interval
        while True:
            with self._cond:
                if not self._stop:
                    self._cond.wait(self.interval)
                if self._stop:
                    return
            if time.monotonic() - last < wait:
                continue
            dirty, self._dirty = self._dirty, False
            if self.changed is not None and self.changed():
                dirty = True
            if dirty or time.monotonic() - last >= self.heartbeat:
                start = time.monotonic()
                try:
                    self.fn()
                except Exception as exc:  # noqa: BLE001 - the viewer never stops a run
                    log.warning("viewer: update failed (%s)", exc)
                last = time.monotonic()
                wait = max(self.interval, STRETCH * (last - start))

    def close(self) -> None:
        """Stop the thread (the owner writes the final state itself)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()


class LiveViewer:
    """The viewer of one run dir while the run writes into it: `add()` each finished image (from the writer
    threads), `close(state)` at the end. Thumbnails missing from earlier runs are made in the background."""

    def __init__(self, run_dir: Path, entries: Iterable[dict], planned: int, done: int,
                 thumb_size: int = THUMB_SIZE, interval: float = 1.0) -> None:
        self.run_dir = Path(run_dir)
        self.thumb_size = thumb_size
        self._entries = {e["key"]: e for e in entries}
        self._old = list(self._entries.values())
        self._planned, self._done, self._started = planned, done, time.time()
        self._lock = threading.Lock()
        self._stopping = False
        try:
            self._write("running")
        except OSError as exc:  # an unwritable run dir fails the run at its first image, with the usual message
            log.warning("viewer: cannot write %s (%s)", self.run_dir / VIEWER_HTML, exc)
        self._throttle = Throttle(lambda: self._write("running"), "t2i-viewer", interval)
        self._backfill = threading.Thread(target=self._thumbs, name="t2i-viewer-thumbs", daemon=True)
        self._backfill.start()

    def _thumbs(self) -> None:
        """Thumbnails of images from earlier runs (made before thumbnails existed, or lost)."""
        missing = [e for e in self._old if not has_thumbs(self.run_dir, e["file"])]
        try:
            ensure_thumbs(self.run_dir, (e for e in missing if not self._stopping), self.thumb_size)
        except Exception as exc:  # noqa: BLE001 - the viewer falls back to the PNGs
            log.warning("viewer: cannot make thumbnails (%s)", exc)

    def _write(self, state: str) -> None:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: (e.get("index", 0), e["file"]))
            prog = progress(state, self._planned, self._done, self._started)
        write_viewer(self.run_dir, entries, prog)

    def add(self, entry: dict) -> None:
        with self._lock:
            self._entries[entry["key"]] = entry
            self._done += 1
        self._throttle.poke()

    def close(self, state: str) -> None:
        """Write the final state (`done`, `interrupted`, `failed`); a run that made nothing leaves no viewer."""
        self._stopping = state != "done"  # a finished run completes the thumbnails; a stopped one does not wait
        self._throttle.close()
        self._backfill.join()
        if not self._entries and state == "failed":
            remove_viewer(self.run_dir)
            return
        try:
            self._write(state)
        except OSError as exc:
            log.warning("viewer: cannot write %s (%s)", self.run_dir / VIEWER_HTML, exc)


# 5. Multirun sweeps: one viewer over every job's images, live while jobs run


def sweep_source(sweep_dir: Path) -> tuple[list[dict], dict]:
    """Every image of a multirun sweep dir (finished jobs from their part files, running jobs from their
    manifests) and the sweep's progress."""
    from .sweep import PARTS_DIR, job_lines

    parts = Path(sweep_dir) / PARTS_DIR
    plan = _read_json(parts / "plan.json") or {}
    markers = [m for m in (_read_json(p) for p in sorted(parts.glob("running-*.json"))) if m and "job" in m]
    running = [m["job"] for m in markers]
    entries: list[dict] = []
    failed, finished = [], set()
    for part in sorted(parts.glob("job-*.jsonl")):
        # a part from before this sweep started (a re-run of it) still shows its images, but is not news
        fresh = part.stat().st_mtime >= (plan.get("started") or 0) - 1
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                item = loads(line)
            except ValueError:
                continue
            if not isinstance(item, dict):
                continue
            if item.get("job") in running:
                continue
            if fresh:
                finished.add(item.get("job"))
            if item.get("status") == "failed" and fresh:
                failed.append({k: item.get(k) for k in ("job", "overrides", "error")})
            elif "file" in item:
                entries.append(item)
    planned, done = 0, 0
    for job in markers:
        job_dir = Path(sweep_dir) / job["job_dir"]
        entries += job_lines(Path(sweep_dir), job_dir, job["job"], job.get("overrides") or [], None)
        status = (read_status(job_dir) or {}).get("progress") or {}
        planned += status.get("planned") or 0
        done += status.get("done") or 0
    entries.sort(key=lambda e: (e.get("job", 0), e.get("index", 0), e["file"]))
    total = plan.get("jobs")
    over = total is not None and len(finished) >= total and not running
    state = plan.get("state") or ("done" if over else "running")
    jobs = {"total": total, "finished": len(finished), "failed": len(failed), "running": running}
    prog = progress(state, None, len(entries), plan.get("started") or time.time(), jobs=jobs,
                    failed_jobs=failed, running_images={"planned": planned, "done": done})
    return entries, prog


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_sweep_viewer(sweep_dir: Path) -> None:
    """Rebuild the sweep dir's viewer from every job (under a lock: jobs may run in parallel processes)."""
    from filelock import FileLock

    from .sweep import PARTS_DIR

    parts = Path(sweep_dir) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    with FileLock(str(parts / "viewer.lock")):
        entries, prog = sweep_source(sweep_dir)
        write_viewer(sweep_dir, entries, prog, kind="sweep")


def start_sweep(sweep_dir: Path, jobs: int | None) -> None:
    """Note the sweep's start and job count (for its progress) and write its first viewer."""
    from .sweep import PARTS_DIR

    parts = Path(sweep_dir) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    old = _read_json(parts / "plan.json") or {}
    atomic_write_bytes(parts / "plan.json", json.dumps({"jobs": jobs, "started": time.time()}).encode())
    if old.get("state"):  # a re-run of the sweep (resume) is running again
        log.debug("sweep %s restarted", sweep_dir)
    write_sweep_viewer(sweep_dir)


def end_sweep(sweep_dir: Path) -> None:
    from .sweep import PARTS_DIR

    parts = Path(sweep_dir) / PARTS_DIR
    plan = _read_json(parts / "plan.json") or {}
    atomic_write_bytes(parts / "plan.json", json.dumps({**plan, "state": "done"}).encode())
    write_sweep_viewer(sweep_dir)


class SweepWatcher:
    """While one multirun job runs (in whatever process runs it), rebuild the sweep's viewer when the job's
    manifest grows; `close()` when the job ends."""

    def __init__(self, sweep_dir: Path, job: int, job_dir: Path, overrides: list[str]) -> None:
        from .sweep import PARTS_DIR

        self.sweep_dir = Path(sweep_dir)
        self.marker = self.sweep_dir / PARTS_DIR / f"running-{job:06d}.json"
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(job_dir, self.sweep_dir)
        atomic_write_bytes(self.marker, json.dumps({"job": job, "job_dir": rel, "overrides": overrides}).encode())
        self._manifest = Path(job_dir) / "manifest.jsonl"
        self._seen: tuple = ()
        write_sweep_viewer(self.sweep_dir)
        self._throttle = Throttle(lambda: write_sweep_viewer(self.sweep_dir), "t2i-sweep-viewer",
                                  interval=1.5, changed=self._changed)

    def _changed(self) -> bool:
        try:
            st = self._manifest.stat()
            now: tuple = (st.st_size, st.st_mtime_ns)
        except OSError:
            now = ()
        changed, self._seen = now != self._seen, now
        return changed

    def close(self) -> None:
        """Stop watching; the job's part file is in place by now, so the marker goes."""
        self._throttle.close()
        self.marker.unlink(missing_ok=True)
        write_sweep_viewer(self.sweep_dir)


# 6. Any folder: its images and progress, for t2i-merge and for the server (old run dirs have no viewer yet)


def folder_source(folder: Path) -> tuple[list[dict], dict, str]:
    """Entries, progress and kind of a run dir, merged dir or multirun sweep dir."""
    from .manifest import MANIFEST, Manifest
    from .sweep import PARTS_DIR

    folder = Path(folder)
    if (folder / PARTS_DIR).is_dir() and not (folder / MANIFEST).is_file():
        entries, prog = sweep_source(folder)
        return entries, prog, "sweep"
    entries = [e for e in Manifest(folder).entries() if (folder / e["file"]).is_file()]
    entries = list({e["key"]: e for e in entries}.values())
    entries.sort(key=lambda e: (e.get("index", 0), e["file"]))
    status = (read_status(folder) or {}).get("progress") or {}
    prog = progress(status.get("state") or "done", status.get("planned"), status.get("done") or len(entries),
                    status.get("started") or 0.0)
    return entries, prog, "run"


def _rev(entries: list[dict]) -> int:
    """A revision number that changes when the entries do (for data built on request)."""
    return zlib.crc32("\n".join(e["key"] for e in entries).encode()) * 1_000_000 + len(entries)


def data_js(folder: Path) -> bytes:
    """`viewer-data.js` for a folder, built now from its manifest (nothing is written)."""
    entries, prog, kind = folder_source(folder)
    return _js(DATA_GLOBAL, build_data(entries, folder, prog, kind, rev=_rev(entries)))


def status_js(folder: Path) -> bytes:
    """`viewer-status.js` for a folder, built now (its rev matches `data_js` of the same entries)."""
    entries, prog, _ = folder_source(folder)
    return _js(STATUS_GLOBAL, {"rev": _rev(entries), "progress": {**prog, "images": len(entries)}})
