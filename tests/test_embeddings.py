"""Textual-inversion embeddings from `embedding_dirs` on the tiny SD1.5 and SDXL models: the same pixels as
diffusers' own `load_textual_inversion` + `encode_prompt`, A1111's `TI hashes`, pickle only by opt-in, unloaded
when a run does not name the folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_fidelity import tiny_sdxl  # noqa: F401 - the SDXL fixture

from runner.common.errors import ConfigError
from runner.config import validate
from runner.run import run


def _cfg(model: Path, prompt: str, dirs: list[str], **extra) -> dict:
    return {"model": {"id": str(model)}, "prompts": [prompt], "seeds": [4], "steps": 3, "width": 32, "height": 32,
            "device": "cpu", "guidance_scale": 7.0, "embedding_dirs": dirs, "grid": {"enabled": False},
            "viewer": {"enabled": False}, **extra}


def _image(out: Path) -> tuple[np.ndarray, dict, str]:
    import json

    (png,) = sorted(out.glob("0*.png"))
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16), json.loads(im.text["t2i-runner"]), im.text["parameters"]


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    from transformers import CLIPTextConfig

    width = CLIPTextConfig.from_pretrained(str(tiny_dir / "text_encoder")).hidden_size
    d = tmp_path_factory.mktemp("embeddings")
    torch.manual_seed(1)
    save_file({"emb_params": torch.randn(3, width) * 2}, str(d / "shinystyle.safetensors"))  # A1111's format
    torch.save({"string_to_param": {"*": torch.randn(1, width)}, "name": "oldstyle"}, d / "oldstyle.pt")
    return d


def test_embedding_equals_diffusers_textual_inversion(tiny_dir: Path, emb_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    run(validate(_cfg(tiny_dir, "a fox, shinystyle", [str(emb_dir)])), tmp_path / "ti", progress=False)
    got, rec, text = _image(tmp_path / "ti")
    sha = hashlib.sha256((emb_dir / "shinystyle.safetensors").read_bytes()).hexdigest()
    assert rec["embeddings"] == [{"name": "shinystyle", "sha256": sha, "file": str(emb_dir / "shinystyle.safetensors")}]
    assert f"TI hashes: \"shinystyle: {sha[:10]}\"" in text
    # diffusers' own: load_textual_inversion, then the pipeline encodes the prompt itself
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    pipe.load_textual_inversion(load_file(str(emb_dir / "shinystyle.safetensors"))["emb_params"], token="shinystyle")
    ref = pipe("a fox, shinystyle", num_inference_steps=3, guidance_scale=7.0, width=32, height=32,
               generator=[torch.Generator().manual_seed(4)]).images[0]
    assert np.array_equal(got, np.asarray(ref.convert("RGB"), dtype=np.int16))
    # the same word without the folder is text again (the embedding is unloaded from the cached pipeline)
    run(validate(_cfg(tiny_dir, "a fox, shinystyle", [])), tmp_path / "plain", progress=False)
    plain, rec2, _ = _image(tmp_path / "plain")
    assert "embeddings" not in rec2 and not np.array_equal(plain, got)


def test_pickle_embeddings_need_the_opt_in(tiny_dir: Path, emb_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="oldstyle.pt is a pickle file .*allow_pickle_embeddings=true"):
        run(validate(_cfg(tiny_dir, "oldstyle fox", [str(emb_dir)])), tmp_path / "no", progress=False)
    run(validate(_cfg(tiny_dir, "oldstyle fox", [str(emb_dir)], allow_pickle_embeddings=True)), tmp_path / "yes",
        progress=False)
    _, rec, _ = _image(tmp_path / "yes")
    assert [e["name"] for e in rec["embeddings"]] == ["oldstyle"]


@pytest.mark.slow
def test_sdxl_embedding_has_clip_l_and_clip_g(tiny_sdxl: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import CLIPTextConfig

    d = tmp_path / "emb"
    d.mkdir()
    l_width = CLIPTextConfig.from_pretrained(str(tiny_sdxl / "text_encoder")).hidden_size
    g_width = CLIPTextConfig.from_pretrained(str(tiny_sdxl / "text_encoder_2")).hidden_size
    save_file({"clip_l": torch.randn(2, l_width), "clip_g": torch.randn(2, g_width)}, str(d / "xlstyle.safetensors"))
    run(validate(_cfg(tiny_sdxl, "a (xlstyle:1.2) fox", [str(d)])), tmp_path / "xl", progress=False)
    with_emb, rec, _ = _image(tmp_path / "xl")
    assert rec["embeddings"][0]["name"] == "xlstyle"
    run(validate(_cfg(tiny_sdxl, "a (xlstyle:1.2) fox", [])), tmp_path / "xl0", progress=False)
    assert not np.array_equal(with_emb, _image(tmp_path / "xl0")[0])


def test_from_image_finds_the_embeddings(tiny_dir: Path, emb_dir: Path, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_hires import _a1111_png, _from_image

    run(validate(_cfg(tiny_dir, "a fox, shinystyle", [str(emb_dir)])), tmp_path / "ours", progress=False)
    (png,) = (tmp_path / "ours").glob("0*.png")
    (again,) = _from_image(png, tmp_path / "again").entries  # the folder comes from the record
    assert again["reproduced"]["identical"] is True and again["embeddings"][0]["name"] == "shinystyle"
    # an A1111 image names them by hash: found in the embedding_dirs given, a wrong hash is an error
    sha = hashlib.sha256((emb_dir / "shinystyle.safetensors").read_bytes()).hexdigest()[:10]
    text = (f"a fox, shinystyle\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 4, Size: 32x32, "
            f'TI hashes: "shinystyle: {sha}", Version: v1.10.1')
    a1111 = _a1111_png(tmp_path / "a.png", text)
    (made,) = _from_image(a1111, tmp_path / "a", f"model.id={tiny_dir}", f"embedding_dirs=[{emb_dir}]").entries
    assert made["embeddings"][0]["sha256"].startswith(sha)
    with pytest.raises(ConfigError, match="not in embedding_dirs"):
        _from_image(a1111, tmp_path / "b", f"model.id={tiny_dir}")
    wrong = _a1111_png(tmp_path / "w.png", text.replace(sha, "0123456789"))
    with pytest.raises(ConfigError, match="has sha256"):
        _from_image(wrong, tmp_path / "c", f"model.id={tiny_dir}", f"embedding_dirs=[{emb_dir}]")
