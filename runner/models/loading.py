"""Load and cache diffusers pipelines (one per model, device and dtype per process); switch schedulers."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, first_line
from ..common.hashing import model_sha256
from ..common.paths import hub_offline
from ..config import ModelConfig
from .source import ModelSource, resolve_device, resolve_dtype, resolve_source
from .tiny import ensure_tiny

log = logging.getLogger(__name__)
LOADS: Counter = Counter()  # base-model loads per process, keyed by model id (tests assert on it)
_CACHE: dict[tuple, LoadedModel] = {}

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
    schedulers: dict[tuple, Any] = field(default_factory=dict)  # (name, schedule) -> scheduler
    adapters: Any = None  # runner.lora.adapters.AdapterManager, created on first use

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def use_scheduler(self, name: str | None, schedule: str | None = None) -> None:
        """Switch to the named scheduler and schedule (None, None = the model's own), each built once."""
        from .schedulers import build_scheduler

        key = (name, schedule)
        if key not in self.schedulers:
            self.schedulers[key] = build_scheduler(self.base_scheduler, name, schedule)
        self.pipe.scheduler = self.schedulers[key]

    def sampler_name(self, name: str | None, schedule: str | None = None) -> tuple[str, str | None]:
        """A1111's (Sampler, Schedule type) of a scheduler; for the model's own, of the table row it matches."""
        from ..config.schedulers import a1111_names
        from .schedulers import table_row

        if name is None:
            name, own = table_row(self.base_scheduler)
            schedule = schedule or own
        sampler, schedule_type = a1111_names(name, schedule)
        return sampler or name or type(self.base_scheduler).__name__, schedule_type


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


def _root_line(exc: BaseException) -> str:
    """The first line of an error, or of its root cause when the message only points at a traceback."""
    msg = first_line(exc)
    while "stacktrace above" in msg or "traceback above" in msg:
        exc = exc.__cause__ or exc.__context__
        if exc is None:
            return msg.split(". ")[0]
        msg = first_line(exc)
    return msg


def load_error(source: ModelSource, model: ModelConfig, exc: BaseException) -> ConfigError:
    """The one-line ConfigError for a model that failed to load (used by t2i, t2i-serve and t2i-train)."""
    msg = _root_line(exc)
    if source.kind == "hub":
        if "not fully cached" in msg or "outgoing traffic" in msg or "connect" in msg.lower() or \
                "resolve" in msg.lower() or "cannot find the requested files" in msg:
            return ConfigError(f"model.id={source.location!r} is not in the local Hugging Face cache and the hub "
                               "cannot be reached; download it first, give a local path, or use model=tiny")
        return ConfigError(f"could not load model.id={source.location!r} from the hub ({msg[:200]}); check the id,"
                           " give a local path, or use model=tiny")
    from huggingface_hub.errors import LocalEntryNotFoundError

    if source.kind == "file" and not model.config and isinstance(exc, LocalEntryNotFoundError):
        return ConfigError(f"model.id={source.location!r} is a single-file checkpoint whose diffusers "
                           "configs are not available offline; set model.config=<diffusers folder or "
                           "cached hub id of the same architecture>")
    if "safetensors" in msg and not model.allow_pickle and source.kind != "file":
        return ConfigError(f"model.id={source.location!r} has no .safetensors weights ({msg}); set "
                           "model.allow_pickle=true only if you trust its pickle files")
    return ConfigError(f"could not load model.id={source.location!r}: {msg}")


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
        raise load_error(source, model, exc) from exc
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
