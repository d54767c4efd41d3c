"""Schedule types A1111 ignores (issue 24, item 6): its timestep samplers (DDIM, PLMS, UniPC;
`modules/sd_samplers_timesteps.py`) take no Schedule type. A config naming one is refused with one line; an
A1111 infotext or API request carrying one is read as A1111 reads it (ignored)."""

from __future__ import annotations

import pytest

from runner.common.errors import ConfigError
from runner.config import validate
from runner.config.schedulers import check_pair, from_a1111


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "unipc"])
@pytest.mark.parametrize("schedule", ["uniform", "karras", "sgm_uniform"])
def test_config_refuses_a_schedule_for_a_timestep_sampler(scheduler: str, schedule: str) -> None:
    why = check_pair(scheduler, schedule)
    assert why and "A1111 ignores the Schedule type" in why and "\n" not in why
    with pytest.raises(ConfigError, match="A1111 ignores the Schedule type"):
        validate({"model": {"id": "tiny"}, "scheduler": scheduler, "schedule": schedule})


@pytest.mark.parametrize(("sampler", "label", "scheduler"), [
    ("DDIM", "Karras", "ddim"), ("PLMS", "Exponential", "pndm"), ("UniPC", "Automatic", "unipc"),
    ("UniPC", None, "unipc")])
def test_a1111_schedule_type_is_ignored_for_timestep_samplers(sampler: str, label: str | None, scheduler: str) -> None:
    assert from_a1111(sampler, label) == (scheduler, None, [])


def test_kdiffusion_samplers_keep_their_schedule_type() -> None:
    assert from_a1111("Euler", "Karras") == ("euler", "karras", [])
    assert check_pair("euler", "karras") is None
