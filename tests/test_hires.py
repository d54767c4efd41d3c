"""Hires. fix: sizes against vectors computed by A1111's processing.py, the second pass on the tiny SD1.5 and SDXL
models, records/infotext as A1111 writes them, from_image of A1111 hires images (new and pre-1.0 forms)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fidelity import tiny_sdxl  # noqa: F401 - the SDXL fixture

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


def _job(prompt: str, hires: Hires | None, seed: int = 3, steps: int = 3, index: int = 0, size: int = 32):
    from runner.plan import ImageJob

    return ImageJob(index, prompt, "blurry", seed, steps, 7.0, size, size, None, 0, (), None, prompt_syntax="a1111",
                    hires=hires)


def _px(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def sd(tiny_dir: Path):
    from runner.config import validate
    from runner.models.loading import load_model

    return load_model(validate({"model": {"id": str(tiny_dir)}, "device": "cpu"}).model, "cpu").pipe


def test_second_pass_is_diffusers_img2img_on_the_upscaled_latents(sd) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds

    hr = Hires(2.0, 2, 0.5, "Latent (bicubic)")
    (got,) = generate(sd, [_job("a red fox", hr)], True, PromptEmbeds())
    f = sd.vae_scale_factor
    assert got.size == (64, 64) and got.info["first_pass"] == (32, 32)
    with torch.inference_mode():
        text = PromptEmbeds().call_kwargs(sd, [("a red fox", "blurry")], None, True, (), "a1111")
        lat = sd(**text, num_inference_steps=3, guidance_scale=7.0, width=32, height=32, output_type="latent",
                 generator=[torch.Generator().manual_seed(3)]).images
        up = torch.nn.functional.interpolate(lat, size=(64 // f, 64 // f), mode="bicubic", antialias=False)
        i2i = StableDiffusionImg2ImgPipeline(**sd.components)
        ref = i2i(**text, image=up, strength=(2 + 0.5) / 4, num_inference_steps=4, guidance_scale=7.0,
                  generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.array_equal(_px(got), _px(ref))


@pytest.mark.slow
def test_hires_batch_equals_each_image_alone_and_pixel_upscalers(sd) -> None:
    import numpy as np

    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds

    for up in ("Latent", "Lanczos", "Nearest"):
        hr = Hires(1.5, 2, 0.6, up)
        jobs = [_job("a red fox", hr, seed=1), _job("a [red:blue:0.5] fox", hr, seed=2, index=1),
                _job("a fox AND snow:0.5", hr, seed=3, index=2)]
        together = generate(sd, jobs, True, PromptEmbeds())
        assert {im.size for im in together} == {(48, 48)}
        for job, im in zip(jobs, together, strict=True):
            assert np.array_equal(_px(im), _px(generate(sd, [job], True, PromptEmbeds())[0])), (up, job.prompt)
    one = generate(sd, [_job("a red fox", Hires(1.5, 2, 0.6, "Lanczos"))], True, PromptEmbeds())[0]
    other = generate(sd, [_job("a red fox", Hires(1.5, 2, 0.6, "Nearest"))], True, PromptEmbeds())[0]
    assert not np.array_equal(_px(one), _px(other))


@pytest.mark.slow
def test_sdxl_hires_and_resize(tiny_sdxl: Path) -> None:  # noqa: F811
    from runner.config import validate
    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds
    from runner.models.loading import load_model

    xl = load_model(validate({"model": {"id": str(tiny_sdxl)}, "device": "cpu"}).model, "cpu").pipe
    (im,) = generate(xl, [_job("a [red:blue:2] fox", Hires(2.0, 2, 0.5, "Latent"))], True, PromptEmbeds())
    assert im.size == (64, 64)
    (im,) = generate(xl, [_job("a fox", Hires(1.0, 2, 0.5, "Lanczos", resize_x=48))], True, PromptEmbeds())
    assert im.size == (48, 48)


def _a1111_png(path: Path, text: str) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def _from_image(img: Path, out: Path, *extra: str):
    from runner.config.overrides import CONF_DIR
    from runner.reproduce.from_image import prepare
    from runner.run import run
    from runner.server.app import compose_config

    overrides = [f"from_image={img}", "device=cpu", *extra]
    return run(prepare(compose_config(overrides), overrides, CONF_DIR), out, progress=False)


@pytest.mark.parametrize(("fields", "size", "first", "hires"), [
    ("Size: 32x32, Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic), "
     "Version: v1.10.1", (48, 48), (32, 32), {"hires_scale": 1.5, "hires_steps": 2, "hires_denoise": 0.5,
                                              "hires_upscaler": "Latent (bicubic)"}),
    ("Size: 32x48, Denoising strength: 0.6, Hires resize: 64x0, Hires upscaler: Lanczos, Version: v1.6.0",
     (64, 96), (32, 48), {"hires_resize": [64, 0], "hires_upscaler": "Lanczos", "hires_denoise": 0.6}),
    ("Size: 64x64, Denoising strength: 0.6, First pass size: 32x32", (64, 64), (32, 32),
     {"hires_resize": [64, 64], "hires_upscaler": "Latent"}),
])
def test_from_image_of_a1111_hires_images(tiny_dir: Path, tmp_path: Path, fields: str, size: tuple, first: tuple,
                                          hires: dict) -> None:
    from PIL import Image

    img = _a1111_png(tmp_path / "a1111.png", "a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, "
                     f"CFG scale: 7, Seed: 3, {fields}")
    result = _from_image(img, tmp_path / "again", f"model.id={tiny_dir}")
    (rec,) = result.entries
    with Image.open(tmp_path / "again" / rec["file"]) as im:
        assert im.size == size
    assert (rec["width"], rec["height"]) == first and {k: rec.get(k) for k in hires} == hires


def test_from_image_of_our_hires_image_is_identical(tiny_dir: Path, tmp_path: Path) -> None:
    from runner.config import validate
    from runner.run import run

    cfg = {"model": {"id": str(tiny_dir)}, "prompts": ["a [red:blue:0.5] fox"], "seeds": [2], "steps": 2,
           "width": 32, "height": 32, "device": "cpu", "hires": {"scale": 1.5, "denoise": 0.4, "steps": 2,
                                                                  "upscaler": "Nearest", "prompt": "a blue fox"}}
    (rec,) = run(validate(cfg), tmp_path / "first", progress=False).entries
    assert "Hires prompt: a blue fox" in (tmp_path / "first" / rec["file"]).read_bytes().decode("latin-1")
    (again,) = _from_image(tmp_path / "first" / rec["file"], tmp_path / "again").entries
    assert again["reproduced"]["identical"] is True, again["reproduced"]
