"""Our PNGs read by a reader we did not write: `sd-parsers` (PyPI), which reads A1111 infotexts as Civitai-style
tools do. Sampler and schedule names are A1111's own labels, written out here from A1111's tables
(modules/sd_samplers_kdiffusion.py `samplers_k_diffusion`, sd_samplers_timesteps.py, sd_schedulers.py), not taken
from the runner's table."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runner.config import RunConfig
from runner.run import run

sd_parsers = pytest.importorskip("sd_parsers")  # a dev dependency: CI fails on this skip (conftest CI_MAY_SKIP)

# scheduler= / schedule= -> A1111's (Sampler, Schedule type) for the same sampling
A1111 = [
    ("euler_a", None, "Euler a", "Uniform"),  # no schedule: A1111's Automatic for the sampler, said explicitly
    ("euler", "karras", "Euler", "Karras"),
    ("dpmpp_2m", "karras", "DPM++ 2M", "Karras"),
    ("dpmpp_2m", None, "DPM++ 2M", "Karras"),  # A1111's Automatic for DPM++ 2M (its sampler option)
    ("dpmpp_2m_sde", "exponential", "DPM++ 2M SDE", "Exponential"),
    ("ddim", None, "DDIM", None),  # A1111's timestep samplers take no Schedule type
    ("heun", "sgm_uniform", "Heun", "SGM Uniform"),
]


@pytest.fixture(scope="module")
def images(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reader")
    lora = {"source": str(tiny_dir / "loras" / "tiny_kohya.safetensors"), "name": "kohya"}
    made = {}
    for scheduler, schedule, *_ in A1111:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
            "model": {"id": str(tiny_dir)}, "device": "cpu", "prompts": ["a red fox, (snow:1.2)"],
            "negative_prompt": "blurry, lowres", "seeds": [1234], "steps": 3, "width": 32, "height": 48,
            "guidance_scale": 6.5, "clip_skip": 2, "scheduler": scheduler, "schedule": schedule,
            "lora_sets": [[lora]], "lora_scales": [0.7], "grid": {"enabled": False}})
        d = out / f"{scheduler}-{schedule}"
        (entry,) = run(cfg, d, progress=False).entries
        made[(scheduler, schedule)] = (d / entry["file"], entry)
    return made


@pytest.mark.parametrize(("scheduler", "schedule", "sampler", "schedule_type"), A1111)
def test_sd_parsers_reads_what_we_wrote(images: dict, scheduler: str, schedule: str | None, sampler: str,
                                        schedule_type: str | None) -> None:
    path, entry = images[(scheduler, schedule)]
    info = sd_parsers.ParserManager().parse(str(path))
    assert info is not None and info.generator.name == "AUTOMATIC1111", info
    (s,) = info.samplers
    assert s.name == sampler
    assert s.parameters.get("scheduler") == schedule_type, s.parameters
    assert (s.parameters["seed"], s.parameters["steps"], s.parameters["cfg_scale"]) == ("1234", "3", "6.5")
    assert [p.value for p in s.prompts] == ["a red fox, (snow:1.2)"]
    assert [p.value for p in s.negative_prompts] == ["blurry, lowres"]
    assert s.model is not None and s.model.hash == entry["model"]["hash"][:10]
    assert info.metadata["Size"] == "32x48" and info.metadata["Clip skip"] == "2"
