"""LoRA adapters: resolve a spec to one file, load each file once per process, activate sets by weight."""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, LoraSpec
from .hashing import file_sha256
from .pipeline import _HUB_ID, hub_offline
from .plan import lora_name
from .tiny import TINY_ID, ensure_tiny

log = logging.getLogger(__name__)
DEFAULT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # the seed's two defaults
PICKLE_EXT = (".bin", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA spec pinned to the file actually read and its sha256."""

    name: str
    source: str
    weight_name: str | None
    file: str
    sha256: str

    @property
    def adapter(self) -> str:
        """Internal adapter name: unique per file content, valid for peft (no dots)."""
        return f"{re.sub(r'[^A-Za-z0-9_]', '_', self.name)[:40]}_{self.sha256[:8]}"

    def record(self, weight: float) -> dict:
        return {"name": self.name, "source": self.source, "weight_name": self.weight_name,
                "scale": weight, "sha256": self.sha256, "file": self.file}


def _listing(folder: Path) -> str:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    return ", ".join(files) if files else "none"


def _pick_in_dir(spec: LoraSpec, folder: Path, allow_pickle: bool) -> Path:
    if spec.weight_name:
        f = folder / spec.weight_name
        if not f.is_file():
            raise ConfigError(f"weight_name={spec.weight_name!r} is not in {spec.source}; .safetensors files there: "
                              f"{_listing(folder)}")
        return f
    for default in DEFAULT_NAMES:
        if (folder / default).is_file():
            return folder / default
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise ConfigError(f"no default LoRA file ({' or '.join(DEFAULT_NAMES)}) in {spec.source}; set weight_name to "
                      f"one of: {_listing(folder)}")


def _hub_file(spec: LoraSpec) -> Path:
    from huggingface_hub import hf_hub_download

    names = [spec.weight_name] if spec.weight_name else list(DEFAULT_NAMES)
    last: Exception | None = None
    for name in names:
        try:
            return Path(hf_hub_download(spec.source, name, local_files_only=hub_offline()))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types; reported below
            last = exc
    where = "the local hub cache (HF_HUB_OFFLINE=1)" if hub_offline() else "the hub"
    raise ConfigError(f"LoRA source {spec.source!r} with weight_name={spec.weight_name!r} was not found in {where}"
                      f" ({type(last).__name__}); give a local file or folder") from last


def resolve_lora(spec: LoraSpec, allow_pickle: bool = False) -> ResolvedLora:
    """Find the file a spec names (local file, folder + weight_name, or hub repo) and hash it."""
    source = spec.source
    if source.startswith(TINY_ID):
        path = ensure_tiny() / source[len(TINY_ID):].lstrip("/")
    else:
        path = Path(os.path.expanduser(source))
    if path.is_dir():
        file = _pick_in_dir(spec, path, allow_pickle)
    elif path.is_file():
        file = path
    elif _HUB_ID.match(source) and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        file = _hub_file(spec)
    else:
        raise ConfigError(f"LoRA source {source!r} not found (no such file or folder, not a hub id)")
    if file.suffix in PICKLE_EXT and not allow_pickle:
        raise ConfigError(f"LoRA file {file} is a pickle file; convert it to .safetensors or set "
                          "allow_pickle_lora=true if you trust it")
    if not os.access(file, os.R_OK):
        raise ConfigError(f"LoRA file {file} is not readable")
    return ResolvedLora(lora_name(spec), source, spec.weight_name, str(file), file_sha256(file))


def _read_state_dict(r: ResolvedLora) -> dict:
    if r.file.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(r.file)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ConfigError(f"LoRA file {r.file} is not a readable safetensors file ({exc})") from exc
    import torch

    try:
        state = torch.load(r.file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"LoRA file {r.file} could not be read ({type(exc).__name__}: {exc})") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else {}


class AdapterManager:
    """Loads each adapter once into a pipeline and switches sets with `set_adapters`, never reloading the base."""

    def __init__(self, pipe: Any, max_loaded: int = 8) -> None:
        self.pipe = pipe
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, ResolvedLora] = OrderedDict()
        self.loads = 0  # adapter file loads (tests assert adapters are loaded once)

    def _load(self, r: ResolvedLora) -> None:
        state = _read_state_dict(r)
        if not state or not any("lora" in k or k.endswith(".alpha") for k in state):
            raise ConfigError(f"{r.file} is not a LoRA file (no LoRA weights in it)")
        try:
            self.pipe.load_lora_weights(state, adapter_name=r.adapter)
        except Exception as exc:  # noqa: BLE001 - diffusers raises ValueError/RuntimeError/KeyError here
            self._forget(r.adapter)
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{r.file} is not a LoRA for this model ({first})") from exc
        attached = any(r.adapter in names for names in self.pipe.get_list_adapters().values())
        if not attached:
            raise ConfigError(f"{r.file} is not a LoRA for this model (none of its layers match the model's)")
        self.loads += 1

    def _forget(self, adapter: str) -> None:
        try:
            self.pipe.delete_adapters(adapter)
        except Exception:  # noqa: BLE001 - partially injected adapters may not be registered everywhere
            log.debug("could not delete adapter %s", adapter)
        self.loaded.pop(adapter, None)

    def ensure(self, loras: tuple[ResolvedLora, ...]) -> None:
        """Load any adapter of the set not loaded yet; evict least-recently-used ones beyond the cap."""
        for r in loras:
            if r.adapter in self.loaded:
                self.loaded.move_to_end(r.adapter)
                continue
            self._load(r)
            self.loaded[r.adapter] = r
        keep = {r.adapter for r in loras}
        for adapter in list(self.loaded):
            if len(self.loaded) <= max(self.max_loaded, len(keep)):
                break
            if adapter not in keep:
                self._forget(adapter)

    def activate(self, loras: tuple[ResolvedLora, ...], weights: tuple[float, ...]) -> None:
        """Make exactly this set active at these weights; an empty or all-zero set is the base model."""
        self.ensure(loras)
        if not self.loaded:
            return
        if not loras or all(w == 0 for w in weights):
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([r.adapter for r in loras], adapter_weights=list(weights))
