"""Shared fixtures: an isolated cache, the hub offline, and the tiny model written once per session."""

from __future__ import annotations

import os
import subprocess
import sys
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


SLOW_CLI = """
import os, sys, time
import runner.generate.batch as g
real = g.generate
def slow(*args, **kwargs):  # each batch takes at least T2I_TEST_BATCH_DELAY s, so signals land mid-run
    time.sleep(float(os.environ.get("T2I_TEST_BATCH_DELAY", "0.5")))
    return real(*args, **kwargs)
g.generate = slow
sys.argv = ["t2i", *sys.argv[1:]]
from runner.cli import main
main()
"""


def start_slow(args: list[str], cwd: Path, delay: float = 0.5) -> subprocess.Popen:
    """Start `t2i ARGS` in a subprocess whose every batch takes at least `delay` seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "T2I_TEST_BATCH_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
