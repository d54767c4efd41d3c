"""bench/bench_train.py: t2i-train beside the plain loop prints one row per family and appends it; --full's code path
(checkpointing, rank 16, batch 1, its own table) runs on the tiny models with --tiny-override; bad input is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_bench import bench

N = r"\d+\.\d+"
ROW = (r"\| {family} \| 32 \| {batch} \| {rank} \| no \| {ckpt} \| N \| N \| N \| N \| N \| N \| [\d.]+ \| [\d.]+ \|"
       .replace("N", N))


@pytest.mark.slow
def test_bench_train_prints_both_loops_and_appends(tmp_path: Path) -> None:
    md = tmp_path / "B.md"
    proc = bench("bench_train", "--families", "sd15", "--steps", "2", "--warmup", "1", "--batch", "1",
                 "--benchmarks", str(md), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(ROW.format(family="sd15", batch=1, rank=4, ckpt="False"), proc.stdout), proc.stdout
    assert '"way": "runner"' in proc.stdout and '"way": "plain"' in proc.stdout
    text = md.read_text()
    assert "bench_train.py --families sd15 --steps 2" in text and "| sd15 | 32 |" in text


def test_full_mode_rehearsal_on_a_tiny_model(tmp_path: Path) -> None:
    proc = bench("bench_train", "--full", "--tiny-override", "--families", "zimage", "--steps", "2", "--warmup", "1",
                 "--size", "32", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(ROW.format(family="zimage", batch=1, rank=16, ckpt="True"), proc.stdout), proc.stdout


def test_bad_input_is_one_line() -> None:
    proc = bench("bench_train", "--families", "sd15,sd9")
    assert proc.returncode == 2 and "unknown family 'sd9'" in proc.stderr
    proc = bench("bench_train", "--steps", "2", "--warmup", "2")
    assert proc.returncode == 2 and "--warmup=2 leaves no timed step" in proc.stderr
