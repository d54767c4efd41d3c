"""The web server (issue 5): the seed's form and /submit, the JSON job API, limits, access, the queue."""

from __future__ import annotations

import html.parser
import io
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import job_done, run_cli, wait_until
from fastapi.testclient import TestClient
from PIL import Image

from runner.outputs.metadata import read_png_record
from runner.server import jobs as jobs_mod
from runner.server.app import compose_config, create_app, main

SEED_FIELDS = ("modelid", "text_prompt", "negative_prompt", "total_nm_img_prompt", "inference_steps",
               "guidance_scale", "strength", "manual_seed", "lora_hugging_face_1", "weight_name_1",
               "lora_hugging_face_2", "weight_name_2", "cross_attention_kwargs")
SMALL = {"inference_steps": "2", "width": "32", "height": "32"}


def seed_form(**extra: str) -> dict[str, str]:
    """What the seed's form posts when the user leaves everything but the prompt and seed at its default."""
    form = {"modelid": "", "text_prompt": "a red cube", "negative_prompt": "null", "total_nm_img_prompt": "1",
            "guidance_scale": "7.5", "strength": "1.0", "manual_seed": "7", "lora_hugging_face_1": "null ",
            "weight_name_1": "null", "lora_hugging_face_2": "null", "weight_name_2": "null",
            "cross_attention_kwargs": "1", **SMALL}
    form.update(extra)
    return form


def make_app(tmp: Path, *overrides: str):
    return create_app(compose_config(["model=tiny", f"server.output_dir={tmp / 'out'}", "server.max_steps=50",
                                      "server.max_images=4", "server.max_side=256", *overrides]))


@pytest.fixture(scope="module")
def allowed_extra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def client(tiny_dir: Path, allowed_extra: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("server")
    dirs = json.dumps([str(tiny_dir / "loras"), str(allowed_extra)])
    app = make_app(tmp, f"server.allowed_lora_dirs={dirs}")
    with TestClient(app) as c:
        yield c


def png(resp) -> tuple[dict, str, np.ndarray]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(resp.content))
    rec = json.loads(im.text["t2i-runner"])
    return rec, im.text["parameters"], np.asarray(im.convert("RGB"))


class _Inputs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str | None] = {}

        self._select: str | None = None
        self.disabled: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag in ("input", "textarea", "select") and "name" in a:
            self.fields[a["name"]] = a.get("value")
            if "disabled" in a:
                self.disabled.add(a["name"])
        self._select = a.get("name") if tag == "select" else self._select
        if tag == "option" and self._select and "selected" in a:  # a select's value: its selected option
            self.fields[self._select] = a.get("value")


def test_form_has_every_seed_field_with_its_default(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    parser = _Inputs()
    parser.feed(resp.text)
    assert set(SEED_FIELDS) <= set(parser.fields)
    f = parser.fields
    assert f["modelid"] == "builtin:tiny"
    assert (f["total_nm_img_prompt"], f["inference_steps"], f["guidance_scale"]) == ("1", "30", "7.5")
    assert (f["strength"], f["cross_attention_kwargs"]) == ("1.0", "1.0")
    assert 'action="/submit"' in resp.text and 'method="post"' in resp.text
    assert "Stable Diffusion" in resp.text and parser.disabled == {"true_cfg_scale"}  # SD has no true CFG


def test_form_offers_allowed_models_and_disables_unused_fields(tiny_dir: Path, tmp_path: Path) -> None:
    """Per family: the fields it does not use are disabled with a hint; the API reports the family."""
    from runner.server.app import compose_config, create_app

    cfg = compose_config(["model=tiny-qwenimage", "server.allowed_models=[tiny,tiny-flux2]",
                          f"server.output_dir={tmp_path / 'srv'}"])
    with TestClient(create_app(cfg)) as c:
        parser = _Inputs()
        parser.feed(c.get("/").text)
        assert parser.fields["modelid"] == "builtin:tiny-qwenimage"
        assert "guidance_scale" in parser.disabled and "true_cfg_scale" not in parser.disabled
        models = {m["id"]: m for m in c.get("/api/models").json()}
        assert set(models) == {"builtin:tiny-qwenimage", "tiny", "tiny-flux2"}
        assert models["tiny-flux2"]["family"] == "flux2" and "negative_prompt" in models["tiny-flux2"]["unused"]
        assert models["tiny"]["unused"].keys() >= {"true_cfg_scale"} and models["tiny"]["defaults"]["steps"] == 30
        assert c.get("/api/health").json()["family"] == "qwenimage"
        job = c.post("/api/jobs", json={"modelid": "tiny-flux2", "text_prompt": "x", "inference_steps": 2,
                                        "width": 32, "height": 32}).json()
        assert job["family"] == "flux2"
        bad = c.post("/api/jobs", json={"modelid": "tiny-flux2", "text_prompt": "x", "negative_prompt": "ugly"})
        assert bad.status_code == 422 and "Flux.2" in bad.json()["detail"]


def test_submit_returns_the_png_with_matching_metadata(client: TestClient) -> None:
    from runner.models.loading import LOADS

    resp = client.post("/submit", data=seed_form())
    rec, infotext, _ = png(resp)
    assert (rec["prompt"], rec["negative_prompt"], rec["seed"]) == ("a red cube", "", 7)
    assert (rec["steps"], rec["guidance_scale"], rec["width"], rec["height"]) == (2, 7.5, 32, 32)
    assert rec["loras"] == [] and rec["model"]["id"] == "builtin:tiny"
    assert "Seed: 7" in infotext and "Steps: 2" in infotext and "Size: 32x32" in infotext
    # the body is the file the core wrote into this server's output dir, listed in its run's manifest
    out = Path(client.app.state.output_dir)
    files = [p for p in out.rglob("*.png") if p.read_bytes() == resp.content]
    assert len(files) == 1
    manifest = [json.loads(line) for line in (files[0].parent / "manifest.jsonl").read_text().splitlines()]
    assert [e["file"] for e in manifest] == [files[0].name]
    rec2, _ = read_png_record(str(files[0]))
    assert rec2 == rec
    # the pipeline stays loaded between requests
    loads = dict(LOADS)
    png(client.post("/submit", data=seed_form(manual_seed="8")))
    assert dict(LOADS) == loads


def test_tiny_lora_changes_the_image_and_its_scale_is_applied(client: TestClient, lora_a: dict,
                                                               tmp_path: Path) -> None:
    _, _, base = png(client.post("/submit", data=seed_form(manual_seed="11")))
    lora = {"lora_hugging_face_1": lora_a["source"], "weight_name_1": lora_a["weight_name"]}
    rec, infotext, styled = png(client.post("/submit", data=seed_form(manual_seed="11", **lora)))
    _, _, half = png(client.post("/submit", data=seed_form(manual_seed="11", cross_attention_kwargs='{"scale": 0.5}',
                                                           **lora)))
    # the form's LoRA at 1.0 and at an in-between 0.5 are the images `t2i` makes with that LoRA at those scales
    proc = run_cli("model=tiny", "prompts=[a red cube]", "seeds=[11]", "steps=2", "width=32", "height=32",
                   "guidance_scale=7.5", "grid.enabled=false", "lora_scales=[0.5,1.0]",
                   f"lora_sets=[[{{source: '{lora_a['source']}', weight_name: {lora_a['weight_name']}}}]]",
                   f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cli = {e["lora_scale"]: np.asarray(Image.open(tmp_path / "cli" / e["file"]).convert("RGB"))
           for e in map(json.loads, (tmp_path / "cli" / "manifest.jsonl").read_text().splitlines())}
    assert np.array_equal(styled, cli[1.0]) and np.array_equal(half, cli[0.5])
    for a, b in ((half, base), (styled, half)):  # and the scale matters: half way is neither end
        assert np.abs(a.astype(int) - b.astype(int)).max() > 4
    assert [(lo["name"], lo["scale"], lo["weight_name"]) for lo in rec["loras"]] == [
        ("tiny_style", 1.0, "tiny_style.safetensors")]
    assert "Lora hashes: " in infotext
    zero = seed_form(manual_seed="11", cross_attention_kwargs='{"scale": 0}', **lora)
    rec0, _, off = png(client.post("/submit", data=zero))
    assert rec0["loras"][0]["scale"] == 0.0
    assert np.array_equal(off, base)


def test_three_images_give_an_escaped_gallery_of_consecutive_seeds(client: TestClient) -> None:
    prompt = '<script>alert("x")</script> & co'
    form = seed_form(text_prompt=prompt, total_nm_img_prompt="3", manual_seed="20")
    resp = client.post("/submit", data=form)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "<script>alert" not in resp.text
    assert "&lt;script&gt;alert(" in resp.text and "&amp; co" in resp.text
    links = sorted({part.split('"')[0] for part in resp.text.split('href="/api/jobs/')[1:]} - {""})
    links = [link for link in links if "/images/" in link]
    assert [link.split("/images/")[1] for link in links] == ["0.png", "1.png", "2.png"]
    seeds = [png(client.get(f"/api/jobs/{link}"))[0]["seed"] for link in links]
    assert seeds == [20, 21, 22]


@pytest.mark.parametrize(("field", "value", "words"), [
    ("inference_steps", "abc", "valid integer"),
    ("guidance_scale", "lots", "valid number"),
    ("guidance_scale", "-1", "out of range"),
    ("inference_steps", "51", "server.max_steps"),
    ("inference_steps", "0", "out of range"),
    ("width", "33", "multiple of 8"),
    ("height", "512", "server.max_side"),
    ("total_nm_img_prompt", "5", "too many images"),
    ("total_nm_img_prompt", "0", "out of range"),
    ("manual_seed", "1.5", "valid integer"),
    ("strength", "2", "less than or equal"),
    ("text_prompt", "null", "text_prompt: Field required"),
    ("cross_attention_kwargs", "99", "less than or equal"),
])
def test_bad_input_is_a_readable_422(client: TestClient, field: str, value: str, words: str) -> None:
    resp = client.post("/submit", data=seed_form(**{field: value}))
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail
    assert field in detail
    page = client.post("/submit", data=seed_form(**{field: value}), headers={"Accept": "text/html"})
    assert page.status_code == 422 and "Error 422" in page.text


def test_json_api_bad_input_and_missing_lora_file_are_422(client: TestClient, lora_a: dict) -> None:
    resp = client.post("/api/jobs", json={"text_prompt": "x", "inference_steps": "many", "colour": 1})
    assert resp.status_code == 422
    assert "inference_steps" in resp.json()["detail"] and "colour" in resp.json()["detail"]
    form = seed_form(lora_hugging_face_1=lora_a["source"], weight_name_1="nope.safetensors")
    missing = client.post("/submit", data=form)
    assert missing.status_code == 422 and "nope.safetensors" in missing.json()["detail"]


def test_lora_paths_outside_the_allowed_dirs_are_403(client: TestClient, tiny_dir: Path, allowed_extra: Path,
                                                      tmp_path: Path) -> None:
    outside = tmp_path / "stolen.safetensors"
    shutil.copy(tiny_dir / "loras" / "tiny_kohya.safetensors", outside)
    link = allowed_extra / "link.safetensors"
    if not link.exists():
        os.symlink(outside, link)
    sibling = tiny_dir / "loras" / ".." / "model_index.json"
    for source in (str(outside), str(tmp_path), str(sibling), str(link), "builtin:tiny/../../etc"):
        resp = client.post("/submit", data=seed_form(lora_hugging_face_2=source))
        assert resp.status_code == 403, (source, resp.text)
        assert "outside" in resp.json()["detail"] or "leaves" in resp.json()["detail"]
    resp = client.post("/api/jobs", json={"text_prompt": "x", "loras": [{"source": str(outside)}]})
    assert resp.status_code == 403
    resp = client.post("/submit", data=seed_form(modelid="runwayml/stable-diffusion-v1-5"))
    assert resp.status_code == 403 and "builtin:tiny" in resp.json()["detail"]


def test_json_api_reports_progress_and_serves_images(client: TestClient, lora_b: dict) -> None:
    body = {"text_prompt": "a blue ball", "total_nm_img_prompt": 2, "manual_seed": 3, "inference_steps": 2,
            "width": 32, "height": 32, "loras": [{**lora_b, "scale": 0.5}]}
    resp = client.post("/api/jobs", json=body)
    assert resp.status_code == 202 and resp.headers["location"] == f"/api/jobs/{resp.json()['id']}"
    job = resp.json()
    assert job["total"] == 2 and job["seeds"] == [3, 4]
    seen = set()

    def poll() -> dict:
        now = client.get(f"/api/jobs/{job['id']}").json()
        seen.add(now["progress"])
        return now

    job = wait_until(poll, lambda j: j["status"] not in ("queued", "running"), "the job to finish")
    assert job["status"] == "done" and job["progress"] == "2/2" and seen <= {"0/2", "1/2", "2/2"}
    assert [u.rsplit("/", 1)[1] for u in job["images"]] == ["0.png", "1.png"]
    rec = png(client.get(job["images"][1]))[0]
    assert rec["seed"] == 4 and rec["loras"][0]["name"] == "B" and rec["loras"][0]["scale"] == 0.5
    assert client.get(job["gallery"]).status_code == 200


def test_image_urls_cannot_leave_the_output_dir(client: TestClient) -> None:
    job = client.post("/api/jobs", json={"text_prompt": "x", "inference_steps": 2, "width": 32, "height": 32})
    jid = job.json()["id"]
    assert job_done(client, jid)["status"] == "done"
    assert client.get(f"/api/jobs/{jid}/images/0.png").status_code == 200
    images = f"/api/jobs/{jid}/images"
    for path in (f"{images}/1.png", f"{images}/-1.png", f"{images}/..%2Fmanifest.jsonl",
                 f"{images}/..%2F..%2F..%2Fetc%2Fpasswd", f"{images}/%2e%2e", f"{images}/0.png%00.txt",
                 "/api/jobs/..%2F..%2Fetc/images/0.png", "/api/jobs/nope", "/jobs/nope",
                 "/static/..%2F..%2Fapp.py"):
        resp = client.get(path)
        assert resp.status_code == 404, path
        assert resp.headers["content-type"] != "image/png"


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/submit", "/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/images/{name}"} <= set(paths)


def test_twenty_concurrent_submissions_all_complete(client: TestClient) -> None:
    forms = [seed_form(text_prompt=f"thing {i}", manual_seed=str(100 + i % 4)) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda f: client.post("/submit", data=f), forms))
    got = [png(r)[0] for r in results]
    asked = [(f["text_prompt"], int(f["manual_seed"])) for f in forms]
    assert [(r["prompt"], r["seed"]) for r in got] == asked
    out = Path(client.app.state.output_dir)
    entries = [json.loads(line) for m in out.glob("*/manifest.jsonl") for line in m.read_text().splitlines()]
    assert sorted(e["prompt"] for e in entries if e["prompt"].startswith("thing ")) == sorted(
        f["text_prompt"] for f in forms)


class Gate:
    """Replaces the worker's run(): holds each run until released, then runs the real one."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.calls: list[int] = []

    def __call__(self, spec, out, **kw):
        self.calls.append(len(spec.prompts) * len(spec.seeds))
        assert self.open.wait(120)
        return jobs_mod_run(spec, out, **kw)


jobs_mod_run = jobs_mod.run


def _wait_status(c: TestClient, jid: str, status: str) -> dict:
    for _ in range(2400):
        job = c.get(f"/api/jobs/{jid}").json()
        if job["status"] == status:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {jid} never reached {status}: {job}")


def test_full_queue_is_503_with_retry_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    monkeypatch.setattr(jobs_mod, "run", gate)
    body = {"text_prompt": "q", "inference_steps": 2, "width": 32, "height": 32}
    with TestClient(make_app(tmp_path, "server.queue_size=1")) as c:
        first = c.post("/api/jobs", json=body).json()
        _wait_status(c, first["id"], "running")
        second = c.post("/api/jobs", json={**body, "manual_seed": 2})
        assert second.status_code == 202 and second.json()["queue_position"] == 1
        full = c.post("/api/jobs", json={**body, "manual_seed": 3})
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert "queue is full" in full.json()["detail"]
        assert c.post("/submit", data=seed_form()).status_code == 503
        gate.open.set()
        for jid in (first["id"], second.json()["id"]):
            assert _wait_status(c, jid, "done")["progress"] == "1/1"


def test_compatible_queued_jobs_share_one_run_with_the_same_pixels(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    monkeypatch.setattr(jobs_mod, "run", gate)
    base = {"inference_steps": 2, "width": 32, "height": 32, "manual_seed": 5}
    with TestClient(make_app(tmp_path)) as c:
        blocker = c.post("/api/jobs", json={**base, "text_prompt": "blocker", "inference_steps": 3}).json()
        _wait_status(c, blocker["id"], "running")
        same_seeds = [c.post("/api/jobs", json={**base, "text_prompt": p}).json()
                      for p in ("cat", "dog", "cat")]
        other = c.post("/api/jobs", json={**base, "text_prompt": "cat", "guidance_scale": 3.0}).json()
        gate.open.set()
        done = [_wait_status(c, j["id"], "done") for j in (*same_seeds, other)]
        assert gate.calls == [1, 2, 1]  # blocker; cat+dog (the repeated cat is not generated twice); other
        merged = png(c.get(done[0]["images"][0]))
        assert merged[0]["batch_size"] == 2 and merged[0]["prompt"] == "cat"
        assert c.get(done[2]["images"][0]).content == c.get(done[0]["images"][0]).content
        assert png(c.get(done[1]["images"][0]))[0]["prompt"] == "dog"
        alone = c.post("/submit", data=seed_form(text_prompt="cat", manual_seed="5"))
        assert np.array_equal(png(alone)[2], merged[2])  # batching did not change the pixels


def test_serve_rejects_a_bad_override_with_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["model=tinyy", "--port", "9"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t2i-serve: error:") and "tiny" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["model.id=/no/such/model"])
    assert exc.value.code == 2 and "/no/such/model" in capsys.readouterr().err


def test_form_offers_hires_fix(client: TestClient) -> None:
    parser = _Inputs()
    parser.feed(client.get("/").text)
    assert {"hires_scale", "hires_denoise", "hires_steps", "hires_upscaler"} <= set(parser.fields)
    assert "<option>Latent (bicubic)</option>" in client.get("/").text
    rec, infotext, pixels_ = png(client.post("/submit", data=seed_form(hires_scale="2", hires_denoise="0.5",
                                                                       hires_upscaler="Lanczos")))
    assert pixels_.shape[:2] == (64, 64) and (rec["width"], rec["height"]) == (32, 32)
    assert "Denoising strength: 0.5" in infotext and "Hires upscale: 2, Hires upscaler: Lanczos" in infotext
    bad = client.post("/submit", data=seed_form(hires_scale="2", hires_upscaler="ESRGAN"))
    assert bad.status_code == 422 and "hires.upscaler='ESRGAN' is not known" in bad.text
    big = client.post("/submit", data=seed_form(hires_scale="8", width="64", height="64"))  # 512 > max_side 256
    assert big.status_code == 422 and "hires. fix to 512x512 is too large" in big.text
    # the second pass's own sampler (A1111's Hires sampler); "" = the first pass's
    assert {"hires_scheduler"} <= set(parser.fields) and '<option value="">Use same sampler</option>' in \
        client.get("/").text
    rec, infotext, other = png(client.post("/submit", data=seed_form(hires_scale="2", hires_denoise="0.5",
                                                                     hires_upscaler="Lanczos",
                                                                     hires_scheduler="dpmpp_2m")))
    assert rec["hires_scheduler"] == "dpmpp_2m" and "Hires sampler: DPM++ 2M" in infotext
    assert not np.array_equal(other, pixels_)
    same = png(client.post("/submit", data=seed_form(hires_scale="2", hires_denoise="0.5", hires_upscaler="Lanczos",
                                                     hires_scheduler="")))
    assert np.array_equal(same[2], pixels_)
    path = client.post("/submit", data=seed_form(hires_scale="2", hires_upscaler="/etc/4x.safetensors"))
    assert path.status_code == 422 and "hires_upscaler='/etc/4x.safetensors' is a path" in path.text
