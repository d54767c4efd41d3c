"""Run-dir integrity (issue 12): no image lost, overwritten or mislabelled after any sequence of runs, extensions,
`resume=false`, kills, two writers, SIGTERM and preemption; keys that cover file contents; stable bytes; nothing
outside the run touched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, frozen_clock, run_cli, start_slow
from omegaconf import OmegaConf
from PIL import Image

from runner.common.errors import ConfigError
from runner.config import GridConfig, RunConfig, validate
from runner.outputs.grid import read_grid_info, write_grids
from runner.outputs.manifest import Manifest
from runner.outputs.metadata import read_png_record
from runner.outputs.sweep import merge_main
from runner.plan import expand, shard
from runner.run import run

TINY = {"model": {"id": "builtin:tiny"}, "device": "cpu", "steps": 1, "width": 32, "height": 32}


def cfg(**over):
    return OmegaConf.merge(OmegaConf.structured(RunConfig), {**TINY, **over})


def lines(d: Path) -> list[dict]:
    path = d / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_run_dir(d: Path) -> list[dict]:
    """The invariant: one manifest line per image file (and a file per line), each file holding its line's key."""
    entries = lines(d)
    files = [e["file"] for e in entries]
    assert len(files) == len(set(files)), "two lines for one file"
    assert sorted(files) == sorted(p.name for p in d.glob("*.png")), "files and lines differ"
    for e in entries:
        assert read_png_record(d / e["file"])[0]["key"] == e["key"], f"{e['file']} holds another image"
    assert not list(d.glob(".*.tmp"))
    return entries


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.glob("*.png")}


def in_grids(d: Path) -> list[str]:
    cells = []
    for g in (d / "grids").glob("*.png"):
        cells += [f for row in read_grid_info(g)["cells"] for f in row if f]
    return cells


# -- 1. never overwrite, extend into the union, one line per file ---------------------------------------------------

def test_extending_a_sweep_keeps_every_image_and_names_stay_unique(tmp_path: Path) -> None:
    d = tmp_path / "run"
    first = run(cfg(prompts=["a", "b"], seeds=[1, 2, 3], steps=1), d, progress=False)
    before = snapshot(d)
    more = run(cfg(prompts=["a"], seeds=[1, 2], steps=2), d, progress=False)  # other steps: other images
    assert (first.generated, more.generated, more.skipped) == (6, 2, 0)
    after = snapshot(d)
    assert all(after[name] == data for name, data in before.items())  # no earlier file was touched
    entries = check_run_dir(d)
    assert len(entries) == 8 and len({e["key"] for e in entries}) == 8
    again = run(cfg(prompts=["a", "b"], seeds=[1, 2, 3, 4], steps=1), d, progress=False)  # add a seed
    assert (again.generated, again.skipped) == (2, 6)
    assert len(check_run_dir(d)) == 10
    assert sorted(in_grids(d)) == sorted(e["file"] for e in lines(d))  # the grids cover the union


def test_a_stray_file_with_the_next_name_is_never_overwritten(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "00000_a_s1_nolora.png").write_bytes(b"not ours")
    run(cfg(prompts=["a"], seeds=[1]), d, progress=False)
    assert (d / "00000_a_s1_nolora.png").read_bytes() == b"not ours"
    assert [e["file"] for e in lines(d)] == ["00001_a_s1_nolora.png"]


def test_resume_false_regenerates_in_place_with_one_line_per_file(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "run"
    frozen_clock(monkeypatch, "2026-01-01T00:00:00+00:00")
    run(cfg(prompts=["a"], seeds=[1, 2]), d, progress=False)
    names = sorted(e["file"] for e in lines(d))
    frozen_clock(monkeypatch, "2026-01-01T00:00:05+00:00")  # the lines' `created` second changes
    redo = run(cfg(prompts=["a"], seeds=[1, 2, 3], resume=False), d, progress=False)
    assert (redo.generated, redo.skipped) == (3, 0)
    entries = check_run_dir(d)
    assert len(entries) == 3
    assert names == sorted(e["file"] for e in entries)[:2]  # the two images kept their own files
    assert {e["created"] for e in entries} == {"2026-01-01T00:00:05+00:00"}  # every line is this run's
    assert len(snapshot(d)) == 3


# -- identity covers file contents ----------------------------------------------------------------------------------

def test_a_lora_retrained_into_the_same_file_gives_a_new_image(tmp_path: Path, tiny_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "style.safetensors"
    shutil.copy(tiny_dir / "loras" / "tiny_kohya.safetensors", lora)
    sets = [[{"source": str(lora), "name": "style"}]]
    d = tmp_path / "run"
    assert run(cfg(prompts=["a"], seeds=[1], lora_sets=sets), d, progress=False).generated == 1
    save_file({k: v * 2 for k, v in load_file(lora).items()}, lora)  # retrained: same path, other weights
    again = run(cfg(prompts=["a"], seeds=[1], lora_sets=sets), d, progress=False)
    assert (again.generated, again.skipped) == (1, 0)
    entries = check_run_dir(d)
    assert len({e["loras"][0]["sha256"] for e in entries}) == 2
    cells = {f for g in (d / "grids").glob("*.png") for row in read_grid_info(g)["cells"] for f in row if f}
    assert cells == {e["file"] for e in entries}  # both in the grids, told apart by the file hash
    titles = sorted(str(read_grid_info(g)["fixed"]) for g in (d / "grids").glob("*.png"))
    assert all("lora_files" in t for t in titles) and len(titles) == 2


def test_an_edited_scheduler_config_gives_new_images_made_with_it(tmp_path: Path, tiny_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("loras"))
    d = tmp_path / "run"
    one = run(cfg(model={"id": str(model)}, prompts=["a"], seeds=[1]), d, progress=False)
    path = model / "scheduler" / "scheduler_config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps({**conf, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}))
    two = run(cfg(model={"id": str(model)}, prompts=["a"], seeds=[1]), d, progress=False)
    assert (one.generated, two.generated, two.skipped) == (1, 1, 0)
    a, b = one.entries[0], two.entries[0]
    assert a["model"]["hash"] == b["model"]["hash"] and a["model"]["config_hash"] != b["model"]["config_hash"]
    with Image.open(d / a["file"]) as x, Image.open(d / b["file"]) as y:
        assert x.tobytes() != y.tobytes()  # made with the edited config, not a cached pipeline
    alone = run(cfg(model={"id": str(model)}, prompts=["a"], seeds=[1]), tmp_path / "alone", progress=False)
    with Image.open(d / b["file"]) as x, Image.open(tmp_path / "alone" / alone.entries[0]["file"]) as y:
        assert x.tobytes() == y.tobytes()
    r = run_cli(f"from_image={d / a['file']}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert r.returncode == 2 and "scheduler_config.json, ...) changed since" in r.stderr, r.stderr


def test_keys_hold_file_hashes_not_paths(tiny_dir: Path) -> None:
    spec = validate(cfg(prompts=["a"], seeds=[1], lora_sets=[[{"source": "/x/one.safetensors"}]]))
    (a,) = expand(spec, "m", [["hash1"]])
    (b,) = expand(spec, "m", [["hash2"]])
    (c,) = expand(validate(cfg(prompts=["a"], seeds=[1], lora_sets=[[{"source": "/y/moved.safetensors"}]])),
                  "m", [["hash1"]])
    assert a.key != b.key and a.key == c.key


# -- random seeds ---------------------------------------------------------------------------------------------------

def test_random_seeds_come_from_the_run_seed_so_resume_and_extension_hold(tmp_path: Path) -> None:
    d = tmp_path / "run"
    first = run(cfg(prompts=["a"], seeds=[-1, -1]), d, progress=False)
    again = run(cfg(prompts=["a"], seeds=[-1, -1]), d, progress=False)
    more = run(cfg(prompts=["a"], seeds=[-1, -1, -1]), d, progress=False)
    assert (first.generated, again.generated, more.generated, more.skipped) == (2, 0, 1, 2)
    seeds = {e["seed"] for e in check_run_dir(d)}
    assert len(seeds) == 3 and all(e["run_seed"] == first.entries[0]["run_seed"] for e in lines(d))
    other = run(cfg(prompts=["a"], seeds=[-1, -1]), tmp_path / "other", progress=False)
    assert {e["seed"] for e in other.entries} != {e["seed"] for e in first.entries}  # a new run dir: new seeds


def test_random_seeds_over_shards_need_one_run_seed(tmp_path: Path) -> None:
    prompts = [f"p{i}" for i in range(8)]
    with pytest.raises(ConfigError, match="run_seed=INT"):
        run(cfg(prompts=prompts, seeds=[-1], shard={"index": 0, "count": 2}), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    spec = validate(cfg(prompts=prompts, seeds=[-1], run_seed=7))
    parts = [shard(expand(spec, "m", run_seed=7), i, 2) for i in range(2)]
    assert sorted(j.prompt for p in parts for j in p) == prompts  # 8 images, each prompt once
    assert len({j.seed for p in parts for j in p}) == 1


def test_multirun_shards_draw_the_same_random_seeds(tmp_path: Path, monkeypatch) -> None:
    from runner import cli

    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["t2i", "-m", "model=tiny", "device=cpu", "steps=1", "width=32", "height=32",
                                      "prompts=[p0,p1,p2,p3,p4,p5]", "seeds=[-1]", "shard.count=2",
                                      "shard.index=0,1", f"hydra.sweep.dir={sweep}"])
    cli.main()
    entries = lines(sweep / "0") + lines(sweep / "1")
    assert sorted(e["prompt"] for e in entries) == [f"p{i}" for i in range(6)]
    assert len({e["seed"] for e in entries}) == 1
    assert [len(lines(sweep / n)) for n in ("0", "1")] == [3, 3]


# -- stable bytes, O(1) resume --------------------------------------------------------------------------------------

def test_same_config_gives_the_same_png_bytes_in_any_run_dir(tmp_path: Path, monkeypatch) -> None:
    frozen_clock(monkeypatch, "2026-01-01T00:00:00+00:00")
    a = run(cfg(prompts=["a"], seeds=[5]), tmp_path / "a", progress=False)
    frozen_clock(monkeypatch, "2026-01-01T00:00:05+00:00")  # written at another time: the bytes do not say when
    run(cfg(prompts=["b"], seeds=[1, 2]), tmp_path / "b", progress=False)
    b = run(cfg(prompts=["a"], seeds=[5]), tmp_path / "b", progress=False)  # number 2 in a dir with others
    data_a = (tmp_path / "a" / a.entries[0]["file"]).read_bytes()
    data_b = (tmp_path / "b" / b.entries[0]["file"]).read_bytes()
    assert a.entries[0]["file"] != b.entries[0]["file"] and data_a == data_b
    assert [a.entries[0]["created"], b.entries[0]["created"]] == ["2026-01-01T00:00:00+00:00",
                                                                  "2026-01-01T00:00:05+00:00"]


def test_resume_reads_the_manifest_without_decoding_images(tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    d = tmp_path / "run"
    run(cfg(prompts=["a"], seeds=[1, 2, 3], grid={"enabled": False}), d, progress=False)
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real(self))
    again = run(cfg(prompts=["a"], seeds=[1, 2, 3], grid={"enabled": False}), d, progress=False)
    assert (again.generated, again.skipped) == (0, 3)
    assert decoded == []  # completeness comes from the atomic rename, not from decoding 100,000 PNGs


# -- two writers, SIGTERM, preemption -------------------------------------------------------------------------------

SWEEP = ["model=tiny", "device=cpu", "prompts=[a,b,c]", "seeds=[1,2,3,4,5,6,7,8]", "steps=1", "width=32",
         "height=32", "batch_size=2"]


def _wait(d: Path, n: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while len(lines(d)) < n:
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < end, "no image appeared in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_writers_share_one_run_dir_and_a_killed_one_is_taken_over(tmp_path: Path) -> None:
    d = tmp_path / "run"
    a = start_slow([*SWEEP, f"hydra.run.dir={d}"], tmp_path, delay=1.0)
    _wait(d, 1, [a])
    b = start_slow([*SWEEP, f"hydra.run.dir={d}"], tmp_path, delay=1.0)
    assert _wait_for_writer(d, b), b.communicate()
    a.send_signal(signal.SIGKILL)  # a dies with a batch claimed: b makes it
    a.communicate()
    out, err = b.communicate(timeout=300)
    assert b.returncode == 0, err
    entries = check_run_dir(d)
    assert len(entries) == 24 and len({e["key"] for e in entries}) == 24
    assert "by other writers" in out


def _wait_for_writer(d: Path, proc: subprocess.Popen) -> bool:
    """Wait until the second writer has written an image of its own (its claims file names it)."""
    end = time.monotonic() + 300
    claims = d / ".t2i" / "claims"
    while time.monotonic() < end and proc.poll() is None:
        mine = [p for p in claims.glob("*.jsonl") if f"-{proc.pid}-" in p.name]
        files = {json.loads(x)["file"] for p in mine for x in p.read_text().splitlines()}
        if files & {e["file"] for e in lines(d)}:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_two_writers_started_together_make_each_image_once(tmp_path: Path) -> None:
    d = tmp_path / "run"
    # a barrier, not a head start: both reach their first batch before either generates, so both share the work
    procs = [start_slow([*SWEEP, f"hydra.run.dir={d}"], tmp_path, delay=1.0, barrier=(tmp_path / "ready", 2))
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    entries = check_run_dir(d)
    assert len(entries) == 24
    made = [int(o.split(" images generated")[0].split()[-1]) for o, _ in outs]
    assert sum(made) == 24 and min(made) > 0  # they shared the work
    assert len(list((d / "grids").glob("*.png"))) >= 1  # the last one wrote the grids


@pytest.mark.slow
def test_sigterm_finishes_the_batch_prints_the_summary_and_exits_143(tmp_path: Path) -> None:
    d = tmp_path / "run"
    proc = start_slow([*SWEEP, f"hydra.run.dir={d}"], tmp_path)
    _wait(d, 1, [proc])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "images generated" in out and "interrupted" in out and "Traceback" not in err
    done = len(check_run_dir(d))
    assert 1 <= done < 24 and done % 2 == 0  # whole batches
    again = run_cli(*SWEEP, f"hydra.run.dir={d}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{24 - done} images generated, {done} already done" in again.stdout
    assert len(check_run_dir(d)) == 24


@pytest.mark.slow
def test_submitit_job_past_its_time_limit_is_requeued_and_resumes(tmp_path: Path) -> None:
    """submitit_local with a 1-minute limit: USR2 comes 30 s before it; the job finishes its batch, submitit
    requeues it (up to 3 times), the requeued job resumes; every image exactly once. Three 15-s batches: USR2
    comes 30 s after the job started, i.e. before 30 s of generating, so always before the last batch (30-45 s)
    even on a quiet machine (12-s batches let a fast start put it in the last one: nothing left to requeue);
    fewer than four attempts are needed even on a loaded machine."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    sweep = tmp_path / "sweep"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "slowdown"), str(REPO)]),
           "T2I_TEST_BATCH_DELAY": "15"}
    proc = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1", *SWEEP[:3],
                   "seeds=[1,2]", *SWEEP[4:], f"hydra.sweep.dir={sweep}", env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = check_run_dir(sweep / "0")
    assert len(entries) == 6 and len({e["key"] for e in entries}) == 6
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued" in logs, logs[-2000:]
    assert "interrupted (SIGUSR2)" in logs
    summary = [json.loads(x) for x in (sweep / "sweep_manifest.jsonl").read_text().splitlines()]
    assert len(summary) == 6 and all(s["status"] == "ok" for s in summary)


# -- shards ---------------------------------------------------------------------------------------------------------

def test_six_images_over_three_shards_are_two_each() -> None:
    plan = expand(validate(cfg(prompts=["a", "b"], seeds=[1, 2, 3])), "m")
    assert [len(shard(plan, i, 3)) for i in range(3)] == [2, 2, 2]


# -- nothing outside the run is touched -----------------------------------------------------------------------------

def test_a_failed_start_in_an_existing_folder_removes_only_what_it_made(tmp_path: Path) -> None:
    logs = tmp_path / "mylogs"
    logs.mkdir()
    (logs / "train.log").write_text("keep me")
    r = run_cli("model=tiny", "width=65", "hydra.run.dir=mylogs", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["train.log"]
    (tmp_path / "empty").mkdir()  # a folder that was there, empty, stays; the ones made for the run go
    r = run_cli("model=tiny", "width=65", "hydra.run.dir=empty/a/b", cwd=tmp_path)
    assert r.returncode == 2 and (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_merge_into_an_existing_run_dir_refuses_and_keeps_its_lines(tmp_path: Path, capsys) -> None:
    for i in range(2):
        run(cfg(prompts=["a"], seeds=[1, 2], shard={"index": i, "count": 2}), tmp_path / str(i), progress=False)
    mine = (tmp_path / "0" / "manifest.jsonl").read_bytes()
    assert merge_main([str(tmp_path / "1"), "-o", str(tmp_path / "0")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run dir with 1 image(s) of its own" in err
    assert (tmp_path / "0" / "manifest.jsonl").read_bytes() == mine
    assert merge_main([str(tmp_path / "0"), str(tmp_path / "1"), "-o", str(tmp_path / "all")]) == 0
    assert merge_main([str(tmp_path / "0"), str(tmp_path / "1"), "-o", str(tmp_path / "all")]) == 0  # re-merge
    assert len(lines(tmp_path / "all")) == 2


def test_output_dir_is_the_run_dir_and_no_other_folder_is_made(tmp_path: Path) -> None:
    r = run_cli("model=tiny", "steps=1", "width=32", "height=32", "output_dir=out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / ".hydra" / "config.yaml").is_file() and len(lines(tmp_path / "out")) == 1


@pytest.mark.parametrize("arg", ["hydra.run.dir=/sys/kernel/t2i-run", "output_dir=/sys/kernel"])
def test_an_unwritable_run_dir_is_one_line_before_the_model_loads(tmp_path: Path, arg: str) -> None:
    try:
        (Path("/sys/kernel") / ".t2i-probe").write_bytes(b"")
        pytest.skip("/sys/kernel is writable here")
    except OSError:
        pass
    r = run_cli("model.id=/nonexistent/model", arg, cwd=tmp_path)  # the model is never looked at
    assert r.returncode == 2, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("t2i: error: cannot write to ") and "/sys/kernel" in line, r.stderr
    assert not list(tmp_path.iterdir())


# -- old run dirs ---------------------------------------------------------------------------------------------------

def test_lines_of_an_older_key_version_are_kept_and_their_images_made_anew(tmp_path: Path) -> None:
    d = tmp_path / "run"
    run(cfg(prompts=["a"], seeds=[1]), d, progress=False)
    (old,) = lines(d)
    legacy = {**old, "key": "0123456789abcdef", "record_version": 1}
    (d / "manifest.jsonl").write_text(json.dumps(legacy) + "\n" + json.dumps(legacy) + "\n")  # a duplicate too
    again = run(cfg(prompts=["a"], seeds=[1]), d, progress=False)
    assert (again.generated, again.skipped) == (1, 0)
    entries = lines(d)
    assert [e["file"] for e in entries] == [old["file"], again.entries[0]["file"]]  # one line per file
    assert sorted(in_grids(d)) == sorted(e["file"] for e in entries)


def test_a_file_placed_by_a_killed_writer_without_its_line_is_adopted(tmp_path: Path) -> None:
    d = tmp_path / "run"
    run(cfg(prompts=["a"], seeds=[1, 2]), d, progress=False)
    entries = lines(d)
    (d / "manifest.jsonl").write_text(json.dumps(entries[0]) + "\n" + '{"torn": ')  # killed mid-line
    again = run(cfg(prompts=["a"], seeds=[1, 2]), d, progress=False)
    assert (again.generated, again.skipped) == (0, 2)
    assert {e["file"] for e in check_run_dir(d)} == {e["file"] for e in entries}


def test_manifest_recover_keeps_the_last_line_of_a_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    m = Manifest(tmp_path)
    m.append({"file": "x.png", "key": "k3"})
    m.append({"file": "x.png", "key": "k4"})  # an old bug wrote the file again with another image
    m.append({"file": "gone.png", "key": "k5"})
    assert [e["key"] for e in m.recover()] == ["k4"]
    assert len(m.path.read_text().splitlines()) == 1


def test_grids_are_paged_with_every_image_once(tmp_path: Path) -> None:
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    entries = []
    for i in range(150):
        name = f"{i:05d}_p_s{i}.png"
        img.save(tmp_path / name)
        entries.append({"file": name, "key": f"k{i}", "index": i, "prompt": f"p{i // 30}", "seed": i % 30,
                        "width": 64, "height": 64})
    pages = write_grids(tmp_path, GridConfig(max_size=640, min_cell=64), entries)
    assert len(pages) > 1
    cells = [f for p in pages for row in read_grid_info(p)["cells"] for f in row if f]
    assert sorted(cells) == sorted(e["file"] for e in entries)
    for p in pages:
        with Image.open(p) as im:
            assert max(im.size) <= 640
            assert read_grid_info(p)["cell_size"][0] >= 56  # about min_cell, not shrunk to fit one page
