"""A1111's SDXL Refiner (issue 25): `refiner.model` takes over sampling at `refiner.switch_at`, at the step A1111's
`apply_refiner` switches; loaded once, swept in a grid, recorded and written as A1111 writes it, read back by
from_image (ours and A1111's), the A1111 API and sd-parsers; bad values refused in one line before loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_fidelity import tiny_sdxl  # noqa: F401 - another SDXL base (the refiner of one test)

from runner.common.errors import ConfigError
from runner.config import validate
from runner.run import run

BASE = "builtin:tiny-sdxl"
REFINER = "builtin:tiny-sdxl-refiner"
CFG = {"model": {"id": BASE}, "steps": 4, "width": 32, "height": 32, "device": "cpu", "prompts": ["a red fox"],
       "seeds": [3], "grid": {"enabled": False}}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def a1111_switch_call(scheduler, steps: int, switch_at: float) -> int:
    """The denoiser call A1111 switches to the refiner at, by its own rule (modules/sd_samplers_common.py,
    apply_refiner): the index of the LDM sigma table entry nearest the call's sigma (the table from SDXL's
    scaled-linear betas, 0.00085 to 0.012, as ldm's DDPM builds it), `(999 - t) / 1000` in torch, and the switch
    once that is not below switch_at. -1: never."""
    import torch

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
    model_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps)
    for i, sigma in enumerate(sched.sigmas[:-1]):  # the last sigma (0) is never a model call
        timestep = torch.argmin(torch.abs(model_sigmas - sigma))
        completed_ratio = (999 - timestep) / 1000
        if not completed_ratio < switch_at:
            return i
    return -1


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], list[dict]]:
    """No refiner, and two prompts (one batch) refined from 0.5 and 0.8, switch_at the grid's x axis: (out,
    entries, plain)."""
    from runner.models import refiner

    out = tmp_path_factory.mktemp("refiner")
    plain = run(validate(CFG), out / "plain", progress=False).entries
    before = dict(refiner.LOADS)
    cfg = {**CFG, "prompts": ["a red fox", "a blue whale"], "refiner": {"model": REFINER, "switch_at": [0.5, 0.8]},
           "grid": {"enabled": True, "x": "refiner_switch_at", "y": "prompt"}}
    result = run(validate(cfg), out / "refined", progress=False)
    loads = {k: v - before.get(k, 0) for k, v in refiner.LOADS.items() if v != before.get(k, 0)}
    assert list(loads.values()) == [1]  # loaded once for the run (four images, two switch points)
    return out, result.entries, plain


def test_refiner_takes_over_where_a1111_does_and_changes_pixels(sweep) -> None:
    from runner.models.loading import load_model

    out, entries, plain = sweep
    assert len(entries) == 4
    scheduler = load_model(validate(CFG).model, "cpu").base_scheduler
    for e in entries:
        assert e["refiner_switch_call"] == a1111_switch_call(scheduler, 4, e["refiner_switch_at"])
    assert {e["refiner_switch_at"]: e["refiner_switch_call"] for e in entries} == {0.5: 2, 0.8: 3}
    images = {(e["prompt"], e["refiner_switch_at"]): pixels(out / "refined" / e["file"]) for e in entries}
    alone = pixels(out / "plain" / plain[0]["file"])
    fox = "a red fox"
    assert not np.array_equal(images[(fox, 0.5)], alone) and not np.array_equal(images[(fox, 0.8)], alone)
    assert not np.array_equal(images[(fox, 0.5)], images[(fox, 0.8)])
    assert list((out / "refined" / "grids").glob("*.png"))  # switch_at across, prompts down
    from runner.models.refiner import _CACHE  # the tiny refiner's VAE weights are the base's: one VAE object

    assert {tuple(r.shared) for r in _CACHE.values() if r.info.source.location == REFINER} == {("vae",)}


def test_a1111_rule_on_other_samplers_and_step_counts() -> None:
    """The switch step of the Karras / multistep / timestep samplers equals A1111's rule on the same sigmas."""
    from runner.generate.refiner import switch_step
    from runner.models.loading import load_model
    from runner.models.schedulers import build_scheduler

    base = load_model(validate(CFG).model, "cpu").base_scheduler
    for name, schedule in ((None, None), ("dpmpp_2m", "karras"), ("euler", "karras"), ("dpmpp_2m", None)):
        sched = build_scheduler(base, name, schedule)
        for steps in (4, 9, 20, 25):
            for at in (0.3, 0.5, 0.8, 0.85):
                ours = switch_step(sched, steps, at)
                assert (-1 if ours is None else ours) == a1111_switch_call(sched, steps, at), (name, steps, at)
    # diffusers' own split (`denoising_end`) cuts at t >= round(1000 - 1000 * switch_at): a fractional Karras
    # timestep just under 500 falls on the refiner's side there (docs/differences-from-a1111.md)
    karras = build_scheduler(base, "euler", "karras")
    karras.set_timesteps(25)
    split = sum(1 for t in karras.timesteps if t >= round(1000 - 1000 * 0.5))
    assert (switch_step(karras, 25, 0.5), split) == (12, 11)


def test_infotext_record_and_sd_parsers(sweep) -> None:
    from runner.outputs.metadata import read_png_record

    sd_parsers = pytest.importorskip("sd_parsers")
    out, entries, _ = sweep
    e = entries[0]
    rec, text = read_png_record(str(out / "refined" / e["file"]))
    short = f"tiny-sdxl-refiner [{rec['refiner']['hash'][:10]}]"
    assert f", Refiner: {short}, Refiner switch at: {e['refiner_switch_at']:g}, Version: " in text
    assert rec["refiner"]["location"] == REFINER and rec["refiner"]["pipeline"] == "StableDiffusionXLImg2ImgPipeline"
    with Image.open(out / "refined" / e["file"]) as im:
        info = sd_parsers.ParserManager().parse(im)
    assert info.generator.name == "AUTOMATIC1111"
    assert info.metadata["Refiner"] == short
    assert float(info.metadata["Refiner switch at"]) == e["refiner_switch_at"]


def test_a1111_writes_no_refiner_fields_when_it_never_took_over(tmp_path: Path) -> None:
    cfg = {**CFG, "refiner": {"model": REFINER, "switch_at": 0.999}}
    (e,) = run(validate(cfg), tmp_path, progress=False).entries
    text = Image.open(tmp_path / e["file"]).info["parameters"]
    assert e["refiner_switch_call"] == -1 and "Refiner" not in text


def test_from_image_of_a_refined_image_is_identical(sweep, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from runner.reproduce.from_image import prepare

    out, entries, _ = sweep
    img = out / "refined" / entries[1]["file"]
    conf = Path(__file__).resolve().parent.parent / "conf"
    overrides = [f"from_image={img}", "device=cpu", "grid.enabled=false"]
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    (again,) = run(prepare(cfg, overrides, conf), tmp_path, progress=False).entries
    assert again["reproduced"]["identical"] is True, again["reproduced"]
    assert pixels(tmp_path / again["file"]).tobytes() == pixels(img).tobytes()
    assert again["refiner_switch_at"] == entries[1]["refiner_switch_at"]


def test_from_image_of_an_a1111_refined_image_finds_the_refiner_by_name_and_hash(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from PIL.PngImagePlugin import PngInfo

    from runner.common.hashing import model_sha256
    from runner.models.tiny import builtin_path
    from runner.reproduce.from_image import prepare

    models = tmp_path / "models"
    models.mkdir()
    (models / "base").symlink_to(builtin_path(BASE))
    (models / "sdxl_refiner_1.0").symlink_to(builtin_path(REFINER))
    short = model_sha256(models / "sdxl_refiner_1.0")[:10]
    png = tmp_path / "a1111.png"
    meta = PngInfo()
    meta.add_text("parameters", "a red fox\nSteps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, "
                                f"Seed: 3, Size: 32x32, Model: base, Refiner: sdxl_refiner_1.0 [{short}], "
                                "Refiner switch at: 0.5, Version: v1.10.1")
    Image.new("RGB", (32, 32)).save(png, pnginfo=meta)
    conf = Path(__file__).resolve().parent.parent / "conf"
    overrides = [f"from_image={png}", "device=cpu", "grid.enabled=false", f"model.id={models / 'base'}"]
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    spec = prepare(cfg, overrides, conf)
    (ref,) = spec.refiner
    assert (ref.model, ref.switch_at) == (str(models / "sdxl_refiner_1.0"), 0.5)
    # another hash: not that file; strict (the default) stops with one line
    meta = PngInfo()
    meta.add_text("parameters", "a red fox\nSteps: 4, Sampler: Euler, Seed: 3, Size: 32x32, "
                                "Refiner: sdxl_refiner_1.0 [0123456789], Refiner switch at: 0.5")
    Image.new("RGB", (32, 32)).save(png, pnginfo=meta)
    with pytest.raises(ConfigError, match=r"refined with 'sdxl_refiner_1.0' .* give refiner.model=PATH"):
        prepare(cfg, overrides, conf)


@pytest.mark.slow
def test_a_second_sdxl_base_refines_with_its_own_vae(tiny_sdxl: Path, tmp_path: Path,  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 takes any same-family checkpoint as the refiner: another SDXL base (six time ids, both encoders), whose
    own VAE decodes (the base's VAE differs)."""
    from runner.generate import refiner
    from runner.models.refiner import _CACHE

    decoded_by = []
    real = refiner._Decoder.decode

    def spy(self, *args, **kwargs):
        decoded_by.append(self._own if self._taken[0] is not None else self._base)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(refiner._Decoder, "decode", spy)

    other = tiny_sdxl
    base = {**CFG}
    (plain,) = run(validate(base), tmp_path / "a", progress=False).entries
    (e,) = run(validate({**base, "refiner": {"model": str(other), "switch_at": 0.5}}), tmp_path / "b",
               progress=False).entries
    assert e["refiner"]["pipeline"] == "StableDiffusionXLPipeline" and e["refiner_switch_call"] == 2
    (loaded,) = [r for r in _CACHE.values() if r.info.source.location == str(other)]
    assert loaded.shared == [] and decoded_by == [loaded.pipe.vae]  # its own VAE decodes (A1111: the loaded model's)
    assert not np.array_equal(pixels(tmp_path / "a" / plain["file"]), pixels(tmp_path / "b" / e["file"]))


@pytest.mark.parametrize(("keys", "words"), [
    ({"refiner": {"model": REFINER, "switch_at": 1.5}}, "refiner.switch_at=1.5 is out of range"),
    ({"refiner": {"model": REFINER, "switch_at": 0}}, "refiner.switch_at=0 is out of range"),
    ({"refiner": {"model": REFINER, "switch_at": "late"}}, "refiner.switch_at='late' is not a number"),
    ({"refiner": {"model": [REFINER, BASE]}}, "must be one model"),
    ({"refiner": {"model": "/no/such/refiner"}}, "refiner.model: refiner.model='/no/such/refiner' does not exist"),
    ({"refiner": {"model": REFINER}, "model": {"id": "builtin:tiny"}}, "is not available for Stable Diffusion 1.x"),
    ({"refiner": {"model": "builtin:tiny"}}, "valid: an SDXL refiner or another SDXL base"),
    ({"refiner": {"model": REFINER}, "hires": {"scale": 2}}, "Hires. fix is not supported here"),
    ({"refiner": {"model": REFINER}, "prompts": ["a [red:blue:0.5] fox"]}, "uses prompt editing"),
])
def test_bad_refiner_input_is_refused_before_loading(keys: dict, words: str, tmp_path: Path) -> None:
    from runner.models import loading
    from runner.run import plan_models

    before = sum(loading.LOADS.values())
    with pytest.raises(ConfigError, match=None) as err:
        plan_models(validate({**CFG, **keys}), [()])
    assert words in str(err.value) and "\n" not in str(err.value)
    assert sum(loading.LOADS.values()) == before


@pytest.mark.slow
def test_cli_bad_switch_at_is_one_line_exit_2(tmp_path: Path) -> None:
    from conftest import run_cli

    proc = run_cli("model=tiny-sdxl", f"refiner.model={REFINER}", "refiner.switch_at=1.2", cwd=tmp_path)
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()]
    assert proc.returncode == 2 and len(lines) == 1 and "refiner.switch_at=1.2" in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_each_image_equals_itself_generated_alone_in_a_fresh_process(sweep, tmp_path: Path) -> None:
    """Differential: the batched sweep's images (a batch of two prompts per switch point) equal each generated
    alone by `t2i` in a fresh process."""
    from conftest import run_cli

    out, entries, _ = sweep
    assert {e["batch_size"] for e in entries} == {2}
    by_prompt = {e["prompt"]: e for e in sorted(entries, key=lambda e: e["index"])}
    assert len(by_prompt) == 2  # one image of each prompt of the batch (their order in the entries may vary)
    for e in by_prompt.values():
        dest = tmp_path / f"{e['index']}"
        proc = run_cli(f"model.id={BASE}", "steps=4", "width=32", "height=32", f"prompts=['{e['prompt']}']",
                       "seeds=[3]", f"refiner.model={REFINER}",
                       f"refiner.switch_at={e['refiner_switch_at']}", f"output_dir={dest}", "grid.enabled=false",
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        (png,) = dest.glob("0*.png")
        assert np.array_equal(pixels(png), pixels(out / "refined" / e["file"]))


@pytest.mark.slow
def test_a1111_api_and_form_refiner_fields_give_the_cli_image(tmp_path: Path) -> None:
    import base64
    import io

    from fastapi.testclient import TestClient

    from runner.server.app import compose_config, create_app

    app = create_app(compose_config(["model=tiny-sdxl", f"server.output_dir={tmp_path / 'out'}", "steps=4",
                                     f"server.allowed_models=[{REFINER}]"]))
    body = {"prompt": "a red fox", "seed": 3, "steps": 4, "width": 32, "height": 32, "cfg_scale": 5,
            "sampler_name": "Euler", "scheduler": "Automatic", "refiner_checkpoint": REFINER, "refiner_switch_at": 0.5}
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Refiner switch at: 0.5" in info["infotexts"][0]
        assert info["extra_generation_params"]["Refiner switch at"] == "0.5"
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        # A1111's checkpoint title (`NAME [shorthash]`, as /sd-models and the infotext give it) names it too
        r = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": f"{REFINER} [0123456789]"})
        assert r.status_code == 200 and "Refiner: tiny-sdxl-refiner [" in json.loads(r.json()["info"])["infotexts"][0]
        for bad, words in (({"refiner_switch_at": 1.5}, "refiner_switch_at=1.5 is out of range"),
                           ({"refiner_switch_at": None}, "refiner_switch_at=null with refiner_checkpoint"),
                           ({"refiner_checkpoint": "/elsewhere"}, "refiner_checkpoint='/elsewhere' is not allowed")):
            r = client.post("/sdapi/v1/txt2img", json={**body, **bad})
            assert r.status_code in (403, 422) and words in r.text, r.text
        # the form: a Refiner select over the allowed models, and its switch point
        page = client.get("/").text
        assert 'name="refiner_model"' in page and f'<option value="{REFINER}">' in page
        r = client.post("/submit", data={"modelid": "builtin:tiny-sdxl", "text_prompt": "a red fox", "manual_seed": "3",
                                         "inference_steps": "4", "width": "32", "height": "32", "guidance_scale": "5",
                                         "refiner_model": REFINER, "refiner_switch_at": "0.5"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert "Refiner switch at: 0.5" in Image.open(io.BytesIO(r.content)).info["parameters"]
    cli = tmp_path / "cli"
    (e,) = run(validate({**CFG, "guidance_scale": 5, "scheduler": "euler", "schedule": "uniform",
                         "refiner": {"model": REFINER, "switch_at": 0.5}}), cli, progress=False).entries
    ours, theirs = json.loads(Image.open(cli / e["file"]).info["t2i-runner"]), json.loads(image.info["t2i-runner"])
    assert theirs["refiner"] == ours["refiner"] and theirs["refiner_switch_call"] == 2
    assert np.array_equal(pixels(cli / e["file"]), np.asarray(image.convert("RGB")))


def test_single_file_checkpoints_are_told_apart_before_loading(tmp_path: Path) -> None:
    """A `.safetensors` refiner is read by its keys (diffusers' own markers): the SDXL refiner's single text
    encoder, an SDXL base's second one; anything else is refused by name."""
    import torch
    from safetensors.torch import save_file

    from runner.config.refiner import Refiner
    from runner.models.families import get_family
    from runner.models.refiner import REFINER_PIPELINE, refiner_info

    marker = ".model.transformer.resblocks.9.mlp.c_proj.bias"
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}  # 4 in-channels: not inpaint
    files = {"refiner": {f"conditioner.embedders.0{marker}": torch.zeros(1), **unet},
             "base": {f"conditioner.embedders.1{marker}": torch.zeros(1), **unet},
             "sd15": {"cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(1), **unet}}
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    model = validate(CFG).model
    sdxl = get_family("sdxl")
    assert refiner_info(Refiner(str(tmp_path / "refiner.safetensors"), 0.8), model, sdxl).pipeline == REFINER_PIPELINE
    assert refiner_info(Refiner(str(tmp_path / "base.safetensors"), 0.8), model, sdxl).pipeline == \
        "StableDiffusionXLPipeline"
    with pytest.raises(ConfigError, match="valid: an SDXL refiner or another SDXL base"):
        refiner_info(Refiner(str(tmp_path / "sd15.safetensors"), 0.8), model, sdxl)


@pytest.mark.slow
def test_refiner_runs_unpadded_sides_apart_and_each_image_equals_itself_alone(tmp_path: Path) -> None:
    """pad_conds=false (A1111's default) with a 2-chunk prompt and a 1-chunk negative: the refiner's sides have
    different lengths, so its UNet rows run apart (they cannot share one call); the batched image equals the image
    made alone, and differs from the padded one."""
    long = "a red fox, " + ", ".join(f"w{i}" for i in range(30))
    prompts = [{"prompt": long, "negative_prompt": "blurry"}, {"prompt": "a cat", "negative_prompt": "blurry"}]
    refiner = {"model": REFINER, "switch_at": 0.5}
    batched = run(validate({**CFG, "prompts": prompts, "refiner": refiner, "batch_size": 2}), tmp_path / "b",
                  progress=False).entries
    alone = run(validate({**CFG, "prompts": prompts[:1], "refiner": refiner}), tmp_path / "a", progress=False).entries
    padded = run(validate({**CFG, "prompts": prompts[:1], "refiner": refiner, "pad_conds": True}), tmp_path / "p",
                 progress=False).entries
    [b] = [e for e in batched if e["prompt"] == long]
    assert b["batch_size"] == 2 and b["refiner_switch_call"] >= 0
    got = pixels(tmp_path / "b" / b["file"])
    assert np.array_equal(got, pixels(tmp_path / "a" / alone[0]["file"]))
    assert not np.array_equal(got, pixels(tmp_path / "p" / padded[0]["file"]))
