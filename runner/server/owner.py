"""Who is asking: the owner of the jobs, sweeps and runs a request makes or may see.

Without `server.api_keys` everyone is the same owner (""). With keys, the owner is a hash of the request's key
(the key itself is never stored): `ApiKeyMiddleware` sets it for the request, and everything the request's
handler does (queueing from any API, listing runs) reads it here.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
from pathlib import Path

SHARED = ""  # the owner when the server has no keys
_current: contextvars.ContextVar[str] = contextvars.ContextVar("t2i_owner", default=SHARED)


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def set_owner(owner: str) -> contextvars.Token:
    return _current.set(owner)


def current_owner() -> str:
    return _current.get()


def reset_owner(token: contextvars.Token) -> None:
    _current.reset(token)


def visible(path: Path, roots: list, run_dirs: dict[str, set[str]], owner: str) -> bool:
    """Whether `owner` may see `path` (a run dir or a file in one) under `server.api_keys`: what this server's
    queue wrote is its owner's only; the rest of the server's own folder (root 0) is nobody's; the shared
    `server.run_dirs` (roots 1…) are everyone's."""
    real = os.path.realpath(path)
    for run_dir, owners in run_dirs.items():
        if real == run_dir or real.startswith(run_dir + os.sep):
            return owner in owners
    return any(real == str(r.path) or real.startswith(str(r.path) + os.sep) for r in roots[1:])
