"""A real browser (Chromium via Playwright) uses the form against a live uvicorn server on the tiny model."""

from __future__ import annotations

import pytest
from conftest import CHROMIUM, NO_CHROMIUM, uvicorn_thread

from runner.server.app import compose_config, create_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=NO_CHROMIUM),
]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory):
    """uvicorn serving `t2i-serve model=tiny` on a free localhost port, in a thread of this process."""
    out = tmp_path_factory.mktemp("browser") / "out"
    app = create_app(compose_config(["model=tiny", f"server.output_dir={out}", "server.max_steps=20"]))
    with uvicorn_thread(app) as url:
        yield url


def fill(page, prompt: str, images: str = "1") -> None:
    page.fill("textarea[name=text_prompt]", prompt)
    page.fill("input[name=total_nm_img_prompt]", images)
    page.fill("input[name=inference_steps]", "2")
    page.fill("input[name=width]", "32")
    page.fill("input[name=height]", "32")


def test_form_submits_shows_progress_and_the_images(live_server: str, browser) -> None:
    page = browser.new_page()
    page.goto(live_server + "/")
    assert page.input_value("select[name=modelid]") == "builtin:tiny"  # the form offers the allowed models
    assert page.input_value("input[name=inference_steps]") == "20"  # 30, capped by server.max_steps
    fill(page, "a green <b>tree</b>", images="2")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#result img').length === 2", timeout=300_000)
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#result img')).every(i => i.complete && i.naturalWidth > 0)",
        timeout=60_000)
    sizes = page.eval_on_selector_all("#result img", "ims => ims.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[32, 32], [32, 32]]
    assert page.text_content("#status-text") == "done: 2/2 images"
    assert page.get_attribute("#progress", "value") == "2"
    # a refusal from the server is shown as its message
    page.fill("input[name=lora_hugging_face_1]", "/etc")
    page.click("#submit")
    page.wait_for_function("document.getElementById('status-text').className === 'error'", timeout=60_000)
    assert "outside the folders" in page.text_content("#status-text")
    page.close()


def test_form_without_javascript_posts_to_submit_and_gets_the_png(live_server: str, browser) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(live_server + "/")
    fill(page, "a yellow star")
    with page.expect_navigation(timeout=300_000) as nav:
        page.click("#submit")
    resp = nav.value
    assert resp.url.endswith("/submit") and resp.status == 200
    assert resp.headers["content-type"] == "image/png"
    body = resp.body()
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and b"a yellow star" in body
    context.close()


def test_api_docs_render_with_every_outside_request_blocked(live_server: str, browser) -> None:
    outside: list[str] = []
    page = browser.new_page()

    def route(r) -> None:
        if r.request.url.startswith(live_server):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(live_server + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=60_000)
    assert "t2i-runner server" in page.text_content(".swagger-ui .info .title")
    page.wait_for_selector("[data-path=\"/api/jobs\"]", timeout=60_000)  # the operations rendered too
    assert outside == []
    page.close()


def test_progress_bar_resets_after_an_error(live_server: str, browser) -> None:
    page = browser.new_page()
    page.goto(live_server + "/")
    page.fill("textarea[name=text_prompt]", "a tree")
    for name, value in (("total_nm_img_prompt", "2"), ("inference_steps", "1"), ("width", "32"),
                        ("height", "32")):
        page.fill(f"input[name={name}]", value)
    page.click("#submit")
    page.wait_for_function("document.getElementById('status-text').textContent.startsWith('done')",
                           timeout=300_000)
    assert page.get_attribute("#progress", "value") == "2"
    assert page.text_content("#result .loras") == "LoRAs: none"
    page.fill("input[name=lora_hugging_face_1]", "/etc")  # refused: outside the allowed folders
    page.click("#submit")
    page.wait_for_function("document.getElementById('status-text').className === 'error'", timeout=60_000)
    assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [0, 1]
    page.close()


def test_submit_error_without_javascript_is_an_html_page(live_server: str, browser) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(live_server + "/")
    page.fill("textarea[name=text_prompt]", "a tree")
    page.fill("input[name=lora_hugging_face_1]", "/etc")
    with page.expect_navigation(timeout=120_000) as nav:
        page.click("#submit")
    assert nav.value.status == 403 and nav.value.headers["content-type"].startswith("text/html")
    assert page.text_content("h1") == "Error 403" and "outside the folders" in page.text_content(".error")
    page.goto(live_server + "/submit")  # reloading the result page is a GET
    assert page.text_content("h1") == "Error 405"
    context.close()


def test_docs_screenshot_of_the_form(live_server: str, browser, tmp_path) -> None:
    """The form picture of docs/index.md: the form after a 4-image request (tests/test_viewer_browser.py's
    screenshot_path: docs/img/form.png with T2I_DOCS_SCREENSHOTS=1)."""
    from PIL import Image
    from test_viewer_browser import screenshot_path

    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(live_server + "/")
    fill(page, "a red fox in the snow", images="4")
    page.fill("input[name=width]", "64")
    page.fill("input[name=height]", "64")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#result img').length === 4", timeout=300_000)
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#result img')).every(i => i.complete && i.naturalWidth > 0)",
        timeout=60_000)
    shot = screenshot_path("form.png", tmp_path)
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1000
    page.close()
