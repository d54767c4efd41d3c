"""What a model is, read before it loads: its pipeline class (model_index.json's `_class_name`, or the keys of a
single-file checkpoint), its family and traits, and the settings a run uses for it (user keys, then the model
group's published settings, then the pipeline's own defaults), checked against the family in one line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, first_line
from ..common.paths import hub_offline, is_safetensors
from ..config import ModelConfig, RunSpec
from ..config.validate import SETTING_KEYS, setting
from .families import G_NONE, Family, Knobs, Traits, check, family_for_pipeline, pipeline_defaults, traits
from .source import ModelSource, resolve_device, resolve_dtype, resolve_source
from .tiny import builtin_path

log = logging.getLogger(__name__)
_LEGACY = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}  # model.pipeline short names
# diffusers' single-file model types (single_file_utils.infer_diffusers_model_type) -> pipeline class
_SINGLE_FILE_TYPES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "sd35": "StableDiffusion3Pipeline",
                      "flux-2": "Flux2Pipeline", "chroma": "ChromaPipeline", "xl": "StableDiffusionXLPipeline",
                      "playground": "StableDiffusionXLPipeline"}


@dataclass(frozen=True)
class ModelInfo:
    """A model resolved without loading its weights."""

    config: ModelConfig
    source: ModelSource
    pipeline: str  # diffusers pipeline class name
    traits: Traits
    configs: dict[str, dict] = field(default_factory=dict)  # component configs read up front
    folder: str | None = None  # local diffusers folder (or hub snapshot) its configs came from

    @property
    def family(self) -> Family:
        return self.traits.family

    def identity(self, device: str) -> tuple[str, str]:
        """(the model part of every image key, the hash of its pixel-changing configs), from the files as they are
        now: what the weights and configs contain (not where they are), dtype, variant, pipeline class and any
        replacement transformer file. A retrained or edited model gives new keys; a moved one does not."""
        import hashlib

        from ..common.hashing import config_sha256, file_sha256, model_sha256

        src, model = self.source, self.config
        local = self._local_folder()
        weights_at = Path(src.location) if src.kind == "file" else local
        weights = model_sha256(weights_at) if weights_at is not None and weights_at.exists() else ""
        configs = Path(model.config) if src.kind == "file" and model.config else local
        config_hash = config_sha256(configs) if configs is not None and configs.is_dir() else str(model.config or "")
        weights = weights or f"{src.location}@{src.revision}"
        if model.transformer:  # the replacement transformer is part of what makes the pixels
            weights = hashlib.sha256(f"{weights}|{file_sha256(model.transformer)}".encode()).hexdigest()
        dtype = str(resolve_dtype(model.dtype, resolve_device(device))).replace("torch.", "")
        return f"{weights}|{config_hash}|{model.variant}|{dtype}|{self.pipeline}", config_hash

    def _local_folder(self) -> Path | None:
        """The diffusers folder on this machine (a hub model: its cached snapshot, if any)."""
        if self.source.kind == "hub":
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(self.source.location, revision=self.source.revision,
                                              local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached: the key names the repo and revision instead
                return None
        return Path(self.folder) if self.folder and self.source.kind != "file" else None


def _hub_file(repo: str, name: str, revision: str | None) -> Path | None:
    """A small file of a hub repo: from the local cache, else downloaded once the hub answered (one quick API
    call, so an unreachable hub is one line at once instead of retried downloads)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, name, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if hub_offline():
        return None
    from huggingface_hub import model_info as hub_model_info

    try:
        hub_model_info(repo, revision=revision)
    except Exception as exc:  # noqa: BLE001 - no network, unknown repo, gated: all one line
        raise ConfigError(f"model.id={repo!r} is not in the local Hugging Face cache and the hub cannot be reached "
                          f"or does not have it ({type(exc).__name__}); download it first, give a local path, or "
                          "use model=tiny") from exc
    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except Exception:  # noqa: BLE001 - the repo has no such file
        return None


def _folder_json(folder: str | Path, name: str, revision: str | None = None) -> dict:
    path = Path(folder) / name
    if not path.is_file():
        if Path(folder).exists():
            return {}
        found = _hub_file(str(folder), name, revision)
        if found is None:
            return {}
        path = found
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# keys only an adapter file holds (kohya/diffusers/peft LoRA, LyCORIS LoHa/LoKr, DoRA), never a model's
_ADAPTER_KEY = re.compile(r"lora|hada_|lokr_|\.alpha$|dora_scale$", re.IGNORECASE)


class _Shapes:
    """Keys and shapes of a safetensors file, without reading its tensors (for diffusers' type inference)."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self._f = safe_open(path, "pt")
        self._keys = list(self._f.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def keys(self) -> list[str]:
        return self._keys

    def __getitem__(self, key: str) -> Any:
        class _T:
            shape = tuple(self._f.get_slice(key).get_shape())

        return _T()


def _single_file_pipeline(path: str, model: ModelConfig) -> str:
    """The pipeline class of a single-file checkpoint: from model.config's index, else from its keys."""
    if model.config:
        name = _folder_json(model.config, "model_index.json").get("_class_name")
        if name:
            return name
    if not is_safetensors(path):
        return "StableDiffusionPipeline"  # pickle checkpoints: the SD1.x layout, as before
    from safetensors import SafetensorError

    try:
        shapes = _Shapes(path)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"model.id={path!r} is not a readable .safetensors file ({first_line(exc)})") from exc
    if shapes._keys and all(_ADAPTER_KEY.search(k) for k in shapes._keys):
        raise ConfigError(f"model.id={path!r} is a LoRA, not a model; give a model (e.g. model=sd15) and this file "
                          f"as a LoRA: lora_sets=[[{{source: {path}}}]] or a <lora:NAME:W> tag with lora_dirs")
    if any(k.startswith("conditioner.embedders.1") for k in shapes):
        return "StableDiffusionXLPipeline"
    if any(k.startswith("model.diffusion_model.input_blocks") for k in shapes):
        return "StableDiffusionPipeline"
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        kind = infer_diffusers_model_type(shapes)
    except Exception:  # noqa: BLE001 - the inference reads shapes it may not find
        kind = "v1"
    for prefix, cls in _SINGLE_FILE_TYPES.items():
        if kind.startswith(prefix):
            return cls
    return "StableDiffusionPipeline"


def _check_forced_pipeline(model: ModelConfig, own: str, family: Family, where: str) -> None:
    """`model.pipeline` forces a class; one of another family than the model's own cannot load its weights (an
    SD1.5 UNet in an SDXL pipeline fails mid-run with a TypeError)."""
    try:
        own_family = family_for_pipeline(own)
    except ConfigError:
        return  # the folder's own class is no text-to-image pipeline we know: the forced one may be the fix
    if own_family.name != family.name:
        short = next((k for k, v in _LEGACY.items() if v == own), own)
        raise ConfigError(f"{where}.pipeline={model.pipeline!r} ({family.label}) does not fit {where}.id={model.id!r}, "
                          f"a {own} ({own_family.label}); valid: auto or {short}")


def model_info(model: ModelConfig, where: str = "model") -> ModelInfo:
    """Resolve `model` and read what it is (pipeline, family, traits) without loading weights."""
    try:
        source = resolve_source(model)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where != "model" else str(exc)) from exc
    folder: str | None = None
    if source.kind == "builtin":
        folder = str(builtin_path(source.location))
    elif source.kind in ("dir", "hub"):
        folder = source.location
    elif model.config:
        folder = model.config
    index = _folder_json(folder, "model_index.json", source.revision) if folder else {}
    if model.pipeline not in ("auto", ""):
        pipeline = _LEGACY.get(model.pipeline, model.pipeline)
    elif source.kind == "file":
        pipeline = _single_file_pipeline(source.location, model)
    else:
        pipeline = index.get("_class_name") or "StableDiffusionPipeline"
    try:
        family = family_for_pipeline(pipeline)
    except ConfigError as exc:
        raise ConfigError(f"{where}.id={model.id!r}: {exc}") from exc
    if model.pipeline not in ("auto", "") and index.get("_class_name"):
        _check_forced_pipeline(model, index["_class_name"], family, where)
    configs = {"model_index": index}
    if folder and family.denoiser == "transformer":
        configs["transformer"] = _folder_json(folder, "transformer/config.json", source.revision)
    return ModelInfo(model, source, pipeline, traits(family, pipeline, configs), configs, folder)


def checkpoint_keys(path: str) -> list[str]:
    """Tensor names of a .gguf or .safetensors checkpoint, read from its header."""
    if path.endswith(".gguf"):
        try:
            import gguf
        except ImportError as exc:
            raise ConfigError("model.transformer is a .gguf file: install the `gguf` package (pip install gguf)"
                              ) from exc
        try:
            return [t.name for t in gguf.GGUFReader(path).tensors]
        except Exception as exc:  # noqa: BLE001 - gguf raises ValueError/struct errors on bad files
            raise ConfigError(f"model.transformer={path!r} is not a readable GGUF file ({first_line(exc, 120)})"
                              ) from exc
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types
        raise ConfigError(f"model.transformer={path!r} is not a readable .safetensors file ({first_line(exc, 120)})"
                          ) from exc


def check_transformer_file(info: ModelInfo, where: str = "") -> None:
    """A `model.transformer` file must exist and hold a transformer of the model's family (before loading)."""
    import os

    from .checkpoint_family import fits, keys_family

    path = info.config.transformer
    if not path:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{where}model.transformer={path!r} does not exist; give a .gguf or .safetensors file")
    if not path.endswith((".gguf", ".safetensors")):
        raise ConfigError(f"{where}model.transformer={path!r} is not a .gguf or .safetensors file")
    if info.family.denoiser != "transformer":
        raise ConfigError(f"{where}model.transformer is for transformer models; {info.family.label} has a UNet")
    keys = checkpoint_keys(path)
    found = keys_family(keys)
    if not fits(found, info.family.name):
        from .checkpoint_family import label

        raise ConfigError(f"{where}model.transformer={path!r} is a {label(found)} transformer, but the model "
                          f"{info.config.id!r} is {info.family.label}; use a {info.family.label} transformer")
    if found is None and not any("blocks" in k or "layers." in k for k in keys):
        raise ConfigError(f"{where}model.transformer={path!r} has no transformer blocks (is it a text encoder or "
                          f"a VAE?); give a {info.family.label} transformer")


def model_infos(spec: RunSpec) -> list[ModelInfo]:
    """Every model of the run resolved up front: a typo in any entry is found before the first one loads."""
    models = spec.model_list
    return [model_info(m, f"models[{i}]" if spec.models else "model") for i, m in enumerate(models)]


def settings_for(spec: RunSpec, info: ModelInfo) -> dict[str, tuple]:
    """The run's per-model settings: a key the user set wins, then the group's settings (if the group is for this
    model's family), then the pipeline's own call defaults; unset keys stay (None,)."""
    group = info.config.settings or {}
    if info.config.family and info.config.family != info.family.name and group:
        log.warning("model %s is %s, but its group's settings are for %s; using the pipeline's own defaults",
                    info.config.id, info.family.label, info.config.family)
        group = {}
    fallback = pipeline_defaults(info.pipeline)
    out: dict[str, tuple] = {}
    for key in SETTING_KEYS:
        user = getattr(spec, key)
        if user != (None,):
            out[key] = user
        elif key == "guidance_scale" and info.traits.guidance == G_NONE:
            out[key] = (None,)  # e.g. Flux.1 schnell: no guidance to set
        elif group.get(key) is not None:
            out[key] = setting(key, group[key])
        elif fallback.get(key) is not None and key in ("steps", "guidance_scale", "true_cfg_scale"):
            out[key] = setting(key, fallback[key])
        else:
            out[key] = (None,)
    return out


def user_keys(spec: RunSpec) -> frozenset[str]:
    return frozenset(k for k in SETTING_KEYS if getattr(spec, k) != (None,))


def check_model(spec: RunSpec, info: ModelInfo, settings: dict[str, tuple], where: str = "") -> None:
    """Every key of the run that this model's family cannot honour, as one ConfigError naming the family."""
    negatives = [p.negative_prompt for p in spec.prompts]
    knobs = Knobs(settings["guidance_scale"], settings["true_cfg_scale"], settings["max_sequence_length"],
                  spec.clip_skip, settings["scheduler"], negatives, user_keys(spec))
    try:
        check(info.traits, knobs)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from exc


def spec_for(spec: RunSpec, info: ModelInfo) -> RunSpec:
    """The run spec as seen by one model: its resolved settings in place of the run-wide values."""
    settings = settings_for(spec, info)
    return replace(spec, model=info.config, **settings)
