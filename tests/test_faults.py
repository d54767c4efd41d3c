"""Fault survival: OOM halving, black/NaN images, disk full, Ctrl-C and SIGKILL (nothing finished is lost)."""

from __future__ import annotations

import errno
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, start_slow
from PIL import Image

import runner.generate.batch
import runner.outputs.writer
from runner.config import validate
from runner.generate import faults
from runner.outputs.metadata import read_png_record
from runner.run import run

BASE = {"model": {"id": "builtin:tiny"}, "prompts": ["a red fox"], "steps": 2, "width": 32, "height": 32,
        "device": "cpu", "batch_invariant": True}


def spec(**over):
    return validate({**BASE, **over})


def manifest_lines(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_oom_halves_the_batch_and_every_image_is_made(tmp_path, monkeypatch, caplog):
    import torch

    real = runner.generate.batch.generate
    calls: list[int] = []

    def fake(pipe, jobs, invariant, *args):
        calls.append(len(jobs))
        if len(jobs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pipe, jobs, invariant, *args)

    monkeypatch.setattr(runner.generate.batch, "generate", fake)
    with caplog.at_level(logging.WARNING, logger="runner.generate.faults"):
        result = run(spec(seeds=[1, 2, 3, 4, 5], batch_size=4), tmp_path / "oom", progress=False)
    assert result.generated == 5
    assert calls[:3] == [4, 2, 1]  # 4 -> OOM -> 2 -> OOM -> 1 ...
    assert max(calls[3:]) == 1  # ... and later batches keep the smaller size
    assert "out of memory with a batch of 4" in caplog.text
    entries = {e["seed"]: e for e in manifest_lines(tmp_path / "oom")}
    assert sorted(entries) == [1, 2, 3, 4, 5]
    for seed, e in entries.items():
        rec, _ = read_png_record(tmp_path / "oom" / e["file"])
        assert rec["batch_size"] == 1
        kinds = [f["type"] for f in rec.get("faults", [])]
        assert kinds == {1: ["oom", "oom"], 2: ["oom", "oom"], 3: ["oom"], 4: ["oom"], 5: []}[seed]
    monkeypatch.setattr(runner.generate.batch, "generate", real)
    plain = run(spec(seeds=[1, 2, 3, 4, 5], batch_size=1), tmp_path / "plain", progress=False)
    for e in plain.entries:  # batch-invariant on CPU: the halved batches give the same pixels
        assert np.array_equal(pixels(tmp_path / "plain" / e["file"]), pixels(tmp_path / "oom" / e["file"]))


def test_oom_with_a_single_image_is_one_clear_error(tmp_path, monkeypatch):
    import torch

    def fake(pipe, jobs, invariant, *args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner.generate.batch, "generate", fake)
    with pytest.raises(faults.OutOfMemory, match="even with batch_size=1"):
        run(spec(seeds=[1, 2], batch_size=2), tmp_path / "o", progress=False)
    assert manifest_lines(tmp_path / "o") == []


def test_other_runtime_errors_are_not_taken_for_oom(tmp_path, monkeypatch):
    def fake(pipe, jobs, invariant, *args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(runner.generate.batch, "generate", fake)
    with pytest.raises(RuntimeError, match="shapes"):
        run(spec(seeds=[1, 2], batch_size=2), tmp_path / "o", progress=False)


def test_black_image_is_detected_and_recorded(tmp_path, monkeypatch, caplog):
    real = runner.generate.batch.generate

    def fake(pipe, jobs, invariant, *args):
        images = real(pipe, jobs, invariant, *args)
        return [Image.new("RGB", im.size) if j.seed == 2 else im for j, im in zip(jobs, images, strict=True)]

    monkeypatch.setattr(runner.generate.batch, "generate", fake)
    with caplog.at_level(logging.WARNING, logger="runner.generate.faults"):
        result = run(spec(seeds=[1, 2]), tmp_path / "o", progress=False)
    by_seed = {e["seed"]: e for e in result.entries}
    assert "faults" not in by_seed[1]
    assert [f["type"] for f in by_seed[2]["faults"]] == ["black_image"]
    assert read_png_record(tmp_path / "o" / by_seed[2]["file"])[0]["faults"][0]["type"] == "black_image"
    assert "all black" in caplog.text and by_seed[2]["file"] in caplog.text


def test_black_image_retried_with_fp32_vae(tmp_path, monkeypatch):
    import torch

    real = runner.generate.batch.generate
    seen: list[torch.dtype] = []

    def fake(pipe, jobs, invariant, *args):  # emulates an fp16 VAE overflow: black unless the VAE runs in fp32
        seen.append(pipe.vae.dtype)
        images = real(pipe, jobs, invariant, *args)
        return [Image.new("RGB", im.size) for im in images] if pipe.vae.dtype == torch.float16 else images

    monkeypatch.setattr(runner.generate.batch, "generate", fake)
    cfg = spec(seeds=[3], nan_retry_fp32_vae=True, model={"id": "builtin:tiny", "dtype": "fp16"})
    result = run(cfg, tmp_path / "o", progress=False)
    (entry,) = result.entries
    assert seen == [torch.float16, torch.float32]
    assert entry["faults"] == [{"type": "black_image", "detail": entry["faults"][0]["detail"],
                                "retried": "fp32_vae", "fixed": True}]
    assert pixels(tmp_path / "o" / entry["file"]).max() > 0
    from runner.models.loading import load_model

    assert load_model(cfg.model, "cpu").pipe.vae.dtype == torch.float16  # restored


def test_is_black():
    assert faults.is_black(Image.new("RGB", (8, 8)))
    assert faults.is_black(Image.new("L", (8, 8)))
    assert not faults.is_black(Image.new("RGB", (8, 8), (0, 0, 1)))


def test_disk_full_keeps_exactly_the_finished_images(tmp_path, monkeypatch):
    real = runner.outputs.writer.save_png
    count = {"n": 0}

    def fake(image, path, record, **kw):
        count["n"] += 1
        if count["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(image, path, record, **kw)

    monkeypatch.setattr(runner.outputs.writer, "save_png", fake)
    out = tmp_path / "o"
    with pytest.raises(faults.OutputError) as err:
        run(spec(seeds=list(range(1, 9)), batch_size=2), out, progress=False)
    msg = str(err.value)
    assert "disk full" in msg and "3 image(s)" in msg and "\n" not in msg
    lines = manifest_lines(out)
    assert len(lines) == 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(e["file"] for e in lines)
    monkeypatch.setattr(runner.outputs.writer, "save_png", real)
    again = run(spec(seeds=list(range(1, 9)), batch_size=2), out, progress=False)
    assert (again.skipped, again.generated) == (3, 5)
    assert len({e["key"] for e in manifest_lines(out)}) == 8


DISK_FULL_CLI = """
import errno, sys
import runner.outputs.writer as o
real, n = o.save_png, [0]
def fake(image, path, record, **kw):
    n[0] += 1
    if n[0] > 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real(image, path, record, **kw)
o.save_png = fake
sys.argv = ["t2i", *sys.argv[1:]]
from runner.cli import main
main()
"""


@pytest.mark.slow
def test_disk_full_on_the_cli_is_one_line_and_nonzero(tmp_path):
    out = tmp_path / "run"
    args = ["model=tiny", "prompts=[a]", "seeds=[1,2,3,4,5,6]", "steps=2", "width=32", "height=32",
            "batch_size=2", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_CLI, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert len(errors) == 1 and errors[0].startswith("t2i: error:"), proc.stderr
    assert "disk full" in errors[0] and "2 image(s)" in errors[0]
    assert len(manifest_lines(out)) == 2
    assert not list(out.glob(".*.tmp"))


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return start_slow(args, cwd)


def _wait_for_images(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while len(manifest_lines(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no image appeared in time"
        time.sleep(0.05)


SWEEP = ["model=tiny", "prompts=[a,b]", "seeds=[1,2,3,4,5,6]", "steps=2", "width=32",
         "height=32", "batch_size=2"]


def _check_consistent(out: Path) -> list[dict]:
    lines = manifest_lines(out)
    assert len({e["key"] for e in lines}) == len(lines)
    for e in lines:
        assert read_png_record(out / e["file"])[0]["key"] == e["key"]
    assert not list(out.glob(".*.tmp"))
    return lines


@pytest.mark.slow
def test_sigint_finishes_the_batch_writes_summary_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = _start([*SWEEP, f"hydra.run.dir={out}"], tmp_path)
    _wait_for_images(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stdout and "images generated" in stdout
    lines = _check_consistent(out)
    assert 1 <= len(lines) < 12
    again = run_cli(*SWEEP, f"hydra.run.dir={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{12 - len(lines)} images generated, {len(lines)} already done" in again.stdout
    assert len(_check_consistent(out)) == 12


class _Stderr:
    """A child's stderr read line by line in a thread, so a test can wait (bounded) for a line to appear."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(text in ln for ln in self.lines), timeout)
        assert ok, f"no {text!r} on stderr in {timeout} s: {''.join(self.lines)[-2000:]}"

    def text(self) -> str:
        self._thread.join(60)
        return "".join(self.lines)


@pytest.mark.slow
def test_second_sigint_aborts_at_once(tmp_path):
    out = tmp_path / "run"
    # every batch sleeps 120 s first: the second Ctrl-C lands inside the batch that the first one lets finish
    proc = start_slow([*SWEEP, "batch_size=1", f"hydra.run.dir={out}"], tmp_path, delay=120)
    err = _Stderr(proc)
    err.wait_for("t2i-test: batch starts")  # generating: the run's Ctrl-C handler is in place
    proc.send_signal(signal.SIGINT)
    err.wait_for("finishing the current batch, then stopping (Ctrl-C again to abort now)")  # the first is handled
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)  # at once: well within the batch's 120 s
    stdout = proc.stdout.read()
    stderr = err.text()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"t2i: error: aborted; the finished images are kept in {out}; re-run the same command to resume" in stderr
    assert "images generated" not in stdout and "images generated" not in stderr, stdout  # no summary
    assert manifest_lines(out) == []  # the batch in flight was not finished
    _check_consistent(out)


@pytest.mark.slow
def test_sigkill_then_resume_completes(tmp_path):
    out = tmp_path / "run"
    proc = _start([*SWEEP, f"hydra.run.dir={out}"], tmp_path)
    _wait_for_images(out, 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    done = len(manifest_lines(out))
    again = run_cli(*SWEEP, f"hydra.run.dir={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    lines = _check_consistent(out)
    assert len(lines) == 12 and done < 12
    assert sorted(p.name for p in out.glob("*.png")) == sorted(e["file"] for e in lines)
