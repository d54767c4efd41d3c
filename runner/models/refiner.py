"""The second model of A1111's Refiner: resolved and checked before anything loads, then loaded once per process
(with the base model's device and dtype) and kept beside the base pipeline.

What can refine: an SDXL refiner (StableDiffusionXLImg2ImgPipeline: text encoder 2 only, aesthetic-score time ids)
or another SDXL base (A1111 takes any checkpoint of the family), as a diffusers folder, a hub id or one
.safetensors file. It is loaded as diffusers' SDXL img2img pipeline, whose `_get_add_time_ids` knows both kinds of
time ids. Its VAE is the base's own object when the weights are equal (the official refiner ships the base's VAE):
nothing held twice. Its text encoders are its own: a LoRA on the base's text encoder must not reach the refiner's
conditioning (A1111 applies the prompt's LoRAs by layer name, and the refiner's encoder has other names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, first_line
from ..common.paths import hub_offline, is_safetensors
from ..config import ModelConfig
from ..config.refiner import Refiner
from .source import ModelSource, resolve_source
from .tiny import REFINER_FAMILIES, TINY_ID, builtin_path

log = logging.getLogger(__name__)
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"
_OK = {"StableDiffusionXLImg2ImgPipeline": "an SDXL refiner", "StableDiffusionXLPipeline": "an SDXL base"}
LOADS: dict[str, int] = {}  # refiner loads per process, keyed by location (tests assert on it)
_CACHE: dict[tuple, LoadedRefiner] = {}


@dataclass
class RefinerInfo:
    """A refiner resolved without loading: where it is and which pipeline class its weights are."""

    config: ModelConfig
    source: ModelSource
    pipeline: str  # StableDiffusionXLImg2ImgPipeline (a refiner) or StableDiffusionXLPipeline (a base)

    @property
    def weights(self) -> Path | None:
        if self.source.kind == "builtin":
            return builtin_path(self.source.location)
        if self.source.kind == "hub":
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(self.source.location, revision=self.source.revision,
                                              local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached: named by repo and revision instead
                return None
        return Path(self.source.location)


@dataclass
class LoadedRefiner:
    """The loaded refiner: its img2img pipeline, a text-to-image view of its text encoders (for A1111-syntax
    conditioning), its prompt-embedding cache and what the record says of it."""

    pipe: Any
    text: Any  # StableDiffusionXLPipeline over the same components (encode_prompt, prompt/clip.py encoders)
    info: RefinerInfo
    sha256: str
    embeds: Any = None  # generate/prompt_embeds.PromptEmbeds of the refiner's text encoders (made on first use)
    shared: list[str] = field(default_factory=list)  # components that are the base's own objects

    def record(self) -> dict:
        src = self.info.source
        return {"id": self.info.config.id, "name": src.display, "kind": src.kind, "location": src.location,
                "revision": src.revision, "hash": self.sha256, "pipeline": self.info.pipeline,
                "config": self.info.config.config}


def _source(model: ModelConfig) -> ModelSource:
    head = model.id.partition("/")[0]
    if head in (f"{TINY_ID}-{f}" for f in REFINER_FAMILIES):  # builtin:tiny-sdxl-refiner
        return ModelSource("builtin", model.id, head.removeprefix("builtin:"))
    return resolve_source(model)


def _file_pipeline(path: str, model: ModelConfig) -> str:
    """The pipeline class of a single-file refiner: from refiner.config's index, else from its keys."""
    from .info import _folder_json, _Shapes

    if model.config:
        return _folder_json(model.config, "model_index.json").get("_class_name") or ""
    if not is_safetensors(path):
        return ""
    try:
        shapes = _Shapes(path)
    except OSError as exc:
        raise ConfigError(f"refiner.model={path!r} is not a readable .safetensors file ({first_line(exc)})") from exc
    if any(k.startswith("conditioner.embedders.1") for k in shapes._keys):
        return "StableDiffusionXLPipeline"
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type(shapes)
    except Exception:  # noqa: BLE001 - the inference reads shapes it may not find
        return ""
    return {"xl_refiner": REFINER_PIPELINE, "xl_base": "StableDiffusionXLPipeline"}.get(kind, "")


def refiner_info(ref: Refiner, base_model: ModelConfig, base_family: Any, where: str = "") -> RefinerInfo:
    """Resolve and check a refiner before anything loads: it exists, it is an SDXL refiner or SDXL base, and the
    base model is SDXL (A1111's refiner switches between models of one latent space and conditioning kind)."""
    if base_family.name != "sdxl":
        raise ConfigError(f"{where}refiner.model={ref.model!r} (A1111's Refiner) is not available for "
                          f"{base_family.label}: it runs on SDXL models; remove refiner.model")
    model = ModelConfig(id=ref.model, config=ref.config, dtype=base_model.dtype, allow_pickle=False)
    try:
        source = _source(model)
    except ConfigError as exc:
        raise ConfigError(f"{where}refiner.model: {str(exc).replace('model.id=', 'refiner.model=')}") from exc
    if source.kind == "file":
        pipeline = _file_pipeline(source.location, model)
    else:
        folder = builtin_path(source.location) if source.kind == "builtin" else source.location
        from .info import _folder_json

        pipeline = _folder_json(folder, "model_index.json", source.revision).get("_class_name") or ""
    if pipeline not in _OK:
        raise ConfigError(f"{where}refiner.model={ref.model!r} is {pipeline or 'not a diffusers SDXL model'}; valid: "
                          "an SDXL refiner or another SDXL base (a diffusers folder, hub id or .safetensors file)")
    return RefinerInfo(model, source, pipeline)


def identity(info: RefinerInfo) -> str:
    """The refiner's part of every image key: what its weights and configs contain, and how it is loaded."""
    from ..common.hashing import config_sha256, model_sha256

    weights = info.weights
    sha = model_sha256(weights) if weights is not None and weights.exists() else \
        f"{info.source.location}@{info.source.revision}"
    configs = Path(info.config.config) if info.source.kind == "file" and info.config.config else \
        (weights if info.source.kind != "file" else None)
    config_hash = config_sha256(configs) if configs is not None and configs.is_dir() else ""
    return f"{sha}|{config_hash}|{info.pipeline}"


def _same(a: Any, b: Any) -> bool:
    """Whether two modules have the same class, config and weights."""
    import torch

    def config(m: Any) -> dict:  # without `_name_or_path` and the like (where it was loaded from)
        return {k: v for k, v in dict(m.config).items() if not k.startswith("_")}

    if a is None or b is None or type(a) is not type(b) or config(a) != config(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def load_refiner(info: RefinerInfo, base: Any) -> LoadedRefiner:
    """Load the refiner once per process for `base` (a models.loading.LoadedModel): the base's device and dtype;
    the base's VAE object where the weights are equal."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline

    from ..models.loading import load_error

    src = info.source
    key = (src.kind, src.location, src.revision, info.config.config, str(base.dtype), base.device, id(base.pipe.vae))
    if key in _CACHE:
        return _CACHE[key]
    for old in [k for k in _CACHE if k[:-1] == key[:-1]]:  # kept for a base that was released: load it afresh
        del _CACHE[old]
    location = str(builtin_path(src.location)) if src.kind == "builtin" else src.location
    cls = getattr(diffusers, REFINER_PIPELINE)
    log.info("loading refiner %s (%s) on %s as %s", src.location, info.pipeline, base.device, base.dtype)
    try:
        if src.kind == "file":
            kw = {"config": info.config.config} if info.config.config else {}
            pipe = cls.from_single_file(location, dtype=base.dtype, local_files_only=hub_offline(), **kw)
        else:
            kw = {"revision": src.revision, "local_files_only": hub_offline()} if src.kind == "hub" else {}
            pipe = cls.from_pretrained(location, dtype=base.dtype, use_safetensors=True, **kw)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        err = load_error(src, info.config, exc)
        raise ConfigError(str(err).replace("model.id=", "refiner.model=")) from exc
    LOADS[src.location] = LOADS.get(src.location, 0) + 1
    shared = []
    if _same(pipe.vae, base.pipe.vae):
        pipe.vae = base.pipe.vae
        shared.append("vae")
    pipe = pipe.to(base.device)
    pipe.set_progress_bar_config(disable=True)
    weights = info.weights
    from ..common.hashing import model_sha256

    sha = model_sha256(weights) if weights is not None and weights.exists() else ""
    # A1111 conditions an empty SDXL negative prompt as zeros on every SDXL model, the refiner too
    # (sd_models_xl.get_learned_conditioning: force_zero_embeddings=['txt']); diffusers' refiner config says false
    text = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                                     tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet,
                                     scheduler=pipe.scheduler, force_zeros_for_empty_prompt=True)
    text.set_progress_bar_config(disable=True)
    loaded = LoadedRefiner(pipe, text, info, sha, None, shared)
    _CACHE[key] = loaded
    return loaded


def find_refiner(name: str, shorthash: str | None, folders: list[Path]) -> Path | None:
    """A refiner an A1111 image names (`Refiner: NAME [shorthash]`) in `folders`: a checkpoint file NAME.safetensors
    or a diffusers folder NAME, whose sha256 starts with the shorthash when one is given; else, by the hash alone,
    any checkpoint there (a renamed file)."""
    from ..common.hashing import model_sha256

    def fits(p: Path) -> bool:
        return not shorthash or model_sha256(p).startswith(shorthash.lower())

    candidates = []
    for folder in folders:
        candidates += [folder / f"{name}.safetensors", folder / name]
    for p in candidates:
        if (p.is_file() or (p / "model_index.json").is_file()) and fits(p):
            return p
    if shorthash:
        for folder in folders:
            for p in sorted(folder.glob("*.safetensors")) + sorted(q.parent for q in folder.glob("*/model_index.json")):
                if p not in candidates and fits(p):
                    return p
    return None


def with_identity(spec: Any, ident: str) -> Any:
    """`spec` with its refiner values carrying the refiner's identity (image keys change with its weights)."""
    import dataclasses

    return dataclasses.replace(spec, refiner=tuple(r if r is None else dataclasses.replace(r, identity=ident)
                                                   for r in spec.refiner))


def attach(loaded: Any, info: RefinerInfo | None) -> None:
    """Load the run's refiner (if any) beside the loaded base model; generation finds it on the pipeline."""
    ref = load_refiner(info, loaded) if info is not None else None
    loaded.refiner = ref
    loaded.pipe._t2i_refiner = ref
