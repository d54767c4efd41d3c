"""Sweeps: Hydra multirun (in-process and submitit), sweep summary, failed jobs, kill -9 + resume, shards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from runner.config import RunConfig, validate
from runner.outputs.grid import read_grid_info
from runner.outputs.manifest import Manifest, png_complete
from runner.outputs.sweep import merge_main
from runner.plan import expand, shard
from runner.run import run

KOHYA = "{source:'builtin:tiny/loras/tiny_kohya.safetensors',name:k}"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _images(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*.png"))


def _check_job_dir(job: Path, n: int) -> list[dict]:
    """n decodable images, one manifest line each, and a grid whose cells are exactly those images."""
    entries = _jsonl(job / "manifest.jsonl")
    assert len(entries) == n and len({e["key"] for e in entries}) == n
    assert sorted(e["file"] for e in entries) == [p.name for p in _images(job)]
    assert all(png_complete(p) for p in _images(job))
    (grid,) = (job / "grids").glob("*.png")
    info = read_grid_info(grid)
    assert sorted(f for row in info["cells"] for f in row if f) == sorted(e["file"] for e in entries)
    return entries


def test_multirun_in_process_reuses_the_pipeline_and_writes_job_dirs_and_summary(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from runner import cli
    from runner.models import loading as pipeline

    pipeline.clear_cache()
    loads = pipeline.LOADS["builtin:tiny"]
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", [
        "t2i", "-m", "model=tiny", "device=cpu", "steps=1", "prompts=[a,b]", f"lora_sets=[[],[{KOHYA}]]",
        "seeds=[1],[2]", f"hydra.sweep.dir={sweep}",
    ])
    cli.main()
    assert pipeline.LOADS["builtin:tiny"] - loads == 1  # 2 jobs, one model load
    (loaded,) = pipeline._CACHE.values()
    assert loaded.adapters.loads == 1  # the LoRA was loaded once too, by job 0
    per_job = [_check_job_dir(sweep / str(n), 4) for n in (0, 1)]
    assert {e["seed"] for e in per_job[0]} == {1} and {e["seed"] for e in per_job[1]} == {2}
    summary = _jsonl(sweep / "sweep_manifest.jsonl")
    assert [(s["job"], s["status"]) for s in summary] == [(0, "ok")] * 4 + [(1, "ok")] * 4
    files = sorted(f"{n}/{e['file']}" for n in (0, 1) for e in per_job[n])
    assert sorted(s["file"] for s in summary) == files
    assert all((sweep / s["file"]).is_file() for s in summary)
    assert summary[4]["overrides"][-1] == "seeds=[2]" and summary[4]["job_dir"] == "1"


@pytest.mark.slow
def test_a_failed_job_is_recorded_the_others_listed_and_the_exit_is_nonzero(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "model=tiny", "device=cpu", "steps=1", "prompts=[a]", "seeds=[1,2]",
                   "scheduler=euler,bogus", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr
    assert "scheduler='bogus' is not valid" in proc.stderr and "Traceback" not in proc.stderr
    summary = _jsonl(sweep / "sweep_manifest.jsonl")
    ok = [s for s in summary if s["status"] == "ok"]
    (failed,) = [s for s in summary if s["status"] == "failed"]
    assert [s["job"] for s in ok] == [0, 0] and all((sweep / s["file"]).is_file() for s in ok)
    assert failed["job"] == 1 and "scheduler=bogus" in failed["overrides"]
    assert failed["error"].startswith("scheduler='bogus' is not valid; valid: euler")
    assert len(_images(sweep / "0")) == 2


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_as_subprocesses(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "hydra/launcher=submitit_local", "model=tiny", "device=cpu", "steps=1",
                   "prompts=[a,b]", "seeds=[1],[2]", f"hydra.sweep.dir={sweep}", timeout=600, isolated=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validated against ConfigStore" not in proc.stderr
    for n in (0, 1):
        _check_job_dir(sweep / str(n), 2)
    summary = _jsonl(sweep / "sweep_manifest.jsonl")
    assert sorted((s["job"], s["seed"]) for s in summary) == [(0, 1), (0, 1), (1, 2), (1, 2)]
    job_ids = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(set(job_ids)) == 2  # one submitit job (its own process) per Hydra job


@pytest.mark.slow
def test_kill_9_mid_sweep_then_resume_gives_every_image_exactly_once(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "runner", "-m", "model=tiny", "device=cpu", "steps=3", "batch_size=1",
            "prompts=[a,b,c]", "seeds=[1,2]", "guidance_scale=5,7", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def lines() -> int:
        return sum(len(p.read_text().splitlines()) for p in sweep.glob("*/manifest.jsonl"))

    deadline = time.monotonic() + 300
    while lines() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = lines()
    assert 2 <= killed_at < 12, "the sweep finished before it could be killed"
    before = {e["key"]: e for p in sweep.glob("*") if p.is_dir() for e in Manifest(p).entries()}

    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"images generated, [1-9]\d* already done", done.stdout), done.stdout
    after = {}
    for n in (0, 1):
        for e in _check_job_dir(sweep / str(n), 6):
            assert e["key"] not in after
            after[e["key"]] = e
    assert len(after) == 12
    assert all(after[k]["created"] == e["created"] for k, e in before.items() if k in after)
    assert len([k for k in before if k in after]) >= 2  # the finished images were kept, not redone
    assert not [p for p in sweep.rglob("*") if p.name.endswith(".tmp")]
    summary = _jsonl(sweep / "sweep_manifest.jsonl")
    assert len(summary) == 12 and {s["key"] for s in summary} == set(after)


_text = st.text(alphabet="abcxyz ", min_size=1, max_size=6).filter(str.strip)
_lora = st.sampled_from(["/l/one.safetensors", "/l/two.safetensors", "hub/three"])


@st.composite
def _specs(draw):
    return validate(OmegaConf.merge(OmegaConf.structured(RunConfig), {
        "prompts": draw(st.lists(_text, min_size=1, max_size=3)),
        "seeds": draw(st.lists(st.integers(0, 2**32), min_size=1, max_size=4)),
        "steps": draw(st.lists(st.integers(1, 50), min_size=1, max_size=2)),
        "guidance_scale": draw(st.lists(st.sampled_from([1.0, 5.0, 7.5]), min_size=1, max_size=2)),
        "scheduler": draw(st.lists(st.sampled_from([None, "euler", "ddim"]), min_size=1, max_size=2)),
        "width": draw(st.lists(st.sampled_from([None, 64, 512]), min_size=1, max_size=2)),
        "lora_sets": draw(st.lists(st.lists(_lora, max_size=2, unique=True), min_size=1, max_size=3)),
        "lora_scales": draw(st.one_of(st.none(), st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1,
                                                          max_size=3))),
    }))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_specs(), model_key=st.text(max_size=8), count=st.integers(1, 40))
def test_shards_are_balanced_disjoint_deterministic_and_together_the_plan(spec, model_key: str,
                                                                         count: int) -> None:
    plan = expand(spec, model_key)
    parts = [shard(plan, i, count) for i in range(count)]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced, whatever the plan (key hashes gave 3/3/0 for 6 over 3)
    indices = [j.index for part in parts for j in part]
    assert sorted(indices) == [j.index for j in plan]  # disjoint, and nothing lost or added
    assert sorted((j for part in parts for j in part), key=lambda j: j.index) == plan
    assert [shard(expand(spec, model_key), i, count) for i in range(count)] == parts  # deterministic
    assert shard(plan, 0, 1) == plan


@pytest.mark.slow
def test_four_shards_merge_into_one_manifest_and_grid(tmp_path: Path, capsys) -> None:
    cfg = {"model": {"id": "builtin:tiny"}, "device": "cpu", "steps": 1, "prompts": ["a", "b"],
           "seeds": [1, 2, 3, 4]}
    for i in range(4):
        c = OmegaConf.merge(OmegaConf.structured(RunConfig), {**cfg, "shard": {"index": i, "count": 4}})
        run(c, tmp_path / "sweep" / str(i), progress=False)
    assert merge_main([str(tmp_path / "sweep")]) == 0
    merged = _jsonl(tmp_path / "sweep" / "manifest.jsonl")
    plan = expand(validate(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)))
    assert sorted((e["prompt"], e["seed"]) for e in merged) == sorted((j.prompt, j.seed) for j in plan)
    assert len({e["key"] for e in merged}) == 8
    assert all((tmp_path / "sweep" / e["file"]).is_file() for e in merged)
    info = read_grid_info(tmp_path / "sweep" / "grids" / "grid.png")
    assert info["x_values"] == [1, 2, 3, 4] and info["y_values"] == ["a", "b"]
    assert all(all(row) for row in info["cells"])  # every cell filled, from all four shards
    assert "t2i-merge: 8 images from" in capsys.readouterr().out
    assert merge_main([str(tmp_path / "sweep"), "--x", "sed"]) == 2
    assert "did you mean 'seed'" in capsys.readouterr().err


def test_merge_console_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 't2i-merge = "runner.outputs.sweep:main"' in text
