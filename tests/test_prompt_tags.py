"""`<lora:name:w>` tags (issue 15): found in lora_dirs by file stem (or by the image's hash), applied as the image's
LoRA set, combined with lora_sets as documented; the prompt as written is what the image records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runner.common.errors import ConfigError
from runner.config import validate
from runner.outputs.metadata import read_png_record
from runner.run import run

SIDE = 32


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _cfg(tiny_dir: Path, prompts: list, **extra) -> dict:
    return {"model": {"id": str(tiny_dir)}, "prompts": prompts, "seeds": [3], "steps": 2, "width": SIDE,
            "height": SIDE, "device": "cpu", "grid": {"enabled": False}, "lora_dirs": [str(tiny_dir / "loras")],
            **extra}


def _by_prompt(out: Path, result) -> dict:
    return {(e["prompt"], e["lora_set_name"]): _pixels(out / e["file"]) for e in result.entries}


def test_a_tag_is_the_equivalent_lora_sets_entry(tiny_dir: Path, tmp_path: Path) -> None:
    kohya = str(tiny_dir / "loras" / "tiny_kohya.safetensors")
    tagged = run(validate(_cfg(tiny_dir, ["a red fox <lora:tiny_kohya:0.8>"])), tmp_path / "tag", progress=False)
    listed = run(validate(_cfg(tiny_dir, ["a red fox "],
                               lora_sets=[[{"source": kohya, "scale": 0.8, "name": "tiny_kohya"}]])),
                 tmp_path / "set", progress=False)
    plain = run(validate(_cfg(tiny_dir, ["a red fox "])), tmp_path / "none", progress=False)
    (t,), (s,), (n,) = tagged.entries, listed.entries, plain.entries
    assert np.array_equal(_pixels(tmp_path / "tag" / t["file"]), _pixels(tmp_path / "set" / s["file"]))
    assert not np.array_equal(_pixels(tmp_path / "tag" / t["file"]), _pixels(tmp_path / "none" / n["file"]))
    assert _pixels(tmp_path / "tag" / t["file"]).std() > 5
    rec, text = read_png_record(str(tmp_path / "tag" / t["file"]))
    assert rec["prompt"] == "a red fox <lora:tiny_kohya:0.8>"  # as written, tag included (as A1111 records it)
    assert [(lo["name"], lo["scale"]) for lo in rec["loras"]] == [("tiny_kohya", 0.8)]
    assert text.splitlines()[0] == "a red fox <lora:tiny_kohya:0.8>" and "Lora hashes: " in text


def test_tags_and_lora_sets_combine_as_documented(tiny_dir: Path, tmp_path: Path, lora_a: dict) -> None:
    cfg = _cfg(tiny_dir, ["a fox <lora:tiny_kohya:0.5>", "a cat"], lora_sets=[[], [lora_a]],
               grid={"x": "lora_set", "y": "prompt"})
    result = run(validate(cfg), tmp_path, progress=False)
    got = sorted((e["prompt"], e["lora_set_name"], tuple((lo["name"], lo["scale"]) for lo in e["loras"]))
                 for e in result.entries)
    assert got == [("a cat", "A", (("A", 1.0),)), ("a cat", "nolora", ()),
                   ("a fox <lora:tiny_kohya:0.5>", "A", (("A", 1.0), ("tiny_kohya", 0.5))),
                   ("a fox <lora:tiny_kohya:0.5>", "nolora", (("tiny_kohya", 0.5),))]
    assert len(result.grids) == 1  # the grid's lora_set axis is the config's sets: a full 2 x 2 grid
    # a tag naming a LoRA the set already has (same file, or same name) sets its weight (the prompt wins)
    renamed = {"source": str(tiny_dir / "loras" / "tiny_kohya.safetensors"), "name": "tiny_kohya", "scale": 0.9}
    for i, (entry, tag, name) in enumerate(((lora_a, "<lora:tiny_style:0.3>", "A"),
                                             (renamed, "<lora:tiny_kohya:0.3>", "tiny_kohya"))):
        again = run(validate(_cfg(tiny_dir, [f"a fox {tag}"], lora_sets=[[entry]])), tmp_path / f"w{i}",
                    progress=False)
        (e,) = again.entries
        assert [(lo["name"], lo["scale"]) for lo in e["loras"]] == [(name, 0.3)]


def test_unknown_or_unfindable_tags_are_one_line_exit_2(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"LoRA 'tiny_kohy' .* is not in lora_dirs .*close matches: tiny_kohya"):
        run(validate(_cfg(tiny_dir, ["a fox <lora:tiny_kohy:0.5>"])), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="lora_dirs is empty"):
        run(validate(_cfg(tiny_dir, ["a fox <lora:tiny_kohya:0.5>"], lora_dirs=[])), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = run_cli(f"model.id={tiny_dir}", "prompts=['a fox <lora:nowhere:0.5>']", f"lora_dirs=[{tiny_dir / 'loras'}]",
                "steps=2", f"hydra.run.dir={tmp_path / 'c'}", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "nowhere" in r.stderr and "lora_dirs" in r.stderr
    r = run_cli(f"model.id={tiny_dir}", "prompts=['a fox <lora:tiny_kohya:x>']", "steps=2",
                f"hydra.run.dir={tmp_path / 'd'}", cwd=tmp_path)
    assert r.returncode == 2 and "'x' is not a number" in r.stderr, r.stderr


def test_plain_syntax_leaves_tags_as_text(tiny_dir: Path, tmp_path: Path) -> None:
    result = run(validate(_cfg(tiny_dir, ["a fox <lora:tiny_kohya:0.5>"], prompt_syntax="plain")), tmp_path,
                 progress=False)
    (e,) = result.entries
    assert e["loras"] == [] and e["prompt_syntax"] == "plain"


def test_from_image_of_an_a1111_image_with_tags_finds_loras_by_name_and_by_hash(tiny_dir: Path,
                                                                                 tmp_path: Path) -> None:
    from runner.common.hashing import addnet_sha256

    kohya = tiny_dir / "loras" / "tiny_kohya.safetensors"
    renamed = tmp_path / "loras"
    renamed.mkdir()
    shutil.copy(kohya, renamed / "my_style_v2.safetensors")  # the same file under another name here
    direct = run(validate(_cfg(tiny_dir, ["a (red:1.1) fox <lora:my_style_v2:0.7>"], lora_dirs=[str(renamed)],
                               scheduler="euler", schedule="uniform", guidance_scale=7, seeds=[11])),
                 tmp_path / "direct", progress=False)
    want = _pixels(tmp_path / "direct" / direct.entries[0]["file"])
    assert want.std() > 5 and not direct.entries[0].get("faults")
    autov3 = addnet_sha256(kohya)[:12]
    for name in ("my_style_v2", "old_name"):  # found by file stem; a name not found here, by its hash
        info = PngInfo()
        info.add_text("parameters", f"a (red:1.1) fox <lora:{name}:0.7>\nSteps: 2, Sampler: Euler, CFG scale: 7, "
                                    f'Seed: 11, Size: {SIDE}x{SIDE}, Lora hashes: "{name}: {autov3}"')
        img = tmp_path / f"{name}.png"
        Image.new("RGB", (SIDE, SIDE)).save(img, pnginfo=info)
        d = tmp_path / f"again-{name}"
        r = run_cli(f"from_image={img}", f"model.id={tiny_dir}", f"lora_dirs=[{renamed}]", f"hydra.run.dir={d}",
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        (e,) = [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()]
        assert [(lo["name"], lo["scale"]) for lo in e["loras"]] == [(name, 0.7)]
        assert np.array_equal(_pixels(d / e["file"]), want), name
