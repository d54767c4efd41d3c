"""bench/: the sweep prints the three ways and their ratios; the SD1.5 builder matches the published sizes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def bench(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python bench/SCRIPT.py ARGS`, run in this process (its main(argv)): stdout, stderr and exit code."""
    import contextlib
    import importlib
    import io
    import os

    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(script).main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def test_bench_sweep_prints_three_ways_and_ratios(tmp_path: Path) -> None:
    md = tmp_path / "BENCH.md"
    proc = bench(
        "bench_sweep",
        *[
            "--quick",
            "--prompts",
            "1",
            "--seeds",
            "1",
            "--lora-sets",
            "2",
            "--steps",
            "1",
            "--size",
            "32",
            "--variants",
            "default",
            "--benchmarks",
            str(md),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert any(r.startswith("| (a) original") for r in rows)
    assert any(r.startswith("| (b) diffusers loop") for r in rows)
    assert any(r.startswith("| (c) runner [default]") for r in rows)
    assert re.search(r"ratio runner/original: \d+\.\d+x", out)
    assert "2 images" in out and "writer.submit blocked" in out
    text = md.read_text()
    assert "bench_sweep.py --quick" in text and "| (c) runner [default]" in text and "torch " in text


def test_bench_rejects_unknown_variant() -> None:
    proc = bench("bench_sweep", "--variants", "turbo")
    assert proc.returncode == 2 and "unknown variant 'turbo'" in proc.stderr


def test_sd15_builder_has_the_published_sizes() -> None:
    from models import build_sd15

    pipe = build_sd15("meta")  # no memory, no weights: just the architecture
    count = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")
    }
    assert count == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.vae.config.scaling_factor == 0.18215


def test_make_lora_loads_into_the_runner(tiny_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from models import make_lora

    from runner.config import LoraSpec
    from runner.lora.adapters import AdapterManager
    from runner.lora.files import resolve_lora

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    path = make_lora(pipe.unet, tmp_path / "l", rank=4, seed=5)
    assert (
        not pipe.unet.peft_config if hasattr(pipe.unet, "peft_config") else True
    )  # builder leaves no adapter
    manager = AdapterManager(pipe)
    r = resolve_lora(LoraSpec(str(path.parent)))
    manager.activate((r,), (1.0,))
    ranks = {
        m.r[r.adapter] for m in pipe.unet.modules() if hasattr(m, "r") and r.adapter in getattr(m, "r", {})
    }
    assert ranks == {4}


def test_full_mode_path_with_a_prebuilt_small_model(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """--full reuses the model `ensure_sd15` wrote, extrapolates (a) when told, and appends the table."""
    import models
    from diffusers import StableDiffusionPipeline

    built = []

    def small(device: str = "cpu", seed: int = 0):
        built.append(device)
        return StableDiffusionPipeline.from_pretrained(str(tiny_dir))

    monkeypatch.setattr(models, "build_sd15", small)
    cache = tmp_path / "cache"
    model_dir, loras = models.ensure_sd15(cache, n_loras=2, rank=4)
    assert (model_dir / "model_index.json").is_file() and all(p.is_file() for p in loras)
    assert models.ensure_sd15(cache, n_loras=2, rank=4) == (model_dir, loras) and built == ["cpu"]
    md = tmp_path / "B.md"
    args = [
        "--full",
        "--cache",
        str(cache),
        "--device",
        "cpu",
        "--prompts",
        "1",
        "--seeds",
        "2",
        "--lora-sets",
        "4",
        "--steps",
        "1",
        "--size",
        "32",
        "--variants",
        "default",
        "--a-images",
        "2",
        "--switches",
        "3",
        "--benchmarks",
        str(md),
    ]
    proc = bench("bench_sweep", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "EXTRAPOLATED from 2 of 8 images" in proc.stdout
    assert re.search(r"LoRA-set switches \[default\]: 3 switches over 4 sets", proc.stdout)
    assert "| (c) runner [default]" in md.read_text()


def test_bench_resume_prints_ms_per_entry_for_resume_decode_and_grids(tmp_path: Path) -> None:
    proc = bench("bench_resume", "--entries", "60", "--size", "64", "--decode-sample", "5", "--dir",
                 str(tmp_path / "work"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^resume: \d+\.\d+ ms/entry", proc.stdout, re.M), proc.stdout
    assert re.search(r"^decode \(the check resume did before\): \d+\.\d+ ms/entry", proc.stdout, re.M)
    assert re.search(r"^grids: \d+ pages for 60 images", proc.stdout, re.M), proc.stdout


def test_bench_eval_prints_its_measurements() -> None:
    proc = bench("bench_eval", "--rounds", "0", "--score-images", "4", "--images", "300")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"tiny scorers on cpu, 64 px: clip_t \d+ images/s, lora_effect \d+ images/s", proc.stdout)
    assert re.search(r"--summary over cached scores of 300 images: [\d.]+ s wall, [\d.]+ s CPU", proc.stdout)
