"""Prompt editing, alternation and AND as text: vectors computed by A1111's own code (tests/data/)."""

import json
from pathlib import Path

import pytest

from runner.prompt.schedule import at_step, prompt_schedule, schedule_steps, split_and

DATA = json.loads((Path(__file__).parent / "data" / "a1111_prompt_schedules.json").read_text())


def test_vectors_cover_the_syntax():
    prompts = {c["prompt"] for c in DATA["schedules"]}
    assert len(prompts) >= 100
    assert any(c["hires_steps"] for c in DATA["schedules"]) and any(c["old_scheduling"] for c in DATA["schedules"])
    assert sum(len(c["schedule"]) > 1 for c in DATA["schedules"]) > 150  # most of them do change


@pytest.mark.parametrize("case", DATA["schedules"], ids=lambda c: f"{c['prompt'][:30]}-{c['steps']}-{c['hires_steps']}")
def test_schedule_equals_a1111(case):
    got = prompt_schedule(case["prompt"], case["steps"], case["hires_steps"], case["old_scheduling"])
    assert [list(e) for e in got] == case["schedule"]


@pytest.mark.parametrize("case", DATA["composable"], ids=lambda c: c["prompt"][:30])
def test_composable_weights_equal_a1111(case):
    assert [list(e) for e in split_and(case["prompt"])] == case["subprompts"]


def test_denoiser_call_picks_entry_like_reconstruct_cond_batch():
    sched = prompt_schedule("a [b:c:0.5]", 10)  # [(5, 'a b'), (10, 'a c')]
    assert [sched[at_step(sched, i)][1] for i in range(10)] == ["a b"] * 6 + ["a c"] * 4
    alt = prompt_schedule("[x|y]", 4)  # A1111: call 0 and 1 both read entry 0
    assert [alt[at_step(alt, i)][1] for i in range(4)] == ["x", "x", "y", "x"]


def test_second_order_samplers_schedule_twice_the_steps():
    assert schedule_steps(10, "Heun") == 20 and schedule_steps(10, "DPM++ SDE") == 20
    assert schedule_steps(10, "Euler a") == 10 and schedule_steps(10, None) == 10
