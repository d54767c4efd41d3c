"""Names and places: the cache folder, weight-file extensions, the hub-id rule, file-name slugs."""

from __future__ import annotations

import os
import re
import threading
import time
import unicodedata
from pathlib import Path

SAFE_EXT = (".safetensors",)
PICKLE_EXT = (".bin", ".ckpt", ".pt", ".pth")  # read only with an explicit allow_pickle opt-in
WEIGHT_EXT = SAFE_EXT + PICKLE_EXT


def is_safetensors(path: str | os.PathLike) -> bool:
    """A safetensors file by its name: read without unpickling, its header tells what it holds."""
    return str(path).lower().endswith(SAFE_EXT)  # `X.SAFETENSORS` too (AutoV3 is hashed from its payload)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def cache_root() -> Path:
    """Per-user cache directory of t2i-runner (respects T2I_CACHE and XDG_CACHE_HOME)."""
    env = os.environ.get("T2I_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "t2i-runner"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


HUB_PROBE_SECONDS = 4.0  # how long to wait for the hub's host before calling it unreachable
_probe: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when, why unreachable); kept for a minute


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (a short reason), or None if its host answers.

    A TCP connection to the endpoint's host, bounded to a few seconds: without it huggingface_hub retries a
    failed request for ~25 s before it reports anything."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    now = time.monotonic()
    if endpoint in _probe and now - _probe[endpoint][0] < 60:
        return _probe[endpoint][1]
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{host}: {exc.strerror or type(exc).__name__}")

    worker = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
    worker.start()
    worker.join(HUB_PROBE_SECONDS)
    why = result[0] if result else f"{host}: no answer within {HUB_PROBE_SECONDS:g} s"
    _probe[endpoint] = (now, why)
    return why


def is_hub_id(text: str, owner_required: bool = True) -> bool:
    """True if `text` reads as a hub repo id (`owner/name`; a bare `name` too unless `owner_required`) and is
    not an existing local path or a weight file name."""
    text = text.strip()
    if text.startswith((".", "/", "~")) or text.endswith(WEIGHT_EXT) or Path(os.path.expanduser(text)).exists():
        return False
    return _HUB_ID.match(text) is not None and (text.count("/") == 1 or not owner_required)


def strip_weight_ext(name: str) -> str:
    """A weight file's name without its extension (`style.pth` -> `style`)."""
    for ext in WEIGHT_EXT:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def slug(text: str, max_len: int = 40) -> str:
    """A short, file-name-safe, lowercase version of `text` (ASCII letters, digits and dashes), cut at a word
    boundary when it is too long (a single word longer than `max_len` is cut)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    if len(text) > max_len:
        cut = text[: max_len + 1].rfind("-")
        text = text[:cut] if cut > 0 else text[:max_len]
    return text.strip("-") or "x"
