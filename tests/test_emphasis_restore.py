"""A1111's emphasis mean restore on text encoders whose output mean is ~0 (issue 32).

A1111 restores a weighted chunk's mean by `z * (old_mean / new_mean)`. On an encoder whose final LayerNorm has no
bias (a random tiny model) both means are float noise, so the result depended on the installed versions' rounding:
one CI run made an all-black image. The tiny models must not be degenerate, and the product must not make a black
image when an encoder is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runner.config import validate
from runner.outputs.metadata import read_png_record
from runner.run import run

PROMPTS = ["a (red:1.4) fox", "(blur:1.2)", "a [snow] field, ((sharp))", "x"]


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path):
    from runner.models.loading import load_model

    return load_model(validate({"model": {"id": str(tiny_dir)}, "device": "cpu"}).model, "cpu").pipe


def _raw(pipe, prompt: str, skip: int | None):
    """The chunk's encoder output before emphasis, read the way prompt/clip.py reads it."""
    import torch

    from runner.generate.prompt_embeds import _encoders
    from runner.prompt.clip import _final_norm, tokenize_chunks
    from runner.prompt.syntax import parse_attention

    (enc,) = _encoders(pipe, "sd", skip)
    (chunk,) = tokenize_chunks(enc.tokenizer, parse_attention(prompt))
    with torch.inference_mode():
        out = enc.text_encoder(torch.tensor([chunk.tokens]), output_hidden_states=True)
        z = out[0] if skip is None else _final_norm(enc.text_encoder)(out.hidden_states[-(skip + 1)])
    return z, torch.tensor(chunk.multipliers).reshape(1, -1, 1)


@pytest.mark.parametrize("skip", [None, 2])
def test_tiny_text_encoder_mean_is_well_conditioned(pipe, skip) -> None:
    for prompt in PROMPTS:
        z, mult = _raw(pipe, prompt, skip)
        # a trained CLIP's means are a sizeable fraction of its magnitude; 1e-8 (a bias-free LayerNorm) is not
        for t in (z, z * mult):
            assert abs(float(t.mean())) > 0.05 * float(t.abs().mean()), (prompt, float(t.mean()))


def test_emphasis_restores_the_mean_exactly_as_a1111(pipe) -> None:
    from runner.generate.prompt_embeds import PromptEmbeds

    z, mult = _raw(pipe, "a (red:1.4) fox", None)
    want = z * mult
    want = want * (z.mean() / want.mean())  # A1111 sd_emphasis.EmphasisOriginal
    got = PromptEmbeds().call_kwargs(pipe, [("a (red:1.4) fox", "")], None, True, (), "a1111")["prompt_embeds"]
    assert np.allclose(got.numpy(), want.numpy(), atol=1e-6)
    assert not np.allclose(got.numpy(), (z * mult).numpy(), atol=1e-4)  # the restore did something


@pytest.fixture(scope="module")
def degenerate_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a bias-free final norm (weight 1, bias 0): every token's output has mean 0."""
    import shutil

    import torch
    from transformers import CLIPTextModel

    from runner.prompt.clip import _final_norm

    model = tmp_path_factory.mktemp("degenerate") / "model"
    shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("loras"))
    te = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder")
    with torch.no_grad():
        _final_norm(te).weight.fill_(1.0)
        _final_norm(te).bias.zero_()
    te.save_pretrained(model / "text_encoder")
    return model


def test_degenerate_encoder_leaves_the_restore_out_and_records_it(degenerate_dir: Path, tmp_path: Path) -> None:
    """A bias-free final norm: the weights apply without the restore (A1111's "No norm"), warned and recorded."""
    import torch

    from runner.generate.prompt_embeds import PromptEmbeds
    from runner.models.loading import load_model

    bad = load_model(validate({"model": {"id": str(degenerate_dir)}, "device": "cpu"}).model, "cpu").pipe
    z, mult = _raw(bad, "a (red:1.4) fox", None)
    assert abs(float(z.mean())) < 1e-6 * float(z.abs().mean())  # the fixture is degenerate
    cache = PromptEmbeds()
    with torch.inference_mode():
        got = cache.call_kwargs(bad, [("a (red:1.4) fox", "(blur:1.2)")], None, True, (), "a1111")
    assert torch.isfinite(got["prompt_embeds"]).all()
    assert torch.allclose(got["prompt_embeds"], z * mult, atol=1e-6)
    assert ("a (red:1.4) fox", "(blur:1.2)") in cache.unrestored

    # end to end: the image is a real one and its record says the restore was left out
    recs = _real_images_records(degenerate_dir, tmp_path / "out", ["a (red:1.4) fox", "a red fox"])
    assert recs["a (red:1.4) fox"]["emphasis_mean_restored"] is False
    assert "emphasis_mean_restored" not in recs["a red fox"]  # no weights: nothing to restore


def test_degenerate_encoder_records_it_for_edited_prompts_too(degenerate_dir: Path, tmp_path: Path) -> None:
    """Prompt editing encodes its texts on a path of its own (generate/scheduled.py): the same record there."""
    recs = _real_images_records(degenerate_dir, tmp_path / "out", ["a [(red:1.4):blue:0.5] fox",
                                                                    "a [red:blue:0.5] fox"])
    assert recs["a [(red:1.4):blue:0.5] fox"]["emphasis_mean_restored"] is False
    assert "emphasis_mean_restored" not in recs["a [red:blue:0.5] fox"]


def _real_images_records(model_dir: Path, out: Path, prompts: list[str]) -> dict[str, dict]:
    """Run `prompts` on the degenerate-encoder model; check every image is a real one (not flat); the records by
    prompt."""
    from PIL import Image

    cfg = {"model": {"id": str(model_dir)}, "prompts": prompts, "negative_prompt": "blur", "seeds": [9], "steps": 2,
           "width": 32, "height": 32, "device": "cpu", "grid": {"enabled": False}}
    result = run(validate(cfg), out, progress=False)
    for e in result.entries:
        assert np.asarray(Image.open(out / e["file"])).std() > 5
    return {e["prompt"]: read_png_record(str(out / e["file"]))[0] for e in result.entries}
