"""`RUN_DIR/metrics.jsonl`: one JSON line per image and scorer signature (scorer version, model identity,
reference set), appended whole (a torn last line of a killed process is skipped and ended before the next append).

A line: {key, file, scorer, version, model, [ref], values: {column: number}, [baseline: {file, made}], created}.
A scorer with another model or version writes new lines beside the old ones; readers pick one signature per
scorer, never a mix (summary.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from ..outputs.manifest import append_line

METRICS = "metrics.jsonl"
SIGNATURE = ("version", "model", "ref")
_lock = threading.Lock()


def sig_of(line: dict) -> tuple:
    return tuple(line.get(k) for k in SIGNATURE)


def read_lines(folder: Path) -> list[dict]:
    """The valid lines of a folder's metrics.jsonl, in the order written."""
    try:
        data = (Path(folder) / METRICS).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("values"), dict) and "key" in line and "scorer" in line:
            out.append(line)
    return out


def done(lines: Iterable[dict], scorer: str, sig: dict) -> set[str]:
    """The image keys that already have a `scorer` line of signature `sig`."""
    want = tuple(sig.get(k) for k in SIGNATURE)
    return {ln["key"] for ln in lines if ln["scorer"] == scorer and sig_of(ln) == want}


def make_line(entry: dict, scorer: str, sig: dict, values: dict, **extra: object) -> dict:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"key": entry["key"], "file": entry["file"], "scorer": scorer, **sig, "values": values, **extra,
            "created": created}


def append(folder: Path, lines: list[dict]) -> None:
    """Append whole lines durably (one write and fsync per batch)."""
    if lines:
        text = "".join(json.dumps(ln, ensure_ascii=False, sort_keys=True) + "\n" for ln in lines)
        append_line(Path(folder) / METRICS, text, _lock)
