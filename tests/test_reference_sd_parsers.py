"""An independent reader of our metadata: `sd-parsers` (PyPI; it reads A1111, ComfyUI, InvokeAI, NovelAI, Fooocus)
reads every image a run writes as an A1111 image, to the values the image's own record holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

sd_parsers = pytest.importorskip("sd_parsers")

from runner.config import validate  # noqa: E402
from runner.outputs.metadata import read_png_record  # noqa: E402
from runner.run import run  # noqa: E402


@pytest.fixture(scope="module")
def images(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small sweep over what an infotext carries: prompts with commas, quotes, weights and a newline, negative
    prompts, two seeds, two samplers with schedule types, CFG, Clip skip, and a LoRA with a `,` in its name."""
    out = tmp_path_factory.mktemp("sdp")
    cfg = {"model": {"id": str(tiny_dir)}, "steps": 2, "width": 32, "height": 32, "device": "cpu",
           "grid": {"enabled": False}, "seeds": [7, 123456789],
           "prompts": [{"prompt": "a (red:1.2) fox, \"quoted\" words", "negative_prompt": "blurry, low quality"},
                       {"prompt": "line one\nline two [soft]", "negative_prompt": ""}],
           "scheduler": ["euler", "dpmpp_2m"], "schedule": "karras", "guidance_scale": 6.5, "clip_skip": 2,
           "lora_sets": [[{"source": str(tiny_dir / "loras" / "tiny_kohya.safetensors"), "name": "style, v2",
                           "scale": 0.7}]]}
    result = run(validate(cfg), out, progress=False)
    assert result.generated == 8
    return [out / e["file"] for e in result.entries]


def test_sd_parsers_reads_every_image_to_its_record(images: list[Path]) -> None:
    manager = sd_parsers.ParserManager()
    for path in images:
        rec, text = read_png_record(str(path))
        assert rec is not None and text
        with Image.open(path) as im:
            info = manager.parse(im)
        assert info is not None, path
        assert info.generator.name == "AUTOMATIC1111"
        (sampler,) = info.samplers
        assert sampler.name == rec["sampler"]
        assert sampler.parameters["scheduler"] == rec["schedule_type"]
        assert int(sampler.parameters["seed"]) == rec["seed"]
        assert int(sampler.parameters["steps"]) == rec["steps"]
        assert float(sampler.parameters["cfg_scale"]) == rec["guidance_scale"]
        assert [p.value for p in sampler.prompts] == [rec["prompt"]]
        assert [p.value for p in sampler.negative_prompts] == ([rec["negative_prompt"]] if rec["negative_prompt"]
                                                               else [])
        assert sampler.model.name == rec["model"]["name"]
        assert sampler.model.hash == rec["model"]["hash"][:10]
        assert info.metadata["Size"] == f"{rec['width']}x{rec['height']}"
        assert int(info.metadata["Clip skip"]) == rec["clip_skip"]
