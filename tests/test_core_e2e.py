"""End-to-end on the tiny model: files, manifest, metadata, reproducibility, batching, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf
from PIL import Image

from runner.config import RunConfig
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.run import run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cfg(**over):
    base = {"model": {"id": "builtin:tiny"}, "steps": 2, "prompts": ["a red fox"], "seeds": [1]}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), base, over)


def manifest(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_run_writes_images_manifest_and_is_reproducible(tmp_path: Path) -> None:
    outs = []
    for name in ("d1", "d2"):
        d = tmp_path / name
        # the whole command in its own interpreter, then again through this process's cached pipeline
        r = run_cli("model=tiny", "prompts=[a,b]", "seeds=[1,2]", "steps=2", f"hydra.run.dir={d}", cwd=tmp_path,
                    isolated=name == "d1")
        assert r.returncode == 0, r.stderr
        assert "4 images generated" in r.stdout
        pngs = sorted(d.glob("*.png"))
        assert len(pngs) == 4 and len(manifest(d)) == 4
        assert (d / ".hydra" / "config.yaml").is_file()
        outs.append(pngs)
    for a, b in zip(*outs, strict=True):
        assert a.name == b.name
        assert np.array_equal(pixels(a), pixels(b))
    rec, text = read_png_record(str(outs[0][0]))
    assert rec["prompt"] == "a" and rec["seed"] == 1 and rec["steps"] == 2 and rec["width"] == 64
    assert rec["model"]["id"] == "builtin:tiny" and len(rec["model"]["hash"]) == 64
    assert rec["versions"]["torch"] and rec["device"] == "cpu" and rec["model"]["dtype"] == "float32"
    parsed = parse_infotext(text)
    assert parsed["Seed"] == "1" and parsed["Steps"] == "2" and parsed["Model hash"] == rec["model"]["hash"][:10]
    entry = manifest(tmp_path / "d1")[0]
    assert (tmp_path / "d1" / entry["file"]).is_file() and entry["key"]


def test_batch_of_four_equals_each_image_alone(tmp_path: Path) -> None:
    prompts, seeds = ["a red fox", "a blue car"], [3, 4]
    together = run(cfg(prompts=prompts, seeds=seeds, batch_size=4), tmp_path / "b4", progress=False)
    alone = run(cfg(prompts=prompts, seeds=seeds, batch_size=1), tmp_path / "b1", progress=False)
    assert together.generated == alone.generated == 4
    assert {e["batch_size"] for e in together.entries} == {4} and {e["batch_size"] for e in alone.entries} == {1}
    for e in together.entries:
        assert np.array_equal(pixels(tmp_path / "b4" / e["file"]), pixels(tmp_path / "b1" / e["file"]))


def test_different_seeds_prompts_and_schedulers_differ(tmp_path: Path) -> None:
    res = run(cfg(prompts=["a", "b"], seeds=[1, 2], scheduler=[None, "euler_a"]), tmp_path, progress=False)
    imgs = {e["file"]: pixels(tmp_path / e["file"]) for e in res.entries}
    arrays = list(imgs.values())
    assert len(arrays) == 8
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert not np.array_equal(arrays[i], arrays[j])
    assert {e["sampler"] for e in res.entries} == {"Euler", "Euler a"}


def test_rerun_into_same_dir_generates_nothing(tmp_path: Path) -> None:
    first = run(cfg(seeds=[1, 2]), tmp_path, progress=False)
    again = run(cfg(seeds=[1, 2, 3]), tmp_path, progress=False)
    assert (first.generated, again.generated, again.skipped) == (2, 1, 2)
    assert len(manifest(tmp_path)) == 3


def test_local_diffusers_dir_equals_builtin(tmp_path: Path, tiny_dir: Path) -> None:
    a = run(cfg(), tmp_path / "builtin", progress=False)
    b = run(cfg(model={"id": str(tiny_dir)}), tmp_path / "dir", progress=False)
    assert b.entries[0]["model"]["kind"] == "dir"
    assert np.array_equal(pixels(tmp_path / "builtin" / a.entries[0]["file"]),
                          pixels(tmp_path / "dir" / b.entries[0]["file"]))


def test_size_override(tmp_path: Path) -> None:
    res = run(cfg(width=48, height=32), tmp_path, progress=False)
    with Image.open(tmp_path / res.entries[0]["file"]) as im:
        assert im.size == (48, 32)


@pytest.mark.slow
def test_t2i_console_script_help() -> None:
    exe = Path(sys.executable).parent / "t2i"
    if not exe.exists():
        pytest.skip("console script not installed")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "prompts" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["model=nosuch"], "unknown model 'nosuch'"),
        (["model=tiny", "steps=0"], "steps=0"),
        (["model=tiny", "width=100"], "width=100 is not a multiple of 8"),
        (["model=tiny", "prompts=[]"], "prompts=[] is empty"),
        (["model=tiny", "scheduler=eulerr"], "did you mean 'euler'"),
        (["model=tiny", "stpes=3"], "did you mean 'steps'"),
        (["model.id=/nonexistent/model/dir"], "does not exist"),
        (["model=sd15"], "model=tiny"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "run"
    r = run_cli(*args, "steps=2" if "steps" not in " ".join(args) else "seeds=[1]", f"hydra.run.dir={out}",
                cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()
    assert not (tmp_path / "outputs").exists()


def test_hub_id_offline_message_suggests_tiny(tmp_path: Path) -> None:
    r = run_cli("model.id=someone/not-cached-model", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 2
    assert "not in the local Hugging Face cache" in r.stderr and "model=tiny" in r.stderr


@pytest.mark.slow
def test_python_dash_m_equals_t2i(tmp_path: Path) -> None:
    exe = shutil.which("t2i", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("console script not installed")
    r = subprocess.run([exe, "model=tiny", "steps=2", "seeds=[5]", f"hydra.run.dir={tmp_path / 'a'}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    r2 = run_cli("model=tiny", "steps=2", "seeds=[5]", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    (a,), (b,) = list((tmp_path / "a").glob("*.png")), list((tmp_path / "b").glob("*.png"))
    assert np.array_equal(pixels(a), pixels(b))


def test_hub_id_unreachable_without_offline_flag_is_one_line(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE=0: the hub is tried; with no network (CI) or an unknown repo, one line, exit 2, nothing written
    r = run_cli("model.id=t2i-runner-tests/no-such-model-xyz", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path,
                env={"HF_HUB_OFFLINE": "0"}, timeout=600)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model=tiny" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


def test_clip_skip_changes_pixels_is_recorded_and_swept(tmp_path: Path) -> None:
    res = run(cfg(clip_skip=[None, 2]), tmp_path, progress=False)
    by_skip = {e["clip_skip"]: e for e in res.entries}
    assert set(by_skip) == {None, 2}
    assert not np.array_equal(pixels(tmp_path / by_skip[None]["file"]), pixels(tmp_path / by_skip[2]["file"]))
    _, text = read_png_record(str(tmp_path / by_skip[2]["file"]))
    assert parse_infotext(text)["Clip skip"] == "2"
    _, text = read_png_record(str(tmp_path / by_skip[None]["file"]))
    assert "Clip skip" not in parse_infotext(text)
    same = run(cfg(clip_skip=1), tmp_path / "one", progress=False)  # A1111's 1 = the last layer = off
    assert np.array_equal(pixels(tmp_path / "one" / same.entries[0]["file"]),
                          pixels(tmp_path / by_skip[None]["file"]))
