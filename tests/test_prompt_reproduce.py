"""from_image with the prompt language (issue 15): our images and A1111's, weights and syntax read as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_reproduce import manifest, pixels

from runner.config import validate
from runner.outputs.metadata import read_png_record
from runner.reproduce.from_image import record_config
from runner.reproduce.inspect import record_from_infotext
from runner.run import run

SIDE = 32


def test_own_image_with_weights_and_a_long_prompt_regenerates_identically(tmp_path: Path, tiny_dir: Path) -> None:
    prompt = "a (red:1.3) fox, [snow] BREAK " + " ".join(f"w{i}" for i in range(40))
    orig = run(validate({"model": {"id": str(tiny_dir)}, "prompts": ["{" + prompt + "|x}"], "seeds": [2],
                         "steps": 2, "width": SIDE, "height": SIDE, "device": "cpu", "grid": {"enabled": False}}),
               tmp_path / "orig", progress=False)
    e = next(e for e in orig.entries if e["prompt"] == prompt)
    rec, text = read_png_record(str(tmp_path / "orig" / e["file"]))
    assert rec["prompt_syntax"] == "a1111" and rec["prompt_template"] == "{" + prompt + "|x}"
    assert text.splitlines()[0] == prompt and "Template: " in text
    assert rec["pad_conds"] is False and "Pad conds" not in text  # A1111's default: 2 chunks against 1, unpadded
    r = run_cli(f"from_image={tmp_path / 'orig' / e['file']}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (again,) = manifest(tmp_path / "again")
    assert again["reproduced"]["compared"] is True and again["reproduced"]["max_pixel_diff"] == 0
    assert pixels(tmp_path / "again" / again["file"]).std() > 5
    assert again["prompt"] == prompt and again["prompt_syntax"] == "a1111"


def _a1111_png(path: Path, text: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (SIDE, SIDE), "gray").save(path, pnginfo=info)
    return path


@pytest.mark.slow
def test_a1111_image_with_weights_gets_the_same_conditioning(tmp_path: Path, tiny_dir: Path) -> None:
    settings = f"Steps: 2, Sampler: Euler, CFG scale: 7, Seed: 9, Size: {SIDE}x{SIDE}, Model: v1-5-pruned"
    for name, extra, emphasis in (("weights", "", "original"), ("none", ", Emphasis: None", "none")):
        img = _a1111_png(tmp_path / f"{name}.png", f"a (red:1.4) fox\nNegative prompt: (blur:1.2)\n{settings}{extra}")
        assert record_from_infotext(f"x\n{settings}{extra}")["emphasis"] == emphasis
        d = tmp_path / f"again-{name}"
        r = run_cli(f"from_image={img}", f"model.id={tiny_dir}", f"hydra.run.dir={d}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        (e,) = manifest(d)
        assert (e["prompt"], e["negative_prompt"], e["emphasis"]) == ("a (red:1.4) fox", "(blur:1.2)", emphasis)
        direct = run(validate({"model": {"id": str(tiny_dir)}, "prompts": ["a (red:1.4) fox"],
                               "negative_prompt": "(blur:1.2)", "seeds": [9], "steps": 2, "width": SIDE,
                               "height": SIDE, "scheduler": "euler", "schedule": "uniform", "guidance_scale": 7,
                               "device": "cpu", "emphasis": emphasis, "grid": {"enabled": False}}),
                     tmp_path / f"direct-{name}", progress=False)
        want = pixels(tmp_path / f"direct-{name}" / direct.entries[0]["file"])
        assert want.std() > 5 and np.array_equal(pixels(d / e["file"]), want)


def test_records_from_before_the_prompt_language_are_plain() -> None:
    old = {"prompt": "a (red:1.3) fox", "negative_prompt": "", "seed": 1, "model": {"kind": "builtin"},
           "loras": []}
    assert record_config(old)["prompt_syntax"] == "plain"
    assert record_config({**old, "prompt_syntax": "a1111"})["prompt_syntax"] == "a1111"
