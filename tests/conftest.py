"""Shared fixtures: an isolated cache, the hub offline, and the tiny model written once per session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# Debian's chromium, driven by Playwright (never `playwright install`); T2I_CHROMIUM names another path (.ci/run sets
# it to the one it installed, so CI and the browser tests agree on where it is)
CHROMIUM = Path(os.environ.get("T2I_CHROMIUM") or "/usr/bin/chromium")
NO_CHROMIUM = f"no chromium at {CHROMIUM} (apt-get install chromium, or set T2I_CHROMIUM to its path)"
# Under CI=true every skip fails the session, except these (nodeid substring -> why CI may skip it): a test CI expects
# to run must not pass silently by skipping (a chromium off its path once skipped 12 browser tests unnoticed).
CI_MAY_SKIP: dict[str, str] = {}
_ci_skips: list[tuple[str, str]] = []
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
_SESSION_CACHE = Path(os.environ.get("T2I_TEST_CACHE", "")) if os.environ.get("T2I_TEST_CACHE") else None


def pytest_configure(config: pytest.Config) -> None:
    """Every test (and every subprocess it starts) uses a private cache and never touches the hub."""
    import tempfile

    cache = _SESSION_CACHE or Path(tempfile.mkdtemp(prefix="t2i-test-cache-"))
    os.environ["T2I_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def pytest_runtest_logreport(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Note every skipped test (not xfail) that CI_MAY_SKIP does not allow."""
    if report.skipped and not hasattr(report, "wasxfail") and _in_ci():
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(part in report.nodeid for part in CI_MAY_SKIP):
            _ci_skips.append((report.nodeid, reason))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A whole module skipped at collection (pytest.importorskip) counts too."""
    pytest_runtest_logreport(report)  # type: ignore[arg-type]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _ci_skips:
        terminalreporter.section("skipped under CI=true (not in tests/conftest.py CI_MAY_SKIP)", red=True)
        for nodeid, reason in _ci_skips:
            terminalreporter.line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test fails the session (exit 1), so a missing tool cannot hide a test."""
    if _ci_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Whatever a test's in-process Hydra app added to the root logger goes with the test: a handler left on that
    test's captured stderr (closed after it) made a later test's one-line error 83 lines of logging errors."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in handlers and not type(h).__module__.startswith("_pytest")]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers model folder written by `t2i-tiny`, with example LoRAs in loras/."""
    from runner.models.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Flux.1 model folder written by `t2i-tiny --family flux1`."""
    from runner.models.tiny import main as tiny_main

    model_dir = tmp_path_factory.mktemp("tiny-flux") / "flux1"
    assert tiny_main([str(model_dir), "--family", "flux1"]) == 0
    return model_dir


@pytest.fixture(scope="session")
def lora_a(tiny_dir: Path) -> dict:
    """The diffusers-format example LoRA (non-default weight_name)."""
    return {"source": str(tiny_dir / "loras" / "tiny_style"), "weight_name": "tiny_style.safetensors", "name": "A"}


@pytest.fixture(scope="session")
def lora_b(tiny_dir: Path) -> dict:
    """The kohya-format example LoRA."""
    return {"source": str(tiny_dir / "loras" / "tiny_kohya.safetensors"), "name": "B"}


@pytest.fixture(scope="module")
def browser():
    """Chromium (CHROMIUM) launched once per test module (the browser tests skip without it; CI fails then)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_until(probe: Any, done: Any, what: str, timeout: float = 300.0, every: float = 0.05) -> Any:
    """Call `probe()` until `done(value)`, sleeping `every` s between tries; the value, or an AssertionError after
    `timeout` s naming `what` (a bound for a hang, never a speed check: it is far above any loaded machine's time)."""
    end = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        assert time.monotonic() < end, f"{what}: not within {timeout} s (last: {value!r})"[:2000]
        time.sleep(every)


def job_done(client: Any, job_id: str, timeout: float = 300.0) -> dict:
    """The server's job `job_id` once it has finished (any final status), polled through its JSON API."""
    return wait_until(lambda: client.get(f"/api/jobs/{job_id}").json(),
                      lambda job: job["status"] not in ("queued", "running"), f"job {job_id} to finish", timeout)


def frozen_clock(monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """The manifest lines written from now on are `created` at `when` (ISO 8601, UTC): runs told apart without
    waiting for the clock's second to change."""
    from datetime import datetime

    import runner.outputs.writer as writer

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN206 - datetime's signature
            return datetime.fromisoformat(when).astimezone(tz)

    monkeypatch.setattr(writer, "datetime", Frozen)


def live_tensors() -> tuple[int, int]:
    """(count, bytes) of the distinct tensor storages alive in this process: a leak of LoRA copies or merge-engine
    copies shows here byte for byte, where the process RSS moves with allocator noise."""
    import gc

    import torch

    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return len(storages), sum(storages.values())


@contextlib.contextmanager
def uvicorn_thread(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port, in a thread of this process; yields the base URL."""
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


PROGRAMS = {  # command -> (what `python -m` runs, the module whose main() is the console entry point)
    "t2i": ("runner", "runner.cli"),
    "t2i-train": ("runner.train", "runner.train.cli"),
    "t2i-inspect": ("runner.reproduce.inspect", "runner.reproduce.inspect"),
    "t2i-serve": ("runner.server.app", "runner.server.app"),
    "t2i-merge": ("runner.outputs.sweep", "runner.outputs.sweep"),
    "t2i-tiny": ("runner.models.tiny", "runner.models.tiny"),
}


def run_program(prog: str, *args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
                isolated: bool = False) -> subprocess.CompletedProcess:
    """`prog ARGS` through its console entry point in this process, with its stdout, stderr and exit code as a
    CompletedProcess (text); the per-process model cache makes it a fraction of a fresh process's cost.
    `isolated=True` (or an `env`): a fresh `python -m ...` subprocess, for what only a new process shows (a
    regenerated image, the real interpreter's exit, environment read at import)."""
    module, entry = PROGRAMS[prog]
    if isolated or env:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's runner
        full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=full_env)
    import importlib
    import io
    import logging

    main = importlib.import_module(entry).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    root = logging.getLogger()
    argv, here, handlers, level = sys.argv, os.getcwd(), list(root.handlers), root.level
    try:
        sys.argv = [prog, *args]
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main() or 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        for h in [h for h in root.handlers if h not in handlers]:  # Hydra's job log: closed with the run
            h.close()
        root.handlers[:] = handlers  # and pytest's own handlers back (Hydra's logging config replaced them)
        root.setLevel(level)
    return subprocess.CompletedProcess([prog, *args], code, out.getvalue(), err.getvalue())


def run_cli(*args: str, **kw: Any) -> subprocess.CompletedProcess:
    """`t2i ARGS` (see run_program)."""
    return run_program("t2i", *args, **kw)


SLOW_CLI = """
import glob, os, sys, time
import runner.generate.batch as g
real = g.generate
barrier = os.environ.get("T2I_TEST_BARRIER")  # PATH:N: the first batch waits until N processes reach theirs
def slow(*args, **kwargs):  # each batch takes at least T2I_TEST_BATCH_DELAY s, so signals land mid-run
    global barrier
    print("t2i-test: batch starts", file=sys.stderr, flush=True)  # an event a test can wait for
    if barrier:
        path, n = barrier.rsplit(":", 1)
        open(f"{path}.{os.getpid()}", "w").close()
        end = time.monotonic() + 600
        while len(glob.glob(path + ".*")) < int(n) and time.monotonic() < end:
            time.sleep(0.05)
        barrier = None
    time.sleep(float(os.environ.get("T2I_TEST_BATCH_DELAY", "0.5")))
    return real(*args, **kwargs)
g.generate = slow
sys.argv = ["t2i", *sys.argv[1:]]
from runner.cli import main
main()
"""


def start_slow(args: list[str], cwd: Path, delay: float = 0.5, barrier: tuple[Path, int] | None = None
               ) -> subprocess.Popen:
    """Start `t2i ARGS` in a subprocess whose every batch takes at least `delay` seconds; with `barrier=(PATH, N)`
    its first batch starts only once N such processes have reached theirs (so they surely overlap)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "T2I_TEST_BATCH_DELAY": str(delay)}
    if barrier:
        env["T2I_TEST_BARRIER"] = f"{barrier[0]}:{barrier[1]}"
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="session")
def viewer_run(tmp_path_factory: pytest.TempPathFactory):
    """A run dir for the viewer tests: 2 prompts (one with HTML in it) x 2 seeds x {no LoRA, kohya at 0.5 and
    1.0} = 12 images of 32x32; `.thumb_threads` names the threads that encoded the thumbnails."""
    from types import SimpleNamespace
    from unittest import mock

    from omegaconf import OmegaConf

    from runner.config import RunConfig
    from runner.outputs import thumbs
    from runner.run import run

    out = tmp_path_factory.mktemp("viewer") / "run"
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "model": {"id": "builtin:tiny"}, "device": "cpu", "steps": 1, "width": 32, "height": 32,
        "prompts": ["a red fox", 'a <img src=x onerror="window.pwned=1"> car'], "seeds": [1, 2],
        "lora_sets": [[], [{"source": "builtin:tiny/loras/tiny_kohya.safetensors", "name": "kohya"}]],
        "lora_scales": [0.5, 1.0]})
    names: list[str] = []
    real = thumbs.encode_thumb

    def spy(image, size=thumbs.THUMB_SIZE):

        names.append(threading.current_thread().name)
        return real(image, size)

    with mock.patch.object(thumbs, "encode_thumb", spy):
        result = run(cfg, out, progress=False)
    assert result.generated == 12
    return SimpleNamespace(dir=out, cfg=cfg, thumb_threads=names)
