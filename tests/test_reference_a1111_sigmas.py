"""A1111's sampler x Schedule type sigmas as test vectors (tests/data/a1111_sigma_vectors.json, made by running
A1111 v1.10's `get_sigmas`, `modules/sd_schedulers.py` and k-diffusion on SD1.5's and SDXL's training schedule at
7, 20 and 30 steps; its "source" says how).

Each vector is read as the runner reads A1111's Sampler + Schedule type (`from_a1111`, the same path as
`from_image`, /sdapi/v1/txt2img and `scheduler=`/`schedule=`), built on that model's own scheduler config, and its
step sigmas compared with A1111's to 1e-5 relative (measured: 3.3e-6 at most; the model's float32 training sigmas
differ from A1111's in the last bits: diffusers takes the cumulative product in float32, ldm in float64). A
Schedule type the runner has no equivalent for must be reported as lost, never run as something else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.config.schedulers import SCHEDULER_TABLE, from_a1111
from runner.models.a1111_sigmas import step_sigmas
from runner.models.schedulers import build_scheduler

DOC = json.loads((Path(__file__).parent / "data" / "a1111_sigma_vectors.json").read_text())
VECTORS = DOC["vectors"]
REL = 1e-5
# the models' own scheduler configs (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0)
COMMON = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None}
BASES = {"sd15": ("PNDMScheduler", COMMON),
         "sdxl": ("EulerDiscreteScheduler", {**COMMON, "interpolation_type": "linear", "prediction_type": "epsilon",
                                             "timestep_spacing": "leading", "use_karras_sigmas": False})}
# A1111 Schedule types the runner does not run (from_a1111 reports them; docs/differences-from-a1111.md says why)
UNSUPPORTED = {"KL Optimal", "Align Your Steps", "DDIM"}


def _base(model: str):
    import diffusers

    cls, config = BASES[model]
    return getattr(diffusers, cls).from_config(config)


def test_vector_count() -> None:
    """10 samplers x 12 Schedule types x 3 step counts on 2 models; 540 of them the runner runs."""
    assert len(VECTORS) == 720
    assert {v["steps"] for v in VECTORS} == {7, 20, 30} and {v["model"] for v in VECTORS} == set(BASES)
    assert sum(v["schedule_type"] not in UNSUPPORTED for v in VECTORS) == 540
    # A1111's LCM samples on its own 50-step denoiser (no vectors here)
    assert {v["sampler"] for v in VECTORS} == {r.a1111 for r in SCHEDULER_TABLE.values() if r.kdiffusion} - {"LCM"}


@pytest.mark.parametrize("model", sorted(BASES))
@pytest.mark.slow
def test_runner_sigmas_match_a1111(model: str) -> None:
    """Every supported vector within REL; the mismatches are listed all at once."""
    base, built, bad, checked = _base(model), {}, [], 0
    for v in (v for v in VECTORS if v["model"] == model and v["schedule_type"] not in UNSUPPORTED):
        scheduler, schedule, lost = from_a1111(v["sampler"], v["schedule_type"])
        assert lost == [], (v["sampler"], v["schedule_type"], lost)
        key = (scheduler, schedule)
        if key not in built:
            built[key] = build_scheduler(base, scheduler, schedule)
        got, want = step_sigmas(built[key], v["steps"]), v["sigmas"]
        checked += 1
        worst = max((abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want, strict=False)), default=0.0)
        if len(got) != len(want) or worst > REL:
            bad.append(f"{v['sampler']} / {v['schedule_type']} / {v['steps']}: {scheduler} {schedule} "
                       f"len {len(got)} vs {len(want)}, worst {worst:.2e}")
    assert checked == 270
    assert not bad, f"{len(bad)} of {checked} mismatch:\n" + "\n".join(bad)


@pytest.mark.parametrize("label", sorted(UNSUPPORTED))
def test_unsupported_schedule_types_are_reported_not_replaced(label: str) -> None:
    scheduler, schedule, lost = from_a1111("Euler", label)
    assert (scheduler, schedule) == ("euler", None) and lost == [f"Schedule type: {label}"]


def test_automatic_resolves_like_a1111() -> None:
    """Automatic is each sampler's own option (Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, else the model's
    evenly spaced sigmas): the vectors say which schedule A1111 used."""
    for v in (v for v in VECTORS if v["schedule_type"] == "Automatic"):
        assert from_a1111(v["sampler"], "Automatic")[1] == from_a1111(v["sampler"], v["used"])[1], v["sampler"]


@pytest.mark.parametrize("model", sorted(BASES))
def test_schedule_null_is_a1111_automatic(model: str) -> None:
    """`scheduler=NAME` with no schedule (the CLI, the form, the OpenAI API) steps through A1111's Automatic
    sigmas for that sampler: the same numbers as the "Automatic" vectors."""
    base, names = _base(model), {r.a1111: k for k, r in SCHEDULER_TABLE.items() if r.a1111_sigmas}
    autos = [v for v in VECTORS if v["model"] == model and v["schedule_type"] == "Automatic"]
    assert len(autos) == 30
    for v in autos:
        got = step_sigmas(build_scheduler(base, names[v["sampler"]], None), v["steps"])
        assert len(got) == len(v["sigmas"]), v["sampler"]
        assert all(abs(g - w) <= REL * w for g, w in zip(got, v["sigmas"], strict=True)), (v["sampler"], v["steps"])
