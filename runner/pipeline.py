"""Load and cache diffusers pipelines: device, dtype, model source (hub id, folder, single file), schedulers."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig
from .hashing import model_sha256
from .tiny import TINY_ID, ensure_tiny

log = logging.getLogger(__name__)
LOADS: Counter = Counter()  # base-model loads per process, keyed by model id (tests assert on it)
_CACHE: dict[tuple, LoadedModel] = {}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")

# short name -> (diffusers class, extra config, A1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


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
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


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
    if mid in (TINY_ID, "tiny"):
        return ModelSource("builtin", TINY_ID, "tiny")
    path = Path(os.path.expanduser(mid))
    looks_local = path.is_absolute() or mid.startswith((".", "~")) or path.exists() or not _HUB_ID.match(mid)
    if path.suffix in (".safetensors", *_PICKLE_EXT):
        looks_local = True
    if looks_local:
        if not path.exists():
            raise ConfigError(f"model.id={mid!r} does not exist; give an existing folder or .safetensors file,"
                              " a hub id, or use model=tiny")
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ConfigError(f"model.id={mid!r} is a folder without model_index.json (not a diffusers model)")
            return ModelSource("dir", str(path.resolve()), path.resolve().name)
        if path.suffix in _PICKLE_EXT and not model.allow_pickle:
            raise ConfigError(f"model.id={mid!r} is a pickle checkpoint; convert it to .safetensors or set "
                              "model.allow_pickle=true if you trust it")
        if path.suffix not in (".safetensors", *_PICKLE_EXT):
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
    return ModelSource("hub", mid, mid.split("/")[-1], revision=model.revision)


@dataclass
class LoadedModel:
    """A loaded pipeline with what the runner needs to record and to switch schedulers/LoRAs."""

    pipe: Any
    source: ModelSource
    config: ModelConfig
    device: str
    dtype: Any
    sha256: str
    base_scheduler: Any
    schedulers: dict[str, Any] = field(default_factory=dict)
    adapters: Any = None  # runner.loras.AdapterManager, created on first use

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def use_scheduler(self, name: str | None) -> None:
        """Switch to the named scheduler (None = the model's own), built once from the base config."""
        if name is None:
            self.pipe.scheduler = self.base_scheduler
            return
        if name not in self.schedulers:
            import diffusers

            cls_name, extra, _ = SCHEDULERS[name]
            self.schedulers[name] = getattr(diffusers, cls_name).from_config(self.base_scheduler.config, **extra)
        self.pipe.scheduler = self.schedulers[name]

    def sampler_name(self, name: str | None) -> str:
        """The A1111 sampler name of a scheduler (the model's own when None)."""
        if name is not None:
            return SCHEDULERS[name][2]
        cls = type(self.base_scheduler).__name__
        karras = bool(getattr(self.base_scheduler.config, "use_karras_sigmas", False))
        for cname, extra, label in SCHEDULERS.values():
            if cname == cls and bool(extra.get("use_karras_sigmas", False)) == karras:
                return label
        return cls


def _pipeline_class(kind: str, source: ModelSource, model: ModelConfig):
    import diffusers

    if model.pipeline == "sd":
        return diffusers.StableDiffusionPipeline
    if model.pipeline == "sdxl":
        return diffusers.StableDiffusionXLPipeline
    if kind == "file":
        from safetensors import SafetensorError, safe_open

        if source.location.endswith(".safetensors"):
            try:
                with safe_open(source.location, "pt") as f:
                    keys = list(f.keys())
            except SafetensorError as exc:
                raise ValueError(f"not a readable .safetensors file ({exc})") from exc
            if any(k.startswith("conditioner.embedders.1") for k in keys):
                return diffusers.StableDiffusionXLPipeline
        return diffusers.StableDiffusionPipeline
    return diffusers.DiffusionPipeline


def _from_pretrained(source: ModelSource, model: ModelConfig, dtype: Any):
    kind, location = source.kind, source.location
    if kind == "builtin":
        kind, location = "dir", str(ensure_tiny())
    cls = _pipeline_class(kind, source, model)
    common: dict[str, Any] = {"dtype": dtype}
    if kind == "file":
        if model.config:
            common["config"] = model.config
        return cls.from_single_file(location, local_files_only=hub_offline(), **common)
    common.update(use_safetensors=not model.allow_pickle, variant=model.variant)
    if kind == "hub":
        common.update(revision=model.revision, local_files_only=hub_offline())
    if kind == "dir":
        index = json.loads((Path(location) / "model_index.json").read_text())
        common.update(safety_checker=None, requires_safety_checker=False) if "safety_checker" in index else None
    return cls.from_pretrained(location, **common)


def _quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and info chatter (our own tqdm bar covers the run)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(model: ModelConfig, device: str) -> LoadedModel:
    """Load (or reuse from the process cache) the pipeline for `model` on `device`."""
    import torch

    source = resolve_source(model)
    dev = resolve_device(device)
    dtype = resolve_dtype(model.dtype, dev)
    key = (source.kind, source.location, source.revision, model.variant, model.pipeline, model.config, str(dtype), dev)
    if key in _CACHE:
        return _CACHE[key]
    log.info("loading %s (%s) on %s as %s", source.location, source.kind, dev, dtype)
    _quiet_libraries()
    try:
        pipe = _from_pretrained(source, model, dtype)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if source.kind == "hub":
            if "not fully cached" in msg or "outgoing traffic" in msg or "connect" in msg.lower():
                raise ConfigError(f"model.id={source.location!r} is not in the local Hugging Face cache and the hub "
                                  "cannot be reached; download it first, give a local path, or use model=tiny") from exc
            raise ConfigError(f"could not load model.id={source.location!r} from the hub ({msg[:200]}); check the id,"
                              " give a local path, or use model=tiny") from exc
        from huggingface_hub.errors import LocalEntryNotFoundError

        if source.kind == "file" and not model.config and isinstance(exc, LocalEntryNotFoundError):
            raise ConfigError(f"model.id={source.location!r} is a single-file checkpoint whose diffusers "
                              "configs are not available offline; set model.config=<diffusers folder or "
                              "cached hub id of the same architecture>") from exc
        if "safetensors" in msg and not model.allow_pickle and source.kind != "file":
            raise ConfigError(f"model.id={source.location!r} has no .safetensors weights ({msg}); set "
                              "model.allow_pickle=true only if you trust its pickle files") from exc
        raise ConfigError(f"could not load model.id={source.location!r}: {msg}") from exc
    LOADS[source.location] += 1
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        log.info("safety checker present: it may blank images it flags")
    torch.set_grad_enabled(False)
    weights = Path(source.location) if source.kind in ("dir", "file") else None
    if source.kind == "builtin":
        weights = ensure_tiny()
    elif source.kind == "hub":
        weights = Path(pipe.config._name_or_path) if Path(pipe.config._name_or_path).exists() else None
    sha = model_sha256(weights) if weights is not None else ""
    if source.kind == "hub" and weights is not None:
        source = ModelSource("hub", source.location, source.display, revision=weights.name)
    loaded = LoadedModel(pipe, source, model, dev, dtype, sha, pipe.scheduler)
    _CACHE[key] = loaded
    return loaded


def clear_cache() -> None:
    """Forget every loaded pipeline (tests, or to free memory)."""
    _CACHE.clear()
