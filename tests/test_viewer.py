"""The run viewer's files (issue 17): data, axes, thumbnails, live updates, sweeps, merge, and the server's /runs.
The page itself is driven in a real browser in test_viewer_browser.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import job_done
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from PIL import Image

from runner.common.errors import ConfigError
from runner.config import RunConfig, validate
from runner.outputs import viewer
from runner.outputs.grid import axis_value
from runner.outputs.manifest import Manifest
from runner.outputs.sweep import PARTS_DIR, merge_main, record_job
from runner.outputs.thumbs import THUMB_DIR, thumb_rel
from runner.server.app import compose_config, create_app


def _record(data: dict, im: dict) -> dict:
    return {**data["common"], **im["r"], "file": im["f"]}


def test_a_run_leaves_a_viewer_and_writer_threads_made_its_thumbnails(viewer_run) -> None:
    run_dir = viewer_run.dir
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert len(pngs) == 12
    html = (run_dir / "index.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "//" not in html.split("<script", 1)[0].replace(
        "<!doctype", "")  # no URL to anywhere: the page is self-contained
    assert '<script src="viewer-data.js"></script>' in html
    for folder in (run_dir / THUMB_DIR, run_dir / THUMB_DIR / "small"):
        thumbs = sorted(p for p in folder.iterdir() if p.is_file())
        assert [t.name for t in thumbs] == [p.replace(".png", ".jpg") for p in pngs]
        for t in thumbs:
            with Image.open(t) as im:
                assert im.format == "JPEG" and im.size == (32, 32)  # never enlarged
    assert len(viewer_run.thumb_threads) == 24  # two sizes per image
    assert all(name.startswith("png-writer-") for name in viewer_run.thumb_threads), viewer_run.thumb_threads
    status = viewer.read_status(run_dir)
    assert status["progress"]["state"] == "done" and status["progress"]["done"] == 12
    assert status["progress"]["planned"] == 12 and status["rev"] == viewer.read_data(run_dir)["rev"]


def test_the_data_holds_every_record_and_the_swept_axes_labelled_like_the_grids(viewer_run) -> None:
    data = viewer.read_data(viewer_run.dir)
    manifest = {e["file"]: e for e in Manifest(viewer_run.dir).entries()}
    assert data["format"] == 1 and data["kind"] == "run" and data["dir"] == str(viewer_run.dir.resolve())
    names = [a["name"] for a in data["axes"]]
    assert names == ["prompt", "seed", "lora_set", "lora_scale"]  # sampler, lora index, model: not swept
    axes = {a["name"]: a for a in data["axes"]}
    assert axes["lora_set"]["values"] == ["nolora", "kohya"] and axes["lora_set"]["baseline"] == 0
    assert axes["lora_scale"]["values"] == [None, 0.5, 1.0] and axes["lora_scale"]["wildcard"] == 0
    assert axes["seed"]["labels"] == ["seed: 1", "seed: 2"]
    assert axes["lora_scale"]["labels"] == ["lora_scale: -", "lora_scale: 0.5", "lora_scale: 1"]
    assert len(data["images"]) == 12
    for im in data["images"]:
        rec = _record(data, im)
        assert rec == manifest[im["f"]]  # the complete record, nothing lost or changed
        assert im["t"] == thumb_rel(im["f"]) and (viewer_run.dir / im["t"]).is_file()
        for a, k in zip(data["axes"], im["a"], strict=True):
            assert a["values"][k] == axis_value(rec, a["name"])


def _entry(i: int, **kw) -> dict:
    base = {"file": f"{i:05d}.png", "key": f"k{i}", "index": i, "prompt": "p", "negative_prompt": "", "seed": 1,
            "steps": 4, "guidance_scale": 7.5, "width": 64, "height": 64, "scheduler": None, "sampler": "Euler",
            "clip_skip": None, "lora_set": 0, "lora_scale": None, "loras": [],
            "model": {"name": "tiny", "id": "builtin:tiny", "dtype": "float32"}, "versions": {"torch": "2.13"}}
    return {**base, **kw}


def test_axes_come_from_any_record_field_and_one_per_way_of_splitting_the_images() -> None:
    import itertools

    entries = []
    for steps, sched, block, (name, mid), dtype, fuse in itertools.product(
            [8, 4], [None, "ddim"], ["ALL", "INS"], [("tiny", "builtin:tiny"), ("other", "x/other")],
            ["float32", "float16"], ["false", "true"]):
        entries.append(_entry(len(entries), steps=steps, scheduler=sched, sampler="DDIM" if sched else "Euler",
                              block_preset=block, model={"name": name, "id": mid, "dtype": dtype},
                              negative_prompt=f"not {steps}", overrides=[f"perf.fuse_qkv={fuse}", "model=x"]))
    axes, index = viewer.viewer_axes(entries)
    by_name = {a["name"]: a for a in axes}
    # sampler is decided by scheduler, model.id by model, the negative prompt by steps: no axes of their
    # own; a field nobody told the viewer about (block_preset), a nested one and a multirun override are axes
    # (the model first: a setting that follows the models' defaults is the model's, issue 31)
    assert [a["name"] for a in axes] == ["model", "steps", "scheduler", "block_preset", "model.dtype",
                                         "perf.fuse_qkv"]
    assert by_name["steps"]["values"] == [4, 8]  # numbers ascending, like the grids
    assert by_name["scheduler"]["labels"] == ["scheduler: default", "scheduler: ddim"]
    assert by_name["model"]["values"] == ["tiny", "other"]
    assert by_name["perf.fuse_qkv"]["values"] == ["false", "true"]
    for e, idx in zip(entries, index, strict=True):
        got = [a["values"][k] for a, k in zip(axes, idx, strict=True)]
        assert got == [e["model"]["name"], e["steps"], e["scheduler"], e["block_preset"], e["model"]["dtype"],
                       e["overrides"][0].split("=")[1]]


def test_integers_javascript_cannot_hold_are_written_as_text(tmp_path: Path) -> None:
    big = 2**63 + 1
    entries = [_entry(0, seed=big), _entry(1, seed=7)]
    viewer.write_viewer(tmp_path, entries, viewer.progress("done", 2, 2, 0.0))
    data = viewer.read_data(tmp_path)
    (seed,) = [a for a in data["axes"] if a["name"] == "seed"]
    assert seed["values"] == [7, str(big)] and seed["labels"][1] == f"seed: {big}"
    assert data["images"][0]["r"]["seed"] == str(big)


def _pngs(folder: Path, n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        e = _entry(i, seed=i)
        Image.new("RGB", (16, 16), (i * 20 % 256, 0, 0)).save(folder / e["file"])
        out.append(e)
    return out


def _wait(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_live_viewer_follows_the_images_as_they_land_throttled_then_writes_the_final_state(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    writes = []
    real = viewer.write_viewer
    monkeypatch.setattr(viewer, "write_viewer", lambda *a, **k: writes.append(time.monotonic()) or real(*a, **k))
    before = time.time()
    live = viewer.LiveViewer(tmp_path, [], planned=40, done=0, interval=0.2)
    after = time.time()
    assert (tmp_path / "index.html").is_file()
    progress = viewer.read_status(tmp_path)["progress"]
    assert before - 1 <= progress["started"] <= after + 1  # the clock read while it started (rounded to 1 s at most)
    assert progress | {"updated": 0, "started": 0} == {
        "state": "running", "planned": 40, "done": 0, "images": 0, "started": 0, "updated": 0}
    entries = _pngs(tmp_path, 40)
    start = time.monotonic()
    for e in entries:  # 40 images in ~0.8 s: a write per interval, not one per image
        live.add(e)
        time.sleep(0.02)
    _wait(lambda: (viewer.read_data(tmp_path) or {}).get("progress", {}).get("done") == 40)
    during = [t for t in writes if t >= start]
    # throttled whatever the machine's load: never two writes within an interval (so far fewer than one per image)
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert 1 <= len(during) < 40 and all(g >= 0.2 - 1e-3 for g in gaps), gaps
    assert viewer.read_status(tmp_path)["progress"]["state"] == "running"
    live.close("interrupted")
    status = viewer.read_status(tmp_path)["progress"]
    assert status["state"] == "interrupted" and status["done"] == 40 and status["images"] == 40
    assert [im["f"] for im in viewer.read_data(tmp_path)["images"]] == [e["file"] for e in entries]


def test_a_run_that_fails_before_its_first_image_leaves_no_viewer(tmp_path: Path, monkeypatch) -> None:
    from runner.generate import batch
    from runner.run import run

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(batch, "generate", boom)
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": {"id": "builtin:tiny"}, "device": "cpu",
                                                             "steps": 1, "width": 32, "height": 32})
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg, tmp_path / "run", progress=False)
    # the run had started (its run dir state stays, issue 12), but no viewer of zero images is left behind
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".t2i"]


def test_viewer_off_and_a_bad_thumbnail_size(tmp_path: Path) -> None:
    from runner.run import run

    base = {"model": {"id": "builtin:tiny"}, "device": "cpu", "steps": 1, "width": 32, "height": 32}
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {**base, "viewer": {"enabled": False}})
    run(cfg, tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / "index.html").exists() and not (tmp_path / "off" / THUMB_DIR).exists()
    with pytest.raises(ConfigError, match=r"viewer.thumb_size=8 is out of range; valid: 32 to 2048"):
        validate(OmegaConf.merge(OmegaConf.structured(RunConfig), {**base, "viewer": {"thumb_size": 8}}))


def test_resume_makes_the_thumbnails_an_earlier_run_lacks(viewer_run, tmp_path: Path) -> None:
    from runner.run import run

    copy = tmp_path / "run"
    shutil.copytree(viewer_run.dir, copy)
    shutil.rmtree(copy / THUMB_DIR)
    for name in ("index.html", "viewer-data.js", "viewer-status.js"):
        (copy / name).unlink()
    result = run(viewer_run.cfg, copy, progress=False)
    assert result.generated == 0 and result.skipped == 12
    assert len(list((copy / THUMB_DIR).glob("*.jpg"))) == len(list((copy / THUMB_DIR / "small").glob("*.jpg"))) == 12
    assert len(viewer.read_data(copy)["images"]) == 12


def test_multirun_writes_one_live_viewer_for_the_whole_sweep(tmp_path: Path, monkeypatch, capsys) -> None:
    from runner import cli

    sweep = tmp_path / "sweep"
    states = []
    real = viewer.write_viewer

    def spy(folder, entries, prog, kind="run", title=None):
        if kind == "sweep":
            states.append((prog["state"], len(entries), prog["jobs"]["finished"], tuple(prog["jobs"]["running"])))
        return real(folder, entries, prog, kind, title)

    monkeypatch.setattr(viewer, "write_viewer", spy)
    monkeypatch.setattr(sys, "argv", ["t2i", "-m", "model=tiny", "device=cpu", "steps=1", "width=32", "height=32",
                                      "prompts=[a]", "seeds=[1],[2]", f"hydra.sweep.dir={sweep}"])
    cli.main()
    out = capsys.readouterr().out
    assert f"t2i: viewer: {(sweep / '1' / 'index.html').resolve().as_uri()} (or t2i-serve's /runs)" in out
    data = viewer.read_data(sweep)
    assert data["kind"] == "sweep" and [a["name"] for a in data["axes"]] == ["seed"]
    assert sorted(im["f"] for im in data["images"]) == sorted(
        f"{n}/{p.name}" for n in (0, 1) for p in (sweep / str(n)).glob("*.png"))
    assert all((sweep / im["t"]).is_file() for im in data["images"])
    prog = data["progress"]
    assert prog["state"] == "done" and prog["jobs"] == {"total": 2, "finished": 2, "failed": 0, "running": []}
    assert states[0] == ("running", 0, 0, ())  # the sweep's page exists before the first job starts
    assert ("running", 0, 0, (0,)) in states and ("running", 1, 1, (1,)) in states  # job 1 running, job 0 in
    assert not list((sweep / PARTS_DIR).glob("running-*"))
    for n in (0, 1):
        assert viewer.read_status(sweep / str(n))["progress"]["state"] == "done"


def test_sweep_progress_lists_failed_jobs_and_reads_running_jobs_live(viewer_run, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job0 = sweep / "0"
    shutil.copytree(viewer_run.dir, job0)
    from runner.outputs.sweep import job_lines

    viewer.start_sweep(sweep, 3)
    record_job(sweep, 0, job_lines(sweep, job0, 0, ["seeds=[1]"], None))
    record_job(sweep, 1, [{"job": 1, "job_dir": "1", "overrides": ["scheduler=bogus"], "status": "failed",
                           "error": "scheduler='bogus' is not valid"}])
    job2 = sweep / "2"
    job2.mkdir()
    watcher = viewer.SweepWatcher(sweep, 2, job2, ["seeds=[3]"])
    prog = viewer.read_data(sweep)["progress"]
    assert prog["jobs"] == {"total": 3, "finished": 2, "failed": 1, "running": [2]} and prog["state"] == "running"
    assert prog["failed_jobs"] == [{"job": 1, "overrides": ["scheduler=bogus"],
                                    "error": "scheduler='bogus' is not valid"}]
    src = viewer_run.dir / sorted(p.name for p in viewer_run.dir.glob("*.png"))[0]
    shutil.copy(src, job2 / src.name)
    entry = next(e for e in Manifest(viewer_run.dir).entries() if e["file"] == src.name)
    Manifest(job2).append(entry)  # job 2 writes an image: the sweep's viewer shows it within seconds
    _wait(lambda: len(viewer.read_data(sweep)["images"]) == 13)
    watcher.close()
    assert not (sweep / PARTS_DIR / "running-000002.json").exists()
    # the same sweep run again (resume): earlier jobs' images stay on the page but do not count as done now
    for part in (sweep / PARTS_DIR).glob("job-*.jsonl"):
        os.utime(part, (time.time() - 60, time.time() - 60))
    viewer.start_sweep(sweep, 3)
    prog = viewer.read_data(sweep)["progress"]
    assert prog["jobs"]["finished"] == 0 and prog["failed_jobs"] == [] and prog["images"] == 12


def test_merge_writes_a_viewer_over_the_merged_dirs(viewer_run, tmp_path: Path, capsys) -> None:
    entries = Manifest(viewer_run.dir).entries()
    for n, part in enumerate((entries[:5], entries[5:])):
        d = tmp_path / f"shard{n}"
        (d / THUMB_DIR).mkdir(parents=True)
        for e in part:
            shutil.copy(viewer_run.dir / e["file"], d / e["file"])
            Manifest(d).append(e)
        if n == 0:  # shard 0 comes from an older version: no thumbnails yet
            continue
        for e in part:
            shutil.copy(viewer_run.dir / thumb_rel(e["file"]), d / thumb_rel(e["file"]))
    out = tmp_path / "merged"
    assert merge_main([str(tmp_path / "shard0"), str(tmp_path / "shard1"), "-o", str(out)]) == 0
    assert f"viewer {out / 'index.html'}" in capsys.readouterr().out
    data = viewer.read_data(out)
    assert len(data["images"]) == 12 and data["progress"]["state"] == "done"
    assert all(im["f"].startswith("../shard") and (out / im["t"]).is_file() for im in data["images"])


# the server: /runs, its files, and nothing outside its folders


@pytest.fixture(scope="module")
def served(viewer_run, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("served")
    extra = tmp / "extra"
    old = extra / "old-run"  # a run dir from before viewers: no index.html, no data, no thumbnails
    shutil.copytree(viewer_run.dir, old, ignore=shutil.ignore_patterns("index.html", "viewer-*.js", THUMB_DIR))
    (old / ".hydra").mkdir()
    (old / ".hydra" / "config.yaml").write_text("secret: 1\n")
    (tmp / "outside.txt").write_text("outside the allowed folders\n")
    os.symlink("/etc", extra / "etc-link")
    os.symlink(tmp / "outside.txt", old / "leak.txt")
    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp / 'out'}",
                                     f"server.run_dirs=[{viewer_run.dir.parent},{extra}]"]))
    with TestClient(app) as client:
        yield client, app, extra


def test_runs_lists_its_own_and_configured_run_dirs_and_serves_their_viewers(served, viewer_run) -> None:
    client, app, extra = served
    listing = client.get("/api/runs").json()
    assert [r["path"] for r in listing["roots"]] == [str(app.state.roots[0].label), str(viewer_run.dir.parent),
                                                     str(extra)]
    runs = {(r["root"], r["path"]): r for r in listing["runs"]}
    assert runs[(1, "run")]["images"] == 12 and runs[(1, "run")]["state"] == "done"
    assert runs[(2, "old-run")]["images"] == 12 and runs[(2, "old-run")]["url"] == "/runs/2/old-run/"
    page = client.get("/runs")
    assert page.status_code == 200 and 'href="/runs/1/run/"' in page.text and 'href="/runs/2/old-run/"' in page.text
    assert client.get("/runs/1/run", follow_redirects=False).headers["location"] == "/runs/1/run/"
    html = client.get("/runs/1/run/")
    assert html.status_code == 200 and html.text == (viewer_run.dir / "index.html").read_text(encoding="utf-8")
    js = client.get("/runs/1/run/viewer-data.js")
    assert js.status_code == 200 and js.headers["cache-control"] == "no-store"
    assert js.content == (viewer_run.dir / "viewer-data.js").read_bytes()
    name = sorted(p.name for p in viewer_run.dir.glob("*.png"))[0]
    assert client.get(f"/runs/1/run/{name}").content == (viewer_run.dir / name).read_bytes()
    assert client.get(f"/runs/1/run/thumbs/{name[:-4]}.jpg").headers["content-type"] == "image/jpeg"
    # an older run dir gets its viewer built on request; nothing is written into it
    assert client.get("/runs/2/old-run/").status_code == 200
    data = client.get("/runs/2/old-run/viewer-data.js").text
    data = json.loads(data[data.index("=") + 1:].strip().rstrip(";"))
    status = client.get("/runs/2/old-run/viewer-status.js").text
    assert len(data["images"]) == 12 and f'"rev":{data["rev"]}' in status
    assert not (extra / "old-run" / "index.html").exists() and not (extra / "old-run" / "viewer-data.js").exists()


def _raw_get(app, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as given (no client-side normalisation of `..`), straight into the ASGI app."""
    result: dict = {"body": b""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        if msg["type"] == "http.response.start":
            result["status"] = msg["status"]
        elif msg["type"] == "http.response.body":
            result["body"] += msg.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode("utf-8", "surrogateescape"), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    return result["status"], result["body"]


@pytest.mark.parametrize("path", [
    "/runs/1/../../../../etc/passwd", "/runs/1/run/../../../../../etc/passwd", "/runs/2/../outside.txt",
    "/runs/2/old-run/../../outside.txt", "/runs/1//etc/passwd", "/runs/1/%2e%2e/%2e%2e/etc/passwd",
    "/runs/2/..%2f..%2fetc%2fpasswd", "/runs/2/etc-link/passwd", "/runs/2/old-run/leak.txt",
    "/runs/2/old-run/.hydra/config.yaml", "/runs/2/old-run/.hydra/", "/runs/9/x", "/runs/-1/etc/passwd",
    "/runs/x/etc/passwd", "/runs/2/old-run\\..\\..\\outside.txt", "/runs/2/old-run/%00", "/runs/2/",
    "/runs/0/../../../etc/passwd", "/runs/\u00b2/x", "/runs/\u0663/x", "/runs/2/" + "a" * 5000,
])
def test_a_path_outside_the_allowed_folders_is_refused(served, path: str) -> None:
    client, app, _ = served
    status, body = _raw_get(app, path)
    assert status in (403, 404), (path, status)
    assert b"root:" not in body and b"outside the allowed" not in body and b"secret" not in body
    assert client.get(path).status_code in (403, 404)  # and as a client sends it (percent-decoded, normalised)


def test_run_dirs_must_be_folders(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.run_dirs: '.*nope' is not a folder"):
        create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path}",
                                   f"server.run_dirs=[{tmp_path / 'nope'}]"]))


def test_a_finished_job_links_to_its_runs_viewer(served) -> None:
    client, _, _ = served
    resp = client.post("/api/jobs", json={"text_prompt": "a viewer test", "inference_steps": 1, "width": 32,
                                          "height": 32, "total_nm_img_prompt": 2})
    job = resp.json()
    job = job_done(client, job["id"], timeout=60)
    assert job["status"] == "done", job
    assert job["viewer"].startswith("/runs/0/") and job["viewer"].endswith("/")
    assert client.get(job["viewer"]).status_code == 200
    js = client.get(job["viewer"] + "viewer-data.js").text
    data = json.loads(js[js.index("=") + 1:].strip().rstrip(";"))
    assert len(data["images"]) == 2 and data["progress"]["state"] == "done"
    gallery = client.get(job["gallery"]).text
    assert f'href="{job["viewer"]}"' in gallery
    assert any(r["url"] == job["viewer"] for r in client.get("/api/runs").json()["runs"])


def test_thumbnails_are_small_jpegs_in_two_sizes(tmp_path: Path) -> None:
    from runner.outputs.thumbs import save_thumb

    Image.new("RGB", (1024, 512), (10, 200, 30)).save(tmp_path / "big.png")
    with Image.open(tmp_path / "big.png") as im:
        save_thumb(im, tmp_path, "big.png")
    with Image.open(tmp_path / thumb_rel("big.png")) as big, Image.open(tmp_path / thumb_rel("big.png", True)) as small:
        assert (big.format, big.size, small.format, small.size) == ("JPEG", (256, 128), "JPEG", (64, 32))
        assert abs(np.asarray(big).astype(int) - (10, 200, 30)).max() <= 3
    assert thumb_rel("0/00001_a.png") == "0/thumbs/00001_a.jpg"
    assert thumb_rel("../s0/x.png", small=True) == "../s0/thumbs/small/x.jpg"
