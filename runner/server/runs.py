"""`/runs`: the run dirs this server may show (its own outputs and the folders in `server.run_dirs`), found by
walking those folders, and the one rule for reaching a file inside them (nothing outside, nothing hidden)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..common.errors import ConfigError
from ..eval.summary import read_summary
from ..outputs.manifest import MANIFEST
from ..outputs.sweep import PARTS_DIR, SWEEP_MANIFEST
from ..outputs.viewer import STATUS_JS, read_status

SKIP = frozenset({"thumbs", "grids"})  # folders inside a run dir that never hold run dirs
MAX_DEPTH = 6  # below a root
MAX_RUNS = 2000  # listed per request


@dataclass(frozen=True)
class Root:
    """A folder whose run dirs may be shown; `/runs/{index}/...` addresses files inside it."""

    index: int
    path: Path  # resolved (symlinks followed), the boundary every served file must lie in
    label: str


def own_root(cfg: DictConfig) -> Path:
    """Where this server's own runs go: server.output_dir, else outputs/server (every start's dated dir)."""
    if cfg.server.output_dir:
        return Path(os.path.expanduser(str(cfg.server.output_dir)))
    return Path("outputs") / "server"


def run_roots(cfg: DictConfig) -> list[Root]:
    """Root 0 is the server's own output folder; then `server.run_dirs`, each an existing folder."""
    paths = [own_root(cfg)]
    for text in cfg.server.get("run_dirs") or []:
        p = Path(os.path.expanduser(str(text)))
        if not p.is_dir():
            raise ConfigError(f"server.run_dirs: {str(text)!r} is not a folder; give existing folders that "
                              "hold run dirs (each with manifest.jsonl)")
        paths.append(p)
    roots: list[Root] = []
    for p in paths:
        real = Path(os.path.realpath(p))
        if all(r.path != real for r in roots):
            roots.append(Root(len(roots), real, str(p)))
    return roots


def kind_of(folder: Path) -> str | None:
    """`run` (a manifest, or a live viewer before the first image), `sweep` (a multirun sweep dir) or None."""
    if (folder / MANIFEST).is_file() or (folder / STATUS_JS).is_file() and not (folder / PARTS_DIR).is_dir():
        return "run"
    if (folder / SWEEP_MANIFEST).is_file() or (folder / PARTS_DIR).is_dir():
        return "sweep"
    return None


def resolve(roots: list[Root], root: str, rel: str) -> Path | None:
    """The real path of `rel` inside root number `root`, or None when it is not allowed: an unknown root,
    `..`, a hidden part (.hydra, .t2i-sweep, dotfiles), an absolute or odd path, or a symlink leading out."""
    if not (root.isascii() and root.isdigit()) or int(root) >= len(roots):
        return None
    base = roots[int(root)].path
    parts = [p for p in rel.split("/") if p != ""] if rel else []
    if any(p in (".", "..") or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        return None
    if rel.startswith("/"):
        return None
    real = Path(os.path.realpath(base.joinpath(*parts)))
    if real != base and not str(real).startswith(str(base) + os.sep):
        return None
    if any(p.startswith(".") for p in real.relative_to(base).parts):  # a link to a hidden file is hidden too
        return None
    return real


def _info(root: Root, folder: Path, kind: str) -> dict[str, Any]:
    rel = folder.relative_to(root.path).as_posix() if folder != root.path else ""
    status = read_status(folder) or {}
    prog = status.get("progress") or {}
    if "images" in prog:
        images = prog["images"]
    else:
        lines = folder / (MANIFEST if kind == "run" else SWEEP_MANIFEST)
        images = lines.read_bytes().count(b"\n") if lines.is_file() else 0
    try:
        mtime = max(p.stat().st_mtime for p in (folder / n for n in (MANIFEST, SWEEP_MANIFEST, "viewer-status.js"))
                    if p.exists())
    except ValueError:
        mtime = folder.stat().st_mtime
    return {"root": root.index, "path": rel, "kind": kind, "images": images, "state": prog.get("state"),
            "planned": prog.get("planned"), "mtime": mtime, "url": f"/runs/{root.index}/" + (f"{rel}/" if rel else ""),
            "jobs": [], "metrics": read_summary(folder)}  # scores (runner/eval) where computed, else None


def find_runs(roots: list[Root]) -> list[dict[str, Any]]:
    """Every run dir under the roots (a sweep's job dirs under its entry), newest first."""
    found: list[dict[str, Any]] = []
    count, seen = 0, set()
    for root in roots:
        stack: list[tuple[Path, int, dict | None]] = [(root.path, 0, None)]
        while stack and count < MAX_RUNS:
            folder, depth, sweep = stack.pop()
            if folder in seen:  # roots may nest (server.run_dirs=[outputs] holds outputs/server)
                continue
            seen.add(folder)
            kind = kind_of(folder)
            here = sweep
            if kind is not None:
                info = _info(root, folder, kind)
                count += 1
                (sweep["jobs"] if sweep is not None else found).append(info)
                if kind == "run":
                    continue
                here = info
            if depth >= MAX_DEPTH:
                continue
            try:
                children = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)
                            and not e.name.startswith(".") and e.name not in SKIP]
            except OSError:
                continue
            stack.extend((Path(e.path), depth + 1, here) for e in children)
    found.sort(key=lambda r: -r["mtime"])
    for r in found:
        r["jobs"].sort(key=lambda j: (len(j["path"]), j["path"]))
    return found


def viewer_url(roots: list[Root], run_dir: Path | None) -> str | None:
    """The /runs URL of a run dir's viewer (None when it lies in no root)."""
    if run_dir is None:
        return None
    real = os.path.realpath(run_dir)
    for root in roots:
        if real == str(root.path) or real.startswith(str(root.path) + os.sep):
            rel = Path(real).relative_to(root.path).as_posix()
            return f"/runs/{root.index}/" + ("" if rel == "." else f"{rel}/")
    return None
