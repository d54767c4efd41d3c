"""The first hour: t2i-train's help, typo hints and resume, the offline default model, t2i-inspect's LoRA lines and
grid PNGs, and t2i-serve failing fast, working offline and showing what it did."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_program
from fastapi.testclient import TestClient
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def train_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_program("t2i-train", *args, cwd=cwd, env=env)


def t2i_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_program("t2i", *args, cwd=cwd, env=env)


def no_hub_env() -> dict:
    """The hub not offline-flagged, but unreachable: a name that never resolves (RFC 2606 .invalid)."""
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid", "HF_HOME": "/nonexistent-hf-home"}


# --- t2i-train -------------------------------------------------------------------------------------------------

def test_train_help_lists_only_what_t2i_train_takes(tmp_path: Path) -> None:
    from runner.train.config import TrainRunConfig

    r = train_cli("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "powered by" not in r.stdout.lower()
    assert "lora: none" not in r.stdout and "server:" not in r.stdout and "tiny_examples" not in r.stdout
    assert r.stdout.startswith("t2i-train:") and "model=NAME" in r.stdout and "train.lr" in r.stdout
    for name in TrainRunConfig.__dataclass_fields__:
        assert f"\n{name}:" in r.stdout, name
    r = t2i_cli("--help", cwd=tmp_path)
    assert "powered by" not in r.stdout.lower() and "lora=NAME" in r.stdout
    assert "train: default" not in r.stdout and "recipe" not in r.stdout  # t2i-train's group is not t2i's


@pytest.mark.parametrize(("arg", "want"), [
    ("train.step=10", "did you mean 'train.steps'"), ("steps=10", "did you mean 'train.steps'"),
    ("lr=0.1", "did you mean 'train.lr'"), ("data.dirr=x", "did you mean 'data.dir'"),
    ("lora=tiny_examples", "lora='tiny_examples' is not valid"),
])
def test_train_typos_name_the_full_key_and_t2i_train(tmp_path: Path, arg: str, want: str) -> None:
    r = train_cli(arg, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("t2i-train: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert want in r.stderr and "see `t2i " not in r.stderr


@pytest.mark.slow
def test_train_offline_default_model_is_one_plain_line(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    # "cannot be reached" is the hub probe's answer (common/paths.py), given before huggingface_hub's ~25 s of
    # retries; test_hub_probe_is_bounded_and_remembered shows the probe itself never waits on a hanging connection
    r = train_cli("data.dir=imgs", "data.caption=x", cwd=tmp_path, env=no_hub_env())
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "stacktrace" not in line and "Traceback" not in line
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in line and "cannot be reached" in line
    r2 = t2i_cli("prompts=x", "steps=1", cwd=tmp_path, env=no_hub_env())  # the same line as t2i
    assert r2.returncode == 2 and r2.stderr.strip().split("error: ", 1)[1] == line.split("error: ", 1)[1]


def test_resume_applies_a_new_learning_rate_and_refuses_a_new_seed(tmp_path: Path, tiny_dir: Path) -> None:
    import csv

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), ("red", "blue")[i]).save(tmp_path / "imgs" / f"{i}.png")
    common = [f"model.id={tiny_dir}", "data.dir=imgs", "data.caption=x", "data.resolution=32", "lora.rank=2",
              "validation.prompts=[]", "train.checkpoint_every=1", f"hydra.run.dir={tmp_path / 'run'}"]
    r = train_cli(*common, "train.steps=2", "train.lr=1e-4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = train_cli(*common, "train.steps=4", "train.lr=5e-3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "train.lr 0.0001 -> 0.005" in out and "come from the checkpoint" in out
    with open(tmp_path / "run" / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = {int(row["step"]): float(row["lr"]) for row in rows}
    assert lrs == {1: 1e-4, 2: 1e-4, 3: 5e-3, 4: 5e-3}
    r = train_cli(*common, "train.steps=5", "train.seed=7", cwd=tmp_path)
    assert r.returncode == 2 and "train.seed" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- t2i-inspect -----------------------------------------------------------------------------------------------

def test_inspect_lora_lines_and_grid_png(tmp_path: Path, tiny_dir: Path, lora_a: dict, lora_b: dict) -> None:
    from omegaconf import OmegaConf

    from runner.config import RunConfig
    from runner.run import run

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "model": {"id": str(tiny_dir)}, "prompts": ["a red fox"], "seeds": [1, 2], "steps": 1, "width": 32,
        "height": 32, "lora_sets": [[lora_a, lora_b]]})
    res = run(cfg, tmp_path / "r", progress=False)
    r = run_program("t2i-inspect", str(tmp_path / "r" / res.entries[0]["file"]))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("loras:"))
    assert lines[i + 1].startswith(" " * 17 + "B x") and ":" not in lines[i + 1][:17]
    (grid,) = res.grids
    r = run_program("t2i-inspect", str(grid))
    assert r.returncode == 0, r.stderr
    assert "comparison grid" in r.stdout and "seed: 1 | 2" in r.stdout
    assert all(e["file"] in r.stdout for e in res.entries)
    r = run_program("t2i-inspect", "--json", str(grid))
    assert json.loads(r.stdout)["x"] == "seed"


# --- t2i-serve -------------------------------------------------------------------------------------------------

def test_serve_exits_2_at_start_with_t2is_line_when_the_model_cannot_load(tmp_path: Path, tiny_dir: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken, ignore=shutil.ignore_patterns("unet"))  # model_index.json names a unet
    serve = run_program("t2i-serve", f"model.id={broken}", "--port", "1", cwd=tmp_path)
    t2i = t2i_cli(f"model.id={broken}", "prompts=x", "steps=1", cwd=tmp_path)
    assert serve.returncode == 2 and t2i.returncode == 2
    line = serve.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("t2i-serve: error: ")
    assert line.split("error: ", 1)[1] == t2i.stderr.strip().split("error: ", 1)[1]


def test_hub_lora_without_network_is_refused_within_seconds(tmp_path: Path, monkeypatch) -> None:
    from runner.common import paths
    from runner.server.app import compose_config, create_app

    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path}"]))
    for key, value in no_hub_env().items():
        monkeypatch.setenv(key, value)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    paths._probe.clear()
    from runner.lora import files

    asked = []  # the hub itself is never asked (its client retries a dead host for ~25 s): the probe answers
    real_listing = files._hub_listing  # the first request to the hub for a LoRA (then hf_hub_download)
    monkeypatch.setattr(files, "_hub_listing", lambda repo: asked.append(repo) or real_listing(repo))
    with TestClient(app) as client:
        resp = client.post("/api/jobs", json={"text_prompt": "a fox", "inference_steps": 1,
                                              "lora_hugging_face_1": "someone/some-lora"})
    assert asked == [] and paths._probe  # refused on the probe's answer, which is remembered
    assert resp.status_code == 422
    assert "hub cannot be reached" in resp.json()["detail"] and "someone/some-lora" in resp.json()["detail"]


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_submit_errors_are_html_pages_and_the_api_stays_json(tmp_path: Path, monkeypatch) -> None:
    from runner.server import app as app_mod
    from runner.server.app import compose_config, create_app

    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path}", "server.max_steps=5"]))
    html = {"accept": BROWSER_ACCEPT}
    with TestClient(app, raise_server_exceptions=False) as client:
        form = {"text_prompt": "a fox", "inference_steps": "50"}
        resp = client.post("/submit", data=form, headers=html)
        assert resp.status_code == 422 and resp.headers["content-type"].startswith("text/html")
        assert "inference_steps=50" in resp.text and "<html" in resp.text
        resp = client.post("/submit", data=form, headers={"accept": "application/json"})
        assert resp.headers["content-type"] == "application/json" and "inference_steps" in resp.json()["detail"]
        resp = client.get("/submit", headers=html)  # a reload of the result page
        assert resp.status_code == 405 and resp.headers["content-type"].startswith("text/html")
        for path in ("/jobs/nope", "/no-such-page"):
            resp = client.get(path, headers=html)
            assert resp.status_code == 404 and resp.headers["content-type"].startswith("text/html"), path
        resp = client.get("/api/jobs/nope", headers=html)
        assert resp.status_code == 404 and resp.json()["detail"].startswith("no job")
        monkeypatch.setattr(app_mod, "parse_form", lambda form: 1 / 0)
        resp = client.post("/submit", data=form, headers=html)
        assert resp.status_code == 500 and resp.headers["content-type"].startswith("text/html")
        assert "ZeroDivisionError" in resp.text


def test_gallery_and_job_json_show_the_loras_used(tmp_path: Path, tiny_dir: Path) -> None:
    from runner.server.app import compose_config, create_app

    loras = tiny_dir / "loras"
    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path}",
                                     f"server.allowed_lora_dirs=[{loras}]"]))
    with TestClient(app) as client:
        form = {"text_prompt": "a fox", "inference_steps": "1", "width": "32", "height": "32",
                "total_nm_img_prompt": "2", "lora_hugging_face_1": str(loras / "tiny_kohya.safetensors"),
                "cross_attention_kwargs": "0.7"}
        resp = client.post("/submit", data=form)
        assert resp.status_code == 200 and "LoRAs: " in resp.text
        assert "tiny_kohya &times;0.7" in resp.text and str(loras / "tiny_kohya.safetensors") in resp.text
        job_id = resp.text.split("/api/jobs/")[1].split("/")[0].split('"')[0]
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["loras"] == [{"name": "tiny_kohya", "scale": 0.7, "weight_name": None,
                                 "source": str(loras / "tiny_kohya.safetensors")}]
        resp = client.post("/submit", data={**form, "lora_hugging_face_1": "null"})
        assert "LoRAs: none" in " ".join(resp.text.split())


def test_hub_probe_is_bounded_and_remembered(monkeypatch) -> None:
    import socket as socket_mod
    import threading

    from runner.common import paths

    calls = []
    answer = threading.Event()  # the connection hangs until the test ends: the probe must not wait for it

    def hang(*args, **kwargs):
        calls.append(args)
        answer.wait(300)
        raise OSError("released by the test")

    monkeypatch.setattr(socket_mod, "create_connection", hang)
    monkeypatch.setattr(paths, "HUB_PROBE_SECONDS", 0.5)
    paths._probe.clear()
    try:
        assert "no answer within 0.5 s" in paths.hub_unreachable()
        assert not answer.is_set() and len(calls) == 1  # it answered while the connection was still hanging
        assert paths.hub_unreachable() is not None and len(calls) == 1  # remembered for a minute
    finally:
        answer.set()
        paths._probe.clear()
