"""Hires. fix with model upscalers (A1111's ESRGAN-class upscalers): found by stem in upscaler_dirs or by path,
pickle files refused without allow_pickle_upscalers, spandrel's absence one line before anything loads, A1111's
upscale loop (native factor until it covers, then Lanczos), loaded once per run, recorded as A1111 names it and
found again by from_image.

spandrel needs torchvision, and PyPI's torchvision for torch 2.13 is the CUDA build, which cannot be imported next
to the CPU torch this project tests with; so the model here is a stand-in for spandrel's loaded model (what
models/upscalers.py `_load` returns: a PIL -> PIL function at the model's native scale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_hires import _from_image, _job, _px
from test_hires_overrides import assert_classified

from runner.common.errors import ConfigError
from runner.config import upscalers as config_upscalers
from runner.config.hires import hires_combos


def fake_4x(im):
    """A stand-in 4x model: nearest 4x, colours inverted (so it cannot pass for a resampler)."""
    from PIL import Image, ImageOps

    return ImageOps.invert(im.convert("RGB").resize((im.width * 4, im.height * 4), resample=Image.NEAREST))


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An upscaler_dirs folder with 4x-Fake.safetensors and 2x-Old.pth; spandrel stands in (see above), and
    every load is counted."""
    import torch
    from safetensors.torch import save_file

    from runner.models import upscalers

    folder = tmp_path / "ESRGAN"
    (folder / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(folder / "4x-Fake.safetensors"))
    torch.save({"w": torch.zeros(1)}, folder / "sub" / "2x-Old.pth")
    loads: list[str] = []

    def load(path: str, device):
        loads.append(path)
        return fake_4x

    monkeypatch.setattr(config_upscalers, "spandrel_problem", lambda: None)
    monkeypatch.setattr(upscalers, "_load", load)
    monkeypatch.setattr(upscalers, "_LOADED", {})
    return folder, loads


def test_a1111_upscale_loop() -> None:
    """A1111's Upscaler.upscale: the model again until the image covers the scale (at most 3 times), then
    Lanczos to the size rounded down to a multiple of 8."""
    from PIL import Image

    from runner.generate.hires import model_upscale

    calls = []

    def twice(im):
        calls.append(im.size)
        return im.resize((im.width * 2, im.height * 2), resample=Image.NEAREST)

    im = Image.linear_gradient("L").convert("RGB").resize((20, 20))
    out = model_upscale(im, 3.0, twice)
    assert calls == [(20, 20), (40, 40)] and out.size == (56, 56)  # 60 rounded down to a multiple of 8
    assert np.array_equal(_px(out), _px(twice(twice(im)).resize((56, 56), resample=Image.LANCZOS)))
    calls.clear()
    assert model_upscale(im, 100.0, twice).size == (2000, 2000) and len(calls) == 3
    calls.clear()
    assert model_upscale(im, 2.0, lambda x: x).size == (40, 40)  # a model that does not scale: once, then Lanczos


def test_found_by_stem_or_path_pickle_by_opt_in(models) -> None:
    folder, _ = models
    (hr,) = hires_combos({"scale": 2, "upscaler": "4x-Fake"}, (str(folder),))
    assert (hr.upscaler, hr.upscaler_file) == ("4x-Fake", str(folder / "4x-Fake.safetensors"))
    (hr,) = hires_combos({"scale": 2, "upscaler": str(folder / "4x-Fake.safetensors")})
    assert (hr.upscaler, hr.upscaler_file) == ("4x-Fake", str(folder / "4x-Fake.safetensors"))
    assert len(hires_combos({"scale": 2, "upscaler": ["Latent", "4x-Fake"]}, (str(folder),))) == 2
    with pytest.raises(ConfigError, match=r"hires.upscaler='2x-Old' is 2x-Old.pth, a pickle file \(it can run code "
                                          r"when loaded\); use a .safetensors file, or set allow_pickle_upscalers"):
        hires_combos({"scale": 2, "upscaler": "2x-Old"}, (str(folder),))
    (hr,) = hires_combos({"scale": 2, "upscaler": "2x-Old"}, (str(folder),), allow_pickle=True)
    assert hr.upscaler_file == str(folder / "sub" / "2x-Old.pth")
    with pytest.raises(ConfigError, match=r"hires.upscaler='4x-Fak' is not known \(did you mean '4x-Fake'\?\); "
                                          r"valid: Latent, .*Nearest, 4x-Fake, 2x-Old, or a model file"):
        hires_combos({"scale": 2, "upscaler": "4x-Fak"}, (str(folder),))
    with pytest.raises(ConfigError, match=r"in upscaler_dirs \(none set\) or its path"):
        hires_combos({"scale": 2, "upscaler": "4x-Fake"})


def test_without_spandrel_one_line_before_loading(models, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.config import validate

    folder, loads = models
    monkeypatch.setattr(config_upscalers, "spandrel_problem", lambda: "No module named 'spandrel'")
    with pytest.raises(ConfigError) as err:
        validate({"model": {"id": "/nonexistent/model"}, "device": "cpu", "upscaler_dirs": [str(folder)],
                  "hires": {"scale": 2, "upscaler": "4x-Fake"}})
    assert str(err.value) == ("hires.upscaler='4x-Fake' is a model upscaler (4x-Fake.safetensors), loaded with "
                              "spandrel, which cannot be imported here (No module named 'spandrel'); pip install "
                              "'t2i-runner[upscale]'")
    assert loads == []


def test_the_second_pass_gets_the_model_upscaled_image(models, tiny_dir: Path) -> None:
    import torch
    from PIL import Image

    from runner.config import validate
    from runner.generate.hires import upscale
    from runner.models.loading import load_model

    folder, loads = models
    pipe = load_model(validate({"model": {"id": str(tiny_dir)}, "device": "cpu"}).model, "cpu").pipe
    side = 32 // pipe.vae_scale_factor
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    file = str(folder / "4x-Fake.safetensors")
    got = upscale(pipe, latents, "4x-Fake", 48, 48, (0, 0), file)
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    for im, first in zip(got, pipe.image_processor.postprocess(decoded.detach(), output_type="pil"), strict=True):
        # 32 -> 128 (covers 48) -> 48 by Lanczos (A1111: Upscaler.upscale, then resize_image's own resize)
        assert np.array_equal(_px(im), _px(fake_4x(first).resize((48, 48), resample=Image.LANCZOS)))
    assert loads == [file]
    upscale(pipe, latents, "4x-Fake", 48, 48, (0, 0), file)
    assert loads == [file]  # loaded once


@pytest.mark.slow
def test_run_records_the_name_and_from_image_finds_it(models, tiny_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from runner.config import validate
    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds
    from runner.models.loading import load_model
    from runner.outputs.metadata import INFOTEXT_KEY
    from runner.run import run

    folder, loads = models
    cfg = {"model": {"id": str(tiny_dir)}, "prompts": ["a red fox"], "seeds": [1, 2], "steps": 2, "width": 32,
           "height": 32, "device": "cpu", "upscaler_dirs": [str(folder)],
           "hires": {"scale": 1.5, "denoise": 0.5, "steps": 2, "upscaler": ["4x-Fake", "Lanczos"]}}
    entries = run(validate(cfg), tmp_path / "first", progress=False).entries
    assert len(entries) == 4 and loads == [str(folder / "4x-Fake.safetensors")]  # once for the run
    by = {(e["seed"], e["hires_upscaler"]): e for e in entries}
    with Image.open(tmp_path / "first" / by[(1, "4x-Fake")]["file"]) as im:
        assert im.size == (48, 48) and "Hires upscaler: 4x-Fake, " in im.info[INFOTEXT_KEY] + ", "
        fake = _px(im)
    assert_classified(tmp_path / "first" / by[(1, "4x-Fake")]["file"])
    with Image.open(tmp_path / "first" / by[(1, "Lanczos")]["file"]) as im:
        assert not np.array_equal(fake, _px(im))
    # each image equals itself generated alone
    pipe = load_model(validate({"model": {"id": str(tiny_dir)}, "device": "cpu"}).model, "cpu").pipe
    (hr,) = hires_combos({"scale": 1.5, "denoise": 0.5, "steps": 2, "upscaler": "4x-Fake"}, (str(folder),))
    together = generate(pipe, [_job("a fox", hr, seed=1, steps=2), _job("a fox", hr, seed=2, steps=2, index=1)],
                        True, PromptEmbeds())
    alone = generate(pipe, [_job("a fox", hr, seed=2, steps=2)], True, PromptEmbeds())
    assert np.array_equal(_px(together[1]), _px(alone[0]))
    (again,) = _from_image(tmp_path / "first" / by[(2, "4x-Fake")]["file"], tmp_path / "again").entries
    assert again["reproduced"]["identical"] is True and again["hires_upscaler"] == "4x-Fake"


def test_from_image_of_an_a1111_image_finds_the_upscaler_by_name(models, tiny_dir: Path, tmp_path: Path) -> None:
    from PIL import Image
    from test_hires import _a1111_png

    folder, loads = models
    img = _a1111_png(tmp_path / "a1111.png", "a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, "
                     "CFG scale: 7, Seed: 3, Size: 32x32, Denoising strength: 0.5, Hires upscale: 1.5, "
                     "Hires steps: 2, Hires upscaler: 4x-Fake, Version: v1.10.1")
    with pytest.raises(ConfigError, match=r"hires.upscaler='4x-Fake' is not known; .* upscaler_dirs \(none set\)"):
        _from_image(img, tmp_path / "none", f"model.id={tiny_dir}")
    (rec,) = _from_image(img, tmp_path / "again", f"model.id={tiny_dir}", f"upscaler_dirs=[{folder}]").entries
    assert rec["hires_upscaler"] == "4x-Fake" and loads == [str(folder / "4x-Fake.safetensors")]
    with Image.open(tmp_path / "again" / rec["file"]) as im:
        assert im.size == (48, 48)
