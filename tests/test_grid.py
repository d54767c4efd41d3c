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
