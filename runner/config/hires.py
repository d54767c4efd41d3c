"""A1111's Hires. fix as configuration: upscaler names and the sizes and step counts of the second pass
(modules/processing.py, `calculate_target_resolution`; tests/test_hires.py holds vectors computed by its code).
Pure arithmetic, so config, the A1111 API and from_image share it with generation (generate/hires.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, did_you_mean
from .schedulers import SCHEDULERS, SCHEDULES
from .upscalers import resolve as resolve_model

# A1111 `shared.latent_upscale_modes`: name -> (torch interpolate mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")  # A1111's built-in resamplers (modules/upscaler.py)
UPSCALERS = (*LATENT_MODES, *PIXEL_UPSCALERS)
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode, used when no upscaler is named


def target_size(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0,
                latent_factor: int = 8) -> tuple[int, int, int, int]:
    """(target width, target height, truncate_x, truncate_y) of the second pass, A1111's rules; truncate_* are
    latent columns/rows cropped (centrally) when both resize sides are given (`latent_factor` pixels each)."""
    if resize_x == 0 and resize_y == 0:
        return int(width * scale), int(height * scale), 0, 0
    if resize_y == 0:
        return resize_x, resize_x * height // width, 0, 0
    if resize_x == 0:
        return resize_y * width // height, resize_y, 0, 0
    if width / height < resize_x / resize_y:
        tw, th = resize_x, resize_x * height // width
    else:
        tw, th = resize_y * width // height, resize_y
    return tw, th, (tw - resize_x) // latent_factor, (th - resize_y) // latent_factor


def old_first_pass(width: int, height: int) -> tuple[int, int]:
    """The first-pass size A1111 before 1.0 chose for a hires image of `width`x`height` (`First pass size: 0x0`):
    about 512x512 pixels, sides rounded up to multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def second_pass_steps(steps: int, denoise: float) -> tuple[int, float]:
    """(num_inference_steps, strength) for diffusers' img2img so it runs exactly `steps` steps, the last ones of a
    schedule of int(steps / denoise) (A1111's setup_img2img_steps with a given step count)."""
    total = int(steps / min(denoise, 0.999)) if denoise > 0 else steps
    return total, min(1.0, (steps + 0.5) / total)


@dataclass(frozen=True)
class Hires:
    """One image's hires. fix settings (one value of each swept key)."""

    scale: float
    steps: int  # 0 = the first pass's steps
    denoise: float
    upscaler: str
    resize_x: int = 0
    resize_y: int = 0
    prompt: str = ""  # "" = the image's prompt
    negative_prompt: str = ""
    scheduler: str | None = None  # A1111 "Hires sampler"; None = the first pass's
    schedule: str | None = None  # A1111 "Hires schedule type"; None = the first pass's
    upscaler_file: str = ""  # a model upscaler's file (`upscaler` is then its stem, as A1111 names it)
    model: str = ""  # A1111 "Hires checkpoint": the second pass's model id; "" = the first pass's

    def second_scheduler(self, scheduler: str | None, schedule: str | None) -> tuple[str | None, str | None]:
        """The second pass's (scheduler, schedule) for a first pass run with `scheduler` and `schedule`; a first
        pass's schedule that the hires sampler cannot run (DDIM's timesteps, LCM on Karras) is left out: the
        sampler's own, A1111's Automatic (config/schedulers.py `automatic`), built as a first pass's."""
        from .schedulers import check_pair

        if self.scheduler and self.schedule is None and schedule is not None and check_pair(self.scheduler,
                                                                                            schedule):
            return self.scheduler, None
        return self.scheduler or scheduler, self.schedule or schedule

    def second_steps(self, first: int) -> int:
        return self.steps or first

    def record(self) -> dict:
        """The image record's hires fields (flat, so grids and the viewer can use them as axes)."""
        out = {"hires_scale": self.scale, "hires_steps": self.steps, "hires_denoise": self.denoise,
               "hires_upscaler": self.upscaler}
        if self.resize_x or self.resize_y:
            out["hires_resize"] = [self.resize_x, self.resize_y]
        if self.prompt:
            out["hires_prompt"] = self.prompt
        if self.negative_prompt:
            out["hires_negative_prompt"] = self.negative_prompt
        if self.upscaler_file:
            out["hires_upscaler_file"] = self.upscaler_file
        if self.scheduler:
            out["hires_scheduler"] = self.scheduler
        if self.schedule:
            out["hires_schedule"] = self.schedule
        return out


def _values(key: str, value: Any, kind: type, lo: float, hi: float) -> tuple:
    items = list(value) if isinstance(value, list | tuple) else [value]
    out = []
    for v in items:
        try:
            number = kind(v)
        except (TypeError, ValueError):
            raise ConfigError(f"hires.{key}={v!r} is not a number; e.g. hires.{key}={kind(hi / 2)!r}") from None
        if isinstance(v, bool) or not lo <= number <= hi or (kind is int and number != float(v)):
            raise ConfigError(f"hires.{key}={v!r} is out of range; valid: {lo:g} to {hi:g}")
        out.append(number)
    return tuple(dict.fromkeys(out))


def hires_combos(raw: Any, upscaler_dirs: tuple[str, ...] = (), allow_pickle: bool = False) -> tuple[Hires | None, ...]:
    """The hires. fix values of a run (the `hires` config group): (None,) when off (`hires.scale` null), else one
    Hires per combination of the swept keys (scale, steps, denoise, upscaler, scheduler, schedule, model)."""
    import itertools

    from omegaconf import DictConfig, OmegaConf

    from .schema import HiresConfig

    if raw is None:
        return (None,)
    cfg = {**vars(HiresConfig()), **(OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else dict(raw))}
    unknown = set(cfg) - {f.name for f in fields(Hires)}
    if unknown:
        raise ConfigError(f"hires.{sorted(unknown)[0]} is not a key{did_you_mean(sorted(unknown)[0], HIRES_KEYS)}; "
                          f"valid: {', '.join(HIRES_KEYS)}")
    if cfg.get("scale") is None and not (cfg.get("resize_x") or cfg.get("resize_y")):
        return (None,)
    scales = _values("scale", 1.0 if cfg["scale"] is None else cfg["scale"], float, 1.0, 8.0)  # 1.0: resize_* rule
    steps = _values("steps", cfg["steps"] or 0, int, 0, 1000)
    denoise = _values("denoise", cfg["denoise"], float, 0.0, 1.0)
    ups = cfg["upscaler"] or DEFAULT_UPSCALER
    ups = tuple(dict.fromkeys(str(u) for u in (ups if isinstance(ups, list | tuple) else [ups])))
    files = {u: "" if u in UPSCALERS else str(resolve_model(u, upscaler_dirs, allow_pickle, UPSCALERS))
             for u in ups}
    rx = _values("resize_x", cfg.get("resize_x") or 0, int, 0, 16384)[0]
    ry = _values("resize_y", cfg.get("resize_y") or 0, int, 0, 16384)[0]
    for key in ("prompt", "negative_prompt"):
        if not isinstance(cfg.get(key) or "", str):
            raise ConfigError(f"hires.{key} must be a string (one prompt for the second pass; \"\" = the image's)")
    models = _models(cfg.get("model"))
    scheds = _names("scheduler", cfg.get("scheduler"), SCHEDULERS)
    schedules = _names("schedule", cfg.get("schedule"), SCHEDULES)
    return tuple(Hires(s, n, d, Path(files[u]).stem if files[u] else u, rx, ry, cfg.get("prompt") or "",
                       cfg.get("negative_prompt") or "", sc, sd, files[u], m)
                 for s, n, d, u, sc, sd, m in itertools.product(scales, steps, denoise, ups, scheds, schedules,
                                                                models))


def _models(value: Any) -> tuple[str, ...]:
    """hires.model: model ids (as `model.id`), "" = the first pass's model."""
    out = []
    for v in list(value) if isinstance(value, list | tuple) else [value]:
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"hires.model={v!r} is not a model id; give a diffusers folder, a .safetensors "
                              "checkpoint or a hub id (null = the first pass's model)")
        out.append("" if v in (None, "", "null") else v)
    return tuple(dict.fromkeys(out))


def _names(key: str, value: Any, valid: tuple[str, ...]) -> tuple[str | None, ...]:
    """A swept name key of the second pass (null = the first pass's)."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    out = []
    for v in items:
        if v in (None, "", "null", "default"):
            out.append(None)
        elif str(v) not in valid:
            raise ConfigError(f"hires.{key}={v!r} is not known{did_you_mean(str(v), valid)}; valid: null (the first "
                              f"pass's), " + ", ".join(valid))
        else:
            out.append(str(v))
    return tuple(dict.fromkeys(out))


def check_second_schedulers(hires: tuple, pairs: Any) -> None:
    """Each hires pass's (scheduler, schedule) with each first pass's `pairs`: one line for a pair that cannot run
    (as the first pass's are checked), before anything loads."""
    from .schedulers import check_pair, effective_schedule, missing_modules

    for hr in hires:
        if hr is None or (hr.scheduler is None and hr.schedule is None):
            continue
        for first in pairs:
            sched, schedule = hr.second_scheduler(*first)
            why = check_pair(sched, schedule)
            if why:
                raise ConfigError(f"the hires. fix pass runs scheduler={sched} schedule={schedule} (hires.scheduler="
                                  f"{hr.scheduler}, hires.schedule={hr.schedule}; null = the first pass's): {why}")
            missing = missing_modules(sched, effective_schedule(sched, schedule))
            if missing:
                raise ConfigError(f"hires.scheduler={sched} needs the Python package {missing[0]!r}, which is not "
                                  f"installed; pip install {missing[0]}")


def preflight_pairs(jobs: Any) -> set[tuple[str | None, str | None, int]]:
    """The (scheduler, schedule, steps) of the hires. fix passes with their own sampler, for the scheduler
    pre-flight (models/schedulers.py) that checks the first passes'."""
    out = set()
    for j in jobs:
        hr = j.hires
        if hr is not None and (hr.scheduler or hr.schedule):
            out.add((*hr.second_scheduler(j.scheduler, j.schedule), second_pass_steps(hr.second_steps(j.steps),
                                                                                     hr.denoise)[0]))
    return out


HIRES_KEYS = ("scale", "steps", "denoise", "upscaler", "resize_x", "resize_y", "prompt", "negative_prompt",
              "scheduler", "schedule", "model")


# A1111 infotext fields of a hires. fix image (read by from_image; "First pass size" is A1111's before 1.0)
INFOTEXT_FIELDS = ("Denoising strength", "Hires upscale", "Hires resize-1", "Hires resize-2", "Hires steps",
                   "Hires upscaler", "Hires prompt", "Hires negative prompt", "Hires sampler", "Hires schedule type",
                   "Hires checkpoint",
                   "First pass size-1", "First pass size-2")


def infotext_fields(rec: dict) -> dict[str, Any]:
    """A1111's infotext fields for a record's hires. fix, in A1111's order (None: not written)."""
    if rec.get("hires_scale") is None:
        return {}
    rx, ry = rec.get("hires_resize") or (0, 0)
    sampler, schedule_type = rec.get("hires_sampler"), rec.get("hires_schedule_type")
    model = rec.get("hires_model") or {}
    checkpoint = f"{model.get('name')} [{model['hash'][:10]}]" if model.get("hash") else model.get("name")
    return {"Hires checkpoint": checkpoint,  # A1111's short_title: name [first 10 of its sha256]
            "Hires sampler": sampler if sampler and sampler != rec.get("sampler") else None,
            "Hires prompt": rec.get("hires_prompt") or None,
            "Hires negative prompt": rec.get("hires_negative_prompt") or None,
            "Hires upscale": f"{rec['hires_scale']:g}" if not (rx or ry) else None,
            "Hires resize": f"{rx}x{ry}" if rx or ry else None,
            "Hires steps": rec.get("hires_steps") or None,
            "Hires upscaler": rec.get("hires_upscaler"),
            # A1111 writes it from its sampler, after the others, where it differs from the first pass's
            "Hires schedule type": schedule_type if schedule_type and schedule_type != rec.get("schedule_type")
            else None}


def record_from_infotext(p: dict[str, Any]) -> dict[str, Any]:
    """The record keys of an A1111 hires. fix infotext (parsed, `Size-1`-style), {} for a one-pass image. An
    image from A1111 before 1.0 (`First pass size: WxH`, `0x0` = about 512x512) has its final size as `Size`."""
    def num(kind: type, key: str) -> Any:
        try:
            return kind(float(p[key])) if kind is int else kind(p[key])
        except (KeyError, TypeError, ValueError):
            return None

    denoise = num(float, "Denoising strength")
    old = "First pass size-1" in p
    if not (old or "Hires upscale" in p or "Hires resize-1" in p):
        return {}
    out: dict[str, Any] = {"hires_denoise": 0.7 if denoise is None else denoise, "hires_steps": num(int, "Hires steps")
                           or 0, "hires_upscaler": p.get("Hires upscaler") or DEFAULT_UPSCALER, "hires_scale": 1.0}
    if old:
        w, h = num(int, "Size-1"), num(int, "Size-2")
        fw, fh = num(int, "First pass size-1") or 0, num(int, "First pass size-2") or 0
        if w and h:
            fw, fh = (fw, fh) if fw and fh else old_first_pass(w, h)
            out.update(width=fw, height=fh, hires_resize=[w, h])
    elif num(int, "Hires resize-1") or num(int, "Hires resize-2"):  # `Hires resize: 0x0` is the scale's (A1111)
        out["hires_resize"] = [num(int, "Hires resize-1") or 0, num(int, "Hires resize-2") or 0]
    else:
        out["hires_scale"] = num(float, "Hires upscale") or 2.0
    for key in ("Hires prompt", "Hires negative prompt"):
        if p.get(key):
            out[key.lower().replace(" ", "_")] = p[key]
    if p.get("Hires sampler") or p.get("Hires schedule type") or p.get("Schedule type"):
        out.update(_second_scheduler(p))
    if p.get("Hires checkpoint"):  # a name and hash only: from_image needs hires.model=... to find it
        out.setdefault("no_equivalent", []).append(f"Hires checkpoint: {p['Hires checkpoint']} (give hires.model="
                                                   "... to use it; without it, the first pass's model)")
    return out


def _second_scheduler(p: dict[str, Any]) -> dict[str, Any]:
    """The record keys of A1111's Hires sampler / Hires schedule type; what diffusers cannot run is listed under
    `no_equivalent` (from_image warns) and the second pass keeps a schedule its sampler can run."""
    from .schedulers import A1111_AUTOMATIC, automatic, from_a1111

    sampler = p.get("Hires sampler") or p.get("Sampler") or ""
    # A1111 (>= 1.9, processing.py: `hr_scheduler = self.scheduler` when None) runs the second pass on `Hires
    # schedule type`, else on the first pass's Schedule type setting, and writes the hires one only where its label
    # differs from the first pass's `Schedule type`; its own reader ("Use same scheduler") does the same
    label = p.get("Hires schedule type") or p.get("Schedule type") or A1111_AUTOMATIC
    scheduler, schedule, lost = from_a1111(sampler, label)
    first = from_a1111(p.get("Sampler") or "", p.get("Schedule type"))[1] if p.get("Sampler") else None
    out: dict[str, Any] = {}
    if p.get("Hires sampler") and scheduler is not None:
        out["hires_scheduler"] = scheduler
    if schedule is not None and (p.get("Hires schedule type") or schedule != first):
        out["hires_schedule"] = schedule
    if lost:
        out["no_equivalent"] = [f"Hires {x[0].lower()}{x[1:]}" for x in lost]
        auto = automatic(scheduler) if scheduler is not None and schedule is None else None
        if auto is not None:  # the first pass's may not run with this sampler either: its Automatic, named
            out["hires_schedule"] = auto
    return out


def config_from_record(rec: dict) -> dict[str, Any]:
    """The `hires` config group that regenerates a record's image (scale null: one pass)."""
    if rec.get("hires_scale") is None:
        return {"scale": None, "resize_x": 0, "resize_y": 0}
    rx, ry = rec.get("hires_resize") or (0, 0)
    return {"scale": rec["hires_scale"], "steps": rec.get("hires_steps") or 0, "denoise": rec["hires_denoise"],
            "upscaler": rec["hires_upscaler"], "resize_x": rx, "resize_y": ry,
            "prompt": rec.get("hires_prompt") or "", "negative_prompt": rec.get("hires_negative_prompt") or "",
            "scheduler": rec.get("hires_scheduler"), "schedule": rec.get("hires_schedule"),
            "model": _model_id(rec.get("hires_model"))}


def _model_id(m: dict | None) -> str | None:
    """The `hires.model` that loads a record's Hires checkpoint again (its folder or file; else its id)."""
    if not m:
        return None
    return m.get("location") if m.get("kind") in ("dir", "file") else m.get("id")
