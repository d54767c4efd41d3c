"""A1111's text options as keys (issue 24, items 7-8): "Pad prompt/negative prompt" (`pad_conds`, off by default as
in A1111: `modules/sd_samplers_cfg_denoiser.py` then runs the conditional and unconditional sides as separate UNet
calls) and the emphasis modes of `modules/sd_emphasis.py` (`emphasis`: Original, No norm, Ignore, None), each
recorded, written to the infotext as A1111 writes it, and read back."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runner.config import validate
from runner.outputs.metadata import read_png_record
from runner.prompt.clip import Encoder, encode_chunk, encode_text, tokenize_chunks
from runner.prompt.syntax import parse_attention
from runner.reproduce.from_image import record_config
from runner.reproduce.inspect import record_from_infotext
from runner.run import run

SIDE = 32
LONG = "a red fox, " + ", ".join(f"w{i}" for i in range(30))  # 2 chunks against the negative's 1
NEGATIVE = "blurry"


def _run(tmp: Path, tiny_dir: Path, **over) -> list[dict]:
    cfg = {"model": {"id": str(tiny_dir)}, "prompts": [LONG], "negative_prompt": NEGATIVE, "seeds": [3],
           "steps": 2, "width": SIDE, "height": SIDE, "guidance_scale": 7, "device": "cpu",
           "grid": {"enabled": False}} | over
    return run(validate(cfg), tmp, progress=False).entries


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path):
    from runner.models.loading import load_model

    return load_model(validate({"model": {"id": str(tiny_dir)}, "device": "cpu"}).model, "cpu").pipe


def test_unpadded_sides_are_denoised_apart(tmp_path: Path, tiny_dir: Path, pipe) -> None:
    """pad_conds=false (the default) equals a reference that runs the UNet on the negative prompt's 1 chunk and the
    prompt's 2 chunks in separate calls; pad_conds=true is another image, written `Pad conds: True`."""
    from runner.generate.prompt_embeds import _encoders

    entries = _run(tmp_path / "off", tiny_dir) + _run(tmp_path / "on", tiny_dir, pad_conds=True)
    (off, on) = entries
    assert off["pad_conds"] is False and on["pad_conds"] is True
    text_off = read_png_record(str(tmp_path / "off" / off["file"]))[1]
    text_on = read_png_record(str(tmp_path / "on" / on["file"]))[1]
    assert "Pad conds" not in text_off and "Pad conds: True" in text_on

    encoders = _encoders(pipe, "sd", None)
    with torch.inference_mode():
        cond, _ = encode_text(encoders, LONG, "cpu")
        uncond, _ = encode_text(encoders, NEGATIVE, "cpu")
    assert (cond.shape[1], uncond.shape[1]) == (154, 77)
    unet = pipe.unet
    calls: list[tuple[int, int]] = []

    def apart(sample, t, encoder_hidden_states, **kw):  # rows: [unconditional, conditional], as diffusers orders
        kw.pop("return_dict", None)
        outs = [unet(sample[i:i + 1], t, z, return_dict=False, **kw)[0] for i, z in enumerate((uncond, cond))]
        calls.append((uncond.shape[1], cond.shape[1]))
        return (torch.cat(outs),)

    ref = copy.copy(pipe)
    object.__setattr__(ref, "unet", type("U", (), {"__call__": staticmethod(apart), "config": unet.config,
                                                   "dtype": unet.dtype, "device": unet.device})())
    with torch.inference_mode():
        image = ref(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), guidance_scale=7,
                    num_inference_steps=2, width=SIDE, height=SIDE,
                    generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert len(calls) == 2
    want = np.asarray(image.convert("RGB"), dtype=np.int16)
    got = _pixels(tmp_path / "off" / off["file"])
    assert want.std() > 5 and np.array_equal(got, want)
    assert not np.array_equal(_pixels(tmp_path / "on" / on["file"]), got)
    # in a batch, each image is still the image made alone (batch invariance: each side's rows run one by one)
    batch = {e["seed"]: e for e in _run(tmp_path / "batch", tiny_dir, seeds=[3, 4], batch_size=2)}
    assert np.array_equal(_pixels(tmp_path / "batch" / batch[3]["file"]), got)


def test_pad_conds_is_read_back() -> None:
    base = f"{LONG}\nNegative prompt: {NEGATIVE}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32"
    assert record_from_infotext(base + ", Pad conds: True")["pad_conds"] is True
    assert record_from_infotext(base)["pad_conds"] is False
    assert record_config(record_from_infotext(base + ", Pad conds: True"))["pad_conds"] is True
    old = {"prompt": LONG, "negative_prompt": "", "prompt_syntax": "a1111", "model": {"kind": "builtin"}}
    assert record_config(old)["pad_conds"] is True  # made when padding was always on
    assert record_config({**old, "emphasis": "original", "pad_conds": False})["pad_conds"] is False


@pytest.mark.parametrize("mode", ["original", "no_norm", "ignore", "none"])
def test_emphasis_modes_match_a1111s_maths(pipe, mode: str) -> None:
    """sd_emphasis.py: Original scales and restores the mean, No norm only scales, Ignore parses and does not
    scale, None reads the brackets as words; all in float32 for a bf16 encoder."""
    prompt = "a (red:1.7) [fox] (in the snow:0.6)"
    te = copy.deepcopy(pipe.text_encoder).to(torch.bfloat16)
    enc = Encoder(pipe.tokenizer, te, None)
    parsed = parse_attention(prompt) if mode != "none" else [(prompt, 1.0)]
    (chunk,) = tokenize_chunks(pipe.tokenizer, parsed)
    with torch.inference_mode():
        z = te(torch.tensor([chunk.tokens]))[0]
        got, _ = encode_text([enc], prompt, "cpu", emphasis=mode)
        got_chunk, _ = encode_chunk(enc, chunk, "cpu", emphasis=mode)
    mult = torch.tensor(chunk.multipliers, dtype=torch.float32).reshape(1, -1, 1)
    zf = z.float()
    want = {"original": zf * mult * (zf.mean() / (zf * mult).mean()), "no_norm": zf * mult, "ignore": zf,
            "none": zf}[mode].to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want) and torch.equal(got_chunk, want)
    if mode == "none":
        assert chunk.tokens != tokenize_chunks(pipe.tokenizer, parse_attention(prompt))[0].tokens


def test_emphasis_sweep_is_recorded_written_and_read_back(tmp_path: Path, tiny_dir: Path) -> None:
    modes = ["original", "no_norm", "ignore", "none"]
    entries = _run(tmp_path, tiny_dir, prompts=["a (red:1.6) fox"], negative_prompt="", emphasis=modes,
                   guidance_scale=1)
    assert sorted(e["emphasis"] for e in entries) == sorted(modes)
    written = {"original": None, "no_norm": "No norm", "ignore": "Ignore", "none": "None"}
    seen = {}
    for e in entries:
        rec, text = read_png_record(str(tmp_path / e["file"]))
        assert rec["emphasis"] == e["emphasis"]
        field = next((f.split(": ", 1)[1] for f in text.splitlines()[-1].split(", ") if f.startswith("Emphasis:")),
                     None)
        assert field == written[e["emphasis"]]  # Original, A1111's default, is not written
        back = record_from_infotext(text)
        assert (back["emphasis"], back["prompt_syntax"], back["no_equivalent"]) == (e["emphasis"], "a1111", [])
        assert record_config(back)["emphasis"] == e["emphasis"]
        seen[e["emphasis"]] = _pixels(tmp_path / e["file"])
    assert not np.array_equal(seen["original"], seen["ignore"])
    assert not np.array_equal(seen["none"], seen["ignore"])


def test_an_unknown_emphasis_is_refused_and_an_extensions_mode_reported() -> None:
    from runner.common.errors import ConfigError

    with pytest.raises(ConfigError, match="emphasis='no norm' is not valid.*original, no_norm, ignore, none"):
        validate({"emphasis": "no norm"})
    with pytest.raises(ConfigError, match="pad_conds='yes'"):
        validate({"pad_conds": "yes"})
    rec = record_from_infotext("a (b) c\nSteps: 2, Sampler: Euler, Seed: 1, Size: 8x8, Emphasis: Fancy")
    assert rec["emphasis"] == "original" and "Emphasis: Fancy" in rec["no_equivalent"]
