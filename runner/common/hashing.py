"""SHA-256 of weight files (cached by path, size and mtime so big checkpoints are hashed once) and of the configs
that change a model's pixels."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

from .paths import WEIGHT_EXT, cache_root

_lock = threading.Lock()
_memo: dict[str, str] = {}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 hex digest of a file (free for Hugging Face cache blobs, which are named by it)."""
    real = os.path.realpath(path)
    blob = os.path.basename(real)
    if _HEX64.match(blob) and os.sep + "blobs" + os.sep in real:
        return blob
    st = os.stat(real)
    ident = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    with _lock:
        if ident in _memo:
            return _memo[ident]
        cached = _load_cache().get(ident)
    if cached:
        _memo[ident] = cached
        return cached
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _memo[ident] = digest
        data = _load_cache()
        data[ident] = digest
        try:
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            tmp = _cache_file().with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, _cache_file())
        except OSError:
            pass  # the cache is an optimisation only
    return digest


def model_sha256(path: str | os.PathLike) -> str:
    """Hash of a model: its file's sha256, or for a diffusers folder the sha256 over its components' weight hashes."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).parts
        if f.suffix in WEIGHT_EXT and f.is_file() and len(rel) > 1 and rel[0] != "loras":  # component weights
            h.update(f"{f.relative_to(p).as_posix()}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _components(folder: Path) -> list[str]:
    """The component subfolders a diffusers `model_index.json` names (`unet`, `scheduler`, `tokenizer`, ...)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return sorted(k for k, v in index.items() if isinstance(v, list) and (folder / k).is_dir())


def config_sha256(path: str | os.PathLike) -> str:
    """Hash of everything in a diffusers folder that changes pixels besides the weights: `model_index.json` and
    every other file of its components (scheduler_config.json, config.json, tokenizer files, ...).

    Empty for a single checkpoint file (its configs come from `model.config`, hashed on its own)."""
    p = Path(path)
    if not p.is_dir():
        return ""
    h = hashlib.sha256()
    if (p / "model_index.json").is_file():
        h.update(f"model_index.json:{file_sha256(p / 'model_index.json')}\n".encode())
    for comp in _components(p):
        for f in sorted((p / comp).rglob("*")):
            rel = f.relative_to(p)
            if f.is_file() and f.suffix not in WEIGHT_EXT and not any(part.startswith(".") for part in rel.parts):
                h.update(f"{rel.as_posix()}:{file_sha256(f)}\n".encode())
    return h.hexdigest()
