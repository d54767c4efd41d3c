"""What the frozen encoders make of the data, computed once: VAE posteriors per image view, text-encoder outputs
per caption, kept for the run and (with `data.cache_latents` / `data.cache_text`) on disk for the next runs.

A disk entry is one safetensors file whose name is the SHA-256 of its key, so an entry is found by content and a
changed key (another image, size, flip, VAE, text encoder, precision or device) finds no file and recomputes:
- latents: the image file's bytes, the view (bucket or square size, centre crop, flipped or not), the VAE's
  identity and the dtype/device it ran in;
- text: the caption as trained (trigger applied; caption dropout's empty caption is one more entry), the family,
  the text encoders' and tokenizers' identity, dtype and device.
The latent cache holds the posterior's mean and log-variance (diffusers' `latent_dist.parameters`), not a sample:
each step still draws its sample from the run's generator, so a run with the cache equals one without, bit for
bit (every path encodes one image / one caption at a time, the same computation hit or miss). Files are written
to a temp name and renamed (several processes may fill one cache), and read back only when their stored key
matches. Stale entries are never read; delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from ..common.io import atomic_write_bytes
from .config import DataConfig
from .data import Example, draw_flip, load_pixels

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when what an entry holds, or how its input is computed (resize, crop, encode), changes
DEFAULT_DIR = ".t2i-cache"  # inside data.dir: a hidden folder, which the image scan skips


@dataclass(frozen=True)
class View:
    """One drawn training sample: the image, its size (a square side or width x height) and the seed of its own
    draws (random crop, flip)."""

    example: Example
    size: int | tuple[int, int]
    seed: int


def cache_dir(data: DataConfig) -> Path | None:
    """The disk cache folder (data.cache_dir, else DATA_DIR/.t2i-cache) when a disk cache is on; a ConfigError
    before anything loads when it cannot be written."""
    if not (data.cache_latents or data.cache_text):
        return None
    folder = Path(data.cache_dir).expanduser() if data.cache_dir else Path(data.dir).expanduser() / DEFAULT_DIR
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        key = "data.cache_dir" if data.cache_dir else "data.dir"
        raise ConfigError(f"{key}: the cache folder {folder} cannot be written ({probe} is not a writable folder); "
                          "give a writable one with data.cache_dir=PATH")
    return folder


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def identity(component: Any) -> str:
    """A model component's identity for cache keys: its class, config and a strided sample of every weight
    (16 values per tensor: any other checkpoint or fine-tune differs there; hashing every byte of a 10 GB text
    encoder would cost seconds per run); a tokenizer's class, vocabulary and limits."""
    import torch

    h = hashlib.sha256(type(component).__name__.encode())
    if isinstance(component, torch.nn.Module):
        config = getattr(component, "config", None)
        h.update(json.dumps(dict(config) if hasattr(config, "keys") else str(config), sort_keys=True,
                            default=str).encode())
        for name, t in component.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(sample.numpy().tobytes())
    else:
        vocab = component.get_vocab() if hasattr(component, "get_vocab") else {}
        h.update(json.dumps(sorted(vocab.items()), default=str).encode())
        h.update(f"{getattr(component, 'model_max_length', '')}{getattr(component, 'padding_side', '')}".encode())
        tok = getattr(component, "tokenizer", None)  # a processor wraps one
        if tok is not None and tok is not component:
            h.update(identity(tok).encode())
    return h.hexdigest()


def _pack(value: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors for safetensors and the layout to rebuild `value` (lists of tensors, None)."""
    tensors, layout = {}, {}
    for k, v in value.items():
        if v is None:
            layout[k] = "none"
        elif isinstance(v, list):
            layout[k] = f"list:{len(v)}"
            tensors |= {f"{k}.{i}": x.detach().contiguous().cpu() for i, x in enumerate(v)}
        else:
            layout[k] = "tensor"
            tensors[k] = v.detach().contiguous().cpu()
    return tensors, layout


def _unpack(tensors: dict[str, Any], layout: dict[str, str], device: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, kind in layout.items():
        if kind == "none":
            out[k] = None
        elif kind.startswith("list:"):
            out[k] = [tensors[f"{k}.{i}"].to(device) for i in range(int(kind[5:]))]
        else:
            out[k] = tensors[k].to(device)
    return out


class Store:
    """Entries of one kind, kept in (CPU) memory for the run and, with a folder, on disk across runs."""

    def __init__(self, folder: Path | None, kind: str, device: str) -> None:
        self.folder = folder / kind if folder is not None else None
        self.device = device
        self.memory: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}  # name: (CPU tensors, layout)
        self.computed = 0  # entries this run computed (encoder calls)
        self.read = 0  # entries read from disk

    def get(self, key: dict, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        name = _digest(key)
        if name not in self.memory:
            packed = self._read(name, key) if self.folder is not None else None
            if packed is None:
                packed = _pack(make())
                self.computed += 1
                if self.folder is not None:
                    self._write(name, key, packed)
            else:
                self.read += 1
            self.memory[name] = packed
        return _unpack(*self.memory[name], self.device)

    def _read(self, name: str, key: dict) -> tuple[dict[str, Any], dict[str, str]] | None:
        from safetensors import safe_open

        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("key", "null")) != json.loads(json.dumps(key, default=str)):
                    return None  # another key with this name (never in practice) or an older layout
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors reader
            return tensors, json.loads(meta["layout"])
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is recomputed, not fatal
            log.warning("cache entry %s is unreadable (%s); recomputing it", path, exc)
            return None

    def _write(self, name: str, key: dict, packed: tuple[dict[str, Any], dict[str, str]]) -> None:
        from safetensors.torch import save

        tensors, layout = packed
        meta = {"key": json.dumps(key, sort_keys=True, default=str), "layout": json.dumps(layout)}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / f"{name}.safetensors", save(tensors, metadata=meta))


def _device_type(device: str) -> str:
    return str(device).split(":")[0]


class LatentSource:
    """The training latents of a batch of views: each view's VAE posterior (cached when `store` has a folder and
    the view is a function of its key), then one sample for the batch from the run's generator."""

    def __init__(self, adapter: Any, data: DataConfig, folder: Path | None) -> None:
        self.adapter, self.data = adapter, data
        disk = folder if data.cache_latents else None
        if disk is not None and data.crop == "random":
            # a random crop is a new view each draw: an entry per crop would almost never be read again
            log.warning("data.cache_latents: not caching latents to disk, data.crop=random draws a new crop each "
                        "time (use data.crop=center, or buckets, to cache)")
            disk = None
        self.store = Store(disk, "latents", adapter.device)
        self._vae: str | None = None

    def __call__(self, views: list[View], gen: Any, share: tuple[int, int, int] | None = None) -> Any:
        import torch

        params = [self.params(v)["params"] for v in views]
        return self.adapter.latents_from(torch.cat(params), gen, share)

    def params(self, view: View) -> dict[str, Any]:
        import torch

        d = self.data

        def encode() -> dict[str, Any]:
            pixels = load_pixels(view.example, view.size, d.crop, d.flip, torch.Generator().manual_seed(view.seed))
            return {"params": self.adapter.vae_params(pixels[None])}

        if self.store.folder is None:
            return encode()  # the run keeps no latents in memory without the cache (a flip or crop varies them)
        flipped = draw_flip(d.flip, torch.Generator().manual_seed(view.seed))  # centre crop: the view's only draw
        key = {"v": CACHE_VERSION, "image": _file_digest(view.example.path), "size": view.size, "crop": d.crop,
               "flipped": flipped, "vae": self._vae_id(), "dtype": str(self.adapter.dtype),
               "device": _device_type(self.adapter.device)}
        return self.store.get(key, encode)

    def _vae_id(self) -> str:
        if self._vae is None:
            self._vae = identity(self.adapter.vae) + str(self.adapter.vae.dtype)
        return self._vae


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) for the process."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        _FILE_DIGESTS[memo] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _FILE_DIGESTS[memo]


class TextSource:
    """The conditioning of a batch of captions from the frozen text encoders: each caption encoded alone once
    (kept for the run; with `data.cache_text`, on disk), joined by the family's `collate`."""

    def __init__(self, adapter: Any, data: DataConfig, folder: Path | None, train_te: bool) -> None:
        self.adapter = adapter
        disk = folder if data.cache_text else None
        self.enabled = not train_te and not data.shuffle_tags
        if disk is not None and not self.enabled:
            why = "lora.text_encoder=true trains the text encoder" if train_te else (
                "data.shuffle_tags=true makes a new caption each draw")
            log.warning("data.cache_text: not caching text embeddings, %s", why)
            disk = None
        self.store = Store(disk, "text", adapter.device)
        self._encoders: str | None = None

    def __call__(self, captions: list[str]) -> dict[str, Any]:
        import torch

        if not self.enabled:
            return self.adapter.encode(captions)  # with gradients when the text encoder trains
        conds = []
        for c in captions:
            def encode(c: str = c) -> dict[str, Any]:
                with torch.no_grad():
                    return self.adapter.encode([c])

            key = {"v": CACHE_VERSION, "caption": c, "family": self.adapter.spec.name,
                   "adapter": type(self.adapter).__name__, "encoders": self._encoders_id(),
                   "dtype": str(self.adapter.dtype), "device": _device_type(self.adapter.device)}
            conds.append(self.store.get(key, encode))
        return self.adapter.collate(conds)

    def _encoders_id(self) -> str:
        if self._encoders is None:
            comps = getattr(self.adapter.pipe, "components", {})
            parts = [f"{n}:{identity(c)}" for n, c in sorted(comps.items()) if c is not None
                     and n.startswith(("text_encoder", "tokenizer", "processor"))]
            self._encoders = _digest(parts)
        return self._encoders
