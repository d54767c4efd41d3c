"""Comparison grids: layout, labels, metadata, aspect ratio, downscaling, axis checks (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from runner.config import ConfigError, GridConfig, RunConfig
from runner.outputs.grid import read_grid_info, write_grids
from runner.run import run


def _cfg(**kw) -> object:
    base = {"model": {"id": "builtin:tiny"}, "steps": 1, "device": "cpu"}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), {**base, **kw})


@pytest.fixture(scope="module")
def run_2x3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prompts x seeds = 2 x 3 images, grids on (default)."""
    out = tmp_path_factory.mktemp("grid") / "run"
    result = run(_cfg(prompts=["a red fox", "a blue bird"], seeds=[1, 2, 3]), out, progress=False)
    assert result.generated == 6
    return out


def _cell(grid: Image.Image, info: dict, r: int, c: int) -> np.ndarray:
    (cw, ch), (left, top) = info["cell_size"], info["origin"]
    box = (left + c * cw, top + r * ch, left + (c + 1) * cw, top + (r + 1) * ch)
    return np.asarray(grid.convert("RGB").crop(box))


def test_2x3_sweep_gives_one_grid_whose_size_labels_and_cells_match(run_2x3: Path) -> None:
    grids = sorted((run_2x3 / "grids").glob("*.png"))
    assert [g.name for g in grids] == ["grid.png"]
    info = read_grid_info(grids[0])
    # auto axes: the swept ones, the last as columns
    assert (info["y"], info["x"]) == ("prompt", "seed")
    assert info["y_values"] == ["a red fox", "a blue bird"] and info["x_values"] == [1, 2, 3]
    assert info["x_labels"] == ["seed: 1", "seed: 2", "seed: 3"]
    assert info["y_labels"] == ["prompt: a red fox", "prompt: a blue bird"]
    assert info["fixed"] == {} and info["cell_size"] == [64, 64] and info["scale"] == 1.0
    left, top = info["origin"]
    assert left > 0 and top > 0  # room for row and column labels
    with Image.open(grids[0]) as grid:
        grid.load()
    assert grid.size == (left + 3 * 64, top + 2 * 64) == tuple(info["size"])
    manifest = [json.loads(line) for line in (run_2x3 / "manifest.jsonl").read_text().splitlines()]
    by_file = {e["file"]: e for e in manifest}
    for r, row in enumerate(info["cells"]):
        for c, name in enumerate(row):
            e = by_file[name]
            assert (e["prompt"], e["seed"]) == (info["y_values"][r], info["x_values"][c])
            with Image.open(run_2x3 / name) as im:
                assert np.array_equal(_cell(grid, info, r, c), np.asarray(im.convert("RGB")))
    # the label strips hold dark text pixels; the top-left corner stays blank
    pixels = np.asarray(grid.convert("L"))
    assert pixels[:top, left:].min() < 100 and pixels[top:, :left].min() < 100
    assert pixels[:top, :left].min() == 255


def test_axes_can_be_chosen_and_huge_grids_are_downscaled(run_2x3: Path) -> None:
    (path,) = write_grids(run_2x3, GridConfig(x="prompt", y="seed"))
    info = read_grid_info(path)
    assert (info["x"], info["y"]) == ("prompt", "seed")
    assert len(info["cells"]) == 3 and len(info["cells"][0]) == 2
    (path,) = write_grids(run_2x3, GridConfig(max_size=120, min_cell=16))
    info = read_grid_info(path)
    with Image.open(path) as im:
        assert max(im.size) <= 120 and list(im.size) == info["size"]
    cw, ch = info["cell_size"]
    assert cw == ch < 64 and info["scale"] < 1  # cells shrink, square images stay square
    assert info["x_labels"] == ["seed: 1", "seed: 2", "seed: 3"]


@pytest.mark.slow
def test_cells_keep_aspect_ratio_and_other_axes_give_one_grid_each(tmp_path: Path) -> None:
    out = tmp_path / "run"
    axes, sizes = {"x": "height", "y": "steps"}, {"width": 64, "height": [32, 64]}
    run(_cfg(prompts=["a"], seeds=[1], steps=[1, 2], grid=axes, **sizes), out, progress=False)
    assert not list(out.glob("*.png.tmp")) and not list((out / "grids").glob(".*"))
    # only two axes are swept: one grid; now sweep a third one by adding seeds to the same run dir
    run(_cfg(prompts=["a"], seeds=[2], steps=[1, 2], grid=axes, **sizes), out, progress=False)
    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 2  # one per seed, covering the whole run dir (both runs)
    infos = [read_grid_info(g) for g in grids]
    assert sorted(i["fixed"]["seed"] for i in infos) == [1, 2]
    info = infos[0]
    assert info["x_values"] == [32, 64] and info["y_values"] == [1, 2] and info["cell_size"] == [64, 64]
    with Image.open(grids[0]) as grid:
        cell = _cell(grid, info, 0, 0)  # a 64x32 image centred in a 64x64 cell: white bands above and below
        with Image.open(out / info["cells"][0][0]) as im:
            assert im.size == (64, 32)
            assert np.array_equal(cell[16:48], np.asarray(im.convert("RGB")))
    assert (cell[:16] == 255).all() and (cell[48:] == 255).all()


def test_bad_axis_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    out = tmp_path / "never"
    msg = r"grid.x='sede' is not an axis \(did you mean 'seed'\?\); valid: prompt"
    with pytest.raises(ConfigError, match=msg):
        run(_cfg(grid={"x": "sede"}), out, progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError, match="both 'seed'"):
        write_grids(tmp_path, GridConfig(x="seed", y="seed"))


def test_grid_disabled_writes_none(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(_cfg(seeds=[1, 2], grid={"enabled": False}), out, progress=False)
    assert len(list(out.glob("*.png"))) == 2 and not (out / "grids").exists()


def _synthetic(folder: Path, rows: list[dict]) -> list[dict]:
    """Manifest entries (and tiny PNGs) for grid tests that need no generation."""
    entries = []
    for i, row in enumerate(rows):
        name = f"{i:05d}_x.png"
        Image.new("RGB", (32, 32), (i * 7 % 256, 0, 0)).save(folder / name)
        entries.append({"file": name, "key": f"k{i}", "index": i, "width": 32, "height": 32, "seed": 1,
                        "prompt": "a fox", **row})
    return entries


def _labels(paths: list[Path]) -> dict[str, tuple]:
    """file -> (page title values, column label, row label) over every grid page."""
    out: dict[str, tuple] = {}
    for p in paths:
        info = read_grid_info(p)
        for r, row in enumerate(info["cells"]):
            for c, f in enumerate(row):
                if f:
                    assert f not in out, f"{f} is in two cells"
                    xs, ys = info["x_labels"] or [""], info["y_labels"] or [""]
                    out[f] = (json.dumps(info["fixed"], sort_keys=True), xs[c], ys[r])
    return out


@pytest.mark.parametrize("rows", [
    # the same prompt with two negative prompts, two seeds
    [{"negative_prompt": n, "seed": s} for n in ("ugly", "blurry") for s in (1, 2)],
    # one adapter at two per-adapter scales (same names, multiplier 1)
    [{"lora_set_name": n, "lora_scale": 1.0, "loras": [{"name": "B", "scale": w, "sha256": "b" * 64}]}
     for n, w in (("B@0.5", 0.5), ("B", 1.0))],
    # a weight-0 member
    [{"lora_set_name": n, "lora_scale": 1.0, "loras": [{"name": "A", "scale": 1.0, "sha256": "a" * 64},
                                                      {"name": "B", "scale": w, "sha256": "b" * 64}]}
     for n, w in (("A+B@0", 0.0), ("A+B", 1.0))],
    # records written before lora_set_name existed: the per-adapter scale comes from the weights
    [{"lora_scale": m, "loras": [{"name": "A", "scale": w, "sha256": "a" * 64}]} for m, w in ((1.0, 0.5),
                                                                                            (0.5, 0.5))],
    # nothing tells them apart but their files (e.g. made again by an older version)
    [{}, {}],
])
def test_images_sharing_every_axis_value_each_get_a_cell_and_a_label_of_their_own(tmp_path: Path,
                                                                                    rows: list[dict]) -> None:
    entries = _synthetic(tmp_path, rows)
    labels = _labels(write_grids(tmp_path, GridConfig(), entries))
    assert sorted(labels) == sorted(e["file"] for e in entries)  # every image in a grid, once
    assert len(set(labels.values())) == len(entries)  # each under labels no other image has


def test_negative_prompts_of_one_prompt_are_all_in_the_grids(tmp_path: Path) -> None:
    prompts = [{"prompt": "a fox", "negative_prompt": "ugly"}, {"prompt": "a fox", "negative_prompt": "blurry"}]
    run(_cfg(prompts=prompts, seeds=[1, 2], width=32, height=32), tmp_path, progress=False)
    labels = _labels(sorted((tmp_path / "grids").glob("*.png")))
    assert len(labels) == 4 and len(set(labels.values())) == 4
    assert {json.loads(v[0]).get("negative_prompt") for v in labels.values()} == {"ugly", "blurry"}


def test_labels_name_the_defaults_and_file_names_keep_whole_words(tmp_path: Path) -> None:
    from runner.outputs.grid import _name, value_label

    assert value_label("clip_skip", None) == "clip_skip: 1"  # A1111's Clip skip 1: the last layer
    assert value_label("clip_skip", 2) == "clip_skip: 2"
    prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed, trending on artstation"
    name = _name({"prompt": prompt, "negative_prompt": "blurry lowres watermark", "steps": 30}, (2, 3))
    assert len(name) <= 110 and name.endswith("_p2")
    words = set(prompt.replace(",", "").split()) | {"blurry", "lowres", "watermark", "30"}
    for part in name.split("_")[1:-1]:
        value = next((part[len(a):] for a in ("negative-prompt-", "prompt-", "steps-") if part.startswith(a)), part)
        if len(value) == 8 and all(ch in "0123456789abcdef" for ch in value):
            continue  # the hash that keeps a long name unique
        assert all(w in words for w in value.split("-")), part


def test_unchanged_pages_are_not_drawn_again(run_2x3: Path) -> None:
    (first,) = write_grids(run_2x3, GridConfig())
    stamp = first.stat().st_mtime_ns
    (again,) = write_grids(run_2x3, GridConfig())
    assert again == first and again.stat().st_mtime_ns == stamp
