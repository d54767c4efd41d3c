"""Metadata: A1111 infotext written and parsed back, JSON record in the PNG."""

from __future__ import annotations

from PIL import Image

from runner.outputs.metadata import infotext, parse_infotext, read_png_record
from runner.outputs.writer import save_png


def record(**over) -> dict:
    rec = {
        "prompt": "a red fox, detailed\nsecond line",
        "negative_prompt": "blurry, low quality",
        "steps": 4, "sampler": "Euler a", "guidance_scale": 7.5, "seed": 1234, "width": 64, "height": 32,
        "model": {"name": "tiny", "hash": "0123456789abcdef" * 4},
        "loras": [{"name": "style", "sha256": "ab" * 32, "scale": 0.5}, {"name": "k", "sha256": "cd" * 32,
                                                                          "scale": 1.0}],
        "versions": {"t2i-runner": "0.1.0"},
    }
    rec.update(over)
    return rec


def test_infotext_round_trip() -> None:
    text = infotext(record())
    lines = text.split("\n")
    assert lines[0] == "a red fox, detailed" and lines[2] == "Negative prompt: blurry, low quality"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a red fox, detailed\nsecond line"
    assert parsed["Negative prompt"] == "blurry, low quality"
    assert parsed["Steps"] == "4" and parsed["Sampler"] == "Euler a" and parsed["CFG scale"] == "7.5"
    assert parsed["Seed"] == "1234" and (parsed["Size-1"], parsed["Size-2"]) == ("64", "32")
    assert parsed["Model hash"] == "0123456789" and parsed["Model"] == "tiny"
    assert parsed["Lora hashes"] == {"style": "ab" * 6, "k": "cd" * 6}


def test_no_negative_prompt_line_when_empty() -> None:
    text = infotext(record(negative_prompt="", loras=[]))
    assert "Negative prompt" not in text and "Lora hashes" not in text
    assert parse_infotext(text)["Negative prompt"] == ""


def test_png_carries_both_chunks(tmp_path) -> None:
    rec = record(file="x.png")
    path = tmp_path / "x.png"
    save_png(Image.new("RGB", (8, 8), "red"), path, rec)
    got, text = read_png_record(str(path))
    assert got == rec
    assert text == infotext(rec)
    assert not list(tmp_path.glob(".*.tmp"))
