"""Issue 20: A1111's `/sdapi/v1` and OpenAI's images API on a live `t2i-serve`, driven by their real client libraries
(`webuiapi`, `openai`); images equal `t2i`'s on the same settings (fresh processes); bad input, limits, allowed
folders and API keys hold on the new routes."""

from __future__ import annotations

import base64
import inspect
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from conftest import REPO, uvicorn_thread
from PIL import Image

from runner.generate import batch as batch_mod
from runner.outputs.metadata import read_png_record
from runner.server.app import compose_config, create_app, main
from runner.server.auth import check_bind, is_loopback

KEY = "t2i-test-key-0123456789"
LIMITS = ["server.max_steps=20", "server.max_images=4", "server.max_side=128", "steps=3"]


def make_app(out: Path, tiny_dir: Path, *extra: str):
    dirs = json.dumps([str(tiny_dir / "loras")])
    return create_app(compose_config(["model=tiny", f"server.output_dir={out}", f"server.allowed_lora_dirs={dirs}",
                                      *LIMITS, *extra]))


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A live server without keys (loopback): (base URL, output dir)."""
    out = tmp_path_factory.mktemp("apis") / "out"
    with uvicorn_thread(make_app(out, tiny_dir)) as url:
        yield url, out


@pytest.fixture(scope="module")
def keyed(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A live server with `server.api_keys=[KEY]`: (base URL, output dir)."""
    out = tmp_path_factory.mktemp("keyed") / "out"
    with uvicorn_thread(make_app(out, tiny_dir, f"server.api_keys=[{KEY}]")) as url:
        yield url, out


def a1111(url: str, **kw) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", **kw)


def oai(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def files(out: Path) -> set[Path]:
    return {p for p in out.rglob("*") if p.is_file()} if out.exists() else set()


def manifest_entries(out: Path) -> list[dict]:
    return [json.loads(line) for m in out.glob("*/manifest.jsonl") for line in m.read_text().splitlines()]


def t2i_runs(tmp: Path, *runs: list[str]) -> list[dict[int, np.ndarray]]:
    """Run `t2i model=tiny ARGS` for each run, each in a fresh process (concurrently); {seed: pixels} per run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for i, args in enumerate(runs):
        out = tmp / f"t2i-{i}"
        procs.append((out, subprocess.Popen([sys.executable, "-m", "runner", "model=tiny", *args,
                                             f"hydra.run.dir={out}", "grid.enabled=false"], cwd=tmp, env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = []
    for out, proc in procs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-3000:]
        entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        results.append({e["seed"]: pixels(Image.open(out / e["file"])) for e in entries})
    return results


@pytest.mark.slow
def test_a1111_and_openai_images_equal_t2i_and_are_saved_like_cli_images(server, tmp_path: Path) -> None:
    url, out = server
    api = a1111(url)
    # webuiapi sends A1111's whole request model (hires. fix, face restore, scripts … at their off values)
    fox = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=5, steps=3, cfg_scale=6, width=32,
                      height=32, batch_size=2, sampler_name="Euler a", scheduler="automatic")
    karras = api.txt2img(prompt="a lighthouse", seed=7, steps=3, width=32, height=32, n_iter=2,
                         sampler_name="DPM++ 2M", scheduler="automatic", eta=None,
                         override_settings={"CLIP_stop_at_last_layers": 2})
    cat = oai(url).images.generate(model="builtin:tiny", prompt="a cat", n=2, size="32x32",
                                   response_format="b64_json", extra_body={"seed": 11})
    # the same sampler names mean the same sampling: t2i's scheduler= with no schedule is A1111's Automatic
    theirs = t2i_runs(
        tmp_path,
        ["prompts=[{prompt: a red fox, negative_prompt: blurry}]", "seeds=[5,6]", "steps=3", "guidance_scale=6",
         "width=32", "height=32", "scheduler=euler_a"],
        ["prompts=[a lighthouse]", "seeds=[7,8]", "steps=3", "guidance_scale=7", "width=32", "height=32",
         "scheduler=dpmpp_2m", "clip_skip=2"],
        ["prompts=[a cat]", "seeds=[11,12]", "steps=3", "width=32", "height=32"])
    # A1111: one PNG per image with the infotext inside, the same infotexts in `info`, seeds seed+i
    assert len(fox.images) == 2 and fox.info["all_seeds"] == [5, 6] and fox.info["seed"] == 5
    assert fox.info["infotexts"] == [im.info["parameters"] for im in fox.images]
    assert "Negative prompt: blurry" in fox.info["infotexts"][0] and "Seed: 6" in fox.info["infotexts"][1]
    assert "Sampler: Euler a, Schedule type: Uniform" in fox.info["infotexts"][0]
    assert fox.parameters["prompt"] == "a red fox" and fox.parameters["enable_hr"] is False
    assert "Clip skip: 2" in karras.info["infotexts"][0] and karras.info["clip_skip"] == 2
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in karras.info["infotexts"][1]
    for result, ref, seeds in ((fox, theirs[0], (5, 6)), (karras, theirs[1], (7, 8))):
        for im, seed in zip(result.images, seeds, strict=True):
            assert np.array_equal(pixels(im), ref[seed]), seed
    # OpenAI: its response shape; seeds come from the saved records
    assert isinstance(cat.created, int) and [d.revised_prompt for d in cat.data] == ["a cat", "a cat"]
    got = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in cat.data]
    seeds = [json.loads(im.info["t2i-runner"])["seed"] for im in got]
    assert seeds == [11, 12]
    for im, seed in zip(got, seeds, strict=True):
        assert np.array_equal(pixels(im), theirs[2][seed])
    # every image is saved with its record and one manifest line, like a CLI image
    entries = manifest_entries(out)
    for im in [*fox.images, *karras.images, *got]:
        rec = json.loads(im.info["t2i-runner"])
        [entry] = [e for e in entries if (e["prompt"], e["seed"]) == (rec["prompt"], rec["seed"])]
        saved, infotext = read_png_record(str(next(out.glob(f"*/{entry['file']}"))))
        assert saved == rec and infotext == im.info["parameters"]


def test_webuiapi_lists_models_samplers_schedulers_loras_and_switches_options(server, tiny_dir: Path) -> None:
    url, _ = server
    api = a1111(url)
    assert api.util_get_model_names() == ["builtin:tiny"]
    assert api.get_sd_models()[0]["model_name"] == "tiny" and len(api.get_sd_models()[0]["sha256"]) == 64
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert [s for s in api.get_samplers() if s["name"] == "DPM++ 2M"][0]["options"] == {"scheduler": "karras"}
    assert {"automatic", "karras", "exponential", "sgm_uniform"} <= set(api.util_get_scheduler_names())
    loras = {lo["name"]: lo for lo in api.get_loras()}
    assert set(loras) == {"tiny_style", "tiny_kohya"}
    assert loras["tiny_kohya"]["path"] == str(tiny_dir / "loras" / "tiny_kohya.safetensors")
    assert isinstance(loras["tiny_kohya"]["metadata"], dict)
    assert api.get_options()["sd_model_checkpoint"] == "builtin:tiny"
    api.util_set_model("builtin:tiny")  # webuiapi's model switch: POST /options
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        # <lora:…> tags reach the core unchanged (the prompt language parses them there)
        r = api.txt2img(prompt="clip two <lora:tiny_kohya:0.5>", seed=1, steps=2, width=32, height=32)
        assert r.info["clip_skip"] == 2 and "Clip skip: 2" in r.info["infotexts"][0]
        assert json.loads(r.image.info["t2i-runner"])["prompt"] == "clip two <lora:tiny_kohya:0.5>"
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    refused = api.session.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "/etc/passwd"})
    assert refused.status_code == 403 and "not allowed" in refused.json()["detail"]
    assert api.get_options()["sd_model_checkpoint"] == "builtin:tiny"
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0] and info.parameters["Seed"] == "1"
    assert json.loads(info.json["items"]["t2i-runner"])["seed"] == 1
    # what A1111 clients ask for on start and this server has none of: empty answers in A1111's shapes
    assert api.get_scripts() == {"txt2img": [], "img2img": []} and api.get_embeddings() == {"loaded": {},
                                                                                             "skipped": {}}
    for path in ("script-info", "sd-vae", "prompt-styles"):
        assert api.session.get(f"{url}/sdapi/v1/{path}").json() == []
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]  # hires. fix's resamplers
    assert [m["name"] for m in api.get_latent_upscale_modes()][0] == "Latent"


def test_a1111_emphasis_and_pad_cond_uncond_options_set_the_text_options(server) -> None:
    """A1111's `emphasis` and `pad_cond_uncond` options (per request in override_settings, or for later requests
    through POST /options) become the run's `emphasis` and `pad_conds`, recorded and written as A1111 writes them."""
    url, _ = server
    api = a1111(url)
    assert (api.get_options()["emphasis"], api.get_options()["pad_cond_uncond"]) == ("Original", False)
    long = "a (red:1.3) fox, " + ", ".join(f"w{i}" for i in range(30))  # 2 chunks against the negative's 1
    r = api.txt2img(prompt=long, negative_prompt="blurry", seed=1, steps=2, width=32, height=32, cfg_scale=7,
                    override_settings={"emphasis": "No norm", "pad_cond_uncond": True})
    rec = json.loads(r.image.info["t2i-runner"])
    assert (rec["emphasis"], rec["pad_conds"]) == ("no_norm", True)
    assert "Emphasis: No norm" in r.info["infotexts"][0] and "Pad conds: True" in r.info["infotexts"][0]
    api.set_options({"emphasis": "Ignore"})
    try:
        assert api.get_options()["emphasis"] == "Ignore"
        r = api.txt2img(prompt=long, negative_prompt="blurry", seed=1, steps=2, width=32, height=32, cfg_scale=7)
        rec = json.loads(r.image.info["t2i-runner"])
        assert (rec["emphasis"], rec["pad_conds"]) == ("ignore", False)
        assert "Emphasis: Ignore" in r.info["infotexts"][0] and "Pad conds" not in r.info["infotexts"][0]
    finally:
        api.set_options({"emphasis": "Original"})
    for body in ({"emphasis": "Strong"}, {"pad_cond_uncond": "yes"}):
        refused = api.session.post(f"{url}/sdapi/v1/options", json=body)
        assert refused.status_code == 422 and list(body)[0] in refused.json()["detail"], refused.text
    assert api.get_options()["emphasis"] == "Original"


def test_openai_url_format_and_models(server) -> None:
    url, out = server
    client = oai(url)
    assert [m.id for m in client.models.list()] == ["builtin:tiny"]
    assert client.models.retrieve("builtin:tiny").id == "builtin:tiny"
    res = client.images.generate(prompt="a boat", size="32x32", response_format="url", user="tester",
                                 extra_body={"seed": 3})
    link = res.data[0].url
    assert link.startswith(f"{url}/v1/images/files/")
    body = httpx.get(link).content
    rec = json.loads(Image.open(io.BytesIO(body)).info["t2i-runner"])
    assert rec["seed"] == 3 and body in {p.read_bytes() for p in out.rglob("*.png")}
    for guess in (link[:-8] + "AAAA.png", f"{url}/v1/images/files/..%2F..%2Fmanifest.jsonl"):
        resp = httpx.get(guess)
        assert resp.status_code == 404 and "error" in resp.json(), guess


def test_progress_during_a_run_and_interrupt_after_the_batch_in_flight(server, monkeypatch) -> None:
    url, out = server
    api = a1111(url)
    real, release, calls = batch_mod.generate, threading.Event(), []

    def held(pipe, jobs, *args, **kwargs):  # the second batch waits until the test has interrupted
        calls.append(len(jobs))
        if len(calls) == 2:
            assert release.wait(120)
        return real(pipe, jobs, *args, **kwargs)

    monkeypatch.setattr(batch_mod, "generate", held)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=api.txt2img(
        prompt="stop me", seed=40, steps=2, width=32, height=32, batch_size=1, n_iter=4)))
    worker.start()
    try:
        for _ in range(1200):
            progress = api.get_progress()
            if progress["state"]["job_no"] >= 1:
                break
            time.sleep(0.05)
        assert progress["state"]["job_count"] == 4 and progress["state"]["job_no"] == 1
        assert 0.25 < progress["progress"] < 1 and progress["eta_relative"] >= 0
        assert api.interrupt() == {}
        assert api.get_progress()["state"]["interrupted"] is True
    finally:
        release.set()
        worker.join(120)
    r = result["r"]
    # the batch in flight finished; the rest were not started; what was made is returned and saved
    assert len(r.images) == 2 and r.info["all_seeds"] == [40, 41, 42, 43]
    assert [json.loads(im.info["t2i-runner"])["seed"] for im in r.images] == [40, 41]
    assert sorted(e["seed"] for e in manifest_entries(out) if e["prompt"] == "stop me") == [40, 41]
    assert api.get_progress()["progress"] == 0 and api.get_progress()["state"]["job_count"] == 0
    assert api.interrupt() == {}  # nothing running: nothing to stop


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 422, "hr_upscaler='R-ESRGAN 4x+' is not available"),
    ({"enable_hr": True, "hr_sampler_name": "DPM adaptive"}, 422, "hr_sampler_name='DPM adaptive' is not available"),
    ({"enable_hr": True, "hr_checkpoint_name": "x"}, 403, "hr_checkpoint_name='x' is not allowed on this server"),
    ({"script_name": "x/y/z plot"}, 422, "script_name"),
    ({"restore_faces": True}, 422, "face restoration"),
    ({"tiling": True}, 422, "tiling"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, 422, "alwayson_scripts"),
    ({"alwayson_scripts": {"": [None]}}, 422, "alwayson_scripts"),  # not A1111's shape (found by test_fuzz)
    ({"subseed_strength": 0.5}, 422, "variation seed"),
    ({"styles": ["cinematic"]}, 422, "styles"),
    ({"steps": 21}, 422, "steps=21 is above this server's limit; valid: 1 to 20 (server.max_steps)"),
    ({"batch_size": 3, "n_iter": 2}, 422, "batch_size*n_iter=6 is too many images; valid: 1 to 4"),
    ({"width": 33}, 422, "width=33 is not a multiple of 8; try 32 or 40"),
    ({"height": 256}, 422, "height=256 is too large; valid: 8 to 128"),
    ({"cfg_scale": -1}, 422, "cfg_scale=-1.0 is out of range"),
    ({"seed": -5}, 422, "seed=-5 is out of range"),
    ({"sampler_name": "DPM adaptive"}, 422, "sampler_name='DPM adaptive' is not available"),
    ({"sampler_name": "LCM", "scheduler": "karras"}, 422, "scheduler='karras' is not available with"),
    ({"scheduler": "kl_optimal"}, 422, "scheduler='kl_optimal' is not available"),
    ({"sampler_name": "DDIM", "eta": 1.0}, 422, "eta=1 with DDIM"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 13}}, 422, "CLIP_stop_at_last_layers=13 is out of range"),
    ({"override_settings": {"sd_vae": "kl-f8.safetensors"}}, 422, "override_settings.sd_vae"),
    ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 403, "not allowed"),
    ({"override_settings": {"emphasis": "Strong"}}, 422,
     "override_settings.emphasis=\"Strong\" is not an emphasis mode; valid: Original, No norm, Ignore, None"),
    ({"prompt": "  "}, 422, "prompt is empty"),
    ({"hr_fix": True}, 422, "hr_fix: Extra inputs are not permitted"),
    ({"steps": "many"}, 422, "steps: Input should be a valid integer"),
])
def test_a1111_bad_input_is_one_clear_error_and_writes_nothing(server, body: dict, status: int, words: str) -> None:
    url, out = server
    api = a1111(url)
    before = files(out)
    payload = {"prompt": "x", "steps": 2, "width": 32, "height": 32, **body}
    with pytest.raises(RuntimeError) as exc:  # webuiapi raises RuntimeError(status, body) on non-200
        if set(body) <= set(inspect.signature(api.txt2img).parameters):
            api.txt2img(**payload)  # the client's whole request model
        else:  # a field the client has no argument for
            api.custom_post("txt2img", payload, baseurl=True)
    code, text = exc.value.args
    detail = json.loads(text)["detail"]
    assert code == status and isinstance(detail, str) and "\n" not in detail and words in detail, detail
    assert files(out) == before


@pytest.mark.parametrize(("kwargs", "error", "param", "words"), [
    ({"n": 5}, openai.BadRequestError, "n", "n=5 is too many images; valid: 1 to 4 (server.max_images)"),
    ({"size": "256x256"}, openai.BadRequestError, "size", "size width=256 is too large"),
    ({"size": "33x32"}, openai.BadRequestError, "size", "not a multiple of 8"),
    ({"size": "big"}, openai.BadRequestError, "size", "size='big' is not valid"),
    ({"style": "vivid"}, openai.BadRequestError, "style", "style='vivid' asks for a DALL-E 3 style"),
    ({"quality": "hd"}, openai.BadRequestError, "quality", "quality='hd'"),
    ({"output_format": "jpeg"}, openai.BadRequestError, "output_format", "another image format"),
    ({"model": "dall-e-3"}, openai.NotFoundError, "model", "The model `dall-e-3` does not exist"),
    ({"model": "../../etc/passwd"}, openai.NotFoundError, "model", "does not exist"),
    ({"extra_body": {"seed": -7}}, openai.BadRequestError, "seed", "seed=-7 is out of range"),
    ({"extra_body": {"steps": 50}}, openai.BadRequestError, "steps", "Unrecognized request argument supplied: steps"),
    ({"prompt": ""}, openai.BadRequestError, "prompt", "prompt"),
])
def test_openai_bad_input_is_one_clear_error_and_writes_nothing(server, kwargs: dict, error: type, param: str,
                                                                 words: str) -> None:
    url, out = server
    before = files(out)
    with pytest.raises(error) as exc:
        oai(url).images.generate(**{"prompt": "x", "size": "32x32", **kwargs})
    body = exc.value.body  # the client's parsed `error` object
    assert body["param"] == param and words in body["message"] and "\n" not in body["message"], body
    assert body["type"] == "invalid_request_error"
    assert files(out) == before


def test_api_keys_hold_on_every_route(keyed) -> None:
    url, out = keyed
    # OpenAI: a wrong key is the client's AuthenticationError (a missing one the same 401); the right one works
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        oai(url, "wrong-key-0000000000").images.generate(prompt="x", size="32x32")
    assert wrong_key.value.body["code"] == "invalid_api_key" and "wrong-key-0000000000" not in str(wrong_key.value)
    missing = httpx.get(f"{url}/v1/models")
    assert missing.status_code == 401 and "didn't provide an API key" in missing.json()["error"]["message"]
    client = oai(url, KEY)
    assert [m.id for m in client.models.list()] == ["builtin:tiny"]
    link = client.images.generate(prompt="key", size="32x32", extra_body={"seed": 1}).data[0].url
    assert httpx.get(link).status_code == 200  # image links are capabilities: no key needed
    # A1111 clients: the key as the Basic-auth password (A1111's --api-auth), or a Bearer token
    with pytest.raises(RuntimeError) as wrong:
        a1111(url, username="t2i", password="nope").txt2img(prompt="x", steps=2, width=32, height=32)
    assert wrong.value.args[0] == 401
    api = a1111(url, username="t2i", password=KEY)
    assert api.util_get_model_names() == ["builtin:tiny"] and len(api.get_loras()) == 2
    assert len(api.txt2img(prompt="ok", seed=2, steps=2, width=32, height=32).images) == 1
    # every other route too (form, JSON API, gallery, docs, health); page assets stay open
    for method, path in (("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/interrupt"), ("GET", "/"),
                         ("POST", "/submit"), ("POST", "/api/jobs"), ("GET", "/api/health"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/jobs/x"), ("GET", "/api/jobs/x/images/0.png")):
        resp = httpx.request(method, url + path)
        assert resp.status_code == 401, path
        assert resp.headers["www-authenticate"].startswith("Basic"), path
    assert httpx.get(f"{url}/api/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/static/style.css").status_code == 200
    # a raw path with `..` under an open prefix reaches nothing behind the key
    port = int(url.rsplit(":", 1)[1])
    for raw in ("/static/../sdapi/v1/options", "/v1/images/files/../../sdapi/v1/options"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            reply = s.recv(65536).decode(errors="replace")
        assert re.match(r"HTTP/1.1 (401|404)", reply) and "sd_model_checkpoint" not in reply, raw


def test_serve_refuses_a_reachable_address_without_keys(capsys: pytest.CaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.1.2.3")
    check_bind("127.0.0.1", ())
    check_bind("0.0.0.0", (KEY,))
    with pytest.raises(SystemExit) as exc:
        main(["model=tiny", "--host", "0.0.0.0", "--port", "9"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t2i-serve: error: --host 0.0.0.0") and "server.api_keys" in err and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["model=tiny", "server.host=10.0.0.1", "--port", "9"])
    assert exc.value.code == 2 and "10.0.0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["model=tiny", "server.api_keys=['']"])
    assert exc.value.code == 2 and "server.api_keys[0] is empty" in capsys.readouterr().err


def test_lora_listing_stays_inside_the_allowed_folders(tiny_dir: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes((tiny_dir / "loras" / "tiny_kohya.safetensors").read_bytes())
    (allowed / "sub" / "mine.safetensors").write_bytes(outside.read_bytes())
    (allowed / "escape.safetensors").symlink_to(outside)
    (allowed / "old.ckpt").write_bytes(b"pickle")
    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path / 'out'}",
                                     f"server.allowed_lora_dirs=[{allowed}]"]))
    with uvicorn_thread(app) as url:
        names = {lo["name"]: lo["path"] for lo in a1111(url).get_loras()}
    assert names == {"mine": str(allowed / "sub" / "mine.safetensors")}
    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path / 'out'}",
                                     f"server.allowed_lora_dirs=[{allowed}]", "allow_pickle_lora=true"]))
    with uvicorn_thread(app) as url:
        with_pickle = {lo["name"] for lo in a1111(url).get_loras()}
    assert with_pickle == {"mine", "old"}


def test_png_info_of_foreign_and_broken_images(server) -> None:
    url, _ = server
    api = a1111(url)
    im = Image.new("RGB", (8, 8))
    im.info["parameters"] = "a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 9, Size: 8x8"
    res = api.png_info(im)
    assert res.info.startswith("a dog") and res.parameters["Seed"] == "9" and res.parameters["Size-1"] == "8"
    assert api.png_info(Image.new("RGB", (8, 8))).info == ""
    bad = api.session.post(f"{url}/sdapi/v1/png-info", json={"image": base64.b64encode(b"not a png").decode()})
    assert bad.status_code == 422 and "not an image" in bad.json()["detail"]


@pytest.mark.slow
def test_readme_client_examples_run(server, tmp_path: Path) -> None:
    url, _ = server
    port = url.rsplit(":", 1)[1]
    text = (REPO / "docs" / "server.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "t2i-serve" in b or "/v1" in b]
    assert len(blocks) == 2 and "webuiapi" in blocks[0] and "OpenAI(" in blocks[1]
    printed = []
    for block in blocks:
        (tmp_path / "fox.png").unlink(missing_ok=True)
        code = block.replace("8000", port)
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert Image.open(tmp_path / "fox.png").size == (64, 64)
        printed.append(r.stdout)
    assert printed[0].startswith("a red fox\nSteps: 4, Sampler: Euler a") and "Seed: 5" in printed[0]  # webuiapi
    assert json.loads(Image.open(tmp_path / "fox.png").info["t2i-runner"])["prompt"] == "a red fox"  # OpenAI's PNG


def test_a1111_hires_fix_fields_give_the_cli_image(server, tmp_path: Path) -> None:
    """`enable_hr` with A1111's hr_* fields: the second pass at hr_scale, recorded as A1111 writes it, the same
    pixels as `t2i … hires.*` (issue 25)."""
    from conftest import run_cli

    url, _ = server
    r = a1111(url).txt2img(prompt="a [red:blue:0.5] fox", seed=3, steps=2, width=32, height=32, enable_hr=True,
                           hr_scale=1.5, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=2,
                           denoising_strength=0.5, hr_sampler_name="DPM++ 2M", hr_scheduler="Karras")
    assert r.image.size == (48, 48)
    text = r.info["infotexts"][0]
    assert "Size: 32x32" in text and "Denoising strength: 0.5, " in text
    assert "Hires sampler: DPM++ 2M, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic), " \
           "Hires schedule type: Karras" in text
    proc = run_cli("model=tiny", "prompts=['a [red:blue:0.5] fox']", "seeds=[3]", "steps=2", "width=32",
                   "height=32", "scheduler=euler_a", "schedule=uniform", "guidance_scale=7", "hires.scale=1.5",
                   "hires.upscaler='Latent (bicubic)'", "hires.steps=2", "hires.denoise=0.5",
                   "hires.scheduler=dpmpp_2m", "hires.schedule=karras", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (png,) = tmp_path.glob("0*.png")
    ours, theirs = json.loads(Image.open(png).info["t2i-runner"]), json.loads(r.image.info["t2i-runner"])
    assert {k: (v, theirs.get(k)) for k, v in ours.items() if k != "versions" and v != theirs.get(k)} == {}
    assert np.array_equal(pixels(Image.open(png)), pixels(r.image))
