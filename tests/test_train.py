"""t2i-train on the tiny model (CPU): loss falls, the LoRA loads in t2i, runs resume, bad input fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.config import ConfigError, validate
from runner.outputs.metadata import read_png_record
from runner.train.losslog import LossLog

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_images(folder: Path, captions: bool = True) -> Path:
    """Solid-colour squares (48x40, so resize + crop run) with same-name .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (48, 40), rgb).save(folder / f"{name}.png")
        if captions:
            (folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def train_cfg(data: Path, **over: dict) -> dict:
    cfg = {
        "model": {"id": "builtin:tiny"},
        "data": {"dir": str(data), "resolution": 32},
        "lora": {"rank": 4},
        "train": {"steps": 40, "lr": 3e-2, "batch_size": 2, "checkpoint_every": 20, "seed": 0},
        "validation": {"steps": 2, "seeds": [0], "include_base": True},
        "progress": False,
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value}
    return cfg


def loss_rows(run_dir: Path) -> list[dict]:
    return LossLog(run_dir / "loss.csv").rows()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def render_sets(sets: list, out: Path) -> dict[int, np.ndarray]:
    """One 32 px image of the tiny model per LoRA set (same prompt and seed), by set index."""
    cfg = {"model": {"id": "builtin:tiny"}, "prompts": ["a red square"], "seeds": [0], "steps": 2, "width": 32,
           "height": 32, "lora_sets": sets}
    from runner.run import run

    result = run(validate(cfg), out, progress=False)
    return {e["lora_set"]: pixels(out / e["file"]) for e in result.entries}


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One 40-step training run on four coloured squares (shared by the tests below)."""
    from runner.train.loop import train

    tmp = tmp_path_factory.mktemp("train")
    data = make_images(tmp / "squares")
    result = train(train_cfg(data), tmp / "run")
    return result


def test_loss_falls(trained) -> None:
    rows = loss_rows(trained.run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    losses = [r["loss"] for r in rows]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert first > last + 0.02, (first, last)


def test_outputs_written(trained) -> None:
    run = trained.run_dir
    assert trained.lora_file == run / "squares.safetensors" and trained.lora_file.is_file()
    assert trained.kohya_file.is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000020", "step-000040"]
    ckpt = run / "checkpoints" / "step-000020"
    assert json.loads((ckpt / "training_state.json").read_text())["step"] == 20
    from safetensors import safe_open

    with safe_open(str(trained.kohya_file), "pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    plot = pixels(run / "loss.png")
    assert (plot != 255).any(axis=2).mean() > 0.01  # something is drawn
    assert not list(run.rglob(".*.tmp")) and not list((run / "checkpoints").glob(".step-*"))


def test_samples_are_one_runner_run_dir_with_a_step_axis(trained) -> None:
    from runner.outputs.grid import read_grid_info
    from runner.outputs.viewer import read_data, viewer_axes

    folder = trained.run_dir / "samples"
    manifest = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    # 2 prompts x 1 seed x (the base + 2 checkpoints), each made once (later checkpoints resumed the run dir)
    assert len(manifest) == 6 and len({e["file"] for e in manifest}) == 6
    assert sorted(e["prompt"] for e in manifest) == ["a blue square"] * 3 + ["a green square"] * 3
    by_step = {}
    for e in manifest:
        rec, infotext = read_png_record(str(folder / e["file"]))
        assert rec["seed"] == 0 and "step" not in rec  # the same seed at every step; the label is the manifest's
        assert e["label_axes"] == ["step"]
        assert ("Lora hashes" in infotext) == (e["step"] > 0)
        assert [lo["name"] for lo in rec["loras"]] == ([f"step-{e['step']:06d}"] if e["step"] else [])
        by_step.setdefault(e["step"], []).append(e["file"])
    assert sorted(by_step) == [0, 20, 40]
    # the grid: the steps across, the prompts down; the viewer: `step` is an axis with the checkpoint steps
    (grid,) = (folder / "grids").glob("grid*.png")
    info = read_grid_info(grid)
    assert info["x"] == "step" and info["x_values"] == [0, 20, 40] and info["y"] == "prompt"
    assert info["x_labels"] == ["step: 0", "step: 20", "step: 40"]
    # the manifest's line order is the writers' order; the viewer orders by each file's plan index
    axes, _ = viewer_axes(sorted(manifest, key=lambda e: e["index"]))
    expected = [("step", [0, 20, 40]), ("prompt", ["a blue square", "a green square"])]
    assert [(a["name"], a["values"]) for a in axes] == expected
    data = read_data(folder)
    assert data is not None and [(a["name"], a["values"]) for a in data["axes"]] == expected
    assert (folder / "loras" / "step-000020.safetensors").is_file()
    a = pixels(folder / sorted(by_step[20])[0])
    b = pixels(folder / sorted(by_step[40])[0])
    assert np.abs(a - b).mean() > 0.5  # the LoRA kept changing between checkpoints


def test_trained_lora_changes_runner_output(trained, tmp_path: Path) -> None:

    sets = [
        [],
        [{"source": str(trained.lora_file), "name": "diffusers"}],
        [{"source": str(trained.kohya_file), "name": "kohya"}],
    ]
    images = render_sets(sets, tmp_path)
    assert len(images) == 3
    assert np.abs(images[0] - images[1]).mean() > 2.0  # the LoRA changes the picture
    assert np.abs(images[1] - images[2]).max() <= 2  # the kohya copy holds the same weights


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    """Stopped at step 7 (checkpoint at 4), the rerun continues at step 5 and matches an uninterrupted run."""
    from runner.train.loop import train

    data = make_images(tmp_path / "squares")
    cfg = train_cfg(data, train={"steps": 8, "checkpoint_every": 4}, validation={"prompts": []})
    whole = train(cfg, tmp_path / "whole")

    def stop(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", on_step=stop)
    assert [int(r["step"]) for r in loss_rows(tmp_path / "cut")] == list(range(1, 8))
    assert not (tmp_path / "cut" / "squares.safetensors").exists()
    resumed = train(cfg, tmp_path / "cut")
    assert resumed.start_step == 4
    rows = loss_rows(tmp_path / "cut")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    expected = [r["loss"] for r in loss_rows(whole.run_dir)]
    assert [r["loss"] for r in rows] == pytest.approx(expected, rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(whole.lora_file)), load_file(str(resumed.lora_file))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)


def test_resume_with_other_lora_settings_is_refused(tmp_path: Path) -> None:
    from runner.train.loop import train

    data = make_images(tmp_path / "squares")
    train(
        train_cfg(data, train={"steps": 2, "checkpoint_every": 2}, validation={"prompts": []}),
        tmp_path / "run",
    )
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(ConfigError, match="lora.rank|rank=4"):
        train(
            train_cfg(data, lora={"rank": 8}, train={"steps": 4}, validation={"prompts": []}),
            tmp_path / "run",
        )
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


@pytest.mark.slow
def test_killed_cli_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """`t2i-train` killed with SIGKILL after a checkpoint; the same command continues from it to the end."""
    data = make_images(tmp_path / "squares")
    out = tmp_path / "run"
    common = [
        f"data.dir={data}",
        "model=tiny",
        "data.resolution=32",
        "lora.rank=4",
        "train.checkpoint_every=3",
        "validation.prompts=[]",
        "progress=false",
        f"output_dir={out}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.train", *common, "train.steps=100000"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step-000003").is_dir():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    last = done[-1]
    logged = [int(r["step"]) for r in loss_rows(out)]
    assert logged[:last] == list(range(1, last + 1))
    res = run_train(*common, f"train.steps={last + 2}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"steps {last}->{last + 2}" in res.stdout
    assert [int(r["step"]) for r in loss_rows(out)] == list(range(1, last + 3))
    assert (out / "squares.safetensors").is_file()
    assert (out / "squares_kohya.safetensors").is_file() and (
        out / "checkpoints" / f"step-{last + 2:06d}"
    ).is_dir()


def _corrupt(folder: Path) -> list[str]:
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")  # the only image: nothing left
    (folder / "broken.txt").write_text("broken")
    return [f"data.dir={folder}"]


def _no_caption(folder: Path) -> list[str]:
    make_images(folder)
    (folder / "blue.txt").unlink()
    return [f"data.dir={folder}", "data.captions=txt"]


def _empty(folder: Path) -> list[str]:
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return [f"data.dir={folder}"]


CASES = {
    "missing folder": (lambda f: [f"data.dir={f / 'nope'}"], "is not a folder"),
    "empty folder": (_empty, "has no images"),
    "only a corrupt image": (_corrupt, "none of its 1 images can be used"),
    "caption missing": (_no_caption, "caption missing for blue.png"),
    "rank zero": (lambda f: [f"data.dir={make_images(f)}", "lora.rank=0"], "lora.rank=0 is out of range"),
    "resolution": (lambda f: [f"data.dir={make_images(f)}", "data.resolution=60"], "not a multiple of 8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    make_args, message = CASES[case]
    args = make_args(tmp_path / "data")
    res = run_train("model=tiny", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2i-train: error:") and message in lines[0], res.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_caption_sources(tmp_path: Path) -> None:
    from runner.train.config import DataConfig
    from runner.train.data import load_pixels, scan

    folder = make_images(tmp_path / "d", captions=False)
    (folder / "red.txt").write_text("a red thing\n")
    by_name = {e.path.name: e.caption for e in scan(DataConfig(dir=str(folder), caption="sks square"))}
    assert by_name == {
        "blue.png": "sks square",
        "green.png": "sks square",
        "red.png": "a red thing",
        "yellow.png": "sks square",
    }
    fixed = scan(DataConfig(dir=str(folder), caption="sks", captions="fixed"))
    assert {e.caption for e in fixed} == {"sks"}
    rows = [{"file_name": f"{n}.png", "text": f"jsonl {n}"} for n in COLORS]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert {e.caption for e in scan(DataConfig(dir=str(folder), captions="jsonl"))} == {
        f"jsonl {n}" for n in COLORS
    }
    with pytest.raises(ConfigError, match="caption missing for blue.png"):
        scan(DataConfig(dir=str(folder), captions="txt"))
    import torch

    px = load_pixels(
        fixed[2], 32, "random", True, torch.Generator().manual_seed(0)
    )  # red, 48x40 -> 38x32 -> crop
    assert tuple(px.shape) == (3, 32, 32)
    assert torch.allclose(px[:, 5, 5], torch.tensor([220, 30, 30]) / 127.5 - 1, atol=0.02)


def test_mixed_precision_needs_cuda() -> None:
    from runner.train.model import resolve_precision

    assert str(resolve_precision("auto", "cpu")) == "torch.float32"
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_text_encoder_lora_with_checkpointing_loads(tmp_path: Path) -> None:
    """lora.text_encoder=true (with gradient checkpointing): both files carry text-encoder layers and load."""
    from safetensors import safe_open

    from runner.train.loop import train

    data = make_images(tmp_path / "squares")
    cfg = train_cfg(
        data,
        lora={"text_encoder": True, "name": "te"},
        validation={"prompts": []},
        train={
            "steps": 3,
            "lr": 5e-2,
            "gradient_checkpointing": True,
            "keep_checkpoints": 1,
            "checkpoint_every": 1,
        },
    )
    result = train(cfg, tmp_path / "run")
    assert [p.name for p in (result.run_dir / "checkpoints").iterdir()] == ["step-000003"]
    for file, prefix in ((result.lora_file, "text_encoder."), (result.kohya_file, "lora_te_")):
        with safe_open(str(file), "pt") as f:
            assert any(k.startswith(prefix) for k in f.keys()), file  # noqa: SIM118
    sets = [[], [{"source": str(result.lora_file)}], [{"source": str(result.kohya_file)}]]
    images = render_sets(sets, tmp_path / "gen")
    assert np.abs(images[0] - images[1]).mean() > 0.5 and np.abs(images[1] - images[2]).max() <= 2


@pytest.mark.slow
def test_best_checkpoint_by_validation_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validation.dir: a validation loss at the start and at every checkpoint (val_loss.csv); the best checkpoint
    is kept beyond keep_checkpoints, copied beside the LoRA as NAME_best.*, recorded in summary.json and in the
    file's metadata; a resumed run that beats it moves it (and prunes the old one)."""
    from safetensors import safe_open

    import runner.train.loop as loop
    from runner.train.valloss import ValLog

    data = make_images(tmp_path / "squares")
    held = tmp_path / "held"
    held.mkdir()
    for name, rgb in (("cyan", (20, 210, 220)), ("magenta", (210, 30, 200))):
        Image.new("RGB", (32, 32), rgb).save(held / f"{name}.png")
        (held / f"{name}.txt").write_text(f"a {name} square")
    # the measured loss of the tiny model only falls in a few steps: the measurements are scripted (after one real
    # one, which is a loss) so that the best is a middle checkpoint; test_train_families measures real ones
    script = iter([1.5, 1.0, 1.2, 1.1, 0.9])
    real = []

    def scripted(*args, **kwargs):
        measure = make_measure(*args, **kwargs)

        def fake() -> float:
            real.append(measure())
            return 2.0 if len(real) == 1 else next(script)

        return fake

    make_measure = loop.make_measure
    monkeypatch.setattr(loop, "make_measure", scripted)
    cfg = train_cfg(data, lora={"name": "sq"}, validation={"prompts": [], "dir": str(held)},
                    train={"steps": 8, "checkpoint_every": 2, "keep_checkpoints": 1, "batch_size": 4})
    result = loop.train(cfg, tmp_path / "run")
    run = result.run_dir
    assert 0.5 < real[0] < 5.0  # a real measurement: an MSE of unit-variance noise
    rows = ValLog(run).rows()
    assert rows == [(0, 2.0), (2, 1.5), (4, 1.0), (6, 1.2), (8, 1.1)]
    best = {"step": 4, "loss": 1.0, "checkpoint": "step-000004"}
    assert json.loads((run / "checkpoints" / "best.json").read_text()) == best == result.best
    assert "best validation loss 1 at step 4" in result.summary()
    # the last K (1) plus the best survive pruning
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.json", "step-000004", "step-000008"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"] == best and summary["best_lora"] == "sq_best.safetensors"
    assert [(r["step"], r["loss"]) for r in summary["val_loss"]] == rows
    for name in ("sq_best.safetensors", "sq_best_kohya.safetensors"):
        src = run / "checkpoints" / "step-000004" / name.replace("_best", "")
        with safe_open(str(run / name), "pt") as f, safe_open(str(src), "pt") as g:
            assert f.metadata()["t2i_best_step"] == "4" and float(f.metadata()["t2i_best_val_loss"]) == 1.0
            assert f.metadata()["ss_network_dim"] == g.metadata()["ss_network_dim"]
            assert all(f.get_tensor(k).equal(g.get_tensor(k)) for k in g.keys())  # noqa: SIM118
    # resumed to step 10, which beats it: the best moves, the old best is pruned like any other checkpoint
    cfg["train"]["steps"] = 10
    again = loop.train(cfg, run)
    assert again.start_step == 8 and ValLog(run).rows() == [*rows, (10, 0.9)]
    assert again.best == {"step": 10, "loss": 0.9, "checkpoint": "step-000010"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.json", "step-000010"]
    with safe_open(str(run / "sq_best.safetensors"), "pt") as f:
        assert f.metadata()["t2i_best_step"] == "10"
