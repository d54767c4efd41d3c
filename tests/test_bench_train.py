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


def test_probe_memorisation_reports_the_x0_error_falling(tmp_path: Path) -> None:
    """bench/probe_memorisation.py (the plain loop behind docs/training.md's SD3 table): a line per quarter of the
    run, each caption's x0 error at sigma 1 beside the mean's; a few steps bring the errors down from the base's."""
    import torch

    with torch.no_grad():  # as the suite may leave it: the script turns grad on where it trains
        proc = bench("probe_memorisation", "flux1", "--steps", "8", "--lr", "1e-2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"flux1 step (\d+): x0 error at sigma 1 per caption \[([^\]]+)\], predicting the mean "
                      rf"({N})", proc.stdout)
    assert [int(s) for s, _, _ in rows] == [0, 2, 4, 6, 8], proc.stdout
    errors = [[float(e) for e in errs.split(",")] for _, errs, _ in rows]
    assert len({m for _, _, m in rows}) == 1 and all(len(e) == 4 for e in errors)
    assert max(errors[-1]) < min(errors[0]), errors
