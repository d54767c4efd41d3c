"""A1111's SDXL Refiner as configuration: which second model takes over sampling, and at what fraction (the
`refiner` config group; generation in generate/refiner.py, loading in models/refiner.py).

A1111 (modules/sd_samplers_common.py, `apply_refiner`) switches models inside one sampling run: at each denoiser
call it reads the step's sigma, finds the nearest of the model's 1000 training sigmas (index t) and switches once
`(999 - t) / 1000 >= switch_at`; the sampler, its sigmas and its noise carry on with the refiner. It writes
`Refiner: NAME [shorthash]` (the checkpoint's file stem and the first 10 hex digits of its sha256) and
`Refiner switch at: 0.8`. Pure values here, so config, the A1111 API, from_image and generation share them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..common.errors import ConfigError

REFINER_KEYS = ("model", "switch_at", "config")
DEFAULT_SWITCH_AT = 0.8  # A1111's "Switch at" slider default
INFOTEXT_FIELDS = ("Refiner", "Refiner switch at")
_SHORT_TITLE = re.compile(r"^(?P<name>.*?)(?: \[(?P<hash>[0-9a-fA-F]{8,64})\])?$")


@dataclass(frozen=True)
class Refiner:
    """One image's refiner: the model (loaded once per run) and the fraction where it takes over."""

    model: str  # as configured: hub id, diffusers folder, single file, builtin:tiny-sdxl-refiner
    switch_at: float
    config: str | None = None  # diffusers configs of a single-file refiner (as model.config)
    identity: str = ""  # the refiner's content identity (its weights and configs), set before jobs are keyed

    def record(self) -> dict:
        return {"refiner_switch_at": self.switch_at}


def check_switch_at(value: Any, where: str = "refiner.switch_at") -> float:
    """A fraction strictly between 0 and 1 (0: the refiner alone; 1: never switches)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a number; valid: a fraction between 0 and 1, e.g. 0.8") from None
    if isinstance(value, bool) or not 0.0 < number < 1.0:
        raise ConfigError(f"{where}={value!r} is out of range; valid: a fraction between 0 and 1 (exclusive), "
                          "e.g. 0.8")
    return number


def refiner_combos(raw: Any) -> tuple[Refiner | None, ...]:
    """The refiner values of a run (the `refiner` group): (None,) when off (`refiner.model` null), else one
    Refiner per `switch_at` value (a sweepable list)."""
    from omegaconf import DictConfig, OmegaConf

    from .schema import RefinerConfig

    if raw is None:
        return (None,)
    cfg = {**vars(RefinerConfig()), **(OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else dict(raw))}
    unknown = sorted(set(cfg) - set(REFINER_KEYS))
    if unknown:
        from ..common.errors import did_you_mean

        raise ConfigError(f"refiner.{unknown[0]} is not a key{did_you_mean(unknown[0], REFINER_KEYS)}; valid: "
                          + ", ".join(REFINER_KEYS))
    model = cfg.get("model")
    if model in (None, "", "None", "none"):  # A1111's API sends "None" for no refiner
        return (None,)
    if not isinstance(model, str):
        raise ConfigError(f"refiner.model={model!r} must be one model (a hub id, a diffusers folder or a "
                          ".safetensors file; it is loaded once for the run); sweep refiner.switch_at instead")
    values = cfg["switch_at"]
    values = list(values) if isinstance(values, list | tuple) else [values]
    if not values:
        raise ConfigError("refiner.switch_at=[] has no values; valid: a fraction between 0 and 1, e.g. 0.8")
    fractions = tuple(dict.fromkeys(check_switch_at(v) for v in values))
    return tuple(Refiner(model.strip(), s, cfg.get("config") or None) for s in fractions)


def short_title(name: str, sha256: str) -> str:
    """A1111's CheckpointInfo.short_title: `NAME [first 10 hex of sha256]` (`NAME` without a hash)."""
    return f"{name} [{sha256[:10]}]" if sha256 else name


def parse_short_title(text: str) -> tuple[str, str | None]:
    """(name, shorthash or None) of A1111's `Refiner:` value."""
    m = _SHORT_TITLE.match(text.strip())
    return (m.group("name"), m.group("hash")) if m else (text.strip(), None)


def infotext_fields(rec: dict) -> dict[str, Any]:
    """A1111's infotext fields of a refined image (after the other generation params, as A1111 adds them when the
    switch happens during sampling)."""
    ref = rec.get("refiner")
    if not ref:
        return {}
    return {"Refiner": short_title(ref.get("name") or "", ref.get("hash") or ""),
            "Refiner switch at": str(float(rec["refiner_switch_at"])) if rec.get("refiner_switch_at") is not None
            else None}  # A1111 writes the float as Python prints it


def record_from_infotext(p: dict[str, Any]) -> dict[str, Any]:
    """The record keys of an A1111 infotext's refiner fields ({} without a refiner)."""
    if not p.get("Refiner"):
        return {}
    name, shorthash = parse_short_title(p["Refiner"])
    try:
        at = float(p.get("Refiner switch at"))
    except (TypeError, ValueError):
        at = DEFAULT_SWITCH_AT
    return {"refiner": {"id": None, "name": name, "hash": shorthash}, "refiner_switch_at": at}


def config_from_record(rec: dict) -> dict[str, Any]:
    """The `refiner` config group that regenerates a record's image (model null: no refiner)."""
    ref = rec.get("refiner")
    if not ref:
        return {"model": None}
    kind = ref.get("kind")
    model = ref.get("location") if kind in ("dir", "file", "builtin") else ref.get("id")
    return {"model": model, "switch_at": rec.get("refiner_switch_at", DEFAULT_SWITCH_AT), "config": ref.get("config")}
