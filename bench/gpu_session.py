"""Everything issue 18 measures on a lent GPU, in ONE process and one call, with its own time guard.

Steps run in order of importance; a step is skipped (and says so) when the time left is below its estimate, so a
call never dies mid-way without results. Every finished step appends to `$OUT/gpu_results.md` and
`$OUT/gpu_results.json` at once (what is under $OUT comes back even if the call is killed).

    python bench/gpu_session.py --budget 540 --out $OUT                 # on the GPU machine
    python bench/gpu_session.py --rehearse --budget 900 --out /tmp/gr   # on CPU: tiny model, every step's code path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ways import (  # noqa: E402
    PROMPTS,
    Setup,
    last_timing,
    lora_switches,
    quiet,
    runner_cfg,
    way_cached,
    way_original,
    way_runner,
)


class Session:
    """Time guard + incremental reporting."""

    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.budget, self.start = out, budget, time.perf_counter()
        self.results: dict[str, object] = {}
        out.mkdir(parents=True, exist_ok=True)
        self.md = out / "gpu_results.md"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def write(self, text: str) -> None:
        print(text, flush=True)
        with open(self.md, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def save(self, key: str, value: object) -> None:
        self.results[key] = value
        (self.out / "gpu_results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def step(self, name: str, estimate: float, fn: Callable[[], object]) -> object:
        if self.left() < estimate:
            self.write(f"- SKIPPED {name}: {self.left():.0f} s left, needs ~{estimate:.0f} s")
            self.save(f"skipped:{name}", estimate)
            return None
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others' results
            self.write(f"- FAILED {name} after {time.perf_counter() - t:.1f} s: {type(exc).__name__}: {exc}")
            (self.out / f"error_{name.replace(' ', '_')}.txt").write_text(traceback.format_exc())
            self.save(f"failed:{name}", str(exc))
            return None
        self.write(f"- done {name} in {time.perf_counter() - t:.1f} s ({self.left():.0f} s left)")
        return value


def env_lines(device: str) -> str:
    import diffusers
    import peft
    import torch
    import transformers

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
             f"transformers {transformers.__version__}, peft {peft.__version__}"]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"card: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                  "power.limit", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            lines.append(f"nvidia-smi: {smi.stdout.strip()}")
    return "\n".join(lines)


def make_setup(args: argparse.Namespace) -> Setup:
    if args.rehearse:
        from runner.models.tiny import DIFFUSERS_LORA, KOHYA_LORA, ensure_tiny

        tiny = ensure_tiny()
        a = {"source": str(tiny / "loras" / DIFFUSERS_LORA[0]), "weight_name": DIFFUSERS_LORA[1], "name": "A"}
        b = {"source": str(tiny / "loras" / KOHYA_LORA), "name": "B"}
        return Setup("builtin:tiny", tiny, [[], [a], [b], [a, b]], PROMPTS[:1], list(range(2)), 2, 7.5, 32, "cpu")
    from models import ensure_sd15

    model_dir, loras = ensure_sd15(Path(args.cache), device="cuda", n_loras=2, rank=16)
    a = {"source": str(loras[0].parent), "weight_name": loras[0].name, "name": "A"}
    b = {"source": str(loras[1].parent), "weight_name": loras[1].name, "name": "B"}
    return Setup(str(model_dir), model_dir, [[], [a], [b], [a, b]], PROMPTS[:4], list(range(16)), 30, 7.5, 512,
                 "cuda")


def row(name: str, images: int, seconds: float, note: str = "") -> str:
    return f"| {name} | {images} | {seconds:.2f} | {images / seconds:.3f} | {seconds / images:.4f} | {note} |"


HEADER = "| way | images | seconds | images/s | s/image | notes |\n|---|---:|---:|---:|---:|---|"


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - a script of numbered steps
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole session")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.mkdtemp())))
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "t2i-bench"))
    p.add_argument("--rehearse", action="store_true", help="CPU, tiny model: exercise every step quickly")
    p.add_argument("--a-images", type=int, default=8, help="(a) measured on this many images, extrapolated")
    p.add_argument("--b-images", type=int, default=32, help="(b) measured on this many images, extrapolated")
    p.add_argument("--variants", default="default,auto+fuse_lora,auto+fuse_lora+channels_last+fuse_qkv,"
                   "b16+fuse_lora+channels_last+fuse_qkv+compile")
    p.add_argument("--late", default="", help="variants to run after the other steps (compile ones always are)")
    p.add_argument("--skip", default="", help="comma list of step names to skip")
    args = p.parse_args(argv)
    import torch

    torch.set_grad_enabled(False)
    quiet()
    s = Session(args.out, args.budget)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="t2i-gpu-"))
    s.write(f"\n## GPU session {time.strftime('%Y-%m-%d %H:%M')} — `python bench/gpu_session.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n")

    # 1. Machine, versions, the model (SD1.5 architecture, random weights, fp32 safetensors) and two LoRAs
    device = "cpu" if args.rehearse else "cuda"
    s.write(env_lines(device))
    setup = s.step("build model", 120, lambda: make_setup(args))
    if setup is None:
        return 1
    jobs = setup.jobs()
    n = len(jobs)
    s.write(f"sweep: {len(setup.prompts)} prompts x {len(setup.seeds)} seeds x {len(setup.lora_sets)} LoRA sets "
            f"(none, A, B, A+B; rank-16 attention LoRAs) = {n} images, {setup.size}px, {setup.steps} Euler steps, "
            f"CFG {setup.guidance}\n\n{HEADER}")
    rows: dict[str, float] = {}  # name -> s/image

    # 2. (a) the original design's way, on a spread-out subset (extrapolated)
    def original() -> None:
        sub = jobs[:: max(1, n // args.a_images)][: args.a_images]
        (work / "a").mkdir()
        secs = way_original(setup, sub, work / "a")
        rows["original"] = secs / len(sub)
        s.write(row("(a) original: from_pretrained+.to per image, LoRAs per image, b1, fp32", len(sub), secs,
                    f"measured on {len(sub)} of {n} images (evenly over the LoRA sets); s/image extrapolates"))
        s.save("original_s_per_image", rows["original"])

    if "original" not in skip:
        s.step("original", 60 if not args.rehearse else 30, original)

    # 3. (b) a plain cached diffusers loop (fp16 on cuda), batch 1, on a subset
    def cached() -> None:
        from runner.models.source import resolve_dtype

        sub = jobs[:: max(1, n // args.b_images)][: args.b_images]
        (work / "b").mkdir()
        secs, _ = way_cached(setup, sub, work / "b", resolve_dtype("auto", device))
        rows["cached"] = secs / len(sub)
        dtype = str(resolve_dtype("auto", device)).replace("torch.", "")
        s.write(row(f"(b) diffusers loop, cached pipeline, b1, {dtype}", len(sub), secs,
                    f"measured on {len(sub)} of {n} images; after a 1-image warm-up"))
        s.save("cached_s_per_image", rows["cached"])

    if "cached" not in skip:
        s.step("cached", 45 if not args.rehearse else 30, cached)

    # 4. the runner's configurations, all images each (after a warm-up run); slow ones (compile) after step 10
    def run_variant(v: str) -> None:
        def one() -> None:
            secs, _, note = way_runner(setup, v, work / "c" / v, False)
            rows[v] = secs / n
            s.write(row(f"(c) runner [{v}]", n, secs, note))
            s.save(f"runner:{v}", {"s_per_image": secs / n, **last_timing.get(v, {})})

        s.step(f"runner {v}", (170 if "compile" in v else 60) if not args.rehearse else 30, one)
        from runner.models.loading import clear_cache

        clear_cache()  # each configuration starts from a fresh pipeline (perf options are process state)
        if device == "cuda":
            torch.cuda.empty_cache()

    variants = args.variants.split(",")
    late = [v for v in variants if "compile" in v or v in args.late.split(",")]
    for v in variants:
        if v not in late:
            run_variant(v)

    # 5. batch size vs images/s (what batch_size=auto measures), 10 steps
    def batch_curve() -> None:
        from runner.config import validate
        from runner.run import run

        lines = ["| batch | images/s | peak GiB |", "|---:|---:|---:|"]
        curve = []
        for b in ([1, 2, 4] if args.rehearse else [4, 8, 16, 24, 32, 48]):
            cfg = {**runner_cfg(setup, "b16+fuse_lora+channels_last"), "batch_size": b, "steps": 10,
                   "lora_sets": [[]], "prompts": setup.prompts[:1], "seeds": list(range(b))}
            run(validate({**cfg, "seeds": [0]}), work / f"bw{b}", progress=False)  # warm
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            run(validate(cfg), work / f"bc{b}", progress=False)
            secs = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
            curve.append((b, b / secs, peak))
            lines.append(f"| {b} | {b / secs:.2f} | {peak:.1f} |")
        s.write("\nbatch size at 512², 10 steps, no LoRA (each after a 1-image warm-up):\n" + "\n".join(lines))
        s.save("batch_curve", curve)

    if "batch" not in skip:
        s.step("batch curve", 40 if not args.rehearse else 30, batch_curve)

    # 6. GPU memory over 100 LoRA-set switches (merge engine)
    def switches() -> None:
        line = lora_switches(setup, "auto+fuse_lora+channels_last", 100)
        s.write("\n" + line)
        s.save("switches", line)

    if "switches" not in skip:
        s.step("switches", 30, switches)

    # 7. forced out-of-memory: the batch halves and every image is made once
    def oom() -> None:
        from runner.config import validate
        from runner.outputs.manifest import Manifest
        from runner.run import run

        cfg = {**runner_cfg(setup, "b16+fuse_lora"), "batch_size": 16, "steps": 4, "lora_sets": [[]],
               "prompts": setup.prompts[:1], "seeds": list(range(32))}
        if device == "cuda":
            run(validate({**cfg, "batch_size": 4, "seeds": list(range(4))}), work / "oomw", progress=False)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run(validate({**cfg, "batch_size": 4, "seeds": list(range(4))}), work / "oom4", progress=False)
            p4 = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run(validate({**cfg, "batch_size": 8, "seeds": list(range(8))}), work / "oom8", progress=False)
            p8 = torch.cuda.max_memory_allocated()
            total = torch.cuda.get_device_properties(0).total_memory
            limit = p8 + 0.5 * (p8 - p4)  # fits 8, not 16 (peak grows about linearly with the batch)
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(limit / total)
            how = f"set_per_process_memory_fraction({limit / total:.4f}) = {limit / 2**30:.2f} GiB " \
                  f"(peak b4 {p4 / 2**30:.2f}, b8 {p8 / 2**30:.2f} GiB)"
            ctx = contextlib.nullcontext()
        else:  # rehearsal: an injected OOM for batches over 8
            import runner.generate.batch as gb

            real = gb.generate

            def fake(pipe, jobs, invariant, *args):
                if len(jobs) > 8:
                    raise torch.OutOfMemoryError("CUDA out of memory (injected)")
                return real(pipe, jobs, invariant, *args)

            @contextlib.contextmanager
            def patched():
                gb.generate = fake
                try:
                    yield
                finally:
                    gb.generate = real

            ctx, how = patched(), "injected OOM above 8 images"
        try:
            with ctx:
                result = run(validate(cfg), work / "oom", progress=False)
        finally:
            if device == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
        entries = Manifest(work / "oom").entries()
        files = [e["file"] for e in entries]
        sizes = sorted({e["batch_size"] for e in entries})
        faults = sum(1 for e in entries if e.get("faults"))
        ok = len(entries) == 32 and len(set(files)) == 32 and len({e["seed"] for e in entries}) == 32
        s.write(f"\nforced OOM ({how}): batch_size=16, 32 images -> {result.generated} generated, "
                f"{len(entries)} manifest lines, {len(set(files))} distinct files, batch sizes used {sizes}, "
                f"{faults} images record the OOM fault; every image exactly once: {ok}")
        s.save("oom", {"ok": ok, "sizes": sizes, "faults": faults, "how": how})

    if "oom" not in skip:
        s.step("oom", 40, oom)

    # 8. NaN/black images from an fp16 VAE that overflows: detected; fixed by the fp32-VAE retry
    def nan() -> None:
        from runner.config import validate
        from runner.outputs.manifest import Manifest
        from runner.run import run

        bad = work / "nanvae"
        bad.mkdir()
        for item in setup.model_dir.iterdir():
            if item.name != "vae":
                (bad / item.name).symlink_to(item)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(setup.model_dir / "vae"))
        with torch.no_grad():  # weights still fp16-representable, activations past fp16's 65504 after conv_in
            factor = 3e4 / float(vae.decoder.conv_in.weight.abs().max())  # (GroupNorm then makes fp32 fine)
            vae.decoder.conv_in.weight.mul_(factor)
        vae.save_pretrained(str(bad / "vae"), safe_serialization=True)
        cfg = {**runner_cfg(setup, "b16"), "model": {"id": str(bad), "dtype": "fp16"}, "steps": 4,
               "lora_sets": [[]], "prompts": setup.prompts[:1], "seeds": [0, 1], "batch_size": 2}
        out = {}
        for retry in (False, True):
            run(validate({**cfg, "nan_retry_fp32_vae": retry}), work / f"nan{retry}", progress=False)
            entries = Manifest(work / f"nan{retry}").entries()
            out[retry] = [e.get("faults") for e in entries]
        s.write(f"\nfp16 VAE overflow (decoder.conv_in weights x{factor:.0f}): without retry faults={out[False]}; "
                f"with nan_retry_fp32_vae=true faults={out[True]}")
        s.save("nan", {str(k): v for k, v in out.items()})

    if "nan" not in skip:
        s.step("nan", 40, nan)

    # 9. VAE decode overlapped with the next batch's UNet (a prototype on the cached pipeline: kept in the runner
    #    only if it measures faster)
    def overlap() -> None:
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np
        from diffusers import StableDiffusionPipeline

        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(str(setup.model_dir), dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)
        pipe.set_progress_bar_config(disable=True)
        b, nb = (16, 4) if device == "cuda" else (2, 2)
        kw = {"num_inference_steps": setup.steps, "guidance_scale": setup.guidance, "width": setup.size,
              "height": setup.size}

        def call(k: int, output_type: str):
            gens = [torch.Generator("cpu").manual_seed(k * b + i) for i in range(b)]
            return pipe(prompt=[setup.prompts[k % len(setup.prompts)]] * b, generator=gens,
                        output_type=output_type, **kw).images

        def plain() -> list:
            return [img for k in range(nb) for img in call(k, "pil")]

        def overlapped() -> list:
            stream = torch.cuda.Stream() if device == "cuda" else None
            pool, futures = ThreadPoolExecutor(1), []
            for k in range(nb):
                latents = call(k, "latent")
                ready = torch.cuda.Event() if stream else None
                if ready:
                    ready.record()

                def decode(latents=latents, ready=ready):
                    ctx = torch.cuda.stream(stream) if stream else contextlib.nullcontext()
                    with ctx, torch.no_grad():
                        if stream:
                            stream.wait_event(ready)
                        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
                        out = pipe.image_processor.postprocess(image, output_type="pil")
                    return out

                futures.append(pool.submit(decode))
            return [img for f in futures for img in f.result()]

        plain()  # warm-up (allocator, cuDNN)
        times = {}
        for name, fn in (("plain", plain), ("overlapped", overlapped), ("plain again", plain)):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            imgs = fn()
            times[name] = (time.perf_counter() - t) / len(imgs)
            if name == "plain":
                ref = imgs
            if name == "overlapped":
                same = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(c, dtype=np.int16)).max())
                           for a, c in zip(ref, imgs, strict=True))
        base = (times["plain"] + times["plain again"]) / 2
        s.write(f"\nVAE decode overlap (cached pipeline, batch {b}, {nb} batches, no LoRA): plain "
                f"{times['plain']:.4f} / {times['plain again']:.4f} s/image, overlapped {times['overlapped']:.4f} "
                f"s/image ({100 * (times['overlapped'] / base - 1):+.1f}%); max pixel diff vs plain {same}")
        s.save("overlap", {**times, "max_pixel_diff": same})

    if "overlap" not in skip:
        s.step("overlap", 35, overlap)

    # 10. where the time goes: one batch of the best eager configuration under the torch profiler
    def profile() -> None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        from runner.config import validate
        from runner.run import run

        cfg = {**runner_cfg(setup, "b16+fuse_lora+channels_last"), "steps": 5 if device == "cuda" else 1,
               "lora_sets": [[]], "prompts": setup.prompts[:1], "seeds": list(range(16 if device == "cuda" else 2))}
        run(validate(cfg), work / "profw", progress=False)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with prof(activities=acts) as p:
            run(validate(cfg), work / "prof", progress=False)
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        table = p.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
        (s.out / "profile.txt").write_text(table)
        s.write("\nprofile (batch 16, 5 steps, no LoRA; top ops by device time; full table in profile.txt):\n```\n"
                + "\n".join(table.splitlines()[:24]) + "\n```")

    if "profile" not in skip:
        s.step("profile", 25, profile)

    # 11. the slow configurations last: compile (its warm-up) and anything else named
    for v in late:
        run_variant(v)

    # 12. summary
    best = min((k for k in rows if k not in ("original", "cached")), key=lambda k: rows[k], default=None)
    if best and "original" in rows:
        over = (s.results.get(f"runner:{best}") or {}).get("lora_overhead_pct")
        sw = str(s.results.get("switches", ""))
        drift = sw.rsplit("(", 1)[-1].rstrip(")%") if "(" in sw else "?"
        s.write(f"\nbest: {best}; GPU summary (draft): runner_s_per_image={rows[best]:.4f} "
                f"original_s_per_image={rows['original']:.3f} ratio={rows['original'] / rows[best]:.1f} "
                f"lora_overhead_pct={over if over is None else round(over, 1)} mem_drift_pct={drift}")
    s.write(f"\nsession used {time.perf_counter() - s.start:.0f} s of {args.budget:.0f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
