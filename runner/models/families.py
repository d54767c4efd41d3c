"""Model families: which diffusers pipelines belong together, and how the one config vocabulary maps onto each.

A family says what its pipeline call understands (`guidance_scale` as CFG or as Flux's distilled guidance,
`true_cfg_scale`, `max_sequence_length`, `clip_skip`, negative prompts), which schedulers fit it (flow-matching
or not), its LoRA components, and what it cannot honour (a one-line ConfigError naming the family and what to
use instead, raised before anything loads). The tested families are listed in FAMILIES; any other diffusers
text-to-image pipeline with a LoRA loader runs through the same code as an "untested family", its vocabulary
read from its `__call__` signature.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..common.errors import ConfigError, did_you_mean
from ..config.schedulers import SCHEDULER_TABLE, is_flow

# How a negative prompt takes effect: with CFG (guidance_scale), with "true CFG" (true_cfg_scale > 1), or not at all.
NEG_CFG, NEG_TRUE_CFG, NEG_NONE = "cfg", "true_cfg", "none"
# What guidance_scale means: classifier-free guidance, a distilled guidance embedding (Flux), or nothing.
G_CFG, G_DISTILLED, G_NONE = "cfg", "distilled", "none"


@dataclass(frozen=True, eq=False)
class Family:
    """One model family: its pipelines and how the config vocabulary maps onto their call."""

    name: str  # the id used in configs and records: sd15, sdxl, sd3, flux1, flux2, qwenimage, zimage
    label: str  # for messages and the README: "Flux.1"
    pipelines: tuple[str, ...]  # diffusers text-to-image pipeline class names
    denoiser: str = "transformer"  # the component LoRAs mostly target (unet | transformer)
    flow: bool = True  # flow-matching: takes the flow_* schedulers, not the SD ones
    negative: str = NEG_CFG
    guidance: str = G_CFG
    guidance_threshold: float = 1.0  # CFG runs when guidance_scale > this (Z-Image: 0)
    clip_skip: bool = False
    max_sequence: int | None = None  # the largest max_sequence_length the text encoder takes; None = no such key
    attention_slicing: bool = False  # the denoiser has diffusers' sliced attention
    invariant_split: bool = False  # batch_invariant can split the denoiser's batch (SD-class UNets)
    tested: bool = True
    aliases: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # per-key hints for messages/the server form

    @property
    def is_sd(self) -> bool:
        return self.denoiser == "unet"

    def schedulers(self) -> tuple[str, ...]:
        """The scheduler names valid for this family."""
        return tuple(n for n in SCHEDULER_TABLE if is_flow(n) == self.flow)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), denoiser="unet", flow=False,
           clip_skip=True, attention_slicing=True, invariant_split=True, aliases=("sd", "sd1", "sd2")),
    Family("sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",), denoiser="unet", flow=False,
           clip_skip=True, attention_slicing=True, invariant_split=True),
    Family("sd3", "Stable Diffusion 3/3.5", ("StableDiffusion3Pipeline",), clip_skip=True, max_sequence=512,
           aliases=("sd35",)),
    Family("flux1", "Flux.1", ("FluxPipeline",), negative=NEG_TRUE_CFG, guidance=G_DISTILLED, max_sequence=512,
           aliases=("flux",),
           notes={"guidance_scale": "the distilled guidance embedding (3.5 for dev; schnell has none)",
                  "true_cfg_scale": "real CFG with the negative prompt when > 1 (twice the compute)"}),
    Family("flux2", "Flux.2", ("Flux2KleinPipeline", "Flux2Pipeline"), negative=NEG_NONE, max_sequence=512,
           notes={"negative_prompt": "Flux.2 has no negative prompt"}),
    Family("qwenimage", "Qwen-Image", ("QwenImagePipeline",), negative=NEG_TRUE_CFG, guidance=G_NONE,
           max_sequence=1024, aliases=("qwen",),
           notes={"true_cfg_scale": "CFG with the negative prompt when > 1 (Qwen-Image's guidance)"}),
    Family("zimage", "Z-Image", ("ZImagePipeline",), guidance_threshold=0.0, max_sequence=512,
           notes={"guidance_scale": "CFG strength above 0 (Z-Image counts from 0; Turbo uses 0)"}),
)}
_BY_PIPELINE = {p: f for f in FAMILIES.values() for p in f.pipelines}


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The family called `name` (or an alias); ConfigError naming the valid ones otherwise."""
    for fam in FAMILIES.values():
        if name == fam.name or name in fam.aliases:
            return fam
    raise ConfigError(f"family {name!r} is not known{did_you_mean(name, FAMILIES)}; valid: {', '.join(FAMILIES)}")


@functools.cache
def _pipeline_class(name: str) -> Any:
    import diffusers

    try:
        return getattr(diffusers, name)
    except (AttributeError, ImportError):
        return None


def _is_text_to_image(cls: Any) -> bool:
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    return cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()


def _has_lora(cls: Any) -> bool:
    from diffusers.loaders.lora_base import LoraBaseMixin

    return isinstance(cls, type) and issubclass(cls, LoraBaseMixin)


@functools.cache
def family_for_pipeline(class_name: str) -> Family:
    """The family of a diffusers pipeline class name; an untested family for other text-to-image pipelines
    with a LoRA loader; ConfigError for anything else (img2img, video, no LoRA support, unknown)."""
    if class_name in _BY_PIPELINE:
        return _BY_PIPELINE[class_name]
    cls = _pipeline_class(class_name)
    tested = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
    if cls is None:
        raise ConfigError(f"pipeline {class_name!r} is not a diffusers pipeline (diffusers has no such class); "
                          f"tested: {tested}")
    if not _is_text_to_image(cls):
        raise ConfigError(f"{class_name} is not a text-to-image pipeline; t2i runs text-to-image pipelines "
                          f"(tested: {tested})")
    if not _has_lora(cls):
        raise ConfigError(f"{class_name} has no LoRA loader in diffusers, so LoRA sets cannot run on it; "
                          f"tested families: {tested}")
    params = inspect.signature(cls.__call__).parameters
    components = getattr(cls, "_lora_loadable_modules", ["transformer"])
    flow = "sigmas" in params  # flow-matching pipelines take custom sigmas; DDPM-style ones take timesteps
    negative = NEG_TRUE_CFG if "true_cfg_scale" in params else NEG_CFG if "negative_prompt" in params else NEG_NONE
    return Family(
        name=f"other:{class_name}", label=f"{class_name} (untested family)", pipelines=(class_name,),
        denoiser="unet" if "unet" in components else "transformer", flow=flow, negative=negative,
        guidance=G_CFG if "guidance_scale" in params else G_NONE, clip_skip="clip_skip" in params,
        max_sequence=params["max_sequence_length"].default if "max_sequence_length" in params else None,
        tested=False)


def pipeline_defaults(class_name: str) -> dict[str, Any]:
    """The pipeline's own call defaults (steps, guidance, true CFG, max sequence length): the last fallback."""
    cls = _pipeline_class(class_name)
    params = inspect.signature(cls.__call__).parameters if cls is not None else {}
    out = {}
    for ours, theirs in (("steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                         ("true_cfg_scale", "true_cfg_scale"), ("max_sequence_length", "max_sequence_length")):
        if theirs in params and params[theirs].default is not inspect.Parameter.empty:
            out[ours] = params[theirs].default
    return out


@dataclass(frozen=True)
class Traits:
    """What one model of a family can do, read from its configs before loading (e.g. Flux.1 schnell has no
    guidance embedding; a distilled Flux.2-klein has no CFG)."""

    family: Family
    pipeline: str
    guidance: str  # G_CFG | G_DISTILLED | G_NONE for this very model
    true_cfg: bool  # the call takes true_cfg_scale
    sequence: bool  # the call takes max_sequence_length

    @property
    def label(self) -> str:
        return self.family.label


def traits(family: Family, pipeline: str, configs: dict[str, dict]) -> Traits:
    """The model-specific traits of a family member, from its component configs (`transformer`, the pipeline's
    own `model_index`)."""
    cls = _pipeline_class(pipeline)
    params = inspect.signature(cls.__call__).parameters if cls is not None else {}
    guidance = family.guidance
    embeds = (configs.get("transformer") or {}).get("guidance_embeds")
    if family.name == "flux1" and embeds is False:
        guidance = G_NONE  # Flux.1 schnell: no guidance embedding
    if family.name == "qwenimage" and embeds:
        guidance = G_DISTILLED
    if family.name == "flux2":
        if pipeline == "Flux2Pipeline":
            guidance = G_DISTILLED if embeds is not False else G_NONE
        elif (configs.get("model_index") or {}).get("is_distilled"):
            guidance = G_NONE  # a distilled klein runs without CFG
    return Traits(family, pipeline, guidance, "true_cfg_scale" in params, "max_sequence_length" in params)


@dataclass(frozen=True)
class Knobs:
    """The family-specific values of a run (each a tuple: swept) that `check` validates for one model."""

    guidance_scale: Sequence[float | None]
    true_cfg_scale: Sequence[float | None]
    max_sequence_length: Sequence[int | None]
    clip_skip: Sequence[int | None]
    scheduler: Sequence[str | None]
    negative_prompts: Sequence[str]
    user_set: frozenset[str] = frozenset()  # keys the user set explicitly (not group defaults)


def check(t: Traits, k: Knobs) -> None:
    """Raise ConfigError for the first key this model's family cannot honour, naming what to use instead."""
    fam, label = t.family, t.label
    # 1. Keys the family has no use for
    if any(v is not None and v > 1 for v in k.clip_skip) and not fam.clip_skip:
        raise ConfigError(f"clip_skip is not available on {label} (its text encoders are not CLIP-only); "
                          "remove clip_skip")
    if any(v is not None for v in k.true_cfg_scale) and not t.true_cfg:
        use = "guidance_scale" if t.guidance == G_CFG else "nothing (the family has no CFG)"
        raise ConfigError(f"true_cfg_scale is not a setting of {label} ({t.pipeline}); for CFG use {use}")
    if any(v is not None for v in k.max_sequence_length):
        if not t.sequence or fam.max_sequence is None:
            raise ConfigError(f"max_sequence_length is not a setting of {label} (its CLIP text encoders read 77 "
                              "tokens); remove it")
        bad = [v for v in k.max_sequence_length if v is not None and not 1 <= v <= fam.max_sequence]
        if bad:
            raise ConfigError(f"max_sequence_length={bad[0]} is out of range for {label}; valid: 1 to "
                              f"{fam.max_sequence}")
    if "guidance_scale" in k.user_set and t.guidance == G_NONE and any(v is not None for v in k.guidance_scale):
        why = {"flux1": "Flux.1 schnell has no guidance embedding",
               "flux2": "this Flux.2 model is guidance-distilled (no CFG)"}.get(fam.name, f"{label} has no guidance")
        instead = "true_cfg_scale with a negative prompt" if t.true_cfg else "nothing; leave guidance_scale unset"
        raise ConfigError(f"guidance_scale has no effect on this model: {why}; use {instead}")
    # 2. Schedulers of the other kind (SD schedulers on flow models and back)
    valid = fam.schedulers()
    for s in k.scheduler:
        if s is not None and s not in valid:
            kind = "a flow-matching model" if fam.flow else "not a flow-matching model"
            raise ConfigError(f"scheduler={s!r} does not fit {label} ({kind}){did_you_mean(s, valid)}; valid: "
                              f"{', '.join(valid)} or null (the model's own)")
    # 3. Negative prompts the settings would silently drop
    if any(n for n in k.negative_prompts):
        if fam.negative == NEG_NONE:
            raise ConfigError(f"negative_prompt is not available on {label}: the pipeline has no negative prompt "
                              "(it guides against an empty prompt); remove negative_prompt")
        if fam.negative == NEG_TRUE_CFG:
            off = [v for v in k.true_cfg_scale if v is None or v <= 1]
            if off:
                raise ConfigError(f"true_cfg_scale={off[0]} makes {label} ignore the negative prompt; set "
                                  "true_cfg_scale > 1 (e.g. 4.0; real CFG, twice the compute) or remove the "
                                  "negative prompt")
        elif t.guidance == G_CFG:
            off = [v for v in k.guidance_scale if v is not None and v <= fam.guidance_threshold]
            if off and fam.guidance_threshold == 0:
                raise ConfigError(f"guidance_scale={off[0]:g} makes {label} ignore the negative prompt; set "
                                  "guidance_scale > 0 or remove the negative prompt")


def call_kwargs(t: Traits, prompts: list[str], negatives: list[str], steps: int, guidance: float | None,
                true_cfg: float | None, max_sequence: int | None, clip_skip: int | None,
                width: int | None, height: int | None) -> dict[str, Any]:
    """The pipeline-call keywords for one batch: the config vocabulary mapped onto this family's `__call__`."""
    kw: dict[str, Any] = {"prompt": prompts, "num_inference_steps": steps, "width": width, "height": height}
    fam = t.family
    if t.guidance != G_NONE and guidance is not None:
        kw["guidance_scale"] = guidance
    elif fam.name == "qwenimage":
        kw["guidance_scale"] = None  # the call defaults to None; a value would only warn
    if t.true_cfg and true_cfg is not None:
        kw["true_cfg_scale"] = true_cfg
    if fam.negative == NEG_TRUE_CFG:
        # True CFG needs a negative prompt, even an empty one; without true CFG it must be None (else ignored)
        kw["negative_prompt"] = negatives if true_cfg is not None and true_cfg > 1 else None
    elif fam.negative == NEG_CFG:
        kw["negative_prompt"] = negatives
    if max_sequence is not None and t.sequence:
        kw["max_sequence_length"] = max_sequence
    if clip_skip and fam.clip_skip:
        kw["clip_skip"] = clip_skip - 1  # A1111's "Clip skip: 2" = diffusers' 1 skipped layer
    return kw


def traits_of(pipe: Any) -> Traits:
    """The traits of a loaded pipeline (from its live configs), for callers that hold only the pipeline."""
    name = type(pipe).__name__
    transformer = getattr(pipe, "transformer", None)
    configs = {"transformer": dict(transformer.config) if transformer is not None else {},
               "model_index": dict(getattr(pipe, "config", {}) or {})}
    return traits(family_for_pipeline(name), name, configs)


def unused_keys(t: Traits) -> dict[str, str]:
    """Config keys this model has no use for, each with a one-line hint (the server form disables them)."""
    fam, out = t.family, {}
    if fam.negative == NEG_NONE:
        out["negative_prompt"] = f"{t.label} has no negative prompt"
    if t.guidance == G_NONE:
        out["guidance_scale"] = (f"{t.label} uses true CFG scale instead" if t.true_cfg
                                 else "this model is guidance-distilled: no guidance scale")
    if not t.true_cfg:
        out["true_cfg_scale"] = "only Flux.1 and Qwen-Image have a true CFG scale"
    if not fam.clip_skip:
        out["clip_skip"] = f"{t.label} has no CLIP skip"
    if fam.max_sequence is None:
        out["max_sequence_length"] = f"{t.label} reads 77 CLIP tokens"
    return out
