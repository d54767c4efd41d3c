"""The viewer's metrics (runner/outputs/viewer_assets/metrics.js) in Chromium, from file://: metric values on every
image, colour, filter and in-cell sort by a metric, the summary table, and the plots whose points open their
images. Every request stays on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CHROMIUM, run_cli

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def scored_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "run"
    kohya = tiny_dir / "loras" / "tiny_kohya.safetensors"
    r = run_cli(f"model.id={tiny_dir}", "steps=2", "width=32", "height=32", "seeds=[0,1]",
                f"lora_sets=[[],[{{source:'{kohya}'}}]]", "lora_scales=[0.5,1.0]", f"output_dir={out}",
                "eval.metrics=[clip_t,lora_effect]", "eval.models.clip=builtin:tiny-clip")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_metric_columns_colour_filter_sort_and_plot_clicks(scored_run: Path, browser) -> None:
    data = json.loads((scored_run / "viewer-metrics.js").read_text().split(" = ", 1)[1].rstrip().rstrip(";"))
    seen, errors = [], []
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.on("request", lambda r: seen.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((scored_run / "index.html").resolve().as_uri() + "#x=lora_set&y=lora_scale&f.seed=%22*%22")
    page.wait_for_function("window.T2I_METRICS_VIEW !== undefined")
    # the table: one row per set x weight, with mean ± std of each metric
    rows = page.locator("#metric-table tbody tr")
    assert rows.count() == len(data["rows"]) == 3
    assert "±" in rows.nth(1).inner_text()
    # every image carries its values (tooltip), colour paints cells by the metric
    thumb = page.locator(".thumb").first
    f = thumb.get_attribute("data-file")
    assert f"clip_t: {data['scores'][f]['clip_t']:.2f}" in thumb.get_attribute("title")
    page.select_option("#metric-colour", "lora_effect")
    colored = page.locator(".thumb[style*='outline']")
    assert colored.count() == 4  # the LoRA images; the baselines have no lora_effect
    # filter: above the median of clip_t only
    values = sorted(v["clip_t"] for v in data["scores"].values())
    page.select_option("#metric-filter", "clip_t")
    page.fill("#metric-min", str(values[3]))
    keep = sum(v >= values[3] for v in values)
    page.wait_for_function(f"document.getElementById('count').textContent.startsWith('{keep} images shown')")
    page.fill("#metric-min", "")
    page.select_option("#metric-filter", "")
    # sort within a cell (the seeds side by side): best clip_t first
    page.select_option("#metric-sort", "clip_t")
    for cell in page.locator(".cell").all():
        files = [t.get_attribute("data-file") for t in cell.locator(".thumb").all()]
        scores = [data["scores"][x]["clip_t"] for x in files]
        assert scores == sorted(scores, reverse=True)
    # the trade-off plot: a point shows its row's images; one of those opens the image view with its scores
    point = page.locator("#metric-scatter circle.pt").first
    label = point.get_attribute("data-row")
    point.click()
    row = next(r for r in data["rows"] if r["label"] == label)
    picked = page.locator("#metric-picked img")
    assert sorted(picked.evaluate_all("els => els.map(e => e.dataset.file)")) == sorted(row["files"])
    picked.first.click()
    page.wait_for_selector("#detail:not([hidden])")
    assert "clip_t" in page.locator("#record").inner_text()
    assert page.locator("#metric-lines circle.pt").count() == 2  # one set, two weights
    assert not errors, errors
    assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in seen), seen
    ctx.close()
