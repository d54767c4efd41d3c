"""The sweep page in a real browser (Chromium via Playwright): a 2x3 sweep built in the form, the live viewer
filling, a second sweep (written as YAML) cancelled half-way, a restart, the first complete and the second resumed.
Batches wait for the test's permits (test_server_queue.Gate): the order of events is the test's, not the clock's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CHROMIUM, uvicorn_thread
from test_server_queue import Gate, assert_complete, server_cfg

from runner.server.app import create_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # two server starts and three sweeps: end-to-end
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"),
]


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    g = Gate.install(monkeypatch)
    yield g
    g.open()


SECOND = "prompts: [a green tree, a cat]\nseeds: [4, 5, 6]\nsteps: 2\nwidth: 32\nheight: 32\nbatch_size: 1\n"


def sweep_row(page, status: str) -> None:
    page.wait_for_selector(f"#sweeps tr.sweep[data-status={status}]", timeout=120_000)


def test_sweep_page_queues_watches_cancels_and_resumes_across_a_restart(tmp_path: Path, gate: Gate,
                                                                          browser) -> None:
    cfg = server_cfg(tmp_path / "out")
    page = browser.new_page()
    with uvicorn_thread(create_app(cfg)) as url:
        # 1. The form: 2 prompts x 3 seeds, each error beside its field, the planned count
        page.goto(f"{url}/sweep")
        page.fill("textarea[name=prompts]", "a red cube\na blue ball")
        page.fill("input[name=seeds]", "1, 2, 3")
        page.fill("input[name=steps]", "2")
        page.fill("input[name=width]", "4096")
        page.fill("input[name=height]", "32")
        page.wait_for_function("document.querySelector('.field-error[data-for=width]').textContent !== ''")
        assert "width=4096 is too large" in page.text_content(".field-error[data-for=width]")
        assert page.text_content(".field-error[data-for=seeds]") == ""
        page.fill("input[name=width]", "32")
        page.wait_for_function("document.getElementById('plan').dataset.planned === '6'")
        assert page.text_content(".field-error[data-for=width]") == ""

        # 2. Submit: the run's live viewer opens and fills as the batches come
        page.click("#submit")
        page.wait_for_url("**/runs/0/sweep-*/")
        page.wait_for_function("window.t2iViewer !== undefined")
        viewer = page.url
        gate.open()
        page.wait_for_function("window.t2iViewer.images().length === 6", timeout=120_000)
        gate.opened.clear()

        # 3. A second sweep, written as YAML, cancelled half-way from the page's list
        page.goto(f"{url}/sweep")
        page.check("input[name=mode][value=yaml]")
        assert "prompts" in page.input_value("#yaml")  # the form's sweep, as YAML
        page.fill("#yaml", SECOND)
        page.wait_for_function("document.getElementById('plan').dataset.planned === '6'")
        page.click("#submit")
        page.wait_for_url("**/runs/0/sweep-*/")
        second = page.url
        assert second != viewer
        gate.allow(3)
        page.wait_for_function("window.t2iViewer.images().length === 3", timeout=120_000)
        page.goto(f"{url}/sweep")
        sweep_row(page, "running")
        page.click("#sweeps tr.sweep[data-status=running] button.cancel")
        gate.allow(1)  # the batch in flight finishes
        sweep_row(page, "cancelled")
        assert page.text_content("#sweeps tr.sweep[data-status=cancelled] td:nth-child(2)").startswith("4 / 6")

    # 4. A restart: the first is complete, the second resumable, and resumed from the page
    gate.open()
    with uvicorn_thread(create_app(cfg)) as url:
        page.goto(f"{url}/sweep")
        sweep_row(page, "done")
        page.click("#sweeps tr.sweep[data-status=cancelled] button.resume")
        page.wait_for_function("document.querySelectorAll('#sweeps tr.sweep[data-status=done]').length === 2",
                               timeout=120_000)
        page.goto(second.replace(second.split("/runs/")[0], url))
        page.wait_for_function("window.t2iViewer.images().length === 6", timeout=60_000)
    page.close()
    for run_dir in (tmp_path / "out").glob("sweep-*"):
        assert_complete(run_dir, 6)
