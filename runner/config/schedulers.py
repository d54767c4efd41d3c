"""The sampler vocabulary: ONE table of schedulers and ONE of schedule types.

A run names a scheduler (`scheduler=dpmpp_2m`) and, separately, a schedule type (`schedule=karras`), like A1111's
"Sampler" and "Schedule type" fields. Each scheduler row maps onto a diffusers scheduler class plus the config
options that make it that sampler; each schedule row onto the diffusers sigma/timestep options that give that
schedule. The same tables validate configs (config), build schedulers (models), write the infotext (outputs) and
read A1111 infotext (reproduce). A family with other schedulers (flow matching, …) adds rows here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

# Schedule types that only change sigmas or timestep spacing, offered by every scheduler class whose __init__
# takes the option (tests/test_schedulers.py checks each row against diffusers' signatures).
SIGMA_SCHEDULES = ("uniform", "karras", "exponential", "beta", "sgm_uniform")
SPACING_SCHEDULES = ("uniform", "sgm_uniform")
# A1111's k-diffusion samplers run A1111's own sigma formulas (runner/models/a1111_sigmas.py), every one of them
A1111_SCHEDULES = ("uniform", "karras", "exponential", "beta", "sgm_uniform", "simple")
FLOW_SCHEDULES = ("karras", "exponential", "beta")  # the FlowMatch classes' sigma options (no timestep spacing)


@dataclass(frozen=True)
class Scheduler:
    """One `scheduler=` value."""

    cls: str  # diffusers scheduler class
    a1111: str | None  # A1111's sampler name (None: A1111 has no such sampler)
    options: dict = field(default_factory=dict)  # from_config overrides that make the class this sampler
    schedules: tuple[str, ...] = SIGMA_SCHEDULES  # `schedule=` values diffusers offers for this class
    auto_schedule: str | None = None  # what A1111 (>= 1.9) uses for "Automatic": its infotext must not rely on it
    kdiffusion: bool = True  # A1111 runs it on k-diffusion sigmas ("Uniform" when no Schedule type is given)
    schedule: str | None = None  # a schedule the name itself fixes (the older combined names)
    requires: tuple[str, ...] = ()  # Python modules diffusers needs for this class
    # A1111's `eta` that samples as this class does (ancestral and SDE samplers add noise at eta 1, DDIM at 0);
    # None: A1111's sampler takes no eta, so any value means the same
    eta: float | None = None
    # its sigmas are A1111's, computed as A1111 does (runner/models/a1111_sigmas.py) for every schedule, "Automatic"
    # (schedule=null) included; `discard`: A1111's DPM2 samplers drop the next-to-last sigma of steps + 1
    a1111_sigmas: bool = False
    discard: bool = False

    def __post_init__(self) -> None:
        assert self.schedule is None or self.schedule in self.schedules


@dataclass(frozen=True)
class Schedule:
    """One `schedule=` value (A1111's "Schedule type")."""

    a1111: str  # A1111's label
    options: dict  # diffusers scheduler config options
    requires: tuple[str, ...] = ()
    a1111_only: bool = False  # no diffusers option gives it: only A1111's samplers (rows with a1111_sigmas) run it


A = {"schedules": A1111_SCHEDULES, "a1111_sigmas": True}  # the rows of A1111's k-diffusion samplers
SCHEDULER_TABLE: dict[str, Scheduler] = {
    "euler": Scheduler("EulerDiscreteScheduler", "Euler", **A),
    "euler_a": Scheduler("EulerAncestralDiscreteScheduler", "Euler a", eta=1.0, **A),
    "heun": Scheduler("HeunDiscreteScheduler", "Heun", **A),
    "lms": Scheduler("LMSDiscreteScheduler", "LMS", requires=("scipy",), **A),
    "dpm2": Scheduler("KDPM2DiscreteScheduler", "DPM2", auto_schedule="karras", discard=True, **A),
    "dpm2_a": Scheduler("KDPM2AncestralDiscreteScheduler", "DPM2 a", auto_schedule="karras", eta=1.0, discard=True,
                        **A),
    "dpmpp_2m": Scheduler("DPMSolverMultistepScheduler", "DPM++ 2M", auto_schedule="karras", **A),
    # the older combined name, kept with its old sigmas (Karras over the model's own timestep spacing) so its
    # images stay reproducible; scheduler=dpmpp_2m schedule=karras is A1111's Karras (the model's whole range)
    "dpmpp_2m_karras": Scheduler("DPMSolverMultistepScheduler", "DPM++ 2M", {"use_karras_sigmas": True},
                                 auto_schedule="karras", schedule="karras"),
    "dpmpp_2m_sde": Scheduler("DPMSolverMultistepScheduler", "DPM++ 2M SDE", {"algorithm_type": "sde-dpmsolver++"},
                              auto_schedule="exponential", eta=1.0, **A),
    "dpmpp_2m_sde_heun": Scheduler("DPMSolverMultistepScheduler", "DPM++ 2M SDE Heun",
                                   {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
                                   auto_schedule="exponential", eta=1.0, **A),
    "dpmpp_sde": Scheduler("DPMSolverSDEScheduler", "DPM++ SDE", auto_schedule="karras", requires=("torchsde",),
                           eta=1.0, **A),
    # A1111's timestep samplers (modules/sd_samplers_timesteps.py) ignore the Schedule type: none is offered
    "ddim": Scheduler("DDIMScheduler", "DDIM", schedules=(), kdiffusion=False, eta=0.0),
    "pndm": Scheduler("PNDMScheduler", "PLMS", {"skip_prk_steps": True}, schedules=(), kdiffusion=False),
    "unipc": Scheduler("UniPCMultistepScheduler", "UniPC", schedules=(), kdiffusion=False),
    "lcm": Scheduler("LCMScheduler", "LCM", schedules=SPACING_SCHEDULES),
    "ddpm": Scheduler("DDPMScheduler", None, schedules=SPACING_SCHEDULES, kdiffusion=False),
    # flow-matching models (Flux, SD3, Qwen-Image, Z-Image, Flux.2): their pipelines pass custom sigmas and a
    # resolution shift, which only the FlowMatch schedulers take (runner/models/families.py picks the kind);
    # A1111 labels come after the SD rows', so an A1111 "Euler" image imports as euler
    # (their sigma transforms: `uniform` is the pipeline's own spacing, so it is no schedule of theirs)
    "flow_euler": Scheduler("FlowMatchEulerDiscreteScheduler", "Euler", schedules=FLOW_SCHEDULES, kdiffusion=False),
    "flow_lcm": Scheduler("FlowMatchLCMScheduler", "LCM", schedules=FLOW_SCHEDULES, kdiffusion=False),
}
SCHEDULERS = tuple(SCHEDULER_TABLE)


def is_flow(name: str) -> bool:
    """True for the schedulers of flow-matching models (the FlowMatch* classes)."""
    return SCHEDULER_TABLE[name].cls.startswith("FlowMatch")

# On A1111's k-diffusion samplers (rows with a1111_sigmas) every schedule is A1111's own formula
# (runner/models/a1111_sigmas.py). Elsewhere (scheduler=null, lcm, ddpm, the flow rows) a schedule is the diffusers
# options below: A1111's sigma schedules span the model's whole noise range (its first and last training
# timestep); diffusers derives the range from the spaced timesteps, so they come with "linspace" spacing
# (t = 999 … 0); SGM Uniform there is diffusers' trailing spacing (within 2.1% of A1111's); Simple has no such
# option (only on A1111's samplers).
SCHEDULE_TABLE: dict[str, Schedule] = {
    "uniform": Schedule("Uniform", {"timestep_spacing": "linspace"}),
    "karras": Schedule("Karras", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    "exponential": Schedule("Exponential", {"use_exponential_sigmas": True, "timestep_spacing": "linspace"}),
    "beta": Schedule("Beta", {"use_beta_sigmas": True, "timestep_spacing": "linspace"}, requires=("scipy",)),
    "sgm_uniform": Schedule("SGM Uniform", {"timestep_spacing": "trailing"}),
    "simple": Schedule("Simple", {}, a1111_only=True),
}
SCHEDULES = tuple(SCHEDULE_TABLE)
# Sigma options a named scheduler starts without (a model's config may turn one on: naming a scheduler resets it)
SIGMA_OPTIONS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

# A1111 names read from infotext that mean one of ours (A1111's aliases and same-sigma labels: "Normal" is the
# Uniform formula; "Polyexponential" at its default rho 1 is the Exponential one; tests/data/a1111_sigma_vectors)
A1111_SCHEDULE_ALIASES = {"Normal": "uniform", "SGMUniform": "sgm_uniform", "Polyexponential": "exponential"}
A1111_AUTOMATIC = "Automatic"  # A1111's Schedule type "the sampler's own default" (its `auto_schedule`)
# ComfyUI sampler names (as A1111-style savers write them)
COMFY_SAMPLERS = {"euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "lms": "lms", "dpm_2": "dpm2",
                  "dpm_2_ancestral": "dpm2_a", "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m_sde",
                  "dpmpp_sde": "dpmpp_sde", "ddim": "ddim", "uni_pc": "unipc", "lcm": "lcm", "ddpm": "ddpm"}


def automatic(scheduler: str) -> str | None:
    """A1111's "Automatic" Schedule type for a sampler (`schedule=null`): the sampler's own option (Karras for
    DPM++ 2M, Exponential for DPM++ 2M SDE; A1111's `samplers_k_diffusion`), else the model's evenly spaced sigmas
    ("Uniform"); None for samplers with their own timesteps (DDIM, PLMS, UniPC, LCM, DDPM, the flow rows)."""
    row = SCHEDULER_TABLE[scheduler]
    return row.auto_schedule or ("uniform" if row.a1111_sigmas else None)


def effective_schedule(scheduler: str | None, schedule: str | None) -> str | None:
    """The schedule a (scheduler, schedule) pair runs with: the explicit one, else the one the name fixes, else
    A1111's Automatic for the sampler (the model's own scheduler, scheduler=null, keeps its own)."""
    if schedule is None and scheduler is not None:
        return SCHEDULER_TABLE[scheduler].schedule or automatic(scheduler)
    return schedule


def check_pair(scheduler: str | None, schedule: str | None) -> str | None:
    """Why `scheduler` with `schedule` cannot run (one line), or None when it can."""
    if scheduler is None:
        if schedule is not None and SCHEDULE_TABLE[schedule].a1111_only:
            return (f"schedule={schedule} is A1111's formula for its samplers; name one, e.g. scheduler=euler "
                    f"(valid: {', '.join(k for k, r in SCHEDULER_TABLE.items() if schedule in r.schedules)})")
        return None  # the model's own scheduler class: checked once it is loaded
    row = SCHEDULER_TABLE[scheduler]
    if schedule is not None and row.schedule is not None and schedule != row.schedule:
        return (f"scheduler={scheduler} already means schedule={row.schedule}; use scheduler="
                f"{scheduler.removesuffix('_' + row.schedule)} schedule={schedule}")
    if schedule is not None and not row.schedules and row.a1111 and not row.kdiffusion:
        return (f"schedule={schedule} with scheduler={scheduler}: A1111 ignores the Schedule type for its timestep "
                f"sampler {row.a1111}; leave schedule unset (the sampler's own timesteps)")
    if schedule is not None and schedule not in row.schedules:
        return (f"schedule={schedule} is not available for scheduler={scheduler} ({row.cls}); valid: "
                f"{', '.join(row.schedules)}")
    return None


def missing_modules(scheduler: str | None, schedule: str | None) -> list[str]:
    """Python modules that `scheduler`/`schedule` need and this install lacks."""
    needs = (SCHEDULER_TABLE[scheduler].requires if scheduler else ()) + \
        (SCHEDULE_TABLE[schedule].requires if schedule else ())
    return [m for m in needs if importlib.util.find_spec(m) is None]


def a1111_names(scheduler: str | None, schedule: str | None) -> tuple[str | None, str | None]:
    """A1111's (Sampler, Schedule type) for a named scheduler: what A1111 must read to run the same thing.

    Always the Schedule type actually used (schedule=null: the sampler's Automatic, named), so that A1111 never
    has to fill it in; None only for samplers whose own timesteps A1111 uses whatever the Schedule type."""
    if scheduler is None:
        return None, SCHEDULE_TABLE[schedule].a1111 if schedule else None
    row = SCHEDULER_TABLE[scheduler]
    sched = effective_schedule(scheduler, schedule)
    return row.a1111, SCHEDULE_TABLE[sched].a1111 if sched is not None else None


def from_a1111(sampler: str, schedule_type: str | None) -> tuple[str | None, str | None, list[str]]:
    """(scheduler, schedule, what has no diffusers equivalent) for A1111's Sampler and Schedule type fields.

    Follows A1111's own reading (`sd_samplers.get_sampler_and_scheduler`): a sampler name may end in a schedule
    label ("DPM++ 2M Karras", before 1.9); "Automatic" means the sampler's default; an image without a
    Schedule type was sampled on evenly spaced timesteps ("Uniform") by A1111's k-diffusion samplers."""
    labels = {s.a1111: name for name, s in SCHEDULE_TABLE.items()} | A1111_SCHEDULE_ALIASES
    name = sampler.strip()
    sched_label = (schedule_type or "").strip() or None
    for label in sorted(labels, key=len, reverse=True):  # "DPM++ 2M SDE Karras": the suffix is the schedule
        if name.endswith(" " + label) and name[: -len(label) - 1] in {s.a1111 for s in SCHEDULER_TABLE.values()}:
            # as in A1111, the name's schedule wins over "Automatic" (its API's default Schedule type)
            name = name[: -len(label) - 1]
            sched_label = label if sched_label in (None, A1111_AUTOMATIC) else sched_label
            break
    lost: list[str] = []
    rows = [k for k, s in SCHEDULER_TABLE.items() if s.a1111 == name and s.schedule is None]
    scheduler = rows[0] if rows else COMFY_SAMPLERS.get(name.lower().replace(" karras", ""))
    if scheduler is None:
        lost.append(f"Sampler: {sampler}")
    if sched_label == A1111_AUTOMATIC:
        auto = SCHEDULER_TABLE[scheduler].auto_schedule if scheduler else None
        sched_label = SCHEDULE_TABLE[auto].a1111 if auto else None
    if sched_label is None and name.lower().endswith(" karras"):  # ComfyUI's "dpmpp_2m karras"
        sched_label = "Karras"
    if sched_label is None and scheduler is not None and SCHEDULER_TABLE[scheduler].a1111_sigmas:
        sched_label = "Uniform"  # (LCM's Automatic is its own timesteps: schedule=null, as t2i writes it)
    schedule = labels.get(sched_label) if sched_label else None
    if sched_label and schedule is None:
        lost.append(f"Schedule type: {sched_label}")
    if scheduler is not None and not SCHEDULER_TABLE[scheduler].kdiffusion and not SCHEDULER_TABLE[scheduler].schedules:
        schedule = None  # A1111's timestep samplers ignore the Schedule type its infotext may still carry
    elif scheduler is None and schedule is not None:  # a schedule for the model's own scheduler is a guess
        lost.append(f"Schedule type: {sched_label}")
        schedule = None
    elif schedule is not None and check_pair(scheduler, schedule):
        lost.append(f"Schedule type: {sched_label} with {SCHEDULER_TABLE[scheduler].a1111}")
        schedule = None
    return scheduler, schedule, lost


# A1111/Forge Schedule types that, on a flow-matching model, are the pipeline's own evenly spaced sigmas
FLOW_OWN_SCHEDULES = ("uniform", "sgm_uniform", "simple")  # "Uniform", "Normal", "Simple", "SGM Uniform"


def for_flow(scheduler: str | None, schedule: str | None) -> tuple[str | None, str | None, list[str]]:
    """An imported (A1111, Forge, ComfyUI) sampler on a flow-matching model: those tools call flow Euler "Euler",
    so the SD row becomes the flow row with the same A1111 name, and an evenly spaced schedule is the model's own.
    Returns (scheduler, schedule, what has no equivalent). Only for settings read from elsewhere: a `scheduler=`
    the user writes is checked against the family as written (models/families.check)."""
    if scheduler is None or is_flow(scheduler):
        return scheduler, schedule, []
    label = SCHEDULER_TABLE[scheduler].a1111
    flows = [n for n, s in SCHEDULER_TABLE.items() if is_flow(n) and s.a1111 == label]
    if not flows:
        lost = [f"Sampler: {label}"] + ([f"Schedule type: {SCHEDULE_TABLE[schedule].a1111}"] if schedule else [])
        return None, None, lost
    if schedule in FLOW_OWN_SCHEDULES:
        schedule = None
    if schedule is not None:  # Forge's Karras/Beta on a flow model are its own maths, not checked against ours
        return flows[0], None, [f"Schedule type: {SCHEDULE_TABLE[schedule].a1111} with {label} on a flow model"]
    return flows[0], schedule, []


def a1111_schedule_types() -> dict[str, str]:
    """A1111's Schedule types this runner can run, as its API names them (`karras`, `sgm_uniform`, `automatic`)
    -> its labels (`Karras`, `SGM Uniform`, `Automatic`): what `from_a1111` reads."""
    labels = [A1111_AUTOMATIC, *(s.a1111 for s in SCHEDULE_TABLE.values()), *A1111_SCHEDULE_ALIASES]
    return {label.lower().replace(" ", "_"): label for label in labels if label != "SGMUniform"}
