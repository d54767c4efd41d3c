"""Hires. fix overrides of the second pass (A1111 v1.10 txt2img: hr_sampler_name, hr_scheduler): the pass runs
diffusers' img2img with the named scheduler, each image equals itself alone, the infotext says it as A1111 does,
from_image and the A1111 API read it back; bad values are one line before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_fidelity import tiny_sdxl  # noqa: F401 - the SDXL fixture
from test_hires import _a1111_png, _from_image, _job, _px

from runner.common.errors import ConfigError
from runner.config.hires import Hires, record_from_infotext
from runner.outputs.metadata import parse_infotext


def assert_classified(png: Path) -> None:
    """Every key of the image's record is in one of from_image's groups (outputs/record.py)."""
    from runner.outputs.metadata import read_png_record
    from runner.outputs.record import DERIVED, PROVENANCE, SETTINGS, SPECIAL

    rec, _ = read_png_record(str(png))
    assert set(rec) <= {*SETTINGS, *SPECIAL, *DERIVED, *PROVENANCE}, set(rec) - {*SETTINGS, *SPECIAL, *DERIVED,
                                                                                 *PROVENANCE}


@pytest.fixture(scope="module")
def sd(tiny_dir: Path):
    from runner.config import validate
    from runner.models.loading import load_model

    return load_model(validate({"model": {"id": str(tiny_dir)}, "device": "cpu"}).model, "cpu").pipe


def reference(sd, i2i, text_pipe):
    """`a red fox` (seed 3, 3 steps, 32 px) on `sd`, its latents bilinear to 64 px, then `i2i` (2 of 4 steps at
    denoise 0.5) with the prompt encoded by `text_pipe`: diffusers' own calls, as A1111's hires. fix runs."""
    import torch

    from runner.generate.prompt_embeds import PromptEmbeds

    f = sd.vae_scale_factor
    with torch.inference_mode():
        text = PromptEmbeds().call_kwargs(sd, [("a red fox", "blurry")], None, True, (), "a1111")
        lat = sd(**text, num_inference_steps=3, guidance_scale=7.0, width=32, height=32, output_type="latent",
                 generator=[torch.Generator().manual_seed(3)]).images
        up = torch.nn.functional.interpolate(lat, size=(64 // f, 64 // f), mode="bilinear", antialias=False)
        second = PromptEmbeds().call_kwargs(text_pipe, [("a red fox", "blurry")], None, True, (), "a1111")
        return i2i(**second, image=up, strength=(2 + 0.5) / 4, num_inference_steps=4, guidance_scale=7.0,
                   generator=[torch.Generator().manual_seed(3)]).images[0]


def a1111_uniform(alphas_cumprod, n: int):
    """k-diffusion's evenly spaced schedule (A1111's "Uniform", Euler a's Automatic), written out here from
    k-diffusion's `DiscreteSchedule` (not the runner's code): n timesteps from 999 to 0, their sigmas log-linearly
    interpolated in the model's training sigmas, and the timestep each sigma gives the model (`sigma_to_t`)."""
    import torch

    table = ((1 - alphas_cumprod.float()) / alphas_cumprod.float()) ** 0.5
    log_table = table.log()
    t = torch.linspace(len(table) - 1, 0, n)
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    sigmas = ((1 - w) * log_table[lo] + w * log_table[hi]).exp()
    dists = sigmas.log() - log_table[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(table) - 2)
    frac = ((log_table[low] - sigmas.log()) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return sigmas, (1 - frac) * low + frac * (low + 1)


@pytest.mark.slow
def test_hires_sampler_is_diffusers_img2img_with_that_scheduler(sd, tiny_dir: Path) -> None:
    """The second pass with hires.scheduler=euler_a (no hires.schedule, the first pass's Automatic) runs as a first
    pass with euler_a does: A1111's Automatic for Euler a, k-diffusion's evenly spaced sigmas, in diffusers'
    EulerAncestralDiscreteScheduler made from the model's scheduler config; the first pass (the model's own
    scheduler) as before."""
    import numpy as np
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds

    class A1111EulerA(EulerAncestralDiscreteScheduler):
        def set_timesteps(self, num_inference_steps: int, device=None) -> None:
            super().set_timesteps(num_inference_steps, device=device)
            sigmas, t = a1111_uniform(self.alphas_cumprod, num_inference_steps)
            self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
            self.timesteps = t.to(self.timesteps.dtype)

    own = generate(sd, [_job("a red fox", Hires(2.0, 2, 0.5, "Latent"))], True, PromptEmbeds())[0]
    (got,) = generate(sd, [_job("a red fox", Hires(2.0, 2, 0.5, "Latent", scheduler="euler_a"))], True,
                      PromptEmbeds())
    assert not np.array_equal(_px(got), _px(own))
    # "linspace": the first sigma is the whole noise (init_noise_sigma), as in k-diffusion
    sched = A1111EulerA.from_pretrained(str(tiny_dir), subfolder="scheduler", timestep_spacing="linspace")
    ref = reference(sd, StableDiffusionImg2ImgPipeline(**{**sd.components, "scheduler": sched}), sd)
    assert np.array_equal(_px(got), _px(ref))
    # diffusers' own Euler a spacing is another image: the reference tells A1111's sigmas apart
    plain = EulerAncestralDiscreteScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler")
    assert not np.array_equal(_px(got), _px(reference(sd, StableDiffusionImg2ImgPipeline(
        **{**sd.components, "scheduler": plain}), sd)))
    # the first pass's scheduler is left as it was
    assert type(sd.scheduler).__name__ != "EulerAncestralDiscreteScheduler"


@pytest.mark.slow
def test_overrides_batch_equals_each_image_alone(sd) -> None:
    import numpy as np

    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds

    for hr in (Hires(1.5, 2, 0.6, "Lanczos", scheduler="euler_a"), Hires(1.5, 2, 0.6, "Latent", scheduler="euler",
                                                                           schedule="karras")):
        jobs = [_job("a red fox", hr, seed=1), _job("a [red:blue:0.5] fox", hr, seed=2, index=1)]
        together = generate(sd, jobs, True, PromptEmbeds())
        for job, im in zip(jobs, together, strict=True):
            assert np.array_equal(_px(im), _px(generate(sd, [job], True, PromptEmbeds())[0])), (hr, job.prompt)
    plain = generate(sd, [_job("a fox", Hires(1.5, 2, 0.6, "Latent", scheduler="euler"))], True, PromptEmbeds())
    karras = generate(sd, [_job("a fox", Hires(1.5, 2, 0.6, "Latent", scheduler="euler", schedule="karras"))],
                      True, PromptEmbeds())
    assert not np.array_equal(_px(plain[0]), _px(karras[0]))


@pytest.mark.slow
def test_sdxl_hires_sampler(tiny_sdxl: Path) -> None:  # noqa: F811
    import numpy as np

    from runner.config import validate
    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds
    from runner.models.loading import load_model

    xl = load_model(validate({"model": {"id": str(tiny_sdxl)}, "device": "cpu"}).model, "cpu").pipe
    one = generate(xl, [_job("a fox", Hires(2.0, 2, 0.5, "Latent"))], True, PromptEmbeds())[0]
    two = generate(xl, [_job("a fox", Hires(2.0, 2, 0.5, "Latent", scheduler="dpmpp_2m", schedule="karras"))],
                   True, PromptEmbeds())[0]
    assert one.size == two.size == (64, 64) and not np.array_equal(_px(one), _px(two))


@pytest.mark.slow
def test_swept_recorded_as_a1111_writes_it_and_reproduced(tiny_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from runner.config import validate
    from runner.outputs.metadata import INFOTEXT_KEY
    from runner.run import run

    cfg = {"model": {"id": str(tiny_dir)}, "prompts": ["a red fox"], "seeds": [2], "steps": 2, "width": 32,
           "height": 32, "device": "cpu", "scheduler": "euler", "schedule": "uniform",
           "hires": {"scale": 1.5, "denoise": 0.5, "steps": 2, "scheduler": [None, "dpmpp_2m"],
                     "schedule": [None, "karras"]}}
    entries = run(validate(cfg), tmp_path / "first", progress=False).entries
    assert len(entries) == 4
    texts = {}
    for rec in entries:
        with Image.open(tmp_path / "first" / rec["file"]) as im:
            texts[(rec.get("hires_scheduler"), rec.get("hires_schedule"))] = im.info[INFOTEXT_KEY]
    assert "Hires sampler" not in texts[(None, None)] and "Hires schedule type" not in texts[(None, None)]
    assert "Sampler: Euler, Schedule type: Uniform" in texts[("dpmpp_2m", "karras")]
    # A1111's order: Hires sampler with the other init() fields, Hires schedule type last (set while sampling)
    assert "Hires sampler: DPM++ 2M, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent, " \
           "Hires schedule type: Karras" in texts[("dpmpp_2m", "karras")]
    assert "Hires sampler: DPM++ 2M" in texts[("dpmpp_2m", None)] and "Hires schedule" not in texts[("dpmpp_2m", None)]
    assert "Hires sampler" not in texts[(None, "karras")] and "Hires schedule type: Karras" in texts[(None, "karras")]
    assert_classified(tmp_path / "first" / next(e["file"] for e in entries if e.get("hires_scheduler")))
    for rec in entries:
        (again,) = _from_image(tmp_path / "first" / rec["file"], tmp_path / f"again-{rec['index']}").entries
        assert again["reproduced"]["identical"] is True, (rec.get("hires_scheduler"), again["reproduced"])
        assert (again.get("hires_scheduler"), again.get("hires_schedule")) == \
            (rec.get("hires_scheduler"), rec.get("hires_schedule"))


def test_a1111_infotext_hires_sampler_and_schedule_type(tiny_dir: Path, tmp_path: Path) -> None:
    p = parse_infotext("a fox\nSteps: 20, Sampler: Euler, Schedule type: Uniform, CFG scale: 7, Seed: 1, "
                       "Size: 512x512, Denoising strength: 0.5, Hires sampler: DPM++ 2M, Hires upscale: 2, "
                       "Hires upscaler: Latent, Hires schedule type: Karras, Version: v1.10.1")
    assert {k: v for k, v in record_from_infotext(p).items() if "sched" in k} == \
        {"hires_scheduler": "dpmpp_2m", "hires_schedule": "karras"}
    only = parse_infotext("a fox\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 1, Size: 512x512, "
                          "Denoising strength: 0.5, Hires upscale: 2, Hires schedule type: Exponential")
    assert {k: v for k, v in record_from_infotext(only).items() if "sched" in k} == {"hires_schedule": "exponential"}
    img = _a1111_png(tmp_path / "a1111.png", "a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, "
                     "Schedule type: Uniform, CFG scale: 7, Seed: 3, Size: 32x32, Denoising strength: 0.5, "
                     "Hires sampler: DPM++ 2M, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent, "
                     "Hires schedule type: Karras, Version: v1.10.1")
    (rec,) = _from_image(img, tmp_path / "again", f"model.id={tiny_dir}").entries
    assert (rec["scheduler"], rec["hires_scheduler"], rec["hires_schedule"]) == ("euler", "dpmpp_2m", "karras")
    assert (rec["hires_sampler"], rec["hires_schedule_type"]) == ("DPM++ 2M", "Karras")
    # no Hires schedule type: A1111 (processing.py: `hr_scheduler = self.scheduler` when None) ran the second pass
    # on the first pass's Schedule type setting, and left the label out where it is the first pass's
    def second(fields: str) -> dict:
        got = record_from_infotext(parse_infotext(f"a\nSteps: 20, {fields}, Seed: 1, Size: 512x512, "
                                                  "Denoising strength: 0.5, Hires upscale: 2"))
        return {k: v for k, v in got.items() if "sched" in k or k == "no_equivalent"}

    assert second("Sampler: Euler, Schedule type: Karras") == {}  # Karras in both passes
    assert second("Sampler: DPM++ 2M, Schedule type: Karras") == {}
    assert second("Sampler: DPM++ 2M Karras") == {}  # before 1.9: the name's schedule, in both passes
    assert second("Sampler: Euler a") == {}
    assert second("Sampler: DPM++ 2M, Schedule type: Exponential, Hires sampler: Euler a") == \
        {"hires_scheduler": "euler_a"}  # Euler a on the first pass's Exponential
    # Euler a runs A1111's Karras sigmas as A1111 does
    assert second("Sampler: Euler, Schedule type: Karras, Hires sampler: Euler a, Hires schedule type: Karras") == \
        {"hires_scheduler": "euler_a", "hires_schedule": "karras"}
    # A1111's LCM takes Karras sigmas, diffusers' LCMScheduler does not: said, and the pass runs LCM as a first pass
    # with it does (its Automatic: its own timesteps), not the first pass's Karras
    assert second("Sampler: Euler, Schedule type: Karras, Hires sampler: LCM, Hires schedule type: Karras") == \
        {"hires_scheduler": "lcm", "no_equivalent": ["Hires schedule type: Karras with LCM"]}
    assert Hires(2, 0, 0.5, "Latent", scheduler="lcm").second_scheduler("euler", "karras") == ("lcm", None)


@pytest.mark.parametrize(("cfg", "words"), [
    ({"hires": {"scale": 2, "scheduler": "eulr_a"}}, r"hires.scheduler='eulr_a' is not known \(did you mean "
                                                     r"'euler_a'\?\); valid: null \(the first pass's\), "),
    ({"hires": {"scale": 2, "schedule": "karas"}}, r"hires.schedule='karas' is not known \(did you mean 'karras'"),
    ({"scheduler": "dpmpp_2m_karras", "hires": {"scale": 2, "schedule": "exponential"}},
     r"the hires. fix pass runs scheduler=dpmpp_2m_karras schedule=exponential \(hires.scheduler=None, "
     r"hires.schedule=exponential; null = the first pass's\): scheduler=dpmpp_2m_karras already means"),
    ({"scheduler": "euler", "hires": {"scale": 2, "scheduler": "ddim", "schedule": "karras"}},
     r"the hires. fix pass runs scheduler=ddim schedule=karras .*A1111 ignores the Schedule type"),
    ({"scheduler": "euler", "schedule": "karras", "hires": {"scale": 2, "scheduler": "lcm", "schedule": "karras"}},
     r"the hires. fix pass runs scheduler=lcm schedule=karras .*: schedule=karras is not available for "
     r"scheduler=lcm \(LCMScheduler\); valid: uniform, sgm_uniform$"),
])
def test_bad_overrides_are_one_line_before_loading(cfg: dict, words: str) -> None:
    from runner.config import validate

    with pytest.raises(ConfigError, match=words) as err:
        validate({"model": {"id": "/nonexistent/model"}, "device": "cpu", **cfg})
    assert "\n" not in str(err.value)


def test_a1111_api_hires_fields() -> None:
    from runner.server.a1111 import Txt2ImgRequest, hires_fields
    from runner.server.forms import FormError

    def fields(**kw) -> dict:
        return hires_fields(Txt2ImgRequest(prompt="a fox", enable_hr=True, **kw))

    assert "scheduler" not in fields(hr_sampler_name="Use same sampler", hr_scheduler="Use same scheduler")
    # no hr_scheduler: the first pass's Schedule type setting (A1111's processing.py), so no override
    assert "schedule" not in fields(sampler_name="Euler", scheduler="Karras", hr_sampler_name="DPM++ 2M")
    assert "schedule" not in fields(sampler_name="Euler", scheduler="Karras")
    # LCM's Automatic is its own timesteps (as a first pass with scheduler=lcm runs): no schedule to name
    assert "schedule" not in fields(sampler_name="Euler", scheduler="Karras", hr_sampler_name="LCM")
    assert fields(sampler_name="DPM++ 2M", scheduler="Exponential", hr_scheduler="Automatic")["schedule"] == "karras"
    got = fields(hr_sampler_name="DPM++ 2M", hr_scheduler="Karras", hr_prompt="a blue fox")
    assert (got["scheduler"], got["schedule"], got["prompt"]) == ("dpmpp_2m", "karras", "a blue fox")
    assert fields(hr_sampler_name="euler_a", hr_scheduler="exponential")["scheduler"] == "euler_a"
    # "Automatic": the hires sampler's own default (A1111's sampler config), Karras for DPM++ 2M
    assert fields(hr_sampler_name="DPM++ 2M", hr_scheduler="Automatic")["schedule"] == "karras"
    # model upscalers: by name among the server's upscaler_dirs (never a path)
    assert hires_fields(Txt2ImgRequest(enable_hr=True, hr_upscaler="4x-Fake"), ("4x-Fake",))["upscaler"] == "4x-Fake"
    for kw, words in [({"hr_sampler_name": "DPM adaptive"}, "hr_sampler_name='DPM adaptive' is not available"),
                      ({"hr_upscaler": "/etc/4x.pth"}, "hr_upscaler='/etc/4x.pth' is not available on this server; "
                                                       "valid: Latent, "),
                      ({"hr_scheduler": "Karas"}, "hr_scheduler='Karas' is not available on this server (did you "
                                                  "mean 'Karras'?)")]:
        with pytest.raises(FormError, match=words.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            fields(**kw)


@pytest.fixture(scope="module")
def other_sd(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny SD1.5 model: the tiny model with its UNet and text encoder weights moved."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("other") / "other"
    pipe.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_hires_checkpoint_is_img2img_of_that_model(sd, tiny_dir: Path, other_sd: Path) -> None:
    """The second pass with hires.model is diffusers' img2img with that model's components and its own text
    encoding (A1111 computes the hires conds after loading the Hires checkpoint), on the first model's latents."""
    import numpy as np
    from diffusers import StableDiffusionImg2ImgPipeline

    from runner.config import validate
    from runner.generate.batch import generate
    from runner.generate.prompt_embeds import PromptEmbeds
    from runner.models.hires_model import hires_model_infos, load_hires_models
    from runner.models.loading import load_model

    spec = validate({"model": {"id": str(tiny_dir)}, "device": "cpu", "hires": {"scale": 2, "model": str(other_sd)}})
    loaded = load_model(spec.model, "cpu")
    # the model's own scheduler in the first pass (the reference's), whatever an earlier test switched the
    # process-cached pipeline to
    loaded.use_scheduler(None)
    load_hires_models(loaded, spec, hires_model_infos(spec, loaded.info))
    other = loaded.pipe._t2i_hires_models[str(other_sd)].pipe
    hr = Hires(2.0, 2, 0.5, "Latent", model=str(other_sd))
    (got,) = generate(sd, [_job("a red fox", hr)], True, PromptEmbeds())
    own = generate(sd, [_job("a red fox", Hires(2.0, 2, 0.5, "Latent"))], True, PromptEmbeds())[0]
    assert not np.array_equal(_px(got), _px(own))
    assert np.array_equal(_px(got), _px(reference(sd, StableDiffusionImg2ImgPipeline(**other.components), other)))
    # a batch with it: each image equals itself alone
    jobs = [_job("a red fox", hr, seed=1), _job("a [red:blue:0.5] fox", hr, seed=2, index=1)]
    for job, im in zip(jobs, generate(sd, jobs, True, PromptEmbeds()), strict=True):
        assert np.array_equal(_px(im), _px(generate(sd, [job], True, PromptEmbeds())[0]))


@pytest.mark.slow
def test_hires_checkpoint_recorded_and_reproduced(tiny_dir: Path, other_sd: Path, tmp_path: Path) -> None:
    from PIL import Image

    from runner.config import validate
    from runner.models import loading
    from runner.outputs.metadata import INFOTEXT_KEY
    from runner.run import run

    before = loading.LOADS[str(other_sd)]
    cfg = {"model": {"id": str(tiny_dir)}, "prompts": ["a red fox"], "seeds": [2, 3], "steps": 2, "width": 32,
           "height": 32, "device": "cpu", "hires": {"scale": 1.5, "denoise": 0.5, "steps": 2,
                                                     "model": [None, str(other_sd)]}}
    entries = run(validate(cfg), tmp_path / "first", progress=False).entries
    assert len(entries) == 4 and loading.LOADS[str(other_sd)] - before <= 1  # loaded once (or already)
    rec = next(e for e in entries if e.get("hires_model") and e["seed"] == 2)
    assert rec["hires_model"]["location"] == str(other_sd) and len(rec["hires_model"]["hash"]) == 64
    with Image.open(tmp_path / "first" / rec["file"]) as im:
        text = im.info[INFOTEXT_KEY]
    assert f"Denoising strength: 0.5, Hires checkpoint: other [{rec['hires_model']['hash'][:10]}], Hires upscale" \
        in text
    assert_classified(tmp_path / "first" / rec["file"])
    plain = next(e for e in entries if not e.get("hires_model") and e["seed"] == 2)
    with Image.open(tmp_path / "first" / plain["file"]) as im:
        assert "Hires checkpoint" not in im.info[INFOTEXT_KEY]
    (again,) = _from_image(tmp_path / "first" / rec["file"], tmp_path / "again").entries
    assert again["reproduced"]["identical"] is True and again["hires_model"] == rec["hires_model"]


def test_from_image_refuses_a_changed_hires_checkpoint(tiny_dir: Path, other_sd: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from runner.config import validate
    from runner.run import run

    other = tmp_path / "other"
    shutil.copytree(other_sd, other)
    cfg = {"model": {"id": str(tiny_dir)}, "prompts": ["a red fox"], "seeds": [2], "steps": 2, "width": 32,
           "height": 32, "device": "cpu", "hires": {"scale": 1.5, "denoise": 0.5, "steps": 2, "model": str(other)}}
    (rec,) = run(validate(cfg), tmp_path / "first", progress=False).entries
    (weights,) = (other / "unet").glob("*.safetensors")
    state = load_file(str(weights))
    key = next(iter(state))
    save_file({**state, key: state[key] + torch.ones_like(state[key])}, str(weights))
    with pytest.raises(ConfigError, match=rf"hires.model {other} is not the one .* was made with \(sha256 "
                                          rf"{rec['hires_model']['hash'][:12]}…\); pass strict=false"):
        _from_image(tmp_path / "first" / rec["file"], tmp_path / "again")


def test_hires_checkpoint_refusals(tiny_dir: Path, tiny_sdxl: Path, tmp_path: Path) -> None:  # noqa: F811
    from runner.config import validate
    from runner.run import run

    base = {"model": {"id": str(tiny_dir)}, "prompts": ["a fox"], "steps": 2, "width": 32, "height": 32,
            "device": "cpu"}
    with pytest.raises(ConfigError, match=rf"hires.model='{tiny_sdxl}' is a Stable Diffusion XL model, the first "
                                          rf"pass's '{tiny_dir}' a Stable Diffusion 1.x/2.x one; the hires. fix pass "
                                          "needs a model of the same family"):
        run(validate({**base, "hires": {"scale": 2, "model": str(tiny_sdxl)}}), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="hires.model: model.id='/nowhere/model' does not exist"):
        run(validate({**base, "hires": {"scale": 2, "model": "/nowhere/model"}}), tmp_path / "b", progress=False)
    lora = {"source": str(tiny_dir / "loras" / "tiny_kohya.safetensors"), "scale": 1.0}
    with pytest.raises(ConfigError, match="with LoRAs: this runner applies LoRAs to the first pass's model only"):
        run(validate({**base, "lora_sets": [[lora]], "hires": {"scale": 2, "model": str(tiny_dir)}}),
            tmp_path / "c", progress=False)
    assert not any((tmp_path / d).glob("*.png") for d in "abc" if (tmp_path / d).exists())


def test_a_first_pass_schedule_the_hires_sampler_cannot_run_is_its_own() -> None:
    assert Hires(2, 0, 0.5, "Latent", scheduler="ddim").second_scheduler("euler", "karras") == ("ddim", None)
    assert Hires(2, 0, 0.5, "Latent", scheduler="lcm").second_scheduler("euler", "karras") == ("lcm", None)
    # a schedule the hires sampler runs is the first pass's ("Use same scheduler"); none: its own Automatic
    assert Hires(2, 0, 0.5, "Latent", scheduler="euler_a").second_scheduler("euler", "karras") == \
        ("euler_a", "karras")
    assert Hires(2, 0, 0.5, "Latent", scheduler="dpmpp_2m").second_scheduler("euler", None) == ("dpmpp_2m", None)
    assert Hires(2, 0, 0.5, "Latent", scheduler="dpmpp_2m").second_scheduler("euler", "karras") == \
        ("dpmpp_2m", "karras")
    assert Hires(2, 0, 0.5, "Latent").second_scheduler("euler", "karras") == ("euler", "karras")


@pytest.mark.slow
def test_doc_commands(tiny_dir: Path, other_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/a1111-features.md's Hires checkpoint and model upscaler commands, in-process (the upscaler: a stand-in
    for spandrel's model, see tests/test_hires_upscalers.py), with the placeholders made here."""
    import re
    import shlex

    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from test_hires_upscalers import fake_4x

    from runner.config import upscalers as config_upscalers
    from runner.config import validate
    from runner.models import upscalers
    from runner.outputs.metadata import INFOTEXT_KEY
    from runner.run import run
    from runner.server.app import compose_config

    page = (Path(__file__).resolve().parent.parent / "docs" / "a1111-features.md").read_text(encoding="utf-8")
    block = page.split("<!-- docs-test: covered-by tests/test_hires_overrides.py::test_doc_commands -->")[1]
    lines = [ln for ln in re.search(r"```bash\n(.*?)```", block, flags=re.S).group(1).splitlines() if ln.strip()]
    assert len(lines) == 2
    esrgan = tmp_path / "models" / "ESRGAN"
    esrgan.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(esrgan / "4x-UltraSharp.safetensors"))
    monkeypatch.setattr(config_upscalers, "spandrel_problem", lambda: None)
    monkeypatch.setattr(upscalers, "_load", lambda path, device: fake_4x)
    texts = []
    for i, line in enumerate(lines):
        line = line.replace("/path/to/models/ESRGAN", str(esrgan)).replace("/path/to/other-model", str(other_sd))
        line = line.replace("/path/to/model", str(tiny_dir))
        argv = shlex.split(line, comments=True)
        assert argv[0] == "t2i" and line.endswith("# -> 1 image")
        (rec,) = run(validate(compose_config([*argv[1:], "device=cpu"])), tmp_path / f"run{i}",
                     progress=False).entries
        with Image.open(tmp_path / f"run{i}" / rec["file"]) as im:
            assert im.size == (64, 64)
            texts.append(im.info[INFOTEXT_KEY])
    assert re.search(r"Hires checkpoint: other \[[0-9a-f]{10}\]", texts[0])
    assert "Hires upscaler: 4x-UltraSharp" in texts[1]
