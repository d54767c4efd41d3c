"""The server form speaks the prompt language (issue 15): A1111 syntax and variants in text_prompt, the gallery
shows each image's expanded prompt, bad syntax is a one-line 422."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_server import make_app, png, seed_form


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with TestClient(make_app(tmp_path_factory.mktemp("server"))) as c:
        yield c


def test_variants_and_weights_in_the_form(client: TestClient) -> None:
    form = seed_form(text_prompt="a {red|blue} (cube:1.2)", total_nm_img_prompt="2", manual_seed="3")
    resp = client.post("/submit", data=form)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "a red (cube:1.2)" in resp.text and "a blue (cube:1.2)" in resp.text  # each image's expanded prompt
    assert "Prompt: a {red|blue} (cube:1.2)" in resp.text  # the prompt as written
    links = sorted({p.split('"')[0] for p in resp.text.split('href="/api/jobs/')[1:] if "/images/" in p})
    recs = [png(client.get(f"/api/jobs/{link}"))[0] for link in links]
    assert sorted((r["prompt"], r["seed"]) for r in recs) == [
        ("a blue (cube:1.2)", 3), ("a blue (cube:1.2)", 4), ("a red (cube:1.2)", 3), ("a red (cube:1.2)", 4)]
    assert {r["prompt_syntax"] for r in recs} == {"a1111"}
    assert {r["prompt_template"] for r in recs} == {"a {red|blue} (cube:1.2)"}


@pytest.mark.parametrize(("prompt", "words"), [
    ("a (red:abc) cube", "'abc' in '(red:abc)' is not a number"),
    ("a {red|blue cube", "not a valid variant"),
    ("a {red|blue|green} {x|y} cube", "too many images"),
    ("a cube <lora:nowhere:0.5>", "lora_dirs"),
])
def test_bad_prompt_syntax_is_a_readable_422(client: TestClient, prompt: str, words: str) -> None:
    resp = client.post("/submit", data=seed_form(text_prompt=prompt))
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert words in detail and "\n" not in detail


def test_plain_syntax_keeps_brackets_as_text(tmp_path: Path) -> None:
    with TestClient(make_app(tmp_path, "prompt_syntax=plain")) as c:
        rec, text, _ = png(c.post("/submit", data=seed_form(text_prompt="a (red:1.5) cube")))
    assert rec["prompt_syntax"] == "plain" and "Emphasis: None" in text


def test_form_tags_are_found_only_in_the_allowed_lora_dirs(tmp_path: Path, tiny_dir: Path) -> None:
    loras = tiny_dir / "loras"
    with TestClient(make_app(tmp_path / "a", f"server.allowed_lora_dirs=[{loras}]", f"lora_dirs=[{tmp_path}]")) as c:
        rec, text, _ = png(c.post("/submit", data=seed_form(text_prompt="a cube <lora:tiny_kohya:0.5>")))
        assert [(lo["name"], lo["scale"]) for lo in rec["loras"]] == [("tiny_kohya", 0.5)]
        assert text.startswith("a cube <lora:tiny_kohya:0.5>")
    (tmp_path / "outside.safetensors").write_bytes((loras / "tiny_kohya.safetensors").read_bytes())
    with TestClient(make_app(tmp_path / "b", f"server.allowed_lora_dirs=[{loras}]", f"lora_dirs=[{tmp_path}]")) as c:
        resp = c.post("/submit", data=seed_form(text_prompt="a cube <lora:outside:0.5>"))
    assert resp.status_code == 422 and "'outside'" in resp.json()["detail"]  # lora_dirs is not searched here
