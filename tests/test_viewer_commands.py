"""Issue 31 (4): every copyable command of the viewer, run as a shell would read it, makes the image's pixels again,
for every model family (the tiny model of each)."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM, run_cli
from PIL import Image

from runner.outputs.manifest import Manifest

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"),
]
FAMILIES = ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux1", "tiny-flux2", "tiny-zimage", "tiny-qwenimage"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_every_copyable_command_remakes_the_image_for_every_family(browser, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = run_cli(f"models=[{','.join(FAMILIES)}]", "prompts=[a red fox]", "seeds=[3]", "steps=2", "width=64",
                "height=64", f"output_dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    entries = Manifest(run_dir).entries()
    assert len(entries) == len(FAMILIES)
    page = browser.new_page()
    page.goto((run_dir / "index.html").resolve().as_uri())
    page.wait_for_function("window.t2iViewer !== undefined")
    commands = page.evaluate("""() => { const v = window.t2iViewer;
        return v.images().map((im, i) => [im.f, v.overridesCommand(v.record(i)), v.fromImageCommand(im.f)]); }""")
    page.close()
    assert sorted(f for f, _, _ in commands) == sorted(e["file"] for e in entries)
    for n, (file, over, from_image) in enumerate(commands):
        want = _pixels(run_dir / file)
        for k, command in enumerate((over, from_image)):
            args = shlex.split(command)
            assert args[0] == "t2i"
            out = tmp_path / f"again-{n}-{k}"
            r = run_cli(*args[1:], f"output_dir={out}", cwd=tmp_path)
            assert r.returncode == 0, (command, r.stderr)
            (made,) = Manifest(out).entries()
            assert made["model"]["id"] == next(e for e in entries if e["file"] == file)["model"]["id"], command
            assert np.array_equal(_pixels(out / made["file"]), want), command


def test_a_run_without_images_says_so_at_the_top(browser, tmp_path: Path) -> None:
    from runner.outputs import viewer

    viewer.write_viewer(tmp_path, [], viewer.progress("done", 0, 0, 0.0))
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto((tmp_path / "index.html").resolve().as_uri())
    page.wait_for_function("window.t2iViewer !== undefined")
    assert page.is_visible("#empty") and page.text_content("#empty") == "This run has no images."
    box = page.locator("#empty").bounding_box()
    view = page.locator("#view").bounding_box()
    page.close()
    assert box["y"] + box["height"] <= view["y"] + 1  # above the (empty) image panel, not under it
