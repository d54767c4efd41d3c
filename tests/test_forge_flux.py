"""Images made by Forge/ComfyUI on Flux.1 reproduce here as those tools ran them: their "Euler" on a flow-matching
model is flow Euler, "Simple"/"Normal" are the model's own sigmas, "Distilled CFG Scale" is Flux's guidance and
"CFG scale" its real CFG; our own Flux infotext follows the same convention, through the A1111 API too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runner.config import RunConfig
from runner.config.schedulers import for_flow
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.run import run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize(("given", "want"), [
    (("euler", None), ("flow_euler", None, [])),
    (("euler", "sgm_uniform"), ("flow_euler", None, [])),
    (("euler", "simple"), ("flow_euler", None, [])),  # Forge's "Simple"
    (("euler", "uniform"), ("flow_euler", None, [])),  # A1111's "Normal"
    (("lcm", None), ("flow_lcm", None, [])),
    (("flow_euler", None), ("flow_euler", None, [])),
    ((None, None), (None, None, [])),
    (("dpmpp_2m", "karras"), (None, None, ["Sampler: DPM++ 2M", "Schedule type: Karras"])),
    (("euler", "karras"), ("flow_euler", None, ["Schedule type: Karras with Euler on a flow model"])),
])
def test_an_imported_sampler_on_a_flow_model(given: tuple, want: tuple) -> None:
    assert for_flow(*given) == want


def _forge_png(path: Path, text: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def test_from_image_of_a_forge_flux_image_runs_flow_euler_with_its_guidance(tiny_flux_dir: Path,
                                                                           tmp_path: Path) -> None:
    from runner.config.overrides import CONF_DIR
    from runner.reproduce.from_image import prepare
    from runner.server.app import compose_config

    forge = _forge_png(tmp_path / "forge.png", "a red fox\nSteps: 2, Sampler: Euler, Schedule type: Simple, "
                       "CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 3, Size: 32x32, Model hash: 0123456789, "
                       "Model: flux1-dev, Version: f2.0.1v1.10.1")
    overrides = [f"from_image={forge}", f"model.id={tiny_flux_dir}", "device=cpu"]
    spec = prepare(compose_config(overrides), overrides, CONF_DIR)
    assert (spec.scheduler, spec.schedule, spec.guidance_scale, spec.true_cfg_scale) == \
        (("flow_euler",), (None,), (2.5,), (None,))
    got = run(spec, tmp_path / "again", progress=False)
    # ... the same pixels as the same settings written by hand
    plain = {"model": {"id": str(tiny_flux_dir)}, "prompts": ["a red fox"], "seeds": [3], "steps": 2, "width": 32,
             "height": 32, "device": "cpu", "scheduler": "flow_euler", "guidance_scale": 2.5}
    ref = run(OmegaConf.merge(OmegaConf.structured(RunConfig), plain), tmp_path / "ref", progress=False)
    (a,), (b,) = got.entries, ref.entries
    assert np.array_equal(pixels(tmp_path / "again" / a["file"]), pixels(tmp_path / "ref" / b["file"]))
    # our infotext says it Forge's way: real CFG 1 (off), the distilled guidance apart
    _, text = read_png_record(str(tmp_path / "ref" / b["file"]))
    fields = parse_infotext(text)
    assert (fields["Sampler"], fields["CFG scale"], fields["Distilled CFG Scale"]) == ("Euler", "1", "2.5")


def test_a_forge_flux_image_with_real_cfg_and_an_unknown_schedule(tiny_flux_dir: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from runner.config.overrides import CONF_DIR
    from runner.reproduce.from_image import prepare
    from runner.server.app import compose_config

    forge = _forge_png(tmp_path / "forge.png", "a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, "
                       "Schedule type: Karras, CFG scale: 3, Distilled CFG Scale: 2.5, Seed: 3, Size: 32x32")
    overrides = [f"from_image={forge}", f"model.id={tiny_flux_dir}", "device=cpu"]
    with caplog.at_level("WARNING"):
        spec = prepare(compose_config(overrides), overrides, CONF_DIR)
    assert (spec.scheduler, spec.schedule, spec.guidance_scale, spec.true_cfg_scale) == \
        (("flow_euler",), (None,), (2.5,), (3.0,))
    assert "no flow-matching equivalent for Schedule type: Karras with Euler on a flow model" in caplog.text


def test_the_a1111_api_runs_euler_on_a_flux_server_as_flow_euler(tiny_flux_dir: Path, tmp_path: Path) -> None:
    import base64
    import io

    from fastapi.testclient import TestClient

    from runner.server.app import compose_config, create_app

    app = create_app(compose_config([f"model.id={tiny_flux_dir}", "device=cpu",
                                     f"server.output_dir={tmp_path / 'out'}"]))
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "seed": 3, "steps": 2, "width": 32,
                                                   "height": 32, "cfg_scale": 1, "sampler_name": "Euler",
                                                   "scheduler": "Simple"})
        assert r.status_code == 200, r.text
        bad = client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "steps": 2, "width": 32, "height": 32,
                                                     "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
        assert bad.status_code == 422 and "no flow-matching equivalent" in bad.json()["detail"], bad.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) as im:
        assert parse_infotext(im.info["parameters"])["Sampler"] == "Euler"
    (png,) = (tmp_path / "out").rglob("*.png")
    rec, _ = read_png_record(str(png))
    assert rec["scheduler"] == "flow_euler"
