"""Benchmark `t2i-train`: steps/s and peak GPU memory of LoRA training on an SD1.5-architecture model.

The model is built locally with random weights from the published SD1.5 configs (UNet 860M, VAE, CLIP ViT-L/14
text encoder; no hub), written once to --model-dir, then trained through the real code path
(`runner.train.loop.train`) on a generated image folder. Steps/s comes from the per-step times in loss.csv
(after --warmup steps); peak memory is `torch.cuda.max_memory_allocated` over the run.

    # on a GPU (H100/H200): the default matrix at 512x512, 30 steps each
    python bench/train_bench.py --matrix
    # one configuration
    python bench/train_bench.py --resolution 512 --batch-size 1 --rank 16 --mixed-precision bf16
    # CPU smoke test with the tiny model (seconds)
    python bench/train_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MATRIX = [  # (batch_size, mixed_precision, gradient_checkpointing, rank)
    (1, "bf16", False, 16),
    (1, "bf16", True, 16),
    (4, "bf16", False, 16),
    (4, "bf16", True, 16),
    (1, "fp16", False, 16),
    (1, "no", False, 16),
]


def build_sd15_random(dest: Path) -> Path:
    """Write an SD1.5-architecture pipeline with random weights to `dest` (skipped when already there)."""
    if (dest / "model_index.json").is_file():
        return dest
    from models import build_sd15  # bench/models.py: the published SD1.5 configs

    tmp = Path(tempfile.mkdtemp(prefix=".sd15-", dir=dest.parent))
    try:
        build_sd15().save_pretrained(tmp / "model", safe_serialization=True)
        (tmp / "model").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def make_images(folder: Path, n: int, side: int) -> Path:
    """`n` random-noise images with captions (content does not change the speed)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photo of sample {i}")
    return folder


def bench_one(
    model_id: str,
    data: Path,
    work: Path,
    *,
    resolution: int,
    batch: int,
    mp: str,
    gc: bool,
    rank: int,
    steps: int,
    warmup: int,
    device: str,
) -> dict:
    """Train `steps` steps; return steps/s (after warmup), images/s and peak memory."""
    import torch

    from runner.train.loop import train

    out = work / f"run-b{batch}-{mp}-gc{int(gc)}-r{rank}"
    shutil.rmtree(out, ignore_errors=True)
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = {
        "model": {"id": model_id},
        "data": {"dir": str(data), "resolution": resolution},
        "lora": {"rank": rank},
        "device": device,
        "progress": False,
        "validation": {"prompts": []},
        "train": {
            "steps": steps,
            "batch_size": batch,
            "mixed_precision": mp,
            "gradient_checkpointing": gc,
            "checkpoint_every": steps,
            "lr": 1e-4,
        },
    }
    t0 = time.perf_counter()
    result = train(cfg, out)
    wall = time.perf_counter() - t0
    from runner.train.losslog import LossLog

    times = [r["seconds"] for r in LossLog(out / "loss.csv").rows()][warmup:]
    per_step = sum(times) / len(times)
    row = {
        "resolution": resolution,
        "batch_size": batch,
        "mixed_precision": mp,
        "gradient_checkpointing": gc,
        "rank": rank,
        "steps": steps,
        "warmup": warmup,
        "steps_per_s": round(1 / per_step, 3),
        "images_per_s": round(batch / per_step, 3),
        "wall_s": round(wall, 1),
        "last_loss": result.last_loss,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if cuda:
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model at 64x64 for a few steps (runs on CPU)")
    p.add_argument("--matrix", action="store_true", help="run the built-in matrix of configurations")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of steps/s")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--model-dir", type=Path, default=None, help="where the random SD1.5 model is (built) kept"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="t2i-train-bench-"))
    if args.quick:
        model_id, res, steps, warmup = "builtin:tiny", 64, 6, 2
        configs = [(1, "auto", False, 4), (2, "auto", True, 4)]
    else:
        from runner.common.paths import cache_root

        model_dir = args.model_dir or cache_root() / "sd15-random-v1"
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model_id = str(build_sd15_random(model_dir))
        print(f"model: {model_id} ({time.perf_counter() - t0:.0f} s to build/find)", flush=True)
        res, steps, warmup = args.resolution, args.steps, args.warmup
        configs = (
            MATRIX
            if args.matrix
            else [(args.batch_size, args.mixed_precision, args.gradient_checkpointing, args.rank)]
        )
    data = make_images(work / "data", 8, max(res, 64))
    rows = []
    try:
        for batch, mp, gc, rank in configs:
            row = bench_one(
                model_id,
                data,
                work,
                resolution=res,
                batch=batch,
                mp=mp,
                gc=gc,
                rank=rank,
                steps=steps,
                warmup=warmup,
                device=args.device,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| res | batch | precision | grad ckpt | rank | steps/s | images/s | peak alloc GiB | device |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['resolution']} | {r['batch_size']} | {r['mixed_precision']} | "
            f"{r['gradient_checkpointing']} | "
            f"{r['rank']} | {r['steps_per_s']} | {r['images_per_s']} | {r.get('peak_allocated_gib', '-')} | "
            f"{r['device']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
