"""Shared fixtures: an isolated cache, the hub offline, and the tiny model written once per session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SESSION_CACHE = Path(os.environ.get("T2I_TEST_CACHE", "")) if os.environ.get("T2I_TEST_CACHE") else None


def pytest_configure(config: pytest.Config) -> None:
    """Every test (and every subprocess it starts) uses a private cache and never touches the hub."""
    import tempfile

    cache = _SESSION_CACHE or Path(tempfile.mkdtemp(prefix="t2i-test-cache-"))
    os.environ["T2I_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers model folder written by `t2i-tiny`, with example LoRAs in loras/."""
    from runner.models.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def lora_a(tiny_dir: Path) -> dict:
    """The diffusers-format example LoRA (non-default weight_name)."""
    return {"source": str(tiny_dir / "loras" / "tiny_style"), "weight_name": "tiny_style.safetensors", "name": "A"}


@pytest.fixture(scope="session")
def lora_b(tiny_dir: Path) -> dict:
    """The kohya-format example LoRA."""
    return {"source": str(tiny_dir / "loras" / "tiny_kohya.safetensors"), "name": "B"}


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run `python -m runner ARGS` in a subprocess; return the CompletedProcess (text mode)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """uvicorn serving `app` on a free 127.0.0.1 port in a thread of this process; yields its base URL."""
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
