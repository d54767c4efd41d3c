"""Names and places: the cache folder, weight-file extensions, the hub-id rule, file-name slugs."""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

SAFE_EXT = (".safetensors",)
PICKLE_EXT = (".bin", ".ckpt", ".pt", ".pth")  # read only with an explicit allow_pickle opt-in
WEIGHT_EXT = SAFE_EXT + PICKLE_EXT
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
    """A short, file-name-safe, lowercase version of `text` (ASCII letters, digits and dashes)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    return text[:max_len].strip("-") or "x"
