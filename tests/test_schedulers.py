"""Schedulers and schedule types (A1111's Sampler + Schedule type): the table matches diffusers, every scheduler
runs at 1, 2 and 4 steps on a fresh install, a failing scheduler x steps is refused before the first image, and
A1111 names map onto the same diffusers settings both ways."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runner.config import ConfigError, RunConfig, validate
from runner.config.schedulers import (
    SCHEDULE_TABLE,
    SCHEDULER_TABLE,
    SCHEDULES,
    a1111_names,
    automatic,
    check_pair,
    effective_schedule,
    from_a1111,
    is_flow,
)
from runner.models.schedulers import build_scheduler, dry_run
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.run import run

REPO = Path(__file__).resolve().parent.parent
SIDE = 32


def cfg(tiny_dir: Path, **kw):
    base = {"model": {"id": str(tiny_dir)}, "prompts": ["a red fox"], "seeds": [3], "steps": 2, "width": SIDE,
            "height": SIDE}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), {**base, **kw})


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def base_scheduler(flow: bool = False):
    """The tiny SD model's scheduler (the tiny Flux.1 model's for the flow-matching rows)."""
    import diffusers

    from runner.models.tiny import ensure_tiny

    if flow:
        return diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(ensure_tiny("flux1"), subfolder="scheduler")
    return diffusers.EulerDiscreteScheduler.from_pretrained(ensure_tiny(), subfolder="scheduler")


def test_table_matches_diffusers_signatures() -> None:
    import diffusers

    for name, row in SCHEDULER_TABLE.items():
        cls = getattr(diffusers, row.cls)
        params = set(inspect.signature(cls.__init__).parameters)
        if params >= {"args", "kwargs"} and len(params) <= 3:
            pytest.fail(f"{row.cls} is a dummy: a module it needs ({row.requires}) is not installed")
        assert set(row.options) <= params, name
        diffusers_rows = [s for s in SCHEDULES if not SCHEDULE_TABLE[s].a1111_only]
        if row.cls.startswith("FlowMatch"):  # the pipeline passes its sigmas: a sigma transform, no spacing
            sigma = {s: set(SCHEDULE_TABLE[s].options) - {"timestep_spacing"} for s in diffusers_rows}
            offered = tuple(s for s in diffusers_rows if sigma[s] and sigma[s] <= params)
        else:
            offered = tuple(s for s in diffusers_rows if set(SCHEDULE_TABLE[s].options) <= params)
        if row.a1111_sigmas:  # A1111's formulas, through diffusers' Karras path or set_timesteps (a1111_sigmas.py)
            assert "use_karras_sigmas" in params or name == "euler_a", name
            offered = SCHEDULES
        if row.a1111 in ("DDIM", "PLMS", "UniPC"):  # A1111's timestep samplers ignore the Schedule type
            offered = ()
        assert row.schedules == offered, (name, offered)


def test_every_module_a_scheduler_needs_is_a_declared_dependency() -> None:
    text = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M).group(1)
    names = {m.lower() for m in re.findall(r'^\s*"([A-Za-z0-9_.\-]+)', deps, flags=re.M)}
    needs = {m for r in SCHEDULER_TABLE.values() for m in r.requires} | \
        {m for r in SCHEDULE_TABLE.values() for m in r.requires}
    assert needs and needs <= names, needs - names


@pytest.mark.slow
def test_every_scheduler_and_schedule_pair_runs_its_loop_at_1_2_4_steps() -> None:
    bases = {False: base_scheduler(), True: base_scheduler(flow=True)}
    for name, row in SCHEDULER_TABLE.items():
        for schedule in (None, *row.schedules):
            if check_pair(name, schedule):
                continue
            sched = build_scheduler(bases[is_flow(name)], name, schedule)
            if row.a1111_sigmas:  # A1111's sigmas for the schedule, Automatic's when none is given
                assert type(sched).a1111_schedule == effective_schedule(name, schedule), (name, schedule)
            expect = {**row.options, **(SCHEDULE_TABLE[schedule].options if schedule and not row.a1111_sigmas
                                        else {})}
            for key, value in expect.items():
                if is_flow(name) and key == "timestep_spacing":
                    continue  # a flow pipeline passes its own sigmas: no spacing option (models/schedulers.py)
                assert sched.config[key] == value, (name, schedule, key)
            for steps in (1, 4):  # (1, 2, 4 with the real pipeline below, for every scheduler)
                dry_run(sched, steps)


@pytest.mark.slow
def test_every_scheduler_makes_images_at_1_2_4_steps(tiny_dir: Path, tmp_path: Path) -> None:
    names = [n for n in SCHEDULER_TABLE if not is_flow(n)]  # the flow rows on a flow model, below
    res = run(cfg(tiny_dir, scheduler=names, steps=[1, 2, 4]), tmp_path / "r", progress=False)
    assert res.generated == len(names) * 3
    flow = [n for n in SCHEDULER_TABLE if is_flow(n)]
    res_flow = run(cfg("builtin:tiny-flux1", scheduler=flow, steps=[1, 2, 4]), tmp_path / "f", progress=False)
    assert {(e["scheduler"], e["steps"]) for e in res_flow.entries} == {(n, s) for n in flow for s in (1, 2, 4)}
    by = {(e["scheduler"], e["steps"]): e for e in res.entries}
    assert set(by) == {(n, s) for n in names for s in (1, 2, 4)}
    for e in res.entries:
        assert pixels(tmp_path / "r" / e["file"]).std() > 0, e["file"]
    assert by[("dpmpp_2m_sde", 4)]["scheduler_class"] == "DPMSolverMultistepScheduler"


def test_a_failing_scheduler_and_steps_is_refused_before_the_first_image(tiny_dir: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    from runner.config import schedulers

    # PNDM with its Runge-Kutta warm-up fails below 4 steps in diffusers (a broadcast error mid-sweep before)
    broken = schedulers.Scheduler("PNDMScheduler", "PLMS", {"skip_prk_steps": False},
                                  schedules=schedulers.SPACING_SCHEDULES, kdiffusion=False)
    monkeypatch.setitem(schedulers.SCHEDULER_TABLE, "pndm", broken)
    out = tmp_path / "r"
    with pytest.raises(ConfigError) as err:
        run(cfg(tiny_dir, scheduler=["euler", "pndm"], steps=[4, 1]), out, progress=False)
    msg = str(err.value)
    assert "scheduler=pndm with steps=1 fails" in msg and "use steps >= " in msg and "\n" not in msg
    assert not (out / "manifest.jsonl").exists() and not list(out.glob("*.png"))


@pytest.mark.slow
def test_schedule_is_a_sweep_axis_recorded_and_in_the_infotext(tiny_dir: Path, tmp_path: Path) -> None:
    res = run(cfg(tiny_dir, scheduler=["euler", "dpmpp_2m"], schedule=[None, "karras", "exponential"], steps=4),
              tmp_path / "r", progress=False)
    assert res.generated == 6
    seen = {}
    for e in res.entries:
        rec, text = read_png_record(str(tmp_path / "r" / e["file"]))
        p = parse_infotext(text)
        assert (rec["scheduler"], rec["schedule"]) == (e["scheduler"], e["schedule"])
        # read back as A1111 would: no schedule = the sampler's Automatic, written out (Uniform for Euler)
        want = e["schedule"] or automatic(e["scheduler"])
        assert from_a1111(p["Sampler"], p.get("Schedule type"))[:2] == (e["scheduler"], want)
        seen[(e["scheduler"], e["schedule"])] = pixels(tmp_path / "r" / e["file"])
    # schedule=null is A1111's Automatic: Karras for DPM++ 2M (the same pixels as schedule=karras), and it says so
    plain = next(e for e in res.entries if (e["scheduler"], e["schedule"]) == ("dpmpp_2m", None))
    assert parse_infotext(read_png_record(str(tmp_path / "r" / plain["file"]))[1])["Schedule type"] == "Karras"
    assert np.array_equal(seen[("dpmpp_2m", None)], seen[("dpmpp_2m", "karras")])
    assert not np.array_equal(seen[("euler", None)], seen[("euler", "karras")])
    assert not np.array_equal(seen[("dpmpp_2m", "karras")], seen[("dpmpp_2m", "exponential")])


def test_karras_spans_the_models_whole_sigma_range_like_a1111() -> None:
    base = base_scheduler()
    model_sigmas = ((1 - base.alphas_cumprod) / base.alphas_cumprod) ** 0.5  # A1111's sigma_min/max: t = 0 / 999
    for schedule in ("karras", "exponential", "beta"):
        sched = build_scheduler(base, "dpmpp_2m", schedule)
        sched.set_timesteps(30)
        assert float(sched.sigmas[0]) == pytest.approx(float(model_sigmas[-1]), rel=1e-4), schedule
        assert float(sched.sigmas[-2]) == pytest.approx(float(model_sigmas[0]), rel=1e-4), schedule
    legacy = build_scheduler(base, "dpmpp_2m_karras", None)  # the older name keeps its records' sigmas
    assert legacy.config.use_karras_sigmas and legacy.config.timestep_spacing == base.config.timestep_spacing
    assert a1111_names("dpmpp_2m_karras", None) == a1111_names("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")


@pytest.mark.parametrize(("overrides", "phrase"), [
    ({"scheduler": "lcm", "schedule": "karras"}, "schedule=karras is not available for scheduler=lcm"),
    ({"schedule": "simple"}, "schedule=simple is A1111's formula for its samplers; name one, e.g. scheduler=euler"),
    ({"scheduler": "dpmpp_2m_karras", "schedule": "exponential"}, "use scheduler=dpmpp_2m schedule=exponential"),
    ({"schedule": "karas"}, "did you mean 'karras'"),
])
def test_bad_schedule_is_one_line(tiny_dir: Path, overrides: dict, phrase: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        validate(cfg(tiny_dir, **overrides))


def test_dpmpp_sde_noise_comes_from_each_images_seed(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    kw = {"scheduler": "dpmpp_sde", "schedule": "karras", "seeds": [3, 4], "steps": 3}
    torch.manual_seed(1)
    a = run(cfg(tiny_dir, batch_size=2, **kw), tmp_path / "a", progress=False)
    torch.manual_seed(2)  # the global RNG must not matter
    b = run(cfg(tiny_dir, batch_size=1, **kw), tmp_path / "b", progress=False)
    for ea, eb in zip(sorted(a.entries, key=lambda e: e["seed"]), sorted(b.entries, key=lambda e: e["seed"]),
                      strict=True):
        assert ea["batch_size"] == 2 and eb["batch_size"] == 1
        assert np.array_equal(pixels(tmp_path / "a" / ea["file"]), pixels(tmp_path / "b" / eb["file"]))


A1111_EULER_KARRAS = "a red fox\nSteps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 32x32"


def test_from_image_of_a1111_euler_karras_runs_euler_with_karras_sigmas(tiny_dir: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    img = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", A1111_EULER_KARRAS)
    Image.new("RGB", (SIDE, SIDE)).save(img, pnginfo=info)
    r = run_cli(f"from_image={img}", f"model.id={tiny_dir}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    entry = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert (entry["scheduler"], entry["schedule"], entry["schedule_type"]) == ("euler", "karras", "Karras")
    direct = run(cfg(tiny_dir, scheduler="euler", schedule="karras"), tmp_path / "d", progress=False).entries[0]
    assert np.array_equal(pixels(tmp_path / "again" / entry["file"]), pixels(tmp_path / "d" / direct["file"]))


def test_from_image_warns_in_one_line_for_what_has_no_equivalent(tiny_dir: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    img = tmp_path / "a1111.png"
    info = PngInfo()
    # KL Optimal: an A1111 Schedule type the runner does not have (Euler a takes every one it has, as in A1111)
    info.add_text("parameters", A1111_EULER_KARRAS.replace("Sampler: Euler", "Sampler: Euler a")
                  .replace("Karras", "KL Optimal"))
    Image.new("RGB", (SIDE, SIDE)).save(img, pnginfo=info)
    r = run_cli(f"from_image={img}", f"model.id={tiny_dir}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "no diffusers equivalent" in line]
    assert len(lines) == 1 and "Schedule type: KL Optimal" in lines[0]
    assert "scheduler=euler_a with A1111's Automatic schedule for it" in lines[0]


def test_a1111_names_round_trip() -> None:
    for name, row in SCHEDULER_TABLE.items():
        if row.a1111 is None or row.schedule:  # a combined name reads back as its scheduler + schedule
            continue
        if is_flow(name):  # A1111/Forge label flow samplers as the SD ones ("Euler"): they read back as those
            assert from_a1111(row.a1111, None)[0] == next(k for k, r in SCHEDULER_TABLE.items() if r.a1111 == row.a1111)
            continue
        for schedule in (None, *row.schedules):
            sampler, label = a1111_names(name, schedule)
            got, got_schedule, lost = from_a1111(sampler, label)
            want = effective_schedule(name, schedule)
            assert lost == [] and got_schedule == want, (name, schedule)
            assert SCHEDULER_TABLE[got].cls == row.cls and SCHEDULER_TABLE[got].options == row.options
