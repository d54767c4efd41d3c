"""The cluster path on a real one-node Slurm cluster (Debian's slurm-wlm + munge, started by tests/slurm/cluster.sh
for this module and stopped after): the docs' sharded sweep through `hydra/launcher=slurm`, one array task
preempted with `scancel --signal=USR2` mid-run and requeued by submitit, `t2i-merge` gathering every image exactly
once; and what a sweep does when a job's batch shell is killed (`scancel --batch`) while Slurm accounting (`sacct`)
is off, as it is on this cluster: it ends with a clear error, it does not wait forever."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
pytestmark = [pytest.mark.slow, pytest.mark.slurm]
# the docs' command, made to fit this cluster and the tiny model: the rest of its line is run as written
FIT = {"model=sd15": "model=tiny", "lora=my_set": "lora=tiny_examples", "hydra.launcher.partition=gpu":
       "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=1": "hydra.launcher.gpus_per_node=0"}
SMALL = ["device=cpu", "steps=1", "width=32", "height=32", "batch_size=4", "threads=1",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running one-node cluster; SLURM_CONF points the clients (sbatch, squeue, scancel, scontrol) at it."""
    missing = [d for d in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(d)]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's slurmd runs as root")
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(CLUSTER), "start", str(state)], check=True, timeout=120)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def docs_cluster_commands() -> list[list[str]]:
    """The sharded sweep and merge commands of docs/clusters.md, split as a shell would."""
    text = (REPO / "docs" / "clusters.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    sweep = next(shlex.split(ln, comments=True) for ln in lines if "hydra/launcher=slurm" in ln and "shard.index" in ln)
    merge = next(shlex.split(ln, comments=True) for ln in lines if ln.startswith("t2i-merge multirun/foxes"))
    return [sweep, merge]


def _env(delay: float) -> dict[str, str]:
    # the jobs run in processes slurmd starts: the batch delay comes through sitecustomize on their PYTHONPATH
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "slowdown"), str(REPO)]),
            "T2I_TEST_BATCH_DELAY": str(delay)}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _wait_for(what, timeout: float, proc: subprocess.Popen, step: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = what()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(step)
    proc.kill()
    pytest.fail(f"timed out: {proc.stdout.read()[-3000:]}")


def _array_id(sweep: Path) -> str | None:
    jobs = [p.name for p in (sweep / ".submitit").glob("*_*") if re.fullmatch(r"\d+_\d+", p.name)]
    return jobs[0].split("_")[0] if jobs else None


def test_sharded_sweep_on_slurm_survives_a_preemption_and_merges_every_image_once(slurm: Path, tmp_path: Path):
    from runner.models.tiny import ensure_tiny

    ensure_tiny()  # built once here, not by four jobs at once
    sweep_cmd, merge_cmd = docs_cluster_commands()
    argv = [FIT.get(a, a) for a in sweep_cmd]
    assert argv[:2] == ["t2i", "-m"] and "hydra/launcher=slurm" in argv and "hydra.sweep.dir=multirun/foxes" in argv
    sweep = tmp_path / "multirun" / "foxes"
    # 64 images, 16 a shard in 4 batches of 4, each batch at least 4 s: the signal lands mid-run
    proc = subprocess.Popen([sys.executable, "-m", "runner", *argv[1:], *SMALL], cwd=tmp_path, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        array = _wait_for(lambda: _array_id(sweep), 120, proc)
        _wait_for(lambda: len(_lines(sweep / "1" / "manifest.jsonl")) >= 4, 400, proc)
        subprocess.run(["scancel", "--signal=USR2", f"{array}_1"], check=True, timeout=60)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    log = "".join(p.read_text() for p in (sweep / ".submitit" / f"{array}_1").glob("*_log.*"))
    assert "interrupted (SIGUSR2)" in log and f"Requeued job {array}_1" in log, log[-3000:]
    shard1 = _lines(sweep / "1" / "manifest.jsonl")
    assert len(shard1) == 16 and len({e["key"] for e in shard1}) == 16  # resumed: nothing made twice
    merge = subprocess.run([sys.executable, "-m", "runner.outputs.sweep", *merge_cmd[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr
    merged = _lines(sweep / "manifest.jsonl")
    assert len(merged) == 64 and len({e["key"] for e in merged}) == 64
    assert sorted({e["seed"] for e in merged}) == list(range(8))
    assert list((sweep / "grids").glob("*.png")) and (sweep / "index.html").is_file()


def test_a_killed_batch_shell_ends_the_sweep_with_an_error_when_sacct_is_off(slurm: Path, tmp_path: Path):
    """`scancel --batch` kills the job's batch shell: the job ends without a result file. submitit alone would wait
    for it forever (sacct, off here, is how it learns a job ended); runner/launcher.py asks squeue instead."""
    assert subprocess.run(["sacct"], capture_output=True, timeout=60).returncode != 0  # accounting is off
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "-m", "model=tiny", "seeds=[1,2,3,4,5,6,7,8]", *SMALL,
                             "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=_env(6), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        jobs = _wait_for(lambda: [p.name for p in (sweep / ".submitit").glob("*") if p.name.isdigit()], 120, proc)
        job = jobs[0]
        _wait_for(lambda: _lines(sweep / "0" / "manifest.jsonl"), 400, proc)
        killed = time.monotonic()
        subprocess.run(["scancel", "--batch", job], check=True, timeout=60)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]
    assert time.monotonic() - killed < 120
    # one line (Hydra's form for a failed multirun job, as every failed job of a sweep), no traceback
    assert f"\nslurm job {job} ended without a result (state FAILED: its batch shell was killed" in out, out[-3000:]
    assert f"slurm job {job} ended without a result (state " in out and "Traceback" not in out, out[-3000:]
