"""The server's persistent queue and sweeps (issue 30): SQLite store, restart and kill -9 recovery, /api/sweeps with
its checks and limits, per-key visibility, priority and limits, and many clients at once.

Ordering uses events, never sleeps: in-process servers generate through a `Gate` (each batch waits for a permit
the test gives), and every wait is a bounded poll of the API with a generous timeout."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, uvicorn_thread
from fastapi.testclient import TestClient

import runner.generate.batch as batch_mod
from runner.config import validate
from runner.server.app import compose_config, create_app
from runner.server.store import decode, encode

SMALL = "steps: 2\nwidth: 32\nheight: 32\nbatch_size: 1\n"
YAML = {"content-type": "application/yaml"}


def wait(fn: Callable[[], object], what: str, timeout: float = 180.0) -> object:
    """Poll `fn` until it returns something true (bounded: fails after `timeout` s)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Gate:
    """Each generated batch waits for a permit: the test decides how many batches run."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.opened = threading.Event()
        self.real = batch_mod.generate

    def __call__(self, *args, **kwargs):
        while not self.opened.is_set():
            if self.permits.acquire(timeout=0.05):
                break
        return self.real(*args, **kwargs)

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self.permits.release()

    def open(self) -> None:
        self.opened.set()

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch) -> Gate:
        g = cls()
        monkeypatch.setattr(batch_mod, "generate", g)
        return g


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    g = Gate.install(monkeypatch)
    yield g
    g.open()


def server_cfg(out: Path, *overrides: str):
    return compose_config(["model=tiny", f"server.output_dir={out}", "server.max_images=24", "server.max_side=256",
                           "server.max_steps=20", *overrides])


def sweep_yaml(prompts: list[str], seeds: list[int]) -> str:
    return f"prompts: {json.dumps(prompts)}\nseeds: {json.dumps(seeds)}\n" + SMALL


def manifest(run_dir: Path) -> list[dict]:
    lines = (run_dir / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def assert_complete(run_dir: Path, n: int) -> None:
    """`n` images, `n` manifest lines, each image once."""
    entries = manifest(run_dir)
    assert len(entries) == n, [e["file"] for e in entries]
    assert len({e["key"] for e in entries}) == n
    assert len({e["file"] for e in entries}) == n
    assert sorted(p.name for p in run_dir.glob("*.png")) == sorted(e["file"] for e in entries)


def status(c, kind: str, item: str) -> dict:
    r = c.get(f"/api/{kind}/{item}")
    assert r.status_code == 200, r.text
    return r.json()


# 1. The store


def test_specs_go_through_the_store_unchanged(lora_a: dict) -> None:
    spec = validate({"model": {"id": "builtin:tiny"}, "prompts": ["a <b>", {"prompt": "c", "negative_prompt": "d"}],
                     "seeds": [1, 2**63], "steps": [2, 3], "width": 32, "guidance_scale": [1.5, 7.25],
                     "lora_sets": [[], [{**lora_a, "scale": 0.5, "blocks": "MIDD"}]], "lora_scales": [0.5, 1.0]})
    back = decode(json.loads(json.dumps(encode(spec))))
    assert back == spec
    assert isinstance(back.lora_sets[1], tuple) and back.lora_sets[1][0].blocks == spec.lora_sets[1][0].blocks
    with pytest.raises(ValueError, match="may not build"):
        decode({"__c": "subprocess:Popen", "f": {"args": "true"}})


# 2. Sweeps through the API: cancel, resume, a restart in the middle


def test_sweeps_cancel_resume_and_survive_a_restart(tmp_path: Path, gate: Gate) -> None:
    out = tmp_path / "out"
    cfg = server_cfg(out)
    with TestClient(create_app(cfg)) as c:
        s1 = c.post("/api/sweeps", content=sweep_yaml(["a red cube", "a blue ball"], [1, 2, 3]), headers=YAML)
        assert s1.status_code == 202, s1.text
        assert s1.json()["total"] == 6 and c.get(s1.json()["viewer"]).status_code == 200  # the viewer, at once
        s1 = s1.json()["id"]
        s2 = c.post("/api/sweeps", json={"config": {"prompts": ["a green tree", "a cat"], "seeds": [4, 5, 6],
                                                    "steps": 2, "width": 32, "height": 32, "batch_size": 1}})
        s2 = s2.json()["id"]
        job = c.post("/api/jobs", json={"text_prompt": "a house", "manual_seed": 9, "inference_steps": 2,
                                        "width": 32, "height": 32}).json()["id"]
        s3 = c.post("/api/sweeps", content=sweep_yaml(["a boat", "a car", "a bus"], [7, 8]), headers=YAML)
        s3 = s3.json()["id"]
        assert [status(c, "sweeps", s)["queue_position"] for s in (s2, s3)] == [1, 3]

        gate.allow(6)
        wait(lambda: status(c, "sweeps", s1)["status"] == "done", "sweep 1 done")
        gate.allow(3)
        wait(lambda: status(c, "sweeps", s2)["done"] == 3, "sweep 2 half-way")
        assert c.delete(f"/api/sweeps/{s2}").status_code == 200
        gate.allow(1)  # the batch in flight finishes; nothing after it
        st = wait(lambda: (s := status(c, "sweeps", s2))["status"] == "cancelled" and s, "sweep 2 cancelled")
        assert st["done"] == 4 and st["resumable"]
        gate.allow(1)
        wait(lambda: status(c, "jobs", job)["status"] == "done", "the job after it")
        gate.allow(2)
        wait(lambda: status(c, "sweeps", s3)["done"] == 2, "sweep 3 started")
        queue = c.app.state.queue
        stopping = threading.Thread(target=queue.stop)  # what the server's shutdown does
        stopping.start()
        wait(lambda: queue.running() is not None and queue.running().interrupted, "the stop request")
        gate.allow(1)
        stopping.join(60)
        assert not stopping.is_alive()
    run3 = out / status_file(out, s3)
    assert len(manifest(run3)) == 3
    with sqlite3.connect(out / "queue.sqlite") as db:
        states = dict(db.execute("SELECT id, state FROM items").fetchall())
    assert states == {s1: "done", s2: "cancelled", job: "done", s3: "running"}

    gate.open()
    with TestClient(create_app(cfg)) as c:  # the restart: sweep 3 goes on in its run dir
        wait(lambda: status(c, "sweeps", s3)["status"] == "done", "sweep 3 resumed")
        assert status(c, "sweeps", s2)["status"] == "cancelled"
        assert c.post(f"/api/sweeps/{s2}/resume").status_code == 202
        wait(lambda: status(c, "sweeps", s2)["status"] == "done", "sweep 2 resumed")
        assert c.post(f"/api/sweeps/{s1}/resume").status_code == 409  # done: nothing to resume
        assert status(c, "jobs", job)["status"] == "done"  # a job of the earlier start, read back
        assert c.get(f"/api/jobs/{job}/images/0.png").status_code == 200
    for sid, n in ((s1, 6), (s2, 6), (s3, 6)):
        assert_complete(out / status_file(out, sid), n)


def status_file(out: Path, sweep_id: str) -> str:
    return f"sweep-{sweep_id[:12]}"


# 3. Bad input: one clear error each, nothing queued

BAD = [
    ("prompts: [a, b\nseeds: 1\n", 400, "yaml", "does not parse at line"),
    ("prompts: [a]\nsteep: 2\n", 422, "yaml", "steep: not a run-config key (did you mean 'steps'?)"),
    ("prompts: [a]\ndevice: cuda\n", 403, "device", "the server's setting"),
    ("prompts: [a]\noutput_dir: /etc\n", 403, "output_dir", "the server's setting"),
    ("prompts: [a, b, c, d, e]\nseeds: [1, 2, 3, 4, 5]\n" + SMALL, 422, "seeds", "images=25 is too many"),
    ("prompts: [a]\nwidth: [32, 512]\nsteps: 2\n", 422, "width", "width=512 is too large; valid: 8 to 256"),
    ("prompts: [a]\nsteps: [2, 40]\n", 422, "steps", "steps=40 is above this server's limit; valid: 1 to 20"),
    ("prompts: [a]\nmodels: [builtin:tiny, someone/else]\n", 403, "models", "models[1]='someone/else' is not "
                                                                            "allowed"),
    ("prompts: [a]\nlora_sets: [[{source: /etc/passwd}]]\n", 403, "lora_sets", "outside the folders"),
    ("prompts: [a]\nscheduler: eulr\n", 422, "scheduler", "scheduler="),
    ("- a list\n", 400, "yaml", "a sweep is a mapping"),
]


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory):
    """A server that is only ever sent sweeps it refuses."""
    out = tmp_path_factory.mktemp("idle") / "out"
    with TestClient(create_app(server_cfg(out))) as c:
        yield c, out


@pytest.mark.parametrize(("body", "code", "field", "words"), BAD, ids=[b[3][:24] for b in BAD])
def test_bad_sweeps_are_one_clear_error_and_queue_nothing(idle, body: str, code: int, field: str,
                                                          words: str) -> None:
    c, out = idle
    r = c.post("/api/sweeps", content=body, headers=YAML)
    assert r.status_code == code, r.text
    errors = r.json()["errors"]
    assert len(errors) == 1 and errors[0]["field"] == field and words in errors[0]["message"], errors
    assert "\n" not in r.json()["detail"]
    assert c.post("/api/sweeps?dry_run=1", content=body, headers=YAML).status_code == code
    assert c.get("/api/sweeps").json()["sweeps"] == []
    assert not [p for p in out.iterdir() if p.name.startswith("sweep-")]


def test_every_bad_key_is_its_own_line(idle) -> None:
    c, _ = idle
    r = c.post("/api/sweeps", content="prompts: [a]\nsteps: 0\nscheduler: eulr\nseeds: [x]\n", headers=YAML)
    assert r.status_code == 422
    fields = [e["field"] for e in r.json()["errors"]]
    assert sorted(fields) == ["scheduler", "seeds", "steps"], r.json()


def test_bad_json_body_is_one_line(idle) -> None:
    c, _ = idle
    r = c.post("/api/sweeps", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "the JSON body does not parse" in r.json()["detail"]
    assert c.get("/api/sweeps").json()["sweeps"] == []


def test_dry_run_counts_images_and_estimates_from_the_measured_rate(tmp_path: Path) -> None:
    with TestClient(create_app(server_cfg(tmp_path / "out"))) as c:
        body = "prompts: [a, b]\nseeds: [1, 2, 3]\nguidance_scale: [1, 5]\n" + SMALL
        first = c.post("/api/sweeps?dry_run=1", content=body, headers=YAML).json()
        assert first["planned"] == 12 and first["estimate_s"] is None  # nothing measured yet
        job = c.post("/api/jobs", json={"text_prompt": "x", "manual_seed": 1, "inference_steps": 2, "width": 32,
                                        "height": 32, "total_nm_img_prompt": 2}).json()["id"]
        wait(lambda: status(c, "jobs", job)["status"] == "done", "a job")
        again = c.post("/api/sweeps?dry_run=1", content=body, headers=YAML).json()
        rate = again["images_per_second"]
        assert rate > 0 and again["estimate_s"] == pytest.approx(12 / rate, abs=0.1)
        assert c.get("/api/sweeps").json()["sweeps"] == []  # a dry run queues nothing


# 4. API keys: who sees what, priority, per-key limit

KEYS = ["server.api_keys=[key-a,key-b]", "server.priorities={key-b: 5}", "server.max_queued_images=4"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_each_key_sees_and_cancels_only_its_own(tmp_path: Path, gate: Gate) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    with TestClient(create_app(server_cfg(tmp_path / "out", *KEYS, f"server.run_dirs=[{shared}]"))) as c:
        a, b = auth("key-a"), auth("key-b")
        sa = c.post("/api/sweeps", content=sweep_yaml(["a"], [1, 2]), headers={**YAML, **a}).json()
        ja = c.post("/api/jobs", json={"text_prompt": "x", "manual_seed": 1, "inference_steps": 2, "width": 32,
                                       "height": 32}, headers=a).json()
        jb = c.post("/api/jobs", json={"text_prompt": "y", "manual_seed": 1, "inference_steps": 2, "width": 32,
                                       "height": 32}, headers=b).json()
        # key-b's priority puts its job before key-a's queued one (the running sweep goes on)
        assert c.get(f"/api/jobs/{jb['id']}", headers=b).json()["queue_position"] == 1
        assert c.get(f"/api/jobs/{ja['id']}", headers=a).json()["queue_position"] == 2
        # the per-key limit: key-a has 1 image queued (and 2 in its sweep), 4 more would pass 4
        r = c.post("/api/jobs", json={"text_prompt": "z", "total_nm_img_prompt": 4, "inference_steps": 2,
                                      "width": 32, "height": 32}, headers=a)
        assert r.status_code == 429 and "server.max_queued_images" in r.json()["detail"]
        # another key's job or sweep is not there; nor is its cancel
        for path in (f"/api/jobs/{ja['id']}", f"/api/sweeps/{sa['id']}"):
            assert c.get(path, headers=b).status_code == 404
            assert c.delete(path, headers=b).status_code == 404
        assert c.get("/api/sweeps", headers=b).json()["sweeps"] == []
        assert c.get(sa["viewer"], headers=b).status_code == 404
        wait(lambda: c.get(f"/api/sweeps/{sa['id']}", headers=a).json()["status"] == "running", "key-a's sweep")
        assert c.post("/sdapi/v1/interrupt", headers=b).status_code == 200  # not key-b's run: it goes on
        gate.open()
        wait(lambda: c.get(f"/api/jobs/{ja['id']}", headers=a).json()["status"] == "done", "key-a's job")
        wait(lambda: c.get(f"/api/sweeps/{sa['id']}", headers=a).json()["status"] not in ("queued", "running"),
             "key-a's sweep")
        assert c.get(f"/api/sweeps/{sa['id']}", headers=a).json()["status"] == "done"
        runs_a = {r["path"] for r in c.get("/api/runs", headers=a).json()["runs"] if r["root"] == 0}
        runs_b = {r["path"] for r in c.get("/api/runs", headers=b).json()["runs"] if r["root"] == 0}
        assert sa["run_dir"] in runs_a and sa["run_dir"] not in runs_b and len(runs_b) == 1
        assert c.get(sa["viewer"], headers=a).status_code == 200
        assert c.get("/api/runs", headers=b).json()["roots"][1]["path"] == str(shared)  # shared with every key
        with sqlite3.connect(tmp_path / "out" / "queue.sqlite") as db:  # no key stored, only its hash
            owners = {o for (o,) in db.execute("SELECT owner FROM items")}
        assert len(owners) == 2 and not owners & {"key-a", "key-b"}


# 5. kill -9 of a real server process mid-sweep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out: Path, port: int, delay: float) -> subprocess.Popen:
    """`t2i-serve` in its own process, every batch taking at least `delay` s (tests/slowdown)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "slowdown"), str(REPO)]),
           "T2I_TEST_BATCH_DELAY": str(delay)}
    cmd = [sys.executable, "-m", "runner.server.app", "model=tiny", f"server.output_dir={out}",
           "server.max_images=24", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait(up, "t2i-serve to start", timeout=300)
    return proc


@pytest.mark.slow
def test_kill_9_mid_sweep_loses_nothing(tmp_path: Path, tiny_dir: Path) -> None:
    out, port = tmp_path / "out", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(out, port, delay=0.2)
    try:
        body = sweep_yaml(["a red cube", "a blue ball", "a cat", "a tree"], [1, 2, 3, 4, 5, 6])
        r = httpx.post(f"{url}/api/sweeps", content=body, headers=YAML, timeout=60)
        assert r.status_code == 202, r.text
        sweep = r.json()
        jobs = [httpx.post(f"{url}/api/jobs", json={"text_prompt": f"job {i}", "manual_seed": i, "inference_steps": 2,
                                                    "width": 32, "height": 32}, timeout=60).json()["id"]
                for i in range(2)]
        point = random.randint(1, 22)  # the kill lands anywhere in the sweep (mid-batch or between batches)
        print(f"kill -9 after at least {point} images")  # shown if the test fails: the point to try again
        wait(lambda: httpx.get(f"{url}/api/sweeps/{sweep['id']}", timeout=10).json()["done"] >= point,
             f"{point} images")
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with sqlite3.connect(out / "queue.sqlite") as db:
        states = dict(db.execute("SELECT id, state FROM items").fetchall())
    assert states == {sweep["id"]: "running", jobs[0]: "queued", jobs[1]: "queued"}  # queued jobs still queued

    proc = start_server(out, port, delay=0.0)
    try:
        for j in jobs:  # not lost: queued behind the sweep, then made
            assert httpx.get(f"{url}/api/jobs/{j}", timeout=10).json()["status"] in ("queued", "running", "done")
        wait(lambda: httpx.get(f"{url}/api/sweeps/{sweep['id']}", timeout=10).json()["status"] == "done",
             "the sweep resumed")
        for j in jobs:
            wait(lambda j=j: httpx.get(f"{url}/api/jobs/{j}", timeout=10).json()["status"] == "done", "a job")
    finally:
        proc.terminate()
        proc.wait(60)
    assert_complete(out / sweep["run_dir"], 24)


# 6. Many clients at once


@pytest.mark.slow
def test_twenty_clients_submitting_and_polling_lose_nothing(tmp_path: Path) -> None:
    """20 clients on 127.0.0.1, each submitting a job (every third a sweep) and polling it to its end, again and
    again for a bounded time (15 s): every item they were given finished with its images, and no answer was a 500."""
    app = create_app(server_cfg(tmp_path / "out"))
    codes: list[int] = []
    lock = threading.Lock()
    with uvicorn_thread(app) as url:
        stop_at = time.monotonic() + 15

        def client(n: int) -> list[tuple[str, int]]:
            mine = []
            with httpx.Client(base_url=url, timeout=120) as h:
                k = 0
                while time.monotonic() < stop_at:
                    if k % 3 == 2:
                        r = h.post("/api/sweeps", content=sweep_yaml([f"c{n} s{k}"], [k, k + 1]), headers=YAML)
                        kind, n_images = "sweeps", 2
                    else:
                        r = h.post("/api/jobs", json={"text_prompt": f"client {n} job {k}", "manual_seed": k,
                                                      "inference_steps": 2, "width": 32, "height": 32})
                        kind, n_images = "jobs", 1
                    with lock:
                        codes.append(r.status_code)
                    k += 1
                    if r.status_code != 202:
                        continue
                    path = f"/api/{kind}/{r.json()['id']}"
                    mine.append((path, n_images))
                    end = time.monotonic() + 300
                    while time.monotonic() < end:
                        got = h.get(path)
                        with lock:
                            codes.append(got.status_code)
                        if got.status_code != 200 or got.json()["status"] not in ("queued", "running"):
                            break
                        time.sleep(0.05)
            return mine

        with ThreadPoolExecutor(20) as pool:
            given = [p for ps in pool.map(client, range(20)) for p in ps]
        assert len(given) >= 20 and 500 not in codes and set(codes) <= {200, 202}, sorted(set(codes))
        with httpx.Client(base_url=url, timeout=120) as h:
            for path, n_images in given:
                got = h.get(path).json()
                assert got["status"] == "done" and got["done"] == got["total"] == n_images, got


# 7. docs/server-sweeps.md: its commands, as written, against a server on 127.0.0.1


@pytest.mark.slow
def test_the_docs_commands_do_what_the_docs_say(tmp_path: Path, tiny_dir: Path) -> None:
    import re

    text = (REPO / "docs" / "server-sweeps.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert len(blocks) >= 6 and blocks[0].startswith("t2i-serve ")
    port = str(free_port())  # the docs' port 8000 may be taken here
    script = "set -e\n" + "\n".join(blocks).replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
        "--port 8000", f"--port {port}")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert '"ok":true,"planned":6' in out
    # the cancel stopped the second sweep (then resumed), or came after its end (then nothing to resume)
    assert '"status":"queued","done":' in out or "is done; only a cancelled" in out
    assert "width=4096 is too large; valid: 8 to 1024, a multiple of 8 (server.max_side)" in out
    assert '"errors":[{"field":"width"' in out
    assert out.rstrip().endswith("404")
    runs = sorted((tmp_path / "outputs" / "team").glob("sweep-*"))
    assert len(runs) == 2  # the refused sweep left nothing
    for run_dir in runs:
        assert_complete(run_dir, 6)
    with sqlite3.connect(tmp_path / "outputs" / "team" / "queue.sqlite") as db:
        assert sorted(s for (s,) in db.execute("SELECT state FROM items")) == ["done", "done"]


def test_a_job_cut_off_mid_run_is_finished_by_the_next_start(tmp_path: Path) -> None:
    """What a kill -9 leaves of a single request (a row `running`, part of its images in the run dir): the next
    start makes the missing images into the same run dir, and the job reports all of them."""
    out = tmp_path / "out"
    cfg = server_cfg(out, "batch_size=1")
    req = {"text_prompt": "a lamp", "manual_seed": 3, "total_nm_img_prompt": 3, "inference_steps": 2, "width": 32,
           "height": 32}
    with TestClient(create_app(cfg)) as c:
        job = c.post("/api/jobs", json=req).json()["id"]
        first = wait(lambda: (s := status(c, "jobs", job))["status"] == "done" and s, "the job")
    run_dir = next(p for p in out.iterdir() if p.is_dir() and p.name.endswith(job[:8]))
    entries = manifest(run_dir)
    kept = [e for e in entries if e["seed"] == 4]  # as if the process died after its second image
    for e in entries:
        if e not in kept:
            (run_dir / e["file"]).unlink()
    (run_dir / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))
    with sqlite3.connect(out / "queue.sqlite") as db:
        db.execute("UPDATE items SET state = 'running' WHERE id = ?", (job,))
    kept_file = (run_dir / kept[0]["file"]).stat()
    with TestClient(create_app(cfg)) as c:
        again = wait(lambda: (s := status(c, "jobs", job))["status"] == "done" and s, "the job, resumed")
        assert again["done"] == 3 and again["images"] == first["images"]
        assert c.get(f"/api/jobs/{job}/images/2.png").status_code == 200
    assert_complete(run_dir, 3)
    again_file = (run_dir / kept[0]["file"]).stat()
    assert (again_file.st_ino, again_file.st_mtime_ns) == (kept_file.st_ino, kept_file.st_mtime_ns)  # not made again
