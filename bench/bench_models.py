"""Models as a sweep axis: process (and GPU) memory when the run moves from model to model.

Builds two mid-size random models of two families (Flux.1 and SD1.5 architectures, ~0.3-0.5 GB each in fp32),
then, in this one process, runs the one-model sweep of the first model (the one-model level), and the model axis
[A, B, A'] (A' = a copy of A at another path, so it loads again), after each model's one-model sweep alone (its
one-model level). After each model's images it records the process RSS (and CUDA memory allocated); the previous
model is released before the next loads, so each level must be within 5% of that model's one-model level.

    python bench/bench_models.py [--device cpu|cuda] [--benchmarks docs/performance.md]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cuda_mb() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def build(root: Path) -> dict[str, Path]:
    """A mid-size Flux.1-architecture pipeline (and a copy) and a mid-size SD1.5 one, with random weights."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as UNet

    from runner.models.tiny import build_tiny_pipeline
    from runner.models.tiny_families import build_flux1

    out = {}
    torch.manual_seed(0)
    flux = build_flux1(root)
    flux = FluxPipeline(
        scheduler=flux.scheduler, vae=flux.vae, text_encoder=flux.text_encoder, tokenizer=flux.tokenizer,
        text_encoder_2=flux.text_encoder_2, tokenizer_2=flux.tokenizer_2,
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=6, num_single_layers=12,
                                           attention_head_dim=64, num_attention_heads=8, joint_attention_dim=32,
                                           pooled_projection_dim=32, axes_dims_rope=[16, 24, 24],
                                           guidance_embeds=True))
    flux.save_pretrained(root / "flux-mid")
    shutil.copytree(root / "flux-mid", root / "flux-mid-copy")
    sd = build_tiny_pipeline(root)
    sd = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(64, 128, 256), latent_channels=4, layers_per_block=1,
                          down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        unet=UNet(block_out_channels=(192, 384, 768), layers_per_block=2, cross_attention_dim=32, sample_size=16,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8),
        text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, scheduler=sd.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(root / "sd-mid")
    out.update(A=root / "flux-mid", B=root / "sd-mid", A2=root / "flux-mid-copy")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--benchmarks", default=None, help="append the results to this markdown file")
    args = p.parse_args(argv)
    import torch
    from omegaconf import OmegaConf

    from runner.config import RunConfig
    from runner.models.loading import _CACHE, release
    from runner.run import run

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="t2i-bench-models-"))
    try:
        models = build(work)
        levels: list[tuple[str, float, float]] = []

        def sweep(entries: list[str], name: str) -> None:
            seen: list[str] = []

            def on_image(entry: dict) -> None:
                loc = entry["model"]["location"]
                if loc not in seen:
                    seen.append(loc)

            cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), {
                "model": {"id": entries[0]}, "models": entries if len(entries) > 1 else [],
                "prompts": ["a red fox"], "seeds": [1, 2], "steps": 2, "width": 64, "height": 64,
                "device": args.device, "grid": {"enabled": False}, "resume": False})
            done: dict[str, float] = {}

            def record(entry: dict) -> None:
                on_image(entry)
                done[entry["model"]["location"]] = rss_mb()

            run(cfg, work / name, progress=False, on_image=record)
            for loc in seen:
                levels.append((f"{name}: {Path(loc).name}", done[loc], cuda_mb()))

        def free_all() -> None:
            for loaded in list(_CACHE.values()):
                release(loaded)

        alone = {}
        for key in ("A", "B"):  # the one-model level of each model: that model's sweep alone
            sweep([str(models[key])], "one model")
            alone[models[key].name] = levels[-1][1]
            free_all()
        alone[models["A2"].name] = alone[models["A"].name]  # the same weights at another path
        sweep([str(models[k]) for k in ("A", "B", "A2")], "model axis")
        lines = ["| run: model | RSS MiB after its images | vs the model's one-model level | CUDA MiB |",
                 "|---|---:|---:|---:|"]
        for name, rss, cuda in levels:
            base = alone[name.split(": ", 1)[1]]
            lines.append(f"| {name} | {rss:.0f} | {100 * (rss - base) / base:+.1f}% | {cuda:.0f} |")
        table = "\n".join(lines)
        print(table)
        if args.benchmarks:
            stamp = time.strftime("%Y-%m-%d %H:%M")
            with open(args.benchmarks, "a", encoding="utf-8") as f:
                f.write(f"\n### {stamp} — `python bench/bench_models.py --device {args.device}`\n\n{table}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
