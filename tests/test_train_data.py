"""t2i-train's data options without a model: captions with a trigger word, caption dropout, tag shuffling with
keep_tokens, repeats per folder, and bad images (EXIF-rotated, CMYK, 16-bit, transparent, corrupt, tiny)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runner.common.errors import ConfigError
from runner.train.config import DataConfig
from runner.train.data import load_pixels, scan, training_caption


def _img(path: Path, rgb=(200, 20, 20), size=(48, 40), caption: str | None = "a red thing") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def test_trigger_word_replaces_placeholder_or_is_prepended(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", caption="a photo of [trigger] on a beach")
    _img(tmp_path / "b.png", caption="a dog")
    caps = {e.path.name: e.caption for e in scan(DataConfig(dir=str(tmp_path), trigger="sks"))}
    assert caps == {"a.png": "a photo of sks on a beach", "b.png": "sks, a dog"}


def test_caption_dropout_and_tag_shuffle_keep_first_tags() -> None:
    cfg = DataConfig(dir="x", shuffle_tags=True, keep_tokens=1)
    caption = "sks, red, square, flat, bright"
    seen = {training_caption(caption, cfg, torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(seen) > 5  # shuffled
    for c in seen:
        tags = c.split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == sorted(["red", "square", "flat", "bright"])
    same = training_caption(caption, cfg, torch.Generator().manual_seed(3))
    assert same == training_caption(caption, cfg, torch.Generator().manual_seed(3))  # seeded: resumable
    drop = DataConfig(dir="x", caption_dropout=0.5)
    got = [training_caption(caption, drop, torch.Generator().manual_seed(s)) for s in range(200)]
    assert 60 < got.count("") < 140 and set(got) == {"", caption}


def test_repeats_per_folder(tmp_path: Path) -> None:
    _img(tmp_path / "top.png")
    _img(tmp_path / "3_subject" / "s.png", caption="subject")
    _img(tmp_path / "style" / "t.png", caption="style")
    names = [e.path.name for e in scan(DataConfig(dir=str(tmp_path)))]
    assert sorted(names) == ["s.png", "s.png", "s.png", "t.png", "top.png"]


def test_bad_images_skipped_or_converted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # EXIF orientation 6 (rotate 90° clockwise to view): stored 40 wide x 48 high, left half red
    arr = np.zeros((48, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    (tmp_path / "rotated.txt").write_text("rotated")
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    (tmp_path / "cmyk.txt").write_text("cmyk")
    Image.fromarray(np.full((48, 48), 65535 // 2, np.uint16)).save(tmp_path / "gray16.png")
    (tmp_path / "gray16.txt").write_text("16 bit")
    rgba = Image.new("RGBA", (48, 48), (0, 0, 255, 0))
    rgba.save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("transparent")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    _img(tmp_path / "tiny.png", size=(16, 16))
    with caplog.at_level(logging.WARNING, logger="runner.train.data"):
        examples = {e.path.name: e for e in scan(DataConfig(dir=str(tmp_path)))}
    assert sorted(examples) == ["clear.png", "cmyk.jpg", "gray16.png", "rotated.jpg"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "broken.png" in lines[0] and "tiny.png: 16x16 is smaller" in lines[1]
    assert lines[2] == "data.dir: skipped 2 of 6 images"

    def px(name: str) -> torch.Tensor:
        return (load_pixels(examples[name], 32, "center", False, torch.Generator()) + 1) * 127.5

    rot = px("rotated.jpg")  # viewed upright: 48 wide x 40 high, the red half on top
    assert rot[0, 2, 16] > 200 and rot[0, 29, 16] < 60
    assert px("cmyk.jpg")[:, 16, 16].tolist() == pytest.approx([255, 0, 0], abs=3)
    assert px("gray16.png")[:, 16, 16].tolist() == pytest.approx([128, 128, 128], abs=2)
    assert px("clear.png")[:, 16, 16].tolist() == pytest.approx([255, 255, 255], abs=1)  # on white


def test_no_usable_image_is_one_error(tmp_path: Path) -> None:
    _img(tmp_path / "tiny.png", size=(8, 8))
    with pytest.raises(ConfigError, match=r"none of its 1 images can be used \(tiny.png: 8x8 is smaller"):
        scan(DataConfig(dir=str(tmp_path)))


def test_aspect_ratio_buckets(tmp_path: Path) -> None:
    from runner.train.data import Example, bucket_batch, bucket_items, bucket_size

    assert bucket_size(1024, 512, 512, 16) == (720, 368)  # 2:1 at about 512^2 pixels, multiples of 16
    assert bucket_size(512, 512, 512, 16) == (512, 512)
    wide = Example(_img(tmp_path / "wide.png", size=(96, 48)), "wide")
    tall = Example(_img(tmp_path / "tall.png", size=(48, 96)), "tall")
    square = Example(_img(tmp_path / "sq.png", size=(64, 64)), "square")
    items = bucket_items([wide, tall, square, square], [32, 64], 8)
    assert items[0] == (0, (48, 24)) and items[1] == (0, (88, 48)) and items[2] == (1, (24, 48))
    epoch = [bucket_batch(items, 0, 2, n) for n in range(6)]  # 8 items, 6 batches of one bucket each
    assert all(len({size for _, size in b}) == 1 for b in epoch)
    assert sorted(x for b in epoch for x in b) == sorted(items)  # each item once per epoch
    assert epoch == [bucket_batch(items, 0, 2, n) for n in range(6)]  # seeded
    px = load_pixels(wide, (48, 24), "center", False, torch.Generator())
    assert tuple(px.shape) == (3, 24, 48)  # the whole wide image, nothing of the subject cropped
