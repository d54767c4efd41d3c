"""The server's persistent queue: one SQLite file (stdlib `sqlite3`, WAL mode) under the server's output folder.

It holds every job (a single request: the form, `/api/jobs`, the A1111 and OpenAI APIs) and every sweep with its
state, owner, priority and run dir. The run dir's manifest stays the source of truth for images: the database only
says what was asked, by whom, in which order, and how far the queue had got. Every state change is one committed
transaction, so a kill -9 leaves the file as it was after the last one; WAL lets readers go on while the worker
writes.

A job's validated RunSpec is stored as JSON (`encode`/`decode`): dataclasses by name (only the `runner.config`
ones), tuples and dicts with non-string keys tagged. No pickle: the file lies in a folder other people may write.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

DB_NAME = "queue.sqlite"
ACTIVE = ("queued", "running")  # states a restart picks up again
_SAFE_MODULES = ("runner.config.",)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,                     -- job | sweep
    owner TEXT NOT NULL,                    -- '' without server.api_keys, else a hash of the key
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,                    -- queued | running | done | error | interrupted | cancelled
    images INTEGER NOT NULL,                -- planned
    done INTEGER NOT NULL DEFAULT 0,        -- made, as of the last state change (the manifest knows better)
    spec TEXT NOT NULL,                     -- the validated RunSpec (encode)
    family TEXT,
    source TEXT,                            -- a sweep's config as submitted (YAML)
    run_dir TEXT,
    error TEXT,
    error_status INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_state ON items(state);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def encode(obj: Any) -> Any:
    """`obj` as plain JSON values; `decode` gives it back (dataclasses, tuples, dicts with non-string keys)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"__c": f"{cls.__module__}:{cls.__qualname__}",
                "f": {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, tuple):
        return {"__t": [encode(x) for x in obj]}
    if isinstance(obj, list):
        return [encode(x) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__d": [[encode(k), encode(v)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the queue")


def decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [decode(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__t" in obj:
        return tuple(decode(x) for x in obj["__t"])
    if "__d" in obj:
        return {decode(k): decode(v) for k, v in obj["__d"]}
    if "__c" in obj:
        module, _, name = obj["__c"].partition(":")
        if not module.startswith(_SAFE_MODULES):
            raise ValueError(f"the queue names class {obj['__c']!r}, which it may not build")
        cls = getattr(importlib.import_module(module), name)
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{obj['__c']} is not a dataclass")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: decode(v) for k, v in obj["f"].items() if k in fields})
    return {k: decode(v) for k, v in obj.items()}


class Store:
    """The queue's SQLite file. One connection shared under a lock: the worker thread and the request handlers
    write rarely and briefly (a state change), so one writer at a time costs nothing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed state change survives a power cut too
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, item: dict[str, Any]) -> int:
        """Insert a new item (its `seq` is returned: the queue order)."""
        now = time.time()
        row = {**item, "created": now, "updated": now}
        cols = ", ".join(row)
        with self._lock:
            cur = self._db.execute(f"INSERT INTO items ({cols}) VALUES ({', '.join('?' * len(row))})",
                                   tuple(row.values()))
            return int(cur.lastrowid)

    def update(self, item_id: str, **values: Any) -> None:
        values["updated"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(f"UPDATE items SET {sets} WHERE id = ?", (*values.values(), item_id))

    def get(self, item_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return dict(row) if row else None

    def active(self) -> list[dict[str, Any]]:
        """Every queued or running item, in submission order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM items WHERE state IN (?, ?) ORDER BY seq", ACTIVE).fetchall()
        return [dict(r) for r in rows]

    def items(self, owner: str | None = None, kind: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """The newest items (of one owner / kind when given), without their specs."""
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        sql = ("SELECT seq, id, kind, owner, priority, state, images, done, family, run_dir, error, created, updated "
               f"FROM items {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq DESC LIMIT ?")
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, (*args, limit)).fetchall()]

    def run_dirs(self, owner: str) -> set[str]:
        """The run dirs of one owner's jobs and sweeps."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT run_dir FROM items WHERE owner = ? AND run_dir IS NOT NULL",
                                    (owner,)).fetchall()
        return {r[0] for r in rows}

    def all_run_dirs(self) -> dict[str, set[str]]:
        """Run dir -> the owners whose items wrote to it."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT run_dir, owner FROM items WHERE run_dir IS NOT NULL").fetchall()
        out: dict[str, set[str]] = {}
        for run_dir, owner in rows:
            out.setdefault(os.path.realpath(run_dir), set()).add(owner)
        return out

    def get_meta(self, name: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, name: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                             "value = excluded.value", (name, json.dumps(value)))
