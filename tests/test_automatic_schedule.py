"""One meaning per sampler name (issue 24, item 5): `scheduler=dpmpp_2m` with no schedule is what A1111's
"Automatic" does for DPM++ 2M (Karras), on every surface: the config (CLI, form, OpenAI API: `scheduler=` /
`schedule=`), the A1111 API (`sampler_name` + `scheduler`) and `from_image` (an A1111 infotext). The infotext
names the schedule used, so A1111 reads back the same sampling. (The sigma numbers against A1111's own:
tests/test_reference_a1111_sigmas.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from runner.config import RunConfig
from runner.config.schedulers import SCHEDULER_TABLE, automatic, from_a1111
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.reproduce.from_image import record_config
from runner.reproduce.inspect import record_from_infotext
from runner.run import run
from runner.server.a1111 import Txt2ImgRequest, sampler_pair

A1111_TEXT = "a red fox\nSteps: 3, Sampler: {sampler}, Schedule type: Automatic, CFG scale: 7, Seed: 3, Size: 32x32"
BASE = {"prompts": ["a red fox"], "seeds": [3], "steps": 3, "width": 32, "height": 32, "guidance_scale": 7,
        "grid": {"enabled": False}}


def _image(tiny_dir: Path, out: Path, **kw) -> tuple[np.ndarray, dict]:
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": {"id": str(tiny_dir)}, **BASE, **kw})
    (entry,) = run(cfg, out, progress=False).entries
    with Image.open(out / entry["file"]) as im:
        return np.asarray(im.convert("RGB")), parse_infotext(read_png_record(str(out / entry["file"]))[1])


# (the flow rows share A1111's names with the SD rows, which are the ones A1111 names mean on an SD model)
@pytest.mark.parametrize("name", [n for n, r in SCHEDULER_TABLE.items()
                                  if r.a1111 and r.schedule is None and not r.cls.startswith("FlowMatch")])
def test_every_surface_reads_a_sampler_name_with_automatic_alike(name: str) -> None:
    """The A1111 API and an A1111 infotext ("Automatic") give the schedule `scheduler=NAME` runs with."""
    row = SCHEDULER_TABLE[name]
    label = row.a1111
    want = automatic(name)
    api = sampler_pair(Txt2ImgRequest(prompt="x", sampler_name=label, scheduler="automatic"))
    assert SCHEDULER_TABLE[api[0]].cls == row.cls and api[1] == want, (name, api)
    assert from_a1111(label, "Automatic")[1] == want
    rec = record_from_infotext(A1111_TEXT.format(sampler=label))
    assert record_config(rec).get("schedule") == want


def test_schedule_null_and_a1111_automatic_make_the_same_image(tiny_dir: Path, tmp_path: Path) -> None:
    """DPM++ 2M: `scheduler=dpmpp_2m` (no schedule) = schedule=karras = an A1111 "Automatic" image read back, and
    the infotext says Karras (A1111 would otherwise have to guess)."""
    plain, text = _image(tiny_dir, tmp_path / "plain", scheduler="dpmpp_2m")
    karras, _ = _image(tiny_dir, tmp_path / "karras", scheduler="dpmpp_2m", schedule="karras")
    rec = record_from_infotext(A1111_TEXT.format(sampler="DPM++ 2M"))
    again, _ = _image(tiny_dir, tmp_path / "again", **{k: v for k, v in record_config(rec).items()
                                                      if k in ("scheduler", "schedule")})
    assert (text["Sampler"], text["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert np.array_equal(plain, karras) and np.array_equal(plain, again)
    euler, euler_text = _image(tiny_dir, tmp_path / "euler", scheduler="euler")
    assert euler_text["Schedule type"] == "Uniform"  # Euler's Automatic, written out
    uniform, _ = _image(tiny_dir, tmp_path / "uniform", scheduler="euler", schedule="uniform")
    assert np.array_equal(euler, uniform)
