"""One sweep, three ways, in ONE process on one machine: images/s and ratios.

(a) the original design's way: from_pretrained + .to(device) per image, LoRAs loaded per image, batch 1, fp32;
(b) a plain diffusers loop over a cached pipeline (LoRAs loaded once, switched with set_adapters), batch 1;
(c) the runner, `runner.run.run` in-process after a warm-up, in one or more `perf`/batch configurations.
Every way writes one PNG per image. `--quick`: tiny model on CPU; `--full`: SD1.5 architecture, random
weights.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ways import (  # noqa: E402
    PROMPTS,
    VARIANTS,
    Setup,
    lora_switches,
    quiet,
    way_cached,
    way_original,
    way_runner,
)


@dataclass
class Row:
    name: str
    images: int
    seconds: float
    note: str = ""
    cpu: float = 0.0  # process CPU seconds (all threads) spent on it

    @property
    def ips(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def table(rows: list[Row]) -> str:
    base_a = next((r.ips for r in rows if r.name.startswith("(a)")), 0.0)
    base_b = next((r.ips for r in rows if r.name.startswith("(b)")), 0.0)
    cpu_a = next((r.cpu / r.images for r in rows if r.name.startswith("(a)")), 0.0)
    lines = [
        "| way | images | seconds | images/s | s/image | x (a) | x (b) | CPU s/image | x (a) by CPU s "
        "| notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        xa = f"{r.ips / base_a:.2f}" if base_a else "-"
        xb = f"{r.ips / base_b:.2f}" if base_b else "-"
        cpu = r.cpu / r.images
        xc = f"{cpu_a / cpu:.2f}" if cpu_a and cpu else "-"
        lines.append(
            f"| {r.name} | {r.images} | {r.seconds:.2f} | {r.ips:.3f} | {1 / r.ips:.4f} | {xa} | {xb} "
            f"| {cpu:.4f} | {xc} | {r.note} |"
        )
    return "\n".join(lines)


def machine(device: str) -> str:
    import diffusers
    import peft
    import torch
    import transformers

    card = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU)"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    import os

    return (
        f"machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; card: {card}\n"
        f"versions: python {platform.python_version()}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )


def make_setup(args: argparse.Namespace, work: Path) -> Setup:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    prompts, seeds = PROMPTS[: args.prompts], list(range(args.seeds))
    if args.family != "sd15":
        return _family_setup(args, device, prompts, seeds)
    if args.full:
        from models import ensure_sd15

        model_dir, loras = ensure_sd15(Path(args.cache), device=device, n_loras=2, rank=16)
        a = {"source": str(loras[0].parent), "weight_name": loras[0].name, "name": "A"}
        b = {"source": str(loras[1].parent), "weight_name": loras[1].name, "name": "B"}
        sets = [[], [a], [b], [a, b]][: args.lora_sets]
        return Setup(
            str(model_dir), model_dir, sets, prompts, seeds, args.steps or 30, 7.5, args.size or 512, device
        )
    from runner.models.tiny import DIFFUSERS_LORA, KOHYA_LORA, ensure_tiny

    tiny = ensure_tiny()
    a = {"source": str(tiny / "loras" / DIFFUSERS_LORA[0]), "weight_name": DIFFUSERS_LORA[1], "name": "style"}
    b = {"source": str(tiny / "loras" / KOHYA_LORA), "name": "kohya"}
    sets = [[], [a], [a, b], [b]][: args.lora_sets]
    return Setup("builtin:tiny", tiny, sets, prompts, seeds, args.steps or 4, 7.5, args.size or 64, device)


# per family: (guidance, --quick steps, --quick size, --full steps, --full size) of its published settings
FAMILY_RUNS = {"sdxl": (5.0, 4, 64, 30, 1024), "flux1": (3.5, 4, 64, 28, 1024), "sd3": (4.5, 4, 64, 28, 1024),
               "qwenimage": (0.0, 4, 64, 50, 1328), "zimage": (0.0, 4, 64, 9, 1024), "flux2": (4.0, 4, 64, 4, 1024)}


def _family_setup(args: argparse.Namespace, device: str, prompts: list, seeds: list) -> Setup:
    """--family F: the tiny F pipeline and its two example LoRAs (--quick), or F's published full-size
    architecture with random weights and two random LoRAs (--full, bench/family_models.py)."""
    guidance, q_steps, q_size, f_steps, f_size = FAMILY_RUNS[args.family]
    if args.full:
        from family_models import ensure_family

        model_dir, loras = ensure_family(args.family, Path(args.cache), device=device)
        sets = [[], *[[{"source": str(lo), "name": f"L{i}"}] for i, lo in enumerate(loras)]]
        return Setup(str(model_dir), model_dir, sets[: args.lora_sets], prompts, seeds, args.steps or f_steps,
                     guidance, args.size or f_size, device, args.family)
    from runner.models.tiny import ensure_tiny

    tiny = ensure_tiny(args.family)
    files = sorted((tiny / "loras").rglob("*.safetensors"))
    sets = [[], *[[{"source": str(f), "name": f.stem}] for f in files]]
    return Setup(str(tiny), tiny, sets[: args.lora_sets], prompts, seeds, args.steps or q_steps, guidance,
                 args.size or q_size, device, args.family)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="tiny model on CPU: 4 prompts x 4 seeds x 3 LoRA sets"
    )
    mode.add_argument(
        "--full", action="store_true", help="SD1.5 architecture, 512px, 30 Euler steps, 256 images"
    )
    p.add_argument("--family", default="sd15", choices=("sd15", *FAMILY_RUNS),
                   help="model family (default sd15); --quick: its tiny model, --full: its published architecture")
    p.add_argument("--prompts", type=int, help="number of prompts (max 4)")
    p.add_argument("--seeds", type=int, help="seeds per prompt")
    p.add_argument("--lora-sets", type=int, help="LoRA sets incl. none (max 4)")
    p.add_argument("--steps", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--device", default=None, help="auto, cpu or cuda (--quick: cpu)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (--quick: 1; the box is shared)"
    )
    p.add_argument("--a-images", type=int, help="measure (a) on N images only, extrapolate (--full: 32)")
    p.add_argument("--switches", type=int, help="LoRA-set switches for the memory check (--full: 100)")
    p.add_argument("--variants", default=None, help=f"comma list of (c) configs: {', '.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true", help="cProfile the first (c) configuration")
    p.add_argument(
        "--cache", default=str(Path(tempfile.gettempdir()) / "t2i-bench"), help="--full model folder"
    )
    p.add_argument("--benchmarks", default=None, help="append the results to this markdown file")
    args = p.parse_args(argv)
    full = args.full
    args.prompts = args.prompts or 4
    args.seeds = args.seeds or (16 if full else 4)
    args.lora_sets = args.lora_sets or (4 if full else 3)
    args.device = args.device or ("auto" if full else "cpu")
    args.a_images = args.a_images if args.a_images is not None else (32 if full else 0)
    args.switches = args.switches if args.switches is not None else (100 if full else 0)
    default = "default,b16,b16+fuse_lora,b16+fuse_lora+channels_last"
    variants = args.variants or (default + ",b16+fuse_lora+channels_last+compile" if full else default)
    variants = variants.split(",")
    bad = [v for v in variants if v.removesuffix("+bf16").removesuffix("+cudnn_benchmark") not in VARIANTS]
    if bad:
        p.error(f"unknown variant {bad[0]!r}; valid: {', '.join(VARIANTS)}")
    import torch

    if args.threads or not full:
        torch.set_num_threads(args.threads or 1)
    torch.set_grad_enabled(False)
    quiet()
    work = Path(tempfile.mkdtemp(prefix="t2i-bench-"))
    try:
        setup = make_setup(args, work)
        jobs = setup.jobs()
        n = len(jobs)
        print(machine(setup.device))
        sweep_line = (
            f"sweep: family {setup.family}, {len(setup.prompts)} prompts x {len(setup.seeds)} seeds x "
            f"{len(setup.lora_sets)} "
            f"LoRA sets = {n} images, {setup.size}px, {setup.steps} Euler steps, CFG {setup.guidance}, "
            f"device {setup.device}"
        )
        print(sweep_line)
        rows = []
        a_jobs = jobs if not args.a_images else jobs[:: max(1, n // args.a_images)][: args.a_images]
        for d in ("a", "b", "c"):
            (work / d).mkdir()
        c0 = time.process_time()
        secs = way_original(setup, a_jobs, work / "a")
        cpu = (time.process_time() - c0) * n / len(a_jobs)
        note = (
            "measured on all images"
            if len(a_jobs) == n
            else f"EXTRAPOLATED from {len(a_jobs)} of {n} images (evenly spread over the LoRA sets)"
        )
        rows.append(
            Row(
                "(a) original: from_pretrained+.to per image, LoRAs per image, b1, fp32",
                n,
                secs * n / len(a_jobs),
                note,
                cpu,
            )
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        from runner.models.source import resolve_dtype

        dtype = resolve_dtype("auto", setup.device)
        secs, cpu = way_cached(setup, jobs, work / "b", dtype)
        rows.append(
            Row(
                f"(b) diffusers loop, cached pipeline, b1, {str(dtype).replace('torch.', '')}",
                n,
                secs,
                "after a 1-image warm-up",
                cpu,
            )
        )
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        for i, v in enumerate(variants):
            secs, cpu, note = way_runner(setup, v, work / "c" / v, args.profile and i == 0)
            batch, inv, perf = VARIANTS[v.removesuffix("+bf16").removesuffix("+cudnn_benchmark")]
            rows.append(
                Row(f"(c) runner [{v}]: batch_size={batch} batch_invariant={inv}", n, secs, note, cpu)
            )
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.switches:
            switches = lora_switches(setup, variants[-1], args.switches)
            print(switches)
        from runner.models.loading import clear_cache

        clear_cache()
        result = table(rows)
        print("\n" + result)
        best = max(rows[2:], key=lambda r: r.ips)
        cpu_ratio = (rows[0].cpu / n) / (best.cpu / n) if best.cpu else 0.0
        print(
            f"\nratio runner/original: {best.ips / rows[0].ips:.2f}x (by CPU seconds {cpu_ratio:.2f}x) "
            f"(best (c): {best.name.split(':')[0]}), "
            f"first (c)/original: {rows[2].ips / rows[0].ips:.2f}x, runner/diffusers loop: "
            f"{best.ips / rows[1].ips:.2f}x"
        )
        if args.benchmarks or full:
            path = Path(args.benchmarks or Path(__file__).resolve().parent.parent / "docs" / "performance.md")
            cmd = "python bench/bench_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
            stamp = time.strftime("%Y-%m-%d %H:%M")
            with open(path, "a", encoding="utf-8") as f:
                info = "".join(f"- {line}\n" for line in machine(setup.device).splitlines())
                sweep = f"- {sweep_line}\n" + (f"- {switches}\n" if args.switches else "")
                f.write(f"\n### {stamp} — `{cmd}`\n\n{info}{sweep}\n{result}\n")
            print(f"appended to {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
