"""Benchmark `t2i-train` per family beside a plain diffusers-style training loop of the same size.

Per family, in one process, side by side (alternating which goes first each round):
(a) `t2i-train`: `runner.train.loop.train` on a generated image folder (its whole step: image loading and
    augmentation, VAE encode, the family objective, backward, clipping, AdamW, the loss log); steps/s from the
    per-step times in loss.csv after `--warmup` steps (checkpoints and sample images fall outside them);
(b) plain: a hand-written loop as diffusers' `train_dreambooth_lora_*` scripts run it: the pipeline from
    `from_pretrained`, peft `add_adapter` on the same target modules (rank, alpha), images as tensors in memory,
    captions encoded once (frozen text encoders), then per step VAE encode -> noise -> forward -> MSE -> backward
    -> clip -> AdamW; it calls the family's denoiser through the runner's per-family `predict` (packing, position
    ids: the model's calling convention, the same work in both loops), so the difference is the loop around it.
Same model, rank, batch, resolution and steps in both. Peak memory: `torch.cuda.max_memory_allocated` on a GPU;
on CPU the peak resident set size above the process's size when the run starts (sampled every 5 ms; the first
run of a process also pays for allocator pools, hence the alternating order).

    # CPU, the tiny models (about a minute per family on 2 cores)
    python bench/bench_train.py --families sd15,flux1 --steps 8 --benchmarks docs/performance.md
    # GPU: published architectures with random weights (bench/family_models.py), bf16, gradient checkpointing,
    # 1024² (512² for SD 1.5), rank 16, batch 1
    python bench/bench_train.py --full --cache /data/bench-models
    # rehearse --full's code path on CPU with the tiny models (no full-size model is built)
    python bench/bench_train.py --full --tiny-override --families zimage --steps 3 --size 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = ("sd15", "sdxl", "flux1", "sd3", "qwenimage", "zimage", "flux2")
TINY = {"sd15": "tiny", "sdxl": "tiny-sdxl", "flux1": "tiny-flux1", "sd3": "tiny-sd3",
        "qwenimage": "tiny-qwenimage", "zimage": "tiny-zimage", "flux2": "tiny-flux2"}
FULL_SIZE = {"sd15": 512}  # --full resolution; every other family 1024² (their published training size)


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or the CPU resident set sampled by a thread."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak, self._stop = cuda, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        import contextlib
        import ctypes
        import gc

        gc.collect()  # the previous run's tensors back to the OS: this run's peak is not hidden in freed pages
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss()) - self._start

    @property
    def mib(self) -> float:
        return round(self.peak / 2**20, 1)


def run_runner(model: str, data: Path, out: Path, s: argparse.Namespace, cuda: bool) -> dict:
    """(a) t2i-train's loop."""
    from runner.train.loop import train
    from runner.train.losslog import LossLog

    shutil.rmtree(out, ignore_errors=True)
    cfg = {"model": {"id": model}, "data": {"dir": str(data), "resolution": s.size},
           "lora": {"rank": s.rank, "preset": s.preset}, "device": s.device, "progress": False,
           "validation": {"prompts": []},
           "train": {"steps": s.steps, "batch_size": s.batch, "mixed_precision": s.precision,
                     "gradient_checkpointing": s.checkpointing, "checkpoint_every": s.steps, "lr": 1e-4,
                     "timestep_sampling": "uniform"}}
    marks: list[float] = []  # process CPU seconds at the end of each step
    with PeakMemory(cuda) as mem:
        train(cfg, out, on_step=lambda step, loss: marks.append(time.process_time()))
    times = [r["seconds"] for r in LossLog(out / "loss.csv").rows()][s.warmup:]
    return timing(times, marks, s.warmup, mem)


def timing(times: list[float], marks: list[float], warmup: int, mem: PeakMemory) -> dict:
    """steps/s from the timed steps' wall seconds, and CPU seconds per step (all threads of the process, from one
    step's end to the next: steadier than wall time on a shared machine)."""
    cpu = marks[-1] - marks[warmup - 1] if warmup >= 1 else marks[-1] - marks[0]
    n_cpu = len(marks) - max(warmup, 1)
    return {"steps_per_s": round(len(times) / sum(times), 3), "cpu_s_per_step": round(cpu / max(n_cpu, 1), 3),
            "peak_mib": mem.mib}


def run_plain(model_dir: Path, family: str, data: Path, s: argparse.Namespace, device: str, cuda: bool) -> dict:
    """(b) the plain diffusers-style loop (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    from runner.train.families import SPECS, make_adapter, target_modules

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision, torch.float32)
    with PeakMemory(cuda) as mem:
        # 1. Model, frozen, on the device; LoRA (fp32) on the same modules as t2i-train's preset.
        pipe = DiffusionPipeline.from_pretrained(str(model_dir))
        adapter = make_adapter(family, pipe, device, dtype)
        for m in adapter.frozen():
            m.requires_grad_(False)
            m.to(device, dtype=dtype)
        denoiser = adapter.denoiser
        torch.manual_seed(0)
        targets = target_modules(SPECS[family], s.preset, None, denoiser)
        denoiser.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                        target_modules=targets))
        params = [p for p in denoiser.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if s.checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        noise_sched = None if SPECS[family].flow else DDPMScheduler.from_config(pipe.scheduler.config)
        # 2. Data in memory: pixels in [-1, 1], captions encoded once.
        files = sorted(data.glob("*.png"))
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((s.size, s.size))))
                              .permute(2, 0, 1).float() / 127.5 - 1 for f in files])
        captions = [f.with_suffix(".txt").read_text() for f in files]
        gen = torch.Generator().manual_seed(0)
        amp = dtype != torch.float32
        conds: dict[int, dict] = {}
        times: list[float] = []
        marks: list[float] = []
        for step in range(s.steps):
            t0 = time.perf_counter()
            idx = [(step * s.batch + i) % len(files) for i in range(s.batch)]
            with torch.enable_grad(), torch.autocast(device_type=device, dtype=dtype, enabled=amp):
                with torch.no_grad():
                    latents = adapter.latents(pixels[idx], gen)
                    if idx[0] not in conds:
                        conds[idx[0]] = adapter.encode([captions[i] for i in idx])
                cond = conds[idx[0]]
                noise = torch.randn(latents.shape, generator=gen).to(latents)
                if noise_sched is None:
                    sig = torch.rand((latents.shape[0],), generator=gen).to(latents)
                    noisy = (1 - sig.view(-1, 1, 1, 1)) * latents + sig.view(-1, 1, 1, 1) * noise
                    pred, target = adapter.predict(noisy, sig, cond), noise - latents
                else:
                    t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],),
                                      generator=gen).to(latents.device)
                    noisy = noise_sched.add_noise(latents, noise, t)
                    target = noise if noise_sched.config.prediction_type == "epsilon" else \
                        noise_sched.get_velocity(latents, noise, t)
                    pred = adapter.predict(noisy, t, cond)
                loss = F.mse_loss(pred.float(), target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            marks.append(time.process_time())
        del pipe, adapter, denoiser, optimizer, params
    return timing(times[s.warmup:], marks, s.warmup, mem)


def model_for(family: str, s: argparse.Namespace, device: str) -> tuple[str, Path]:
    """(model id for t2i-train, pipeline folder for the plain loop)."""
    if not s.full or s.tiny_override:
        from runner.models.tiny import ensure_tiny

        return f"builtin:{TINY[family]}", ensure_tiny(family)
    cache = Path(s.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if family == "sd15":
        from models import ensure_sd15

        model_dir, _ = ensure_sd15(cache, device=device)
    else:
        from family_models import ensure_family

        model_dir, _ = ensure_family(family, cache, device=device)
    return str(model_dir), model_dir


def settings(args: argparse.Namespace, family: str, cuda: bool) -> argparse.Namespace:
    """The run's settings for one family: --full's GPU defaults (bf16, checkpointing, 1024²/512², rank 16,
    batch 1) unless given; --tiny-override keeps --full's code path on the tiny models (fp32 off CUDA)."""
    s = argparse.Namespace(**vars(args))
    if args.full:
        s.size = args.size or FULL_SIZE.get(family, 1024)
        s.rank = args.rank or 16
        s.batch = args.batch or 1
        s.checkpointing = True
        s.precision = args.precision or ("bf16" if cuda else "no")
    else:
        s.size, s.rank, s.batch = args.size or 32, args.rank or 4, args.batch or 2
        s.checkpointing = args.checkpointing
        s.precision = args.precision or "no"
    return s


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of steps/s")
    p.add_argument("--rounds", type=int, default=1, help="repeat (a)/(b), alternating which goes first")
    p.add_argument("--size", type=int, default=None, help="resolution (default 32; --full: 1024, SD 1.5 512)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4; --full: 16)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 2; --full: 1)")
    p.add_argument("--preset", default="attn", choices=["attn", "attn_mlp", "all_linear"])
    p.add_argument("--precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (always on with --full)")
    p.add_argument("--device", default="auto")
    p.add_argument("--full", action="store_true", help="full-size random-weight models on a GPU")
    p.add_argument("--tiny-override", action="store_true", help="with --full: the tiny models (rehearsal)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "t2i-bench"), help="--full models live here")
    p.add_argument("--benchmarks", type=Path, default=None, help="append the table to this Markdown file")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        print(f"--families: unknown family {bad[0]!r}; valid: {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    if args.warmup >= args.steps:
        print(f"--warmup={args.warmup} leaves no timed step of --steps={args.steps}; try --warmup "
              f"{max(0, args.steps - 2)}", file=sys.stderr)
        return 2
    from train_bench import make_images  # bench/train_bench.py: random images with captions

    from runner.models.source import resolve_device

    device = resolve_device(args.device)
    cuda = device == "cuda"
    work = Path(tempfile.mkdtemp(prefix="t2i-bench-train-"))
    rows = []
    try:
        for family in families:
            s = settings(args, family, cuda)
            model_id, model_dir = model_for(family, s, device)
            data = make_images(work / f"data-{family}", max(4, s.batch * 2), max(s.size, 32))
            for r in range(args.rounds):
                order = ("runner", "plain") if r % 2 == 0 else ("plain", "runner")
                for way in order:
                    try:
                        got = (run_runner(model_id, data, work / f"run-{family}", s, cuda) if way == "runner"
                               else run_plain(model_dir, family, data, s, device, cuda))
                    except torch.OutOfMemoryError as exc:  # a family too big for this GPU: a row, not a crash
                        got = {"steps_per_s": None, "cpu_s_per_step": None, "peak_mib": None,
                               "error": str(exc).splitlines()[0][:120]}
                        torch.cuda.empty_cache()
                    row = {"family": family, "way": way, "round": r, "size": s.size, "batch": s.batch,
                           "rank": s.rank, "precision": s.precision, "checkpointing": s.checkpointing,
                           "device": torch.cuda.get_device_name() if cuda else "cpu", **got}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(rows, args, argv)
    print(text)
    if args.benchmarks:
        with open(args.benchmarks, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def table(rows: list[dict], args: argparse.Namespace, argv: list[str] | None) -> str:
    """A Markdown section: per family, each way's best steps/s, lowest CPU seconds per step and lowest peak memory
    over the rounds (a process's first run also pays for imports and allocator pools), and the ratios (above 1:
    t2i-train is faster)."""
    import platform

    import torch

    cmd = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — `{cmd.strip()}`", "",
             f"{rows[0]['device'] if rows else '-'}, torch {torch.__version__}, {platform.machine()}; steps "
             f"{args.steps} (first {args.warmup} untimed), preset {args.preset}", "",
             "| family | size | batch | rank | precision | grad ckpt | t2i-train steps/s | plain steps/s | ratio "
             "| t2i-train CPU s/step | plain CPU s/step | CPU ratio | t2i-train peak MiB | plain peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        best = {}
        for way in ("runner", "plain"):
            ok = [r for r in mine if r["way"] == way and r["steps_per_s"]]
            best[way] = max(ok, key=lambda r: r["steps_per_s"]) if ok else None
        a, b, r0 = best["runner"], best["plain"], mine[0]
        peak = {w: min((r["peak_mib"] for r in mine if r["way"] == w and r["peak_mib"] is not None), default="-")
                for w in ("runner", "plain")}
        ratio = f"{a['steps_per_s'] / b['steps_per_s']:.2f}" if a and b else "-"
        cpu = {w: min((r["cpu_s_per_step"] for r in mine if r["way"] == w and r.get("cpu_s_per_step")), default=None)
               for w in ("runner", "plain")}
        cpu_ratio = f"{cpu['plain'] / cpu['runner']:.2f}" if cpu["runner"] and cpu["plain"] else "-"
        lines.append(f"| {family} | {r0['size']} | {r0['batch']} | {r0['rank']} | {r0['precision']} | "
                     f"{r0['checkpointing']} | {a['steps_per_s'] if a else 'OOM'} | {b['steps_per_s'] if b else 'OOM'}"
                     f" | {ratio} | {cpu['runner'] or '-'} | {cpu['plain'] or '-'} | {cpu_ratio} | {peak['runner']} | "
                     f"{peak['plain']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
