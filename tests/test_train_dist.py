"""Data-parallel t2i-train: two processes started by `accelerate launch` (torchrun underneath, gloo on the CPU),
each with batch 2, train what one process with batch 4 trains: the same loss per step and the same LoRA file
(within float rounding: the two halves' gradients are summed instead of computed in one batch).

Tolerances: the logged loss to 1e-6 relative (float32 sums in another order); the LoRA weights to 2e-4 absolute
after 3 AdamW steps at lr 1e-2 (Adam divides each gradient by its own magnitude, so a rounding difference in a
near-zero gradient moves its weight by up to a fraction of lr; measured: 5.4e-5)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from runner.train.dist import Dist

COMMON = ["model=tiny", "data.resolution=32", "lora.rank=4", "train.steps=3", "train.checkpoint_every=3",
          "train.lr=1e-2", "validation.prompts=[]", "progress=false", "device=cpu"]
# `t2i-train` in two CPU processes (accelerate launch: torchrun and gloo underneath), with COMMON's settings
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "runner.train",
                 *COMMON]


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, rgb in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
                      "yellow": (230, 220, 30)}.items():
        im = Image.new("RGB", (32, 32), rgb)
        im.paste((255, 255, 255), (0, 0, 6, 32))
        im.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def _one_process(data: Path, steps: int, checkpoint_every: int) -> dict:
    """COMMON's settings for `train()` in this process, with the global batch of 4."""
    return {"model": {"id": "builtin:tiny"}, "data": {"dir": str(data), "resolution": 32}, "lora": {"rank": 4},
            "train": {"steps": steps, "checkpoint_every": checkpoint_every, "lr": 1e-2, "batch_size": 4},
            "validation": {"prompts": []}, "progress": False, "device": "cpu"}


def _losses(run: Path) -> list[float]:
    with open(run / "loss.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path: Path) -> None:
    from runner.train.loop import train

    data = _data(tmp_path / "sq")
    train(_one_process(data, 3, 3), tmp_path / "one")
    two = subprocess.run([*TWO_PROCESSES, f"data.dir={data}", "train.batch_size=2",
                          f"output_dir={tmp_path / 'two'}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("t2i-train: steps 0->3") == 2  # two processes ran
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and a == pytest.approx(b, rel=1e-6)
    x, y = load_file(str(tmp_path / "one" / "sq.safetensors")), load_file(str(tmp_path / "two" / "sq.safetensors"))
    assert x.keys() == y.keys()
    assert max(float((x[k] - y[k]).abs().max()) for k in x) < 2e-4
    # the LoRA moved (a test of equal files must not pass on two untrained ones)
    assert max(float(x[k].abs().max()) for k in x if "lora_B" in k or "lora.up" in k) > 1e-3


def test_shares_cover_the_batch_and_process_0_always_has_one() -> None:
    for world in (1, 2, 3):
        for n in range(1, 8):
            shares = [Dist(r, world).share(n) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == n and shares[0][1] >= 1
            assert all(shares[r][1] == shares[r + 1][0] for r in range(world - 1))
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def test_one_process_sum_is_identity() -> None:
    t = torch.tensor([1.0, 2.0])
    Dist().sum_([t])
    assert torch.equal(t, torch.tensor([1.0, 2.0]))


@pytest.mark.slow
def test_a_run_started_on_two_processes_resumes_on_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two processes (batch 2 each) train to step 2; one process (batch 4: the same global batch) resumes to step 4
    and writes what one process training all 4 steps writes. The resume names the changed process count."""
    from runner.train.loop import train

    data = _data(tmp_path / "sq")
    cfg = _one_process(data, 4, 2)
    train(cfg, tmp_path / "whole")
    two = subprocess.run([*TWO_PROCESSES, f"data.dir={data}", "train.batch_size=2", "train.steps=2",
                          "train.checkpoint_every=2", f"output_dir={tmp_path / 'moved'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    with caplog.at_level("WARNING", logger="runner.train.loop"):
        again = train(cfg, tmp_path / "moved")
    assert again.start_step == 2
    assert "processes 2 -> 1" in caplog.text and "train.batch_size 2 -> 4" in caplog.text
    assert _losses(tmp_path / "moved") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-6)
    x, y = load_file(str(tmp_path / "whole" / "sq.safetensors")), load_file(str(tmp_path / "moved" / "sq.safetensors"))
    assert x.keys() == y.keys() and max(float((x[k] - y[k]).abs().max()) for k in x) < 2e-4


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc: Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@pytest.mark.slow
def test_sigterm_to_every_process_checkpoints_and_a_rerun_resumes(tmp_path: Path) -> None:
    """As Slurm stops a job step: SIGTERM to the launcher and to both training processes at once (the launcher
    forwards it again, so each training process gets two: the second must not abort). Both stop after the same
    step and process 0 checkpoints it; the rerun resumes there and ends with what one uninterrupted process with
    the same global batch writes."""
    import os
    import signal
    import time

    from runner.train.loop import train

    data = _data(tmp_path / "sq")
    launch = [*TWO_PROCESSES, f"data.dir={data}", "train.batch_size=2", "train.checkpoint_every=1000",
              f"output_dir={tmp_path / 'two'}"]
    proc = subprocess.Popen([*launch, "train.steps=1000"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(_losses(tmp_path / "two") if (tmp_path / "two" / "loss.csv").is_file() else []) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # every process, as slurmstepd signals a job step's tasks
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-3000:]
    assert err.count("t2i: interrupted (SIGTERM); finishing the current batch, then stopping") == 2, err[-3000:]
    assert err.count("t2i-train: error: interrupted; rerun with output_dir=") == 2, err[-3000:]
    assert "aborted" not in err and "Traceback" not in err.split("t2i: interrupted")[-1]
    (stopped,) = (tmp_path / "two" / "checkpoints").glob("step-*")
    at = int(stopped.name.split("-")[1])
    assert at >= 3 and len(_losses(tmp_path / "two")) == at  # every process stopped after the same step
    again = subprocess.run([*launch, f"train.steps={at + 3}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(f"t2i-train: steps {at}->{at + 3}") == 2
    train(_one_process(data, at + 3, 1000), tmp_path / "one")
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    x, y = load_file(str(tmp_path / "one" / "sq.safetensors")), load_file(str(tmp_path / "two" / "sq.safetensors"))
    assert x.keys() == y.keys() and max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-3
