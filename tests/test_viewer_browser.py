"""The run viewer in a real browser (Chromium via Playwright), from file:// and from t2i-serve's /runs: axes
and filters put the right files in the right cells, the image view and its commands, the comparison views,
keyboard, phone width, live updates; every request is checked to stay on this machine. Each test keeps a
screenshot of every view it opens in its tmp dir."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import CHROMIUM, NO_CHROMIUM, uvicorn_thread
from PIL import Image

from runner.outputs import viewer
from runner.outputs.manifest import Manifest
from runner.outputs.thumbs import THUMB_DIR, thumb_rel
from runner.server.app import compose_config, create_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=NO_CHROMIUM),
]
FOX, HTML_PROMPT = "a red fox", 'a <img src=x onerror="window.pwned=1"> car'


def _local(url: str) -> bool:
    u = urlparse(url)
    return u.scheme in ("file", "data", "blob", "about") or (u.scheme == "http" and u.hostname == "127.0.0.1")


@pytest.fixture
def open_page(browser, tmp_path: Path):
    """open_page(url, width, height) -> a page whose every request is recorded (and refused if it would leave
    this machine); the test fails afterwards if any did. Also checks that the page raised no JS error."""
    contexts, seen, errors = [], [], []

    def guard(route) -> None:
        seen.append(route.request.url)
        route.continue_() if _local(route.request.url) else route.abort()

    def open_(url: str, width: int = 1280, height: int = 800):
        ctx = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        ctx.route("**/*", guard)
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("request", lambda r: seen.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("window.t2iViewer !== undefined || document.getElementById('runs') !== null")
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    assert seen, "no request was seen: the guard did not run"
    assert [u for u in seen if not _local(u)] == [], "a request left the machine"
    assert errors == []


def shot(page, tmp_path: Path, name: str, selector: str | None = None) -> Path:
    """Keep a screenshot of the current view as a test artifact (in the test's tmp dir)."""
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    (page.locator(selector) if selector else page).screenshot(path=str(path))
    assert path.stat().st_size > 0
    return path


def cells(page) -> dict[tuple[int, int], list[str]]:
    return {(r, c): files for r, c, files in page.eval_on_selector_all(
        ".cell", "els => els.map(e => [+e.dataset.r, +e.dataset.c, "
                 "[...e.querySelectorAll('.thumb')].map(t => t.dataset.file)])")}


def headers(page, which: str) -> list[str]:
    return page.eval_on_selector_all(f"#{which}head .label", "els => els.sort((a, b) => "
                                     "(parseFloat(a.style.left) - parseFloat(b.style.left)) || "
                                     "(parseFloat(a.style.top) - parseFloat(b.style.top))).map(e => e.textContent)")


def pick(page, axis: str, value: str) -> None:
    page.select_option(f'#filters select[data-axis="{axis}"]', value)


def find(entries: list[dict], **want) -> str:
    from runner.outputs.grid import axis_value

    (hit,) = [e["file"] for e in entries if all(axis_value(e, k) == v for k, v in want.items())]
    return hit


def file_url(run_dir: Path) -> str:
    return (run_dir / "index.html").resolve().as_uri()


def test_axes_and_filters_put_the_right_files_in_the_right_cells(viewer_run, open_page, tmp_path: Path) -> None:
    entries = Manifest(viewer_run.dir).entries()
    page = open_page(file_url(viewer_run.dir))
    # the default view: the last two swept axes, like the PNG grids; the baseline row first and marked
    assert page.input_value("#x-axis") == "lora_scale" and page.input_value("#y-axis") == "lora_set"
    assert headers(page, "row") == ["lora_set: nolorabaseline", "lora_set: kohya"]
    assert headers(page, "col") == ["lora_scale: 0.5", "lora_scale: 1"]
    # seeds (the batch) default to all of them in each cell; no LoRA: the same images under every scale
    assert page.input_value('#filters select[data-axis="seed"]') == "*"
    base = [find(entries, prompt=FOX, seed=s, lora_set="nolora") for s in (1, 2)]
    kohya = {c: [find(entries, prompt=FOX, seed=s, lora_set="kohya", lora_scale=x) for s in (1, 2)]
             for c, x in enumerate((0.5, 1.0))}
    assert cells(page) == {(0, 0): base, (0, 1): base, (1, 0): kohya[0], (1, 1): kohya[1]}
    assert page.eval_on_selector_all(".cell.base-row", "els => els.length") == 2
    shot(page, tmp_path, "grid-default")

    page.select_option("#x-axis", "seed")
    page.select_option("#y-axis", "prompt")
    pick(page, "lora_set", '"kohya"')
    pick(page, "lora_scale", "0.5")
    assert headers(page, "col") == ["seed: 1", "seed: 2"]
    assert headers(page, "row") == [f"prompt: {FOX}", f"prompt: {HTML_PROMPT}"]
    want = {(r, c): [find(entries, prompt=p, seed=s, lora_set="kohya", lora_scale=0.5)]
            for r, p in enumerate([FOX, HTML_PROMPT]) for c, s in enumerate([1, 2])}
    assert cells(page) == want
    shot(page, tmp_path, "grid-seed-by-prompt")
    page.click("#swap")  # rows and columns trade places
    assert page.input_value("#x-axis") == "prompt" and page.input_value("#y-axis") == "seed"
    assert cells(page) == {(c, r): files for (r, c), files in want.items()}
    page.keyboard.press("s")  # and back, from the keyboard
    assert cells(page) == want
    # "all" on a filter: every image of it in the cell (a batch is never cut to its first image)
    pick(page, "lora_scale", "*")
    got = cells(page)
    assert got == {(r, c): [find(entries, prompt=p, seed=s, lora_set="kohya", lora_scale=0.5),
                            find(entries, prompt=p, seed=s, lora_set="kohya", lora_scale=1.0)]
                   for r, p in enumerate([FOX, HTML_PROMPT]) for c, s in enumerate([1, 2])}
    shot(page, tmp_path, "grid-all-scales")
    # hide a column; the state survives a reload (it lives in the URL)
    page.click("#shown summary >> nth=0")
    page.uncheck('#shown input[data-value="1"]')
    assert headers(page, "col") == ["seed: 2"] and set(cells(page)) == {(0, 0), (1, 0)}
    page.reload()
    page.wait_for_function("window.t2iViewer !== undefined")
    assert headers(page, "col") == ["seed: 2"] and page.input_value("#x-axis") == "seed"
    # the prompt with HTML in it is text everywhere, never markup
    assert page.evaluate("window.pwned") is None
    assert page.eval_on_selector_all("img[src='x']", "els => els.length") == 0


def test_image_view_shows_the_record_and_a_command_that_reproduces_it(viewer_run, open_page,
                                                                       tmp_path: Path) -> None:
    from runner.config import validate
    from runner.reproduce.from_image import record_config
    from runner.run import run
    from runner.server.app import compose_config

    entries = Manifest(viewer_run.dir).entries()
    page = open_page(file_url(viewer_run.dir) + "#x=seed&y=prompt&f.lora_set=%22kohya%22&f.lora_scale=0.5")
    # keyboard: arrows move the focus, Enter opens the image, arrows move on in the image view, Esc closes
    page.focus("#scroller")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowRight")
    assert page.eval_on_selector(".cell.focus", "e => [+e.dataset.r, +e.dataset.c]") == [1, 1]
    page.keyboard.press("Enter")
    name = find(entries, prompt=HTML_PROMPT, seed=2, lora_set="kohya", lora_scale=0.5)
    assert page.is_visible("#detail") and page.text_content("#detail-caption").startswith(name)
    page.keyboard.press("ArrowLeft")
    name = find(entries, prompt=HTML_PROMPT, seed=1, lora_set="kohya", lora_scale=0.5)
    assert page.text_content("#detail-caption").startswith(name)
    rec = next(e for e in entries if e["file"] == name)
    record = page.inner_text("#record")
    for text in (HTML_PROMPT, rec["loras"][0]["sha256"][:12], "kohya", "Euler", "tiny", rec["model"]["hash"],
                 "torch " + rec["versions"]["torch"], "1 / 0.5"):
        assert text in record, text
    assert page.evaluate("window.pwned") is None
    shot(page, tmp_path, "detail")
    assert page.text_content("#cmd-from") == f"t2i from_image={viewer_run.dir.resolve() / name}"
    page.click("[data-copy=cmd-from]")
    page.wait_for_function("document.getElementById('copy-note').textContent !== ''")
    assert page.text_content("#copy-note") in ("Copied.", "Select the command and copy it (the browser refused).")
    command = page.text_content("#cmd-over")
    page.keyboard.press("Escape")
    assert page.is_hidden("#detail")

    # the overrides command, as a shell reads it, sets what from_image would take from the record
    args = shlex.split(command)
    assert args[0] == "t2i"
    cfg = compose_config(args[1:])
    for key, want in record_config(rec).items():
        got = _plain(cfg, key)
        if key == "model":  # the default group's settings stay in the composed config; the record's keys win
            assert all(_plain(cfg, k) == rec[k] for k in got.pop("settings")), got
            want = {k: v for k, v in want.items() if k != "settings"}
        if isinstance(want, dict):
            got = {k: got[k] for k in want}
        assert got == want, key
    assert _plain(cfg, "prompts") == [HTML_PROMPT] and validate(cfg).seeds == (1,)
    # ... and it makes the same pixels
    result = run(cfg, tmp_path / "again", progress=False)
    (made,) = result.entries
    with Image.open(tmp_path / "again" / made["file"]) as a, Image.open(viewer_run.dir / name) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _plain(cfg, key: str):
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _sample(path: Path, w: int, h: int) -> np.ndarray:
    """The colour at the centre of each source pixel of a screenshot of a w x h image drawn enlarged."""
    with Image.open(path) as im:
        shot_ = np.asarray(im.convert("RGB")).astype(int)
    sy, sx = shot_.shape[0] / h, shot_.shape[1] / w
    ys = (np.arange(h) * sy + sy / 2).astype(int)
    xs = (np.arange(w) * sx + sx / 2).astype(int)
    return shot_[ys][:, xs]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_compare_side_by_side_slider_and_difference_to_the_baseline(viewer_run, open_page,
                                                                     tmp_path: Path) -> None:
    entries = Manifest(viewer_run.dir).entries()
    a = find(entries, prompt=FOX, seed=1, lora_set="kohya", lora_scale=1.0)
    b = find(entries, prompt=FOX, seed=1, lora_set="kohya", lora_scale=0.5)
    base = find(entries, prompt=FOX, seed=1, lora_set="nolora")
    page = open_page(file_url(viewer_run.dir) + "#x=lora_scale&y=lora_set&f.prompt=%22a%20red%20fox%22&f.seed=1")
    page.add_style_tag(content=".stage .tag, #slider-line { display: none; }")  # clean pixels to compare
    page.focus("#scroller")
    for key in ("ArrowDown", "ArrowRight", "a", "ArrowLeft", "b", "c"):
        page.keyboard.press(key)
    assert page.text_content("#slot-a") == f"prompt: {FOX}, seed: 1, lora_set: kohya, lora_scale: 1"
    assert page.get_attribute("#side-a", "src") == a and page.get_attribute("#side-b", "src") == b
    assert page.text_content("#cap-a") == "A: lora_scale: 1" and page.text_content("#cap-b") == "B: lora_scale: 0.5"
    shot(page, tmp_path, "compare-side")
    page.keyboard.press("2")
    stage = page.locator("#slider-stage")
    for pos, want in ((100, a), (0, b)):
        page.eval_on_selector("#slider-pos", f"e => {{ e.value = {pos}; e.dispatchEvent(new Event('input')); }}")
        png = shot(page, tmp_path, f"compare-slider-{pos}", "#slider-stage")
        assert np.array_equal(_sample(png, 32, 32), _pixels(viewer_run.dir / want))
    page.eval_on_selector("#slider-pos", "e => { e.value = 50; e.dispatchEvent(new Event('input')); }")
    half = _sample(shot(page, tmp_path, "compare-slider-50", "#slider-stage"), 32, 32)
    assert np.array_equal(half[:, :15], _pixels(viewer_run.dir / a)[:, :15])
    assert np.array_equal(half[:, 17:], _pixels(viewer_run.dir / b)[:, 17:])
    box = stage.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] / 2)  # drag/click moves it too
    assert page.input_value("#slider-pos") == "25"
    page.keyboard.press("3")
    assert page.get_attribute("#diff-a", "src") == a and page.get_attribute("#diff-ref-img", "src") == base
    diff = _sample(shot(page, tmp_path, "compare-diff", "#diff-stage"), 32, 32)
    want = np.abs(_pixels(viewer_run.dir / a) - _pixels(viewer_run.dir / base))
    assert want.max() > 0 and np.abs(diff - want).max() <= 2  # |A - baseline| per pixel and channel
    page.eval_on_selector("#diff-gain", "e => { e.value = 4; e.dispatchEvent(new Event('input')); }")
    brighter = _sample(shot(page, tmp_path, "compare-diff-gain4", "#diff-stage"), 32, 32)
    assert brighter.mean() > 2 * diff.mean()
    page.select_option("#diff-ref", "b")
    assert page.get_attribute("#diff-ref-img", "src") == b
    page.keyboard.press("Escape")
    assert page.is_hidden("#compare")
    # d: straight from a cell to its difference with the no-LoRA baseline
    page.keyboard.press("d")
    assert page.is_visible("#compare") and page.get_attribute("#diff-ref-img", "src") == base


def test_phone_width_has_no_sideways_page_and_every_view_fits(viewer_run, open_page, tmp_path: Path) -> None:
    page = open_page(file_url(viewer_run.dir), width=390, height=844)
    fits = "() => document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(fits)
    assert page.is_visible("#x-axis") and page.is_visible("#filters select >> nth=0")
    shot(page, tmp_path, "phone-grid")
    first = page.get_attribute(".thumb >> nth=0", "data-file")
    page.click(".thumb >> nth=0")
    assert page.is_visible("#detail-img") and page.evaluate(fits)
    panel = page.locator("#detail .panel").bounding_box()
    assert panel["width"] <= 390 and page.locator("#detail-img").bounding_box()["width"] <= 390
    shot(page, tmp_path, "phone-detail")
    page.click("#detail-a")
    page.keyboard.press("Escape")
    page.click(f'.thumb:not([data-file="{first}"]) >> nth=0')
    page.click("#detail-b")
    page.keyboard.press("Escape")
    page.click("#compare-open")
    assert page.get_attribute("#side-a", "src") != page.get_attribute("#side-b", "src")
    a, b = page.locator("#side-a").bounding_box(), page.locator("#side-b").bounding_box()
    assert b["y"] >= a["y"] + a["height"] - 1 and max(a["x"] + a["width"], b["x"] + b["width"]) <= 390
    assert a["width"] >= 160  # small images are enlarged to fill the phone (by whole pixels)
    assert page.evaluate(fits)
    shot(page, tmp_path, "phone-compare")


@pytest.fixture(scope="module")
def live_server(viewer_run, tmp_path_factory: pytest.TempPathFactory):
    """uvicorn serving `t2i-serve model=tiny` with the viewer test runs as `server.run_dirs`."""
    tmp = tmp_path_factory.mktemp("viewer-server")
    live = tmp / "live"
    live.mkdir()
    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp / 'out'}",
                                     f"server.run_dirs=[{viewer_run.dir.parent},{live}]"]))
    with uvicorn_thread(app) as url:
        yield url, live


def test_runs_page_opens_a_viewer_served_over_http(viewer_run, live_server, open_page, tmp_path: Path) -> None:
    base_url, _ = live_server
    entries = Manifest(viewer_run.dir).entries()
    page = open_page(base_url + "/runs")
    shot(page, tmp_path, "runs")
    page.click('a[href="/runs/1/run/"]')
    page.wait_for_function("window.t2iViewer !== undefined")
    assert page.url.startswith(base_url + "/runs/1/run/#x=")
    assert len(cells(page)) == 4
    a = find(entries, prompt=FOX, seed=1, lora_set="kohya", lora_scale=1.0)
    base = find(entries, prompt=FOX, seed=1, lora_set="nolora")
    page.click(f'.thumb[data-file="{a}"]')
    # served over http, the page may read pixels: the difference view adds exact numbers
    page.click("#detail-diff")
    page.wait_for_function("document.getElementById('diff-stats').dataset.max !== undefined")
    want = np.abs(_pixels(viewer_run.dir / a) - _pixels(viewer_run.dir / base)).max()
    assert page.get_attribute("#diff-stats", "data-max") == str(want)
    assert page.text_content("#diff-stats").startswith(f"max pixel diff {want}, mean ")
    shot(page, tmp_path, "http-diff")
    page.keyboard.press("Escape")  # back to the image view it was opened from
    assert page.is_visible("#detail") and page.is_hidden("#compare")
    page.keyboard.press("Escape")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    page.click(f'.thumb[data-file="{a}"]')
    page.click("[data-copy=cmd-over]")
    page.wait_for_function("document.getElementById('copy-note').textContent !== ''")
    assert page.text_content("#copy-note") == "Copied."
    assert page.evaluate("navigator.clipboard.readText()") == page.text_content("#cmd-over")


def _land(run_dir: Path, src: Path, entries: list[dict], live) -> None:
    """What the writer threads do for each image: the PNG, its thumbnail, then the viewer hears of it."""
    for e in entries:
        shutil.copy(src / e["file"], run_dir / e["file"])
        (run_dir / THUMB_DIR).mkdir(exist_ok=True)
        shutil.copy(src / thumb_rel(e["file"]), run_dir / thumb_rel(e["file"]))
        Manifest(run_dir).append(e)
        live.add(e)


def test_live_run_shows_new_images_as_they_land_from_file_and_from_the_server(viewer_run, live_server, open_page,
                                                                             tmp_path: Path) -> None:
    base_url, live_root = live_server
    run_dir = live_root / "run"
    run_dir.mkdir()
    entries = sorted(Manifest(viewer_run.dir).entries(), key=lambda e: e["index"])
    live = viewer.LiveViewer(run_dir, [], planned=len(entries), done=0, interval=0.1)
    try:
        pages = [open_page(file_url(run_dir)), open_page(f"{base_url}/runs/2/run/")]
        for page in pages:
            assert page.text_content("#empty") == "Waiting for the first image…"
            assert page.text_content("#progress-text").startswith("running: 0 / 12 images")
        _land(run_dir, viewer_run.dir, entries[:5], live)
        for page in pages:  # no reload: the page follows the run by itself
            page.wait_for_function("window.t2iViewer.images().length === 5", timeout=20_000)
            assert page.text_content("#progress-text").startswith("running: 5 / 12 images")
        shot(pages[0], tmp_path, "live-running")
        _land(run_dir, viewer_run.dir, entries[5:], live)
    finally:
        live.close("done")
    for page in pages:
        page.wait_for_function("window.t2iViewer.images().length === 12", timeout=20_000)
        page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('done')",
                               timeout=20_000)
        assert page.text_content("#progress-text") == "done: 12 / 12 images"
        shown = {f for files in cells(page).values() for f in files}
        assert shown and shown <= {e["file"] for e in entries}
    shot(pages[1], tmp_path, "live-done")


@pytest.mark.slow
def test_the_viewer_benchmark_runs(tmp_path: Path) -> None:
    """bench/bench_viewer.py end to end on 300 images (what it measures is recorded in docs/performance.md)."""
    import subprocess
    import sys

    md = tmp_path / "B.md"
    proc = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "bench_viewer.py"),
                           "--images", "300", "--trials", "1", "--frames", "20", "--dir", str(tmp_path / "b"),
                           "--benchmarks", str(md)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in md.read_text().splitlines() if line.startswith("| viewer") or line.startswith("| naive")]
    assert len(rows) == 4 and "300 images" in md.read_text() and "Ratio, first screen" in proc.stdout
    assert len(Manifest(tmp_path / "b" / "run").entries()) == 300


def screenshot_path(name: str, tmp_path: Path) -> Path:
    """docs/img/NAME with T2I_DOCS_SCREENSHOTS=1 (how the docs' pictures are made), else the test's tmp dir."""
    import os

    docs = Path(__file__).resolve().parent.parent / "docs" / "img"
    return (docs if os.environ.get("T2I_DOCS_SCREENSHOTS") == "1" else tmp_path) / name


@pytest.mark.slow
def test_docs_screenshot_of_the_viewer(open_page, tmp_path: Path) -> None:
    """The viewer picture of README.md and docs/index.md: 2 prompts x 3 LoRA sets x 3 seeds of the tiny model,
    prompts down and LoRA sets across, from file://."""
    from omegaconf import OmegaConf

    from runner.config import RunConfig
    from runner.run import run

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "model": {"id": "builtin:tiny"}, "device": "cpu", "steps": 4, "width": 64, "height": 64,
        "prompts": ["a red fox in the snow", "a lighthouse at dusk"], "seeds": [1, 2, 3],
        "lora_sets": [[], [{"source": "builtin:tiny/loras/tiny_style", "weight_name": "tiny_style.safetensors",
                            "name": "style"}], [{"source": "builtin:tiny/loras/tiny_kohya.safetensors",
                                                 "name": "kohya"}]],
        "grid": {"x": "lora_set", "y": "prompt"}})
    out = tmp_path / "run"
    run(cfg, out, progress=False)
    page = open_page((out / "index.html").as_uri(), 1100, 560)
    page.select_option("#x-axis", "lora_set")
    page.select_option("#y-axis", "prompt")
    assert page.eval_on_selector_all(".cell", "els => els.length") == 6  # 2 prompts x 3 LoRA sets, 3 seeds each
    page.wait_for_timeout(1500)  # the thumbnails decode
    shot = screenshot_path("viewer.png", tmp_path)
    page.screenshot(path=str(shot))
    assert Image.open(shot).size == (1100, 560)
