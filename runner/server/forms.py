"""Map the seed's form fields and the JSON API body to a validated RunSpec, enforcing the server's limits.

Field names and defaults are the original design's. The string "null" (any case, spaces ignored) or an empty
value means "not given", for every field. `strength` is accepted and checked but ignored: it only matters for
image-to-image, and this server does text-to-image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..common.errors import ConfigError
from ..common.paths import is_hub_id
from ..config import MAX_SEED, LoraSpec, ModelConfig, RunSpec, lora_name, validate
from ..config.hires import target_size
from ..config.validate import model_group, string_list
from ..lora.files import GLOB_CHARS, checkpoint_files, resolve_loras
from ..lora.tags import resolve_tags
from ..models.tiny import TINY_ID
from ..plan import with_prompt_loras
from ..run import plan_models

NOT_GIVEN = ("", "null", "none")
_HF_URL = re.compile(r"^https?://(www\.)?huggingface\.co/([^/]+/[^/]+)(?:/(?:blob|resolve)/[^/]+/(.+))?/?$")


class FormError(Exception):
    """A request the server refuses: an HTTP status and one readable line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_given(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in NOT_GIVEN)


class LoraIn(BaseModel):
    """One LoRA adapter of a JSON request."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="hub id (owner/repo), huggingface.co URL, local file or folder")
    weight_name: str | None = Field(None, description="file name inside a folder or hub repo")
    scale: float = 1.0
    name: str | None = None


class JobRequest(BaseModel):
    """One generation request: the seed form's fields (same names) plus optional size and a list of LoRAs."""

    model_config = ConfigDict(extra="forbid")
    modelid: str | None = Field(None, description="default: the server's model; others must be allowed")
    text_prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    total_nm_img_prompt: int = Field(1, description="number of images; seeds manual_seed … manual_seed+N-1")
    inference_steps: int | None = Field(None, description="default: the model's (its group's settings)")
    guidance_scale: float | None = Field(None, description="default: the model's; the distilled guidance on Flux.1")
    true_cfg_scale: float | None = Field(None, ge=0.0, le=100.0,
                                         description="Flux.1 / Qwen-Image: real CFG with the negative prompt")
    strength: float = Field(1.0, ge=0.0, le=1.0, description="accepted; text-to-image ignores it")
    manual_seed: int | None = Field(None, description="first seed; not given = a random one")
    lora_hugging_face_1: str | None = None
    weight_name_1: str | None = None
    lora_hugging_face_2: str | None = None
    weight_name_2: str | None = None
    cross_attention_kwargs: float | None = Field(1.0, ge=-10.0, le=10.0,
                                                 description='scale of the form LoRAs (or {"scale": x})')
    width: int | None = Field(None, description="multiple of 8; default: the model's size")
    height: int | None = None
    loras: list[LoraIn] = Field(default_factory=list, description="more LoRAs, each with its own scale")
    hires_scale: float | None = Field(None, ge=1.0, le=8.0, description="A1111's Hires. fix upscale; not given = off")
    hires_denoise: float | None = Field(None, ge=0.0, le=1.0, description="its denoising strength (default 0.7)")
    hires_steps: int | None = Field(None, ge=0, description="its steps; 0 = the first pass's")
    hires_upscaler: str | None = Field(None, description="Latent, Lanczos, … (default Latent)")
    hires_scheduler: str | None = Field(None, description="its sampler (a `scheduler=` name, A1111's Hires sampler); "
                                                          "not given = the first pass's")
    refiner_model: str | None = Field(None, description="A1111's Refiner (SDXL): an allowed model; not given = off")
    refiner_switch_at: float | None = Field(None, gt=0.0, lt=1.0, description="where it takes over (default 0.8)")

    @model_validator(mode="before")
    @classmethod
    def _drop_not_given(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = {k: v for k, v in data.items() if not not_given(v)}
        cak = out.get("cross_attention_kwargs")
        if isinstance(cak, str) and cak.strip().startswith("{"):
            with contextlib.suppress(ValueError):
                cak = json.loads(cak)
        if isinstance(cak, dict) and set(cak) == {"scale"}:
            out["cross_attention_kwargs"] = cak["scale"]
        return out


class SubmitForm(BaseModel):
    """The seed's form as posted by a browser: every field is text, parsed by JobRequest."""

    modelid: str | None = None
    text_prompt: str | None = None
    negative_prompt: str | None = None
    total_nm_img_prompt: str | None = "1"
    inference_steps: str | None = None
    guidance_scale: str | None = None
    true_cfg_scale: str | None = None
    strength: str | None = "1.0"
    manual_seed: str | None = None
    lora_hugging_face_1: str | None = "null"
    weight_name_1: str | None = "null"
    lora_hugging_face_2: str | None = "null"
    weight_name_2: str | None = "null"
    cross_attention_kwargs: str | None = "1"
    width: str | None = None
    height: str | None = None
    hires_scale: str | None = None
    hires_denoise: str | None = None
    hires_steps: str | None = None
    hires_upscaler: str | None = None
    hires_scheduler: str | None = None
    refiner_model: str | None = None
    refiner_switch_at: str | None = None


def error_line(errors: list[Any]) -> str:
    """Pydantic errors as one line: `field: problem (got value)`."""
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict | list) else f" (got {got!r})"
        parts.append(f"{loc}: {err['msg']}{shown}")
    return "; ".join(parts)


def parse_form(form: SubmitForm) -> JobRequest:
    try:
        return JobRequest.model_validate(form.model_dump())
    except ValidationError as exc:
        raise FormError(422, error_line(exc.errors())) from exc


def _normalise_source(source: str, weight: str | None) -> tuple[str, str | None]:
    m = _HF_URL.match(source.strip())
    if m:
        return m.group(2), weight or (m.group(3).split("/")[-1] if m.group(3) else None)
    return source.strip(), weight


def _inside(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


def check_lora_access(spec: LoraSpec, server: DictConfig) -> None:
    """Refuse (403) local LoRA paths outside `server.allowed_lora_dirs`, and hub LoRAs if disabled."""
    src = spec.source
    if src.startswith(TINY_ID):
        if ".." in PurePosixPath(src[len(TINY_ID):]).parts:
            raise FormError(403, f"LoRA source {src!r} leaves the built-in model's folder")
        return
    path = Path(os.path.expanduser(src))
    if is_hub_id(src):
        if not server.allow_hub_loras:
            raise FormError(403, f"LoRA source {src!r} is a hub id and this server does not allow hub LoRAs")
        return
    dirs = string_list("server.allowed_lora_dirs", server.allowed_lora_dirs)
    roots = [Path(os.path.realpath(os.path.expanduser(d))) for d in dirs]
    files = [path] + ([path / spec.weight_name] if spec.weight_name and path.is_dir() else [])
    if not all(_inside(f, roots) for f in files):
        raise FormError(403, f"LoRA path {src!r} is outside the folders this server allows "
                             "(server.allowed_lora_dirs)")
    # one request, one file: a glob or a folder of checkpoints (the CLI's epoch axis) could reach files the
    # check above never saw (symlinks), and would multiply the request's images
    if any(c in src for c in GLOB_CHARS) or checkpoint_files(spec) is not None:
        raise FormError(422, f"LoRA source {src!r} names several files (a glob or a folder of checkpoints); give "
                             "one file, or the folder and its weight_name")


def _loras(req: JobRequest, server: DictConfig) -> list[dict]:
    scale = 1.0 if req.cross_attention_kwargs is None else req.cross_attention_kwargs
    items = []
    form = ((req.lora_hugging_face_1, req.weight_name_1), (req.lora_hugging_face_2, req.weight_name_2))
    for src, weight in form:
        if src is not None:
            src, weight = _normalise_source(src, None if not_given(weight) else weight)
            items.append({"source": src, "weight_name": weight, "scale": scale, "name": None})
    for lo in req.loras:
        src, weight = _normalise_source(lo.source, None if not_given(lo.weight_name) else lo.weight_name)
        items.append({"source": src, "weight_name": weight, "scale": lo.scale, "name": lo.name})
    used: set[str] = {i["name"] for i in items if i["name"]}
    for item in items:
        if not item["name"]:  # derived names must be unique within the set
            base = name = lora_name(LoraSpec(item["source"], item["weight_name"]))
            n = 1
            while name in used:
                n += 1
                name = f"{base}_{n}"
            item["name"] = name
            used.add(name)
    for i, item in enumerate(items):
        if not item["source"]:
            raise FormError(422, f"LoRA {i + 1}: source is empty")
        check_lora_access(LoraSpec(item["source"], item["weight_name"]), server)
    return items


def allowed_models(cfg: DictConfig) -> list[str]:
    """The model ids a request may pick: the server's model (the default) first, then `server.allowed_models`."""
    return [cfg.model.id, *string_list("server.allowed_models", cfg.server.allowed_models)]


def check_model(mid: str, cfg: DictConfig) -> None:
    """Refuse (403) a model id the server does not allow."""
    valid = allowed_models(cfg)
    if mid not in valid:
        raise FormError(403, f"modelid={mid!r} is not allowed on this server; valid: {', '.join(valid)}")


def model_dict(mid: str, cfg: DictConfig) -> dict:
    """The `model` config of model id `mid` on this server (unchecked): the server's own model, a model group
    (with its settings), or an id with the server's dtype."""
    if mid == cfg.model.id:
        return OmegaConf.to_container(cfg.model, resolve=True)
    group = model_group(mid)  # an allowed model may be a model group (with its settings)
    if group is not None:
        return group
    return {"id": mid, "revision": None, "pipeline": "auto", "variant": None, "config": None,
            "allow_pickle": False, "dtype": cfg.model.dtype}


def _model(req: JobRequest, cfg: DictConfig) -> dict:
    mid = (req.modelid or cfg.model.id).strip()
    if mid != cfg.model.id:
        check_model(mid, cfg)
    return model_dict(mid, cfg)


def _refiner(req: JobRequest, cfg: DictConfig) -> dict:
    """The `refiner` group of a request: an allowed model (403 otherwise) and its switch point."""
    if req.refiner_model in (None, "", "None", "none"):
        return {}
    mid = req.refiner_model.strip()
    check_model(mid, cfg)
    return {"refiner": {"model": model_dict(mid, cfg)["id"],
                        **({"switch_at": req.refiner_switch_at} if req.refiner_switch_at is not None else {})}}


def first_value(value: Any) -> Any:
    """A server default for one request: a request is one image per seed, so a swept default gives its first."""
    return value[0] if OmegaConf.is_list(value) else value


def _limit(name: str, value: int, hi: int, key: str, what: str = "") -> None:
    if not 1 <= value <= hi:
        raise FormError(422, f"{name}={value} is {what or 'out of range'}; valid: 1 to {hi} (server.{key})")


def renamed(message: str, names: dict[str, str]) -> str:
    """`message` with the field it starts with (`key=…`) called by the client's name for it."""
    for ours, theirs in names.items():
        if message.startswith((f"{ours}=", f"{ours}[")):
            return theirs + message[len(ours):]
    return message


def to_spec(req: JobRequest, cfg: DictConfig, extra: dict[str, Any] | None = None,
            names: dict[str, str] | None = None) -> RunSpec:
    """The RunSpec of a request on this server's config; FormError 422 (bad value) or 403 (not allowed).

    `extra` sets more run-config keys (the client APIs' scheduler, clip skip, batch size, prompts); `names` maps
    our field and config-key names to the client's (`inference_steps` -> `steps`) in error messages."""
    names = names or {}
    try:
        return _to_spec(req, cfg, extra or {})
    except FormError as exc:
        raise FormError(exc.status, renamed(exc.message, names)) from exc


def _to_spec(req: JobRequest, cfg: DictConfig, extra: dict[str, Any]) -> RunSpec:
    server = cfg.server
    n = req.total_nm_img_prompt
    _limit("total_nm_img_prompt", n, server.max_images, "max_images", "too many images" if n > 1 else "")
    if req.inference_steps is not None:
        _limit("inference_steps", req.inference_steps, server.max_steps, "max_steps",
               "above this server's limit" if req.inference_steps > 1 else "")
    for side, v in (("width", req.width), ("height", req.height)):
        if v is not None and v > server.max_side:
            raise FormError(422, f"{side}={v} is too large; valid: 8 to {server.max_side}, a multiple of 8 "
                                 "(server.max_side)")
    seed = random.SystemRandom().randrange(2**32) if req.manual_seed is None else req.manual_seed
    if not 0 <= seed <= MAX_SEED - n + 1:
        raise FormError(422, f"manual_seed={seed} is out of range; valid: 0 to {MAX_SEED - n + 1}")
    neg = req.negative_prompt
    up = req.hires_upscaler or ""
    if "/" in up or "\\" in up or up.lower().endswith((".safetensors", ".pth", ".pt")):
        raise FormError(422, f"hires_upscaler={req.hires_upscaler!r} is a path; name a model upscaler of the "
                             "server's upscaler_dirs (this server reads only its own folders)")
    overrides = {
        "model": _model(req, cfg),
        "prompts": [{"prompt": req.text_prompt, "negative_prompt": neg}] if neg else [req.text_prompt],
        "seeds": list(range(seed, seed + n)),
        "steps": req.inference_steps,
        "guidance_scale": req.guidance_scale,
        "true_cfg_scale": req.true_cfg_scale,
        "width": req.width,
        "height": req.height,
        "scheduler": first_value(cfg.scheduler),
        "schedule": first_value(cfg.get("schedule")),
        "clip_skip": first_value(cfg.get("clip_skip")),
        "lora_sets": [_loras(req, server)],
        "lora_scales": None,
        "shard": {"index": 0, "count": 1},
        "resume": False,
        "grid": {"enabled": False},  # a merged run mixes requests; a grid of it would mean nothing
        **({"hires": {k: v for k, v in (("scale", req.hires_scale), ("denoise", req.hires_denoise),
                                        ("steps", req.hires_steps), ("upscaler", req.hires_upscaler),
                                        ("scheduler", req.hires_scheduler))
                      if v is not None}} if req.hires_scale is not None else {}),
        **_refiner(req, cfg),
        **extra,
    }
    model = overrides.pop("model")
    merged = OmegaConf.merge(cfg, overrides)
    # the request's model replaces the server's (a merge would mix two groups' settings)
    merged.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    try:
        spec = validate(merged)
        # the prompt's <lora:…> tags name files in the folders this server allows (what /sdapi/v1/loras lists)
        allowed = tuple(string_list("server.allowed_lora_dirs", server.allowed_lora_dirs))
        spec = resolve_tags(dataclasses.replace(spec, lora_dirs=allowed))
        for lo in (lo for p in spec.prompts for lo in p.loras):
            check_lora_access(lo, server)
        # missing LoRA files and keys the model's family cannot honour are a 422 now, not a failed job later
        tagged = with_prompt_loras(spec)
        plans = plan_models(tagged, resolve_loras(tagged))
    except ConfigError as exc:
        raise FormError(422, str(exc)) from exc
    if len(spec.prompts) > 1:  # variants {a|b} made several prompts: each gets every seed
        _limit("images (prompts x total_nm_img_prompt)", len(spec.prompts) * n, server.max_images, "max_images",
               f"too many images ({len(spec.prompts)} prompts from the variants x {n})")
    for p in plans:  # hires. fix: its second pass is the image's size (A1111 has no limit; this server has one)
        for hr, w, h in itertools.product(p.spec.hires, p.spec.width, p.spec.height):
            size = target_size(w, h, hr.scale, hr.resize_x, hr.resize_y)[:2] if hr and w and h else (0, 0)
            if max(size) > server.max_side:
                raise FormError(422, f"hires. fix to {size[0]}x{size[1]} is too large; valid: up to "
                                     f"{server.max_side} a side (server.max_side)")
    steps = max(s for p in plans for s in p.spec.steps if s is not None)
    if req.inference_steps is None and steps > server.max_steps:
        raise FormError(422, f"inference_steps={steps} (the model's default) is above this server's limit; "
                             f"valid: 1 to {server.max_steps} (server.max_steps)")
    return spec
