"""Hires. fix: sizes against vectors computed by A1111's processing.py, the second pass on the tiny SD1.5 and SDXL
models, records/infotext as A1111 writes them, from_image of A1111 hires images (new and pre-1.0 forms)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.common.errors import ConfigError
from runner.config.hires import (
    Hires,
    hires_combos,
    old_first_pass,
    record_from_infotext,
    second_pass_steps,
    target_size,
)
from runner.outputs.metadata import parse_infotext

DATA = json.loads((Path(__file__).parent / "data" / "a1111_hires_sizes.json").read_text())


def test_target_sizes_equal_a1111() -> None:
    assert len(DATA["target"]) >= 100
    for c in DATA["target"]:
        tw, th, tx, ty = target_size(c["width"], c["height"], c["scale"], c["resize_x"], c["resize_y"])
        assert [c["width"], c["height"], tw, th, tx, ty] == c["result"], c


def test_old_first_pass_sizes_equal_a1111() -> None:
    for c in DATA["old_first_pass"]:
        assert list(old_first_pass(c["width"], c["height"])) == c["first_pass"], c


@pytest.mark.parametrize(("steps", "denoise"), [(10, 0.7), (20, 0.35), (4, 1.0), (15, 0.5), (7, 0.33), (30, 0.05)])
def test_second_pass_runs_exactly_hires_steps(steps: int, denoise: float) -> None:
    total, strength = second_pass_steps(steps, denoise)
    assert total == int(steps / min(denoise, 0.999))  # A1111's setup_img2img_steps
    assert min(int(total * strength), total) == steps  # what diffusers' img2img get_timesteps runs


def test_sweepable_keys_and_bad_values() -> None:
    combos = hires_combos({"scale": [1.5, 2], "denoise": [0.3, 0.6], "upscaler": ["Latent", "Lanczos"], "steps": 0})
    assert len(combos) == 8 and all(isinstance(c, Hires) for c in combos)
    assert hires_combos({"scale": None}) == (None,)
    with pytest.raises(ConfigError, match=r"hires.upscaler='Lanczoz' is not known \(did you mean 'Lanczos'\?\)"):
        hires_combos({"scale": 2, "upscaler": "Lanczoz"})
    with pytest.raises(ConfigError, match="hires.denoise=1.5 is out of range"):
        hires_combos({"scale": 2, "denoise": 1.5})


def test_infotext_of_a1111_hires_images() -> None:
    new = parse_infotext("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, "
                         "Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent "
                         "(nearest-exact), Version: v1.10.1")
    assert record_from_infotext(new) == {"hires_scale": 1.5, "hires_steps": 10, "hires_denoise": 0.45,
                                         "hires_upscaler": "Latent (nearest-exact)"}
    resize = parse_infotext("a fox\nSteps: 20, Seed: 1, Size: 512x512, Denoising strength: 0.7, "
                            "Hires resize: 1024x0, Hires upscaler: Lanczos, Version: v1.6.0")
    assert record_from_infotext(resize)["hires_resize"] == [1024, 0]
    old = parse_infotext("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x768, "
                         "Denoising strength: 0.7, First pass size: 0x0")
    assert record_from_infotext(old) == {"hires_scale": 1.0, "hires_steps": 0, "hires_denoise": 0.7,
                                              "hires_upscaler": "Latent", "width": 640, "height": 448,
                                              "hires_resize": [1024, 768]}
    assert record_from_infotext(parse_infotext("a\nSteps: 20, Seed: 1, Size: 512x512, Model: x")) == {}
