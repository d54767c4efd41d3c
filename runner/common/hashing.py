"""SHA-256 of weight files (cached by path, size and mtime so big checkpoints are hashed once) and of the configs
that change a model's pixels.

Besides the full SHA-256, the short hashes A1111 and Civitai show: AutoV2 (`Model hash`) = the first 10 hex digits
of the file's SHA-256; AutoV3 (`Lora hashes`) = the first 12 hex digits of the SHA-256 of a safetensors file's
payload after its header (kohya's / A1111's `addnet_hash_safetensors`), so editing the metadata keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

from .paths import WEIGHT_EXT, cache_root, is_safetensors

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


def _digest(real: str, skip_header: bool) -> str:
    h = hashlib.sha256()
    with open(real, "rb") as f:
        if skip_header:  # safetensors: 8-byte little-endian header length, the JSON header, then the tensors
            n = int.from_bytes(f.read(8), "little")
            f.seek(n + 8)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_digest(path: str | os.PathLike, kind: str) -> str:
    """A digest of a file, memoised per process and in the cache file under (kind, path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    ident = f"{real}|{st.st_size}|{st.st_mtime_ns}" + ("" if kind == "sha256" else f"|{kind}")
    with _lock:
        if ident in _memo:
            return _memo[ident]
        cached = _load_cache().get(ident)
    if cached:
        _memo[ident] = cached
        return cached
    digest = _digest(real, skip_header=kind == "addnet")
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


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 hex digest of a file (free for Hugging Face cache blobs, which are named by it)."""
    real = os.path.realpath(path)
    blob = os.path.basename(real)
    if _HEX64.match(blob) and os.sep + "blobs" + os.sep in real:
        return blob
    return _cached_digest(real, "sha256")


def addnet_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a safetensors file's tensor payload (after the header); a pickle file's full SHA-256."""
    if not is_safetensors(path):
        return file_sha256(path)  # A1111 hashes non-safetensors LoRAs whole
    return _cached_digest(path, "addnet")


def autov2(sha256: str) -> str:
    """Civitai's AutoV2 / A1111's `Model hash`: the first 10 hex digits of the file's SHA-256."""
    return sha256[:10]


def autov3(path: str | os.PathLike) -> str:
    """Civitai's AutoV3 / A1111's `Lora hashes` entry: the first 12 hex digits of `addnet_sha256`."""
    return addnet_sha256(path)[:12]


def model_sha256(path: str | os.PathLike) -> str:
    """Hash of a model: its file's sha256, or for a diffusers folder the sha256 over its components' weight hashes."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    # the components model_index.json names (other folders, e.g. the tiny model's example loras/, are no part of
    # the model); a folder without an index: every subfolder's weights
    comps = set(_components(p))
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).parts
        if f.suffix in WEIGHT_EXT and f.is_file() and len(rel) > 1 and (not comps or rel[0] in comps):
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
