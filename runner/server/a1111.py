"""AUTOMATIC1111's web API (`/sdapi/v1/*`) on `t2i-serve`: the routes its clients (the `webuiapi` package, editor
plugins, bots) call, on the same queue, limits, allowed folders and core as the form and the JSON job API.

`txt2img` takes A1111's whole request model, as clients send it on every call. Fields at their off/default values
(hires. fix off, no face restoration, no scripts, …) are accepted; a field that asks for something this server cannot
do is refused (422) by name, never silently changed. Sampler and Schedule type go through the one sampler table
(runner/config/schedulers.py), so `Euler a` + `Automatic` here is `scheduler=euler_a schedule=uniform` in `t2i`, and
the image is the same. Seeds follow A1111: -1 draws one, image i of `batch_size x n_iter` has seed + i.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..common.errors import ConfigError, did_you_mean
from ..common.paths import PICKLE_EXT, SAFE_EXT, strip_weight_ext
from ..config import validate
from ..config.hires import LATENT_MODES, PIXEL_UPSCALERS
from ..config.refiner import parse_short_title
from ..config.schedulers import (
    A1111_AUTOMATIC,
    A1111_SCHEDULE_ALIASES,
    SCHEDULE_TABLE,
    SCHEDULER_TABLE,
    a1111_schedule_types,
    automatic,
    for_flow,
    from_a1111,
)
from ..config.upscalers import model_files
from ..config.validate import string_list
from ..outputs.metadata import INFOTEXT_KEY, parse_infotext, read_png_record, versions
from ..prompt.syntax import EMPHASIS, EMPHASIS_BY_LABEL
from ..reproduce.inspect import image_text
from .forms import FormError, JobRequest, allowed_models, check_model, first_value, model_dict, renamed, to_spec
from .jobs import Job, JobQueue, wait_for

PREFIX = "/sdapi/v1"
# our field names and config keys -> A1111's, in error messages
NAMES = {"total_nm_img_prompt": "batch_size*n_iter", "inference_steps": "steps", "manual_seed": "seed",
         "guidance_scale": "cfg_scale", "modelid": "override_settings.sd_model_checkpoint",
         "clip_skip": "override_settings.CLIP_stop_at_last_layers", "batch_size": "batch_size",
         "refiner.switch_at": "refiner_switch_at", "refiner.model": "refiner_checkpoint"}
CLIP_SKIP = "CLIP_stop_at_last_layers"
CHECKPOINT = "sd_model_checkpoint"
EMPHASIS_OPTION, PAD_OPTION = "emphasis", "pad_cond_uncond"  # A1111's option names for the text options
# A1111's /sdapi/v1/schedulers details of the schedule types this server runs (its sd_schedulers.py)
_SCHEDULE_INFO = {"automatic": (-1.0, False), "uniform": (-1.0, True), "karras": (7.0, False),
                  "exponential": (-1.0, False), "sgm_uniform": (-1.0, True), "beta": (-1.0, True),
                  "simple": (-1.0, True)}


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI (v1.10): every field, with A1111's defaults. `null` means the
    default, as in A1111, whose fields are all optional."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


def _is(*values: Any):
    return lambda v: v in values


# What a request may leave at A1111's off/default values and this server does not do otherwise:
# field -> (is it off?, what another value asks for, the value to send instead)
UNSUPPORTED: dict[str, tuple[Any, str, Any]] = {
    "restore_faces": (_is(None, False), "face restoration", False),
    "tiling": (_is(None, False), "tiling", False),
    "styles": (lambda v: not v, "prompt styles", []),
    "subseed_strength": (_is(0), "a variation seed", 0),
    "seed_resize_from_w": (lambda v: v <= 0, "resizing the seed", -1),
    "seed_resize_from_h": (lambda v: v <= 0, "resizing the seed", -1),
    "s_churn": (_is(None, 0), "stochastic churn (k-diffusion's s_churn)", 0),
    "s_noise": (_is(None, 1), "a noise multiplier (s_noise)", 1),
    "s_min_uncond": (_is(None, 0), "negative guidance minimum sigma (NGMS)", 0),
    "disable_extra_networks": (_is(False), "prompts without extra networks", False),
    "firstpass_image": (_is(None, ""), "a first-pass image", None),
    "script_name": (_is(None, ""), "a script", None),
    "alwayson_scripts": (lambda v: all(not (s.get("args") if isinstance(s, dict) else s) for s in v.values()),
                         "always-on scripts", {}),  # {name: {"args": [...]}}; any other non-empty value asks too
    "infotext": (_is(None, ""), "settings from infotext (send the fields instead)", None),
}


def check_supported(req: Txt2ImgRequest) -> None:
    """422 naming the first field that asks for something this server cannot do."""
    for name, (off, what, instead) in UNSUPPORTED.items():
        value = getattr(req, name)
        if not off(value):
            raise FormError(422, f"{name}={json.dumps(value)} asks for {what}, which this server cannot do; send "
                                 f"{name}={json.dumps(instead)} or leave it out")


def hires_fields(req: Txt2ImgRequest, models: tuple[str, ...] = ()) -> dict[str, Any]:
    """The `hires` config group of an `enable_hr` request (A1111's hr_* fields; 422 for an unknown upscaler).
    `models`: the model upscalers in the server's upscaler_dirs, by name (no paths: the server reads only those)."""
    from ..config.hires import UPSCALERS

    valid = (*UPSCALERS, *(m for m in models if m not in UPSCALERS))

    second: dict[str, Any] = {}  # (hr_checkpoint_name: the router's, which knows the allowed models)
    if req.hr_sampler_name not in (None, "", "Use same sampler"):  # A1111's txt2img: None = the first pass's
        scheduler, _, _ = from_a1111(_sampler_name(req.hr_sampler_name), None)
        if scheduler is None:
            valid = sorted(set(sampler_names().values()))
            raise FormError(422, f"hr_sampler_name={req.hr_sampler_name!r} is not available on this server"
                                 f"{did_you_mean(req.hr_sampler_name, valid)}; valid: Use same sampler, "
                                 + ", ".join(valid))
        second["scheduler"] = scheduler
    given = (req.hr_scheduler or "").strip()
    if given.lower() in ("", "use same scheduler"):
        pass  # A1111 (processing.py: `hr_scheduler = self.scheduler` when None): the first pass's setting
    elif given.lower() == A1111_AUTOMATIC.lower():
        # the hires sampler's own Automatic schedule, whatever the first pass's
        first = sampler_pair(req)
        auto = automatic(second.get("scheduler") or first[0])
        if auto is not None and auto != first[1]:
            second["schedule"] = auto
    else:
        labels = {s.a1111: k for k, s in SCHEDULE_TABLE.items()} | A1111_SCHEDULE_ALIASES
        lower = {k.lower(): v for k, v in labels.items()} | {k: k for k in SCHEDULE_TABLE}
        schedule = labels.get(given) or lower.get(given.lower())
        if schedule is None:
            raise FormError(422, f"hr_scheduler={req.hr_scheduler!r} is not available on this server"
                                 f"{did_you_mean(req.hr_scheduler, list(labels))}; valid: Use same scheduler, "
                                 + ", ".join(labels))
        second["schedule"] = schedule
    upscaler = req.hr_upscaler or "Latent"
    if upscaler not in valid:
        raise FormError(422, f"hr_upscaler={upscaler!r} is not available on this server"
                             f"{did_you_mean(upscaler, valid)}; valid: {', '.join(valid)} (model upscalers: "
                             "the server's upscaler_dirs)")
    return {"scale": req.hr_scale, "steps": req.hr_second_pass_steps, "upscaler": upscaler,
            # A1111's txt2img denoising_strength default (its processing class); the UI's slider starts at 0.7
            "denoise": 0.75 if req.denoising_strength is None else req.denoising_strength,
            "resize_x": req.hr_resize_x, "resize_y": req.hr_resize_y, "prompt": req.hr_prompt,
            "negative_prompt": req.hr_negative_prompt, **second}


def schedule_label(value: str | None) -> str:
    """A1111's Schedule type label for its API's `scheduler` (a name like `karras` or a label like `Karras`)."""
    types = a1111_schedule_types()
    if value is None or not value.strip():
        return A1111_AUTOMATIC
    if value in types.values():
        return value
    if value.strip().lower() in types:
        return types[value.strip().lower()]
    raise FormError(422, f"scheduler={value!r} is not available on this server{did_you_mean(value, types)}; "
                         f"valid: {', '.join(types)}")


def sampler_names() -> dict[str, str]:
    """A1111's sampler names this server runs, and our `scheduler=` names as aliases -> A1111's name."""
    out: dict[str, str] = {}
    for key, row in SCHEDULER_TABLE.items():
        if row.a1111 is not None and row.schedule is None:
            out[row.a1111] = out[key] = row.a1111
    return out


def _sampler_name(given: str) -> str:
    """A1111's sampler name for a request's (A1111 name, any case, or our `scheduler=` name)."""
    names = sampler_names()
    lower = {k.lower(): v for k, v in names.items()}
    return names.get(given) or lower.get(given.strip().lower()) or given


def sampler_pair(req: Txt2ImgRequest) -> tuple[str, str | None]:
    """(scheduler, schedule) for the request's sampler and Schedule type; 422 for what has no equivalent."""
    given = req.sampler_name or req.sampler_index or "Euler"
    names = sampler_names()
    sampler = _sampler_name(given)
    label = schedule_label(req.scheduler)
    scheduler, schedule, lost = from_a1111(sampler, label)
    if scheduler is None:
        valid = sorted(set(names.values()))
        raise FormError(422, f"sampler_name={given!r} is not available on this server{did_you_mean(given, valid)}; "
                             f"valid: {', '.join(valid)}")
    if lost:
        row = SCHEDULER_TABLE[scheduler]
        valid = ["automatic", *(s for s in row.schedules)]
        raise FormError(422, f"scheduler={req.scheduler!r} is not available with sampler {row.a1111!r}; valid: "
                             f"{', '.join(valid)}")
    row = SCHEDULER_TABLE[scheduler]
    if req.eta is not None and row.eta is not None and req.eta != row.eta:
        raise FormError(422, f"eta={req.eta:g} with {row.a1111}: this server samples {row.a1111} as A1111 does at "
                             f"eta={row.eta:g}; send eta={row.eta:g} or leave it out")
    return scheduler, schedule


@dataclass
class A1111State:
    """What A1111 keeps in its options and this server honours: the checkpoint and Clip skip of later requests."""

    checkpoint: str
    clip_skip: int
    emphasis: str = "original"  # A1111's `emphasis` option (prompt/syntax.py EMPHASIS: Original, No norm, …)
    pad_conds: bool = False  # A1111's `pad_cond_uncond` option ("Pad prompt/negative prompt")


def model_name(mid: str) -> str:
    """A short name for a model id (a folder's or file's name, a hub repo's name)."""
    return "tiny" if mid.startswith("builtin:") else strip_weight_ext(mid.rstrip("/").split("/")[-1])


def lora_files(cfg: DictConfig) -> list[Path]:
    """LoRA files in the folders a request may use (`server.allowed_lora_dirs`; `lora_dirs` inside them), sorted;
    a link that leads outside them is left out."""
    roots = [os.path.realpath(os.path.expanduser(d)) for d in
             string_list("server.allowed_lora_dirs", cfg.server.allowed_lora_dirs)]
    extra = [os.path.realpath(os.path.expanduser(d)) for d in string_list("lora_dirs", cfg.get("lora_dirs"))]
    exts = SAFE_EXT + (PICKLE_EXT if cfg.get("allow_pickle_lora") else ())

    def inside(path: str) -> bool:
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    found: dict[str, Path] = {}
    for top in roots + [d for d in extra if inside(d)]:
        for folder, _, files in os.walk(top):
            for f in files:
                path = os.path.join(folder, f)
                if f.endswith(exts) and inside(os.path.realpath(path)):
                    found.setdefault(os.path.realpath(path), Path(path))
    return sorted(found.values())


def lora_entry(path: Path) -> dict[str, Any]:
    """A1111's /sdapi/v1/loras item: name (the file's stem, what `<lora:name:w>` names), alias, path, metadata."""
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError):
            metadata = {}
    name = strip_weight_ext(path.name)
    return {"name": name, "alias": metadata.get("ss_output_name") or name, "path": str(path), "metadata": metadata}


def decode_image(data: str) -> io.BytesIO:
    """A1111's base64 image field (optionally a data: URL) as bytes."""
    text = data.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return io.BytesIO(base64.b64decode(text, validate=False))
    except (binascii.Error, ValueError) as exc:
        raise FormError(422, f"image is not base64 ({exc})") from exc


def a1111_router(cfg: DictConfig, queue: JobQueue, model_sha256: str) -> APIRouter:
    """The `/sdapi/v1/*` routes for the server whose config is `cfg` (its model's sha256 for `sd-models`)."""
    router = APIRouter(prefix=PREFIX, tags=["A1111 API"])
    default_clip = first_value(cfg.get("clip_skip")) or 1
    state = A1111State(cfg.model.id, int(default_clip), str(first_value(cfg.get("emphasis")) or "original"),
                       bool(first_value(cfg.get("pad_conds")) or False))

    # 1. A request's settings in t2i terms: its checkpoint, Clip skip and run spec (A1111's field names in errors).
    def checkpoint_id(name: str, field: str = CHECKPOINT) -> str:
        """A model id for an A1111 checkpoint name (its title, id or model name); 403 when not allowed."""
        valid = allowed_models(cfg)
        by_name = {model_name(m): m for m in valid}
        mid = name if name in valid else by_name.get(name.strip(), name.strip())
        try:
            check_model(mid, cfg)
        except FormError as exc:
            raise FormError(exc.status, f"{field}={name!r} is not allowed on this server; valid: "
                                        f"{', '.join(valid)}") from exc
        return mid

    flows: dict[str, bool] = {}

    def on_flow(mid: str) -> bool:
        """Whether model `mid` is flow-matching (read before loading, once per model)."""
        if mid not in flows:
            from ..config import ModelConfig
            from ..models.info import model_info

            try:
                flows[mid] = model_info(ModelConfig(**model_dict(mid, cfg))).family.flow
            except ConfigError:  # the run reports it in its own words
                flows[mid] = False
        return flows[mid]

    def check_clip_skip(value: Any, field: str) -> int:
        try:
            spec = validate(OmegaConf.merge(cfg, {"clip_skip": value}))
        except ConfigError as exc:
            raise FormError(422, renamed(str(exc), {"clip_skip": field})) from exc
        return spec.clip_skip[0] or 1

    def check_emphasis(value: Any, field: str) -> str:
        if value not in EMPHASIS_BY_LABEL:
            raise FormError(422, f"{field}={json.dumps(value)} is not an emphasis mode; valid: "
                                 f"{', '.join(EMPHASIS_BY_LABEL)}")
        return EMPHASIS_BY_LABEL[value]

    def check_pad(value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise FormError(422, f"{field}={json.dumps(value)} is not a boolean; valid: true, false")
        return value

    def settings(req: Txt2ImgRequest) -> tuple[str, int, str, bool]:
        """The request's checkpoint, Clip skip, emphasis mode and Pad prompt/negative prompt (override_settings,
        else the options)."""
        over = dict(req.override_settings)
        mid = checkpoint_id(str(over.pop(CHECKPOINT)), f"override_settings.{CHECKPOINT}") if over.get(CHECKPOINT) \
            else state.checkpoint
        clip = over.pop(CLIP_SKIP, None)
        clip = state.clip_skip if clip is None else check_clip_skip(clip, f"override_settings.{CLIP_SKIP}")
        emphasis = check_emphasis(over.pop(EMPHASIS_OPTION), f"override_settings.{EMPHASIS_OPTION}") \
            if EMPHASIS_OPTION in over else state.emphasis
        pad = check_pad(over.pop(PAD_OPTION), f"override_settings.{PAD_OPTION}") if PAD_OPTION in over \
            else state.pad_conds
        current = options()
        for key, value in over.items():
            if key not in current or current[key] != value:
                raise FormError(422, f"override_settings.{key}={json.dumps(value)} cannot be set on this server; "
                                     f"valid keys: {CHECKPOINT}, {CLIP_SKIP}, {EMPHASIS_OPTION}, {PAD_OPTION}, or "
                                     "another option at its current value (GET /sdapi/v1/options)")
        return mid, clip, emphasis, pad

    def spec_of(req: Txt2ImgRequest) -> Any:
        # 1. Refuse what this server cannot do, by name
        check_supported(req)
        if not req.prompt.strip():
            raise FormError(422, "prompt is empty; give some text")
        scheduler, schedule = sampler_pair(req)
        mid, clip, emphasis, pad = settings(req)
        if on_flow(mid):  # A1111/Forge's "Euler" on Flux & co. is flow Euler
            if scheduler == "euler_a" and req.scheduler in (None, "", "automatic", "Automatic"):
                # a client's default sampler (webuiapi sends "Euler a" unasked), on a model family that has no
                # ancestral flow sampler: run the family's Euler, as an unnamed sampler is (the image says Euler)
                scheduler, schedule = "euler", None
            scheduler, schedule, lost = for_flow(scheduler, schedule)
            if lost:
                raise FormError(422, f"sampler_name={req.sampler_name or req.sampler_index or 'Euler'!r} with "
                                     f"scheduler={req.scheduler!r} has no flow-matching equivalent on {mid} "
                                     f"({'; '.join(lost)}); use Euler with Automatic, Simple or Normal")
        # 2. The shared rules: limits, allowed models, validation (error messages in A1111's field names)
        job = JobRequest(modelid=mid, text_prompt=req.prompt, total_nm_img_prompt=req.batch_size * req.n_iter,
                         inference_steps=req.steps, guidance_scale=req.cfg_scale,
                         manual_seed=None if req.seed == -1 else req.seed, width=req.width, height=req.height)
        # the prompt goes to the core unchanged (with any <lora:…> tags); an explicit empty negative prompt stays
        extra = {"scheduler": scheduler, "schedule": schedule, "clip_skip": clip, "batch_size": req.batch_size,
                 "emphasis": emphasis, "pad_conds": pad,
                 "prompts": [{"prompt": req.prompt, "negative_prompt": req.negative_prompt}]}
        if req.refiner_checkpoint not in (None, "", "None", "none"):  # A1111's Refiner: an allowed checkpoint
            if req.refiner_switch_at is None:
                raise FormError(422, "refiner_switch_at=null with refiner_checkpoint (A1111 then runs the refiner "
                                     "from the first step); send a fraction between 0 and 1, e.g. 0.8")
            name = req.refiner_checkpoint
            if name not in allowed_models(cfg):  # A1111's title `NAME [shorthash]` names the same checkpoint
                name = parse_short_title(name)[0]
            rid = checkpoint_id(name, "refiner_checkpoint")
            extra["refiner"] = {"model": model_dict(rid, cfg)["id"], "switch_at": req.refiner_switch_at}
        if req.enable_hr:
            extra["hires"] = hires_fields(req, tuple(model_files(tuple(string_list(
                "upscaler_dirs", cfg.get("upscaler_dirs"))))))
            if req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):  # A1111's Hires checkpoint
                hmid = checkpoint_id(req.hr_checkpoint_name, "hr_checkpoint_name")
                extra["hires"]["model"] = model_dict(hmid, cfg)["id"] if hmid != mid else None
            if req.firstphase_width or req.firstphase_height:  # A1111 < 1.0: the first pass at this size
                job.width, job.height = req.firstphase_width or req.width, req.firstphase_height or req.height
        return to_spec(job, cfg, extra, NAMES)

    # 2. Generation: txt2img on the shared queue, its progress, interrupt (img2img: 501).
    def info(req: Txt2ImgRequest, job: Job, started: datetime) -> dict[str, Any]:
        """A1111's `info` (Processed.js()) for a finished job, from the saved images' records and infotexts."""
        files = [f for f in job.files if f is not None]
        records = [read_png_record(str(f)) for f in files]
        infotexts = [text or "" for _, text in records]
        rec = records[0][0] if records and records[0][0] else {}
        extra = {k: v for k, v in parse_infotext(infotexts[0]).items()
                 if k in ("Schedule type", "Lora hashes", "Lora weights", "Refiner", "Refiner switch at")} \
            if infotexts else {}
        seeds = list(job.spec.seeds)
        n = len(seeds)
        prompt, negative = job.spec.prompts[0].prompt, job.spec.prompts[0].negative_prompt
        return {
            "prompt": prompt, "all_prompts": [prompt] * n, "negative_prompt": negative,
            "all_negative_prompts": [negative] * n, "seed": seeds[0], "all_seeds": seeds, "subseed": -1,
            "all_subseeds": [-1] * n, "subseed_strength": 0, "width": rec.get("width", req.width),
            "height": rec.get("height", req.height), "sampler_name": rec.get("sampler"),
            "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": (rec.get("model") or {}).get("name"),
            "sd_model_hash": ((rec.get("model") or {}).get("hash") or "")[:10] or None, "sd_vae_name": None,
            "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": req.denoising_strength, "extra_generation_params": extra,
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": started.strftime("%Y%m%d%H%M%S"), "clip_skip": rec.get("clip_skip") or 1,
            "is_using_inpainting_conditioning": False, "version": f"t2i-runner {versions().get('t2i-runner')}",
        }

    @router.post("/txt2img", summary="Generate (A1111's txt2img: images as base64 PNG, parameters, info)")
    async def txt2img(req: Txt2ImgRequest) -> dict[str, Any]:
        spec = await run_in_threadpool(spec_of, req)
        started = datetime.now()
        job = await run_in_threadpool(queue.submit, spec)
        await wait_for(queue, job)
        if job.status == "error":
            raise FormError(job.error_status, job.error or "generation failed")
        # an interrupted job answers with the images it made, as A1111 does
        images = [base64.b64encode(f.read_bytes()).decode() for f in job.files if f is not None]
        return {"images": images if req.send_images else [], "parameters": req.model_dump(),
                "info": json.dumps(await run_in_threadpool(info, req, job, started))}

    @router.post("/img2img", status_code=501, summary="Not available: this server generates text-to-image")
    async def img2img() -> dict[str, Any]:
        raise FormError(501, "img2img is not available: t2i-serve does text-to-image only (POST /sdapi/v1/txt2img)")

    @router.get("/progress", summary="Progress of the run in progress (0 when idle)")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        now = queue.running()
        if now is None:
            state_ = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                      "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
            return {"progress": 0.0, "eta_relative": 0.0, "state": state_, "current_image": None, "textinfo": None}
        # per image: the core reports finished images (0.01 so a started run never reads as idle, as in A1111)
        fraction = min(1.0, 0.01 + now.done / max(1, now.total))
        elapsed = time.time() - now.started
        first = now.jobs[0]
        state_ = {"skipped": False, "interrupted": now.interrupted, "stopping_generation": now.interrupted,
                  "job": f"t2i {first.id[:8]}", "job_count": now.total, "job_no": now.done,
                  "job_timestamp": datetime.fromtimestamp(now.started).strftime("%Y%m%d%H%M%S"),
                  "sampling_step": 0, "sampling_steps": first.spec.steps[0]}
        return {"progress": fraction, "eta_relative": max(0.0, elapsed / fraction - elapsed), "state": state_,
                "current_image": None, "textinfo": f"{now.done} of {now.total} images"}

    @router.post("/interrupt", summary="Stop the run in progress after its batch in flight")
    async def interrupt() -> dict[str, Any]:
        queue.interrupt()
        return {}

    # 3. Options: the checkpoint and Clip skip later requests use.
    def options() -> dict[str, Any]:
        return {CHECKPOINT: state.checkpoint, "sd_checkpoint_hash":
                (model_sha256 or None) if state.checkpoint == cfg.model.id else None,
                CLIP_SKIP: state.clip_skip, EMPHASIS_OPTION: EMPHASIS[state.emphasis], PAD_OPTION: state.pad_conds,
                "sd_vae": "Automatic", "samples_format": "png",
                "eta_noise_seed_delta": 0, "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0, "s_noise": 1.0,
                "s_min_uncond": 0.0, "enable_pnginfo": True, "sd_lora": "None"}

    @router.get("/options", summary="The options this server has (checkpoint, Clip skip, fixed sampler options)")
    async def get_options() -> dict[str, Any]:
        return options()

    @router.post("/options", summary=f"Set {CHECKPOINT} (an allowed model) and {CLIP_SKIP} for later requests")
    async def set_options(body: dict[str, Any] = Body(...)) -> None:
        current = options()
        new = dataclasses.replace(state)
        for key, value in body.items():
            if key == CHECKPOINT:
                new.checkpoint = checkpoint_id(str(value))
            elif key == CLIP_SKIP:
                new.clip_skip = check_clip_skip(value, CLIP_SKIP)
            elif key == EMPHASIS_OPTION:
                new.emphasis = check_emphasis(value, EMPHASIS_OPTION)
            elif key == PAD_OPTION:
                new.pad_conds = check_pad(value, PAD_OPTION)
            elif key not in current or current[key] != value:
                raise FormError(422, f"option {key}={json.dumps(value)} cannot be set on this server; settable: "
                                     f"{CHECKPOINT}, {CLIP_SKIP}, {EMPHASIS_OPTION}, {PAD_OPTION} (others only at "
                                     "their current value)")
        state.checkpoint, state.clip_skip, state.emphasis, state.pad_conds = (new.checkpoint, new.clip_skip,
                                                                              new.emphasis, new.pad_conds)

    # 4. What this server offers: models, samplers, schedule types, LoRAs, and png-info.
    @router.get("/sd-models", summary="The models a request may use (the server's and server.allowed_models)")
    async def sd_models() -> list[dict[str, Any]]:
        def item(mid: str) -> dict[str, Any]:
            sha = model_sha256 if mid == cfg.model.id and model_sha256 else None
            return {"title": mid, "model_name": model_name(mid), "hash": sha[:10] if sha else None, "sha256": sha,
                    "filename": mid, "config": None}

        return [item(m) for m in allowed_models(cfg)]

    @router.get("/samplers", summary="Samplers (A1111 names; aliases: t2i's scheduler names)")
    async def samplers() -> list[dict[str, Any]]:
        return [{"name": row.a1111, "aliases": [key],
                 "options": {"scheduler": row.auto_schedule} if row.auto_schedule else {}}
                for key, row in SCHEDULER_TABLE.items() if row.a1111 is not None and row.schedule is None]

    @router.get("/schedulers", summary="Schedule types")
    async def schedulers() -> list[dict[str, Any]]:
        labels = {"automatic": A1111_AUTOMATIC} | {k: s.a1111 for k, s in SCHEDULE_TABLE.items()}
        return [{"name": name, "label": label, "aliases": ["SGMUniform"] if name == "sgm_uniform" else None,
                 "default_rho": _SCHEDULE_INFO[name][0], "need_inner_model": _SCHEDULE_INFO[name][1]}
                for name, label in labels.items()]

    @router.get("/loras", summary="LoRA files in the allowed folders (name: what <lora:name:weight> names)")
    async def loras() -> list[dict[str, Any]]:
        return await run_in_threadpool(lambda: [lora_entry(p) for p in lora_files(cfg)])

    @router.post("/refresh-loras", summary="Re-read the LoRA folders (they are read on every /loras)")
    async def refresh_loras() -> None:
        return None

    @router.post("/refresh-checkpoints", summary="Re-read the models (they come from the server's config)")
    async def refresh_checkpoints() -> None:
        return None

    @router.post("/png-info", summary="The generation parameters in an image (A1111 infotext, other text chunks)")
    async def png_info(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        if not isinstance(body.get("image"), str) or not body["image"].strip():
            raise FormError(422, "image: give the image as a base64 string")
        try:
            items = image_text(decode_image(body["image"]))
        except ConfigError as exc:
            raise FormError(422, str(exc)) from exc
        geninfo = items.pop(INFOTEXT_KEY, "")
        return {"info": geninfo, "items": items, "parameters": parse_infotext(geninfo) if geninfo else {}}

    # 5. What this server has none of (no scripts, VAEs, styles, embeddings, upscalers): empty lists, as A1111
    #    clients ask for them on start.
    for path, summary, empty in NONE_HERE:
        router.add_api_route(path, _constant(empty), methods=["GET"], summary=summary)
    return router


NONE_HERE = (  # (path, summary, the answer in A1111's shape: empty, or constant)
    ("/scripts", "Scripts (none)", {"txt2img": [], "img2img": []}),
    ("/script-info", "Scripts (none)", []),
    ("/sd-vae", "VAEs besides each model's own (none)", []),
    ("/prompt-styles", "Prompt styles (none)", []),
    ("/upscalers", "Upscalers for hires. fix (A1111's built-in resamplers; latent modes: /latent-upscale-modes)",
     [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in PIXEL_UPSCALERS]),
    ("/latent-upscale-modes", "Latent upscale modes for hires. fix", [{"name": n} for n in LATENT_MODES]),
    ("/embeddings", "Textual-inversion embeddings (none)", {"loaded": {}, "skipped": {}}),
)


def _constant(value: Any) -> Callable[[], Any]:
    async def endpoint() -> Any:
        return copy.deepcopy(value)

    return endpoint
