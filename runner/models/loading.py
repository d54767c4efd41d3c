"""Load and cache diffusers pipelines (one per model, device and dtype per process); switch schedulers."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, first_line
from ..common.hashing import file_sha256, model_sha256
from ..common.paths import hub_offline
from ..config import ModelConfig
from .info import ModelInfo, model_info
from .source import ModelSource, resolve_device, resolve_dtype
from .tiny import builtin_path

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
    info: ModelInfo | None = None  # pipeline class, family and traits (models/info.py)
    offload: str = "none"
    memory: Any = None  # the memory switches applied now (MemoryConfig), see models/memory.py

    @property
    def family(self) -> Any:
        return self.info.family if self.info else None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def use_scheduler(self, name: str | None, schedule: str | None = None) -> None:
        """Switch to the named scheduler and schedule (None, None = the model's own), each built once."""
        self.pipe.scheduler = self.scheduler_for(name, schedule)
        self.pipe._t2i_scheduler_for = self.scheduler_for  # the hires. fix pass's own (generate/hires.py)

    def scheduler_for(self, name: str | None, schedule: str | None = None) -> Any:
        """The scheduler for `name` and `schedule` built from the model's own (once per pair)."""
        from .schedulers import build_scheduler

        key = (name, schedule)
        if key not in self.schedulers:
            self.schedulers[key] = build_scheduler(self.base_scheduler, name, schedule)
        return self.schedulers[key]

    def sampler_name(self, name: str | None, schedule: str | None = None) -> tuple[str, str | None]:
        """A1111's (Sampler, Schedule type) of a scheduler; for the model's own, of the table row it matches."""
        from ..config.schedulers import SCHEDULER_TABLE, a1111_names
        from .schedulers import table_row

        if name is None:
            name, own = table_row(self.base_scheduler)
            schedule = schedule or own
            spacing = self.base_scheduler.config.get("timestep_spacing")
            if name is not None and schedule is None and spacing != "linspace":
                # the model's own spacing (SD1.5's "leading") is none of A1111's schedules: no Schedule type, not
                # the one A1111's Automatic would run
                return SCHEDULER_TABLE[name].a1111 or name, None
        sampler, schedule_type = a1111_names(name, schedule)
        return sampler or name or type(self.base_scheduler).__name__, schedule_type


def _pipeline_class(info: ModelInfo) -> Any:
    import diffusers

    cls = getattr(diffusers, info.pipeline, None)
    if cls is None:
        raise ConfigError(f"model.pipeline={info.pipeline!r} is not a diffusers pipeline class")
    return cls


def _transformer(info: ModelInfo, dtype: Any) -> Any:
    """The replacement transformer of `model.transformer` (a GGUF file quantized through diffusers' GGUF
    support, or a .safetensors transformer checkpoint), built on the model's own transformer config."""
    import diffusers

    path = info.config.transformer
    cls_name = (info.configs.get("model_index") or {}).get("transformer", [None, None])[1]
    cls = getattr(diffusers, cls_name or "", None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ConfigError(f"model.transformer={path!r}: {info.family.label} ({info.pipeline}) has no transformer "
                          "that loads from a single file; remove model.transformer")
    kw: dict[str, Any] = {"config": info.folder, "subfolder": "transformer", "torch_dtype": dtype,
                          "local_files_only": hub_offline()}
    if path.endswith(".gguf"):
        from diffusers import GGUFQuantizationConfig

        kw["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    try:
        return cls.from_single_file(path, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"model.transformer={path!r} is not a {cls_name} for {info.config.id} "
                          f"({first_line(exc, 200)})") from exc


def _from_pretrained(info: ModelInfo, dtype: Any):
    source, model = info.source, info.config
    kind, location = source.kind, source.location
    if kind == "builtin":
        kind, location = "dir", str(builtin_path(location))
    cls = _pipeline_class(info)
    common: dict[str, Any] = {"dtype": dtype}
    if model.transformer:
        common["transformer"] = _transformer(info, dtype)
    if kind == "file":
        if not hasattr(cls, "from_single_file"):
            raise ConfigError(f"model.id={location!r}: {info.family.label} ({cls.__name__}) has no single-file "
                              "loader in diffusers; give a diffusers folder (or keep the folder and set "
                              "model.transformer=FILE for a transformer checkpoint)")
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


def load_model(model: ModelConfig, device: str, info: ModelInfo | None = None, offload: str = "none") -> LoadedModel:
    """Load (or reuse from the process cache) the pipeline for `model` on `device` (`offload`: none | model |
    sequential, diffusers' CPU offload switches, set at load because they replace moving the pipeline)."""
    import torch

    info = info or model_info(model)
    source = info.source
    dev = resolve_device(device)
    dtype = resolve_dtype(model.dtype, dev)
    key = (source.kind, source.location, source.revision, model.variant, model.pipeline, model.config,
           model.transformer, str(dtype), dev, offload)
    if key in _CACHE:
        return _CACHE[key]
    log.info("loading %s (%s, %s) on %s as %s", source.location, source.kind, info.pipeline, dev, dtype)
    _quiet_libraries()
    try:
        pipe = _from_pretrained(info, dtype)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise load_error(source, model, exc) from exc
    LOADS[source.location] += 1
    if offload == "model":
        pipe.enable_model_cpu_offload(device=dev)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=dev)
    else:
        pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        log.info("safety checker present: it may blank images it flags")
    torch.set_grad_enabled(False)
    weights = Path(source.location) if source.kind in ("dir", "file") else None
    if source.kind == "builtin":
        weights = builtin_path(source.location)
    elif source.kind == "hub":
        weights = Path(pipe.config._name_or_path) if Path(pipe.config._name_or_path).exists() else None
    sha = model_sha256(weights) if weights is not None else ""
    if source.kind == "hub" and weights is not None:
        source = ModelSource("hub", source.location, source.display, revision=weights.name)
    if model.transformer:  # the replacement transformer is part of what makes the pixels
        sha = hashlib.sha256(f"{sha}|{file_sha256(model.transformer)}".encode()).hexdigest()
    loaded = LoadedModel(pipe, source, model, dev, dtype, sha, pipe.scheduler, info=info, offload=offload)
    _CACHE[key] = loaded
    return loaded


def release(loaded: LoadedModel) -> None:
    """Drop a loaded pipeline from the process cache and give its memory back (the model axis moves on)."""
    import gc

    import torch

    for key in [k for k, v in _CACHE.items() if v is loaded]:
        del _CACHE[key]
    loaded.adapters = None
    loaded.pipe = None
    loaded.schedulers.clear()
    loaded.base_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_heap()


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and RSS would not fall)."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def clear_cache() -> None:
    """Forget every loaded pipeline (tests, or to free memory)."""
    _CACHE.clear()
