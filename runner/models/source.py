"""Where a model comes from (hub id, diffusers folder, single file, built-in tiny), on which device, in which dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import ConfigError
from ..common.paths import PICKLE_EXT, hub_offline, hub_unreachable, is_hub_id
from ..config import TORCH_DTYPES, ModelConfig
from .tiny import TINY_ID, tiny_family


def resolve_device(name: str) -> str:
    """`auto` picks mps, then cuda, then cpu; an explicit device must exist."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "mps" if mps else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available here; valid: auto, cpu" + (", mps" if mps else ""))
    if name == "mps" and not mps:
        raise ConfigError("device=mps but Apple MPS is not available here; valid: auto, cpu"
                          + (", cuda" if torch.cuda.is_available() else ""))
    return name


def resolve_dtype(name: str, device: str):
    """`auto` is fp16 on cuda/mps and fp32 on cpu."""
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, TORCH_DTYPES[name])


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, resolved without loading them."""

    kind: str  # builtin | dir | file | hub
    location: str  # local path or hub repo id
    display: str  # short name for the infotext `Model:` field
    revision: str | None = None


def resolve_source(model: ModelConfig) -> ModelSource:
    """Classify `model.id` and check it exists (locally, or in the hub cache when offline)."""
    mid = model.id.strip()
    family = tiny_family(mid)
    if family is not None:  # builtin:tiny (SD1.5) or builtin:tiny-<family>
        name = "tiny" if family == "sd15" else f"tiny-{family}"
        return ModelSource("builtin", TINY_ID if family == "sd15" else f"{TINY_ID}-{family}", name)
    path = Path(os.path.expanduser(mid))
    if not is_hub_id(mid, owner_required=False):
        if not path.exists():
            raise ConfigError(f"model.id={mid!r} does not exist; give an existing folder or .safetensors file,"
                              " a hub id, or use model=tiny")
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ConfigError(f"model.id={mid!r} is a folder without model_index.json (not a diffusers model)")
            return ModelSource("dir", str(path.resolve()), path.resolve().name)
        if path.suffix in PICKLE_EXT and not model.allow_pickle:
            raise ConfigError(f"model.id={mid!r} is a pickle checkpoint; convert it to .safetensors or set "
                              "model.allow_pickle=true if you trust it")
        if path.suffix not in (".safetensors", *PICKLE_EXT):
            raise ConfigError(f"model.id={mid!r} is not a .safetensors/.ckpt checkpoint or a diffusers folder")
        return ModelSource("file", str(path.resolve()), path.stem)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snap = snapshot_download(mid, revision=model.revision, local_files_only=True,
                                 allow_patterns=["model_index.json"])
        return ModelSource("hub", mid, mid.split("/")[-1], revision=Path(snap).name)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        if hub_offline():
            raise ConfigError(f"model.id={mid!r} is not in the local Hugging Face cache and the hub is offline "
                              "(HF_HUB_OFFLINE=1); download it first, give a local path, or use model=tiny") from exc
        if hub_unreachable():  # fail now, not after huggingface_hub's retries
            raise ConfigError(f"model.id={mid!r} is not in the local Hugging Face cache and the hub cannot be "
                              "reached; download it first, give a local path, or use model=tiny") from exc
    return ModelSource("hub", mid, mid.split("/")[-1], revision=model.revision)


