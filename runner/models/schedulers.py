"""Build diffusers schedulers from the sampler table (config/schedulers.py) and check them before a run.

A scheduler is built once per (name, schedule) from the model's own scheduler config, so model-specific settings
(betas, prediction type, steps offset) carry over and the sampler's options and the schedule's sigma options are
laid on top.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from ..common.errors import ConfigError, first_line
from ..config.schedulers import SCHEDULE_TABLE, SCHEDULER_TABLE, SIGMA_OPTIONS, check_pair, effective_schedule
from .a1111_sigmas import with_a1111_sigmas

log = logging.getLogger(__name__)
PREFLIGHT_MAX_STEPS = 50  # how far up the pre-flight looks for the smallest step count that works


def scheduler_options(base: Any, name: str | None, schedule: str | None) -> tuple[type, dict]:
    """The diffusers class and the config overrides for `name` with `schedule` (None = A1111's Automatic for a
    named sampler, the model's own for scheduler=null, or the one a combined name such as dpmpp_2m_karras carries
    in its options)."""
    import diffusers

    if name is None:
        cls, options = type(base), {}
    else:
        row = SCHEDULER_TABLE[name]
        cls = getattr(diffusers, row.cls)
        options = {**SIGMA_OPTIONS, **row.options}  # a named sampler starts from plain sigmas
        if row.a1111_sigmas:  # A1111's own sigmas for every schedule (models/a1111_sigmas.py)
            schedule = effective_schedule(name, schedule)
            cls = with_a1111_sigmas(cls, schedule, row.discard)
            # the class takes them through diffusers' Karras path (Euler a, without one, through set_timesteps);
            # "linspace": the first sigma is the whole noise (diffusers' init_noise_sigma), as in k-diffusion
            hook = {"use_karras_sigmas": True} if hasattr(cls, "_convert_to_karras") else {}
            options = {**options, **hook, "timestep_spacing": "linspace"}
            schedule = None  # (it is in the class, not in the config options)
    if schedule is not None:  # one sigma transform at a time: the schedule's replaces the model's own
        if SCHEDULE_TABLE[schedule].a1111_only:
            raise ConfigError(check_pair(name, schedule) or f"schedule={schedule} is not available here")
        options = {**options, **SIGMA_OPTIONS, **SCHEDULE_TABLE[schedule].options}
    # (a schedule only implied by a combined name is in that row's own options)
    accepted = inspect.signature(cls.__init__).parameters
    flow = cls.__name__.startswith("FlowMatch")  # the pipeline passes its own sigmas: no timestep spacing to set
    unknown = sorted(k for k, v in options.items() if k not in accepted and v is not False
                     and not (flow and k == "timestep_spacing"))
    if unknown:
        raise ConfigError(f"schedule={schedule} is not available for this model's scheduler {cls.__name__} "
                          f"(it has no {unknown[0]} option); name a scheduler, e.g. "
                          f"scheduler={'flow_euler' if flow else 'euler'}")
    return cls, {k: v for k, v in options.items() if k in accepted}


def table_row(scheduler: Any) -> tuple[str | None, str | None]:
    """The (scheduler, schedule) names of the table that describe a scheduler instance (None where none does)."""
    cls, cfg = type(scheduler).__name__, scheduler.config
    rows = [(len(r.options), k) for k, r in SCHEDULER_TABLE.items() if r.cls == cls and r.schedule is None
            and all(cfg.get(o) == v for o, v in r.options.items())]
    sigma = [k for k, r in SCHEDULE_TABLE.items() if any(o.startswith("use_") for o in r.options)
             and all(cfg.get(o) == v for o, v in r.options.items())]
    return (max(rows)[1] if rows else None), (sigma[0] if sigma else None)


def build_scheduler(base: Any, name: str | None, schedule: str | None) -> Any:
    """A new scheduler for `name` + `schedule` from the config of `base` (the model's own scheduler)."""
    if name is None and schedule is None:
        return base
    cls, options = scheduler_options(base, name, schedule)
    with quiet_schedulers(), _silent_diffusers():  # e.g. LCM's note on the Euler config keys it does not use
        return cls.from_config(base.config, **options)


@contextlib.contextmanager
def quiet_schedulers() -> Iterator[None]:
    """Hide diffusers' and torchsde's notes about configs and Brownian-tree tolerances (not the user's business)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchsde\.")
        yield


def seed_noise(scheduler: Any, seeds: list[int]) -> None:
    """Schedulers with their own noise source (DPM++ SDE's Brownian tree) draw it from each image's seed, as
    A1111 does, so an image does not depend on its batch-mates or on the global RNG."""
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = [int(s) % 2**63 for s in seeds]
        scheduler.noise_sampler = None


def dry_run(scheduler: Any, steps: int) -> None:
    """Run the scheduler's whole step loop on a tiny zero latent (no model): raises what a real run would."""
    import torch

    sched = type(scheduler).from_config(scheduler.config)
    seed_noise(sched, [0])
    # flow-matching schedulers with a resolution-dependent shift need the pipeline's `mu` (any value checks the loop)
    shift = {"mu": 0.5} if getattr(sched.config, "use_dynamic_shifting", False) else {}
    sched.set_timesteps(steps, device="cpu", **shift)
    x = torch.zeros(1, 4, 8, 8) * getattr(sched, "init_noise_sigma", 1.0)
    extra = {"generator": torch.Generator().manual_seed(0)} if "generator" in \
        inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        if hasattr(sched, "scale_model_input"):  # FlowMatch schedulers scale nothing
            sched.scale_model_input(x, t)
        x = sched.step(torch.zeros_like(x), t, x, **extra).prev_sample
    if not torch.isfinite(x).all():
        raise ValueError("the sampling loop produced NaN")


def preflight(base: Any, combos: Iterable[tuple[str | None, str | None, int]]) -> None:
    """Check every (scheduler, schedule, steps) of a plan before the first image (ConfigError naming it)."""
    with quiet_schedulers(), _silent_diffusers():
        for name, schedule, steps in sorted(set(combos), key=lambda c: (c[0] or "", c[1] or "", c[2])):
            sched = build_scheduler(base, name, schedule)
            try:
                dry_run(sched, steps)
            except Exception as exc:  # noqa: BLE001 - any failure of the loop is the user's combination
                what = f"scheduler={name or 'null (' + type(base).__name__ + ')'}"
                what += f" schedule={schedule}" if schedule else ""
                raise ConfigError(f"{what} with steps={steps} fails in diffusers ({type(exc).__name__}: "
                                  f"{first_line(exc, 120)}); {_hint(sched, steps)}") from exc


def _hint(sched: Any, steps: int) -> str:
    for more in range(steps + 1, PREFLIGHT_MAX_STEPS + 1):
        try:
            dry_run(sched, more)
        except Exception:  # noqa: BLE001
            continue
        return f"use steps >= {more} or another scheduler"
    return "use another scheduler"


@contextlib.contextmanager
def _silent_diffusers() -> Iterator[None]:
    """diffusers logs a warning per odd step count for some solvers; the pre-flight is not the real run."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
