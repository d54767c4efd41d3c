"""Load test against a live `t2i-serve` on 127.0.0.1: 100 requests from 10 concurrent clients on the tiny model.

Bounded: every request has a timeout and the test gives up after a fixed deadline; the server is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow
CLIENTS, PER_CLIENT, RETRIES = 10, 10, 4
HANG_GUARD = 1800.0  # seconds: only a test that hangs meets it (no speed is asserted)
SLOWDOWN = Path(__file__).resolve().parent / "slowdown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(tmp_path: Path):
    port = _free_port()
    out = tmp_path / "out"
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 - closed in the finalizer
    gate = tmp_path / "gate-open"  # the server's batches wait for it: the queue surely overflows while it is shut
    env = os.environ | {"T2I_TEST_BATCH_GATE": str(gate),
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(SLOWDOWN), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "runner.server.app", "model=tiny", f"server.output_dir={out}",
                             "server.queue_size=16", "server.merge_max_images=4", "server.max_steps=4",
                             "server.max_side=64", "--port", str(port)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.2)
        yield base, out, tmp_path / "server.log", gate
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _client(base: str, index: int) -> list[tuple[int, dict, int, int]]:
    """One client: PER_CLIENT jobs, each with its own seed; a 503 is retried a few times after a pause.
    Returns (seed, last answer body, last status, number of 503s met)."""
    results = []
    with httpx.Client(base_url=base, timeout=60) as c:
        for k in range(PER_CLIENT):
            seed = 1000 + index * PER_CLIENT + k
            body = {"text_prompt": f"load test {index}", "manual_seed": seed, "inference_steps": 1,
                    "width": 32, "height": 32}
            busy = 0
            for _ in range(RETRIES + 1):
                resp = c.post("/api/jobs", json=body)
                if resp.status_code != 503:
                    break
                assert "queue is full" in resp.json()["detail"] and int(resp.headers["retry-after"]) >= 1
                busy += 1
                time.sleep(0.5)
            results.append((seed, resp.json(), resp.status_code, busy))
    return results


def test_100_requests_from_10_clients_all_answered(live_server) -> None:
    base, out, log, gate = live_server
    assert "http://127.0.0.1:" in log.read_text()  # bound to loopback by default
    start = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [a for batch in pool.map(lambda i: _client(base, i), range(CLIENTS)) for a in batch]
    assert len(answers) == CLIENTS * PER_CLIENT
    statuses = [s for _, _, s, _ in answers]
    assert set(statuses) <= {202, 503}, statuses
    busy = sum(n for *_, n in answers)
    assert busy >= 1  # the queue (16) overflowed while no batch could finish, and said so with 503 + Retry-After
    accepted = {b["id"]: seed for seed, b, s, _ in answers if s == 202}
    assert accepted
    gate.touch()  # now the worker drains the queue
    with httpx.Client(base_url=base, timeout=30) as c:
        pending = set(accepted)
        while pending:
            assert time.monotonic() - start < HANG_GUARD, f"{len(pending)} jobs unfinished"
            for jid in list(pending):
                job = c.get(f"/api/jobs/{jid}").json()
                if job["status"] not in ("queued", "running"):
                    assert job["status"] == "done", job
                    assert job["seeds"] == [accepted[jid]]
                    (url,) = job["images"]
                    assert c.get(url).status_code == 200
                    pending.discard(jid)
            time.sleep(0.2)
    seeds = []
    for manifest in out.rglob("manifest.jsonl"):
        seeds += [json.loads(line)["seed"] for line in manifest.read_text().splitlines()]
    assert sorted(seeds) == sorted(accepted.values())  # each accepted job's image exactly once
    names = [p.name for p in out.rglob("*.png")]
    for seed in accepted.values():
        assert sum(f"_s{seed}_" in n for n in names) == 1, seed
    print(f"load: {len(accepted)} of 100 accepted, {busy} answers were 503, "
          f"{time.monotonic() - start:.1f} s")
