"""The three ways of bench_sweep.py: (a) the original design, (b) a cached diffusers loop, (c) the runner."""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import time
from dataclasses import dataclass
from pathlib import Path

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in the snow, watercolor",
    "a lighthouse at dusk, oil painting",
    "a bowl of ramen, studio lighting",
]
# (c) configurations: name -> (batch_size, batch_invariant, perf overrides)
VARIANTS = {
    "default": ("auto", "auto", {}),
    "b16": (16, False, {}),
    "b16+fuse_lora": (16, False, {"fuse_lora": True}),
    "b16+channels_last": (16, False, {"channels_last": True}),
    "b16+fuse_lora+channels_last": (16, False, {"fuse_lora": True, "channels_last": True}),
    "b16+fuse_qkv": (16, False, {"fuse_qkv": True}),
    "b16+fuse_qkv+channels_last+compile": (16, False, {"fuse_qkv": True, "channels_last": True, "compile": True}),
    "b16+compile": (16, False, {"compile": True}),
    "b16+fuse_lora+channels_last+compile": (16, False, {"fuse_lora": True, "channels_last": True, "compile": True}),
    "auto+fuse_lora": ("auto", "auto", {"fuse_lora": True}),
    "auto+fuse_lora+channels_last": ("auto", "auto", {"fuse_lora": True, "channels_last": True}),
    "auto+fuse_lora+channels_last+fuse_qkv": ("auto", "auto", {"fuse_lora": True, "channels_last": True,
                                                                "fuse_qkv": True}),
    "b32+fuse_lora+channels_last+fuse_qkv": (32, False, {"fuse_lora": True, "channels_last": True,
                                                         "fuse_qkv": True}),
    "b16+fuse_lora+channels_last+fuse_qkv+compile": (16, False, {"fuse_lora": True, "channels_last": True,
                                                                 "fuse_qkv": True, "compile": True}),
}


@dataclass
class Setup:
    model_id: str  # what the runner loads (builtin:tiny or a folder)
    model_dir: Path  # what from_pretrained loads in (a) and (b)
    lora_sets: list[list[dict]]  # runner-style specs: {source, weight_name, name}
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    size: int
    device: str
    family: str = "sd15"  # the model family (runner/models/families.py) of model_dir

    def jobs(self) -> list[tuple[str, int, int]]:
        return [(p, s, i) for i in range(len(self.lora_sets)) for p in self.prompts for s in self.seeds]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(setup: Setup, dtype):
    from diffusers import DiffusionPipeline

    extra = {"safety_checker": None, "requires_safety_checker": False} if setup.family == "sd15" else {}
    pipe = DiffusionPipeline.from_pretrained(str(setup.model_dir), use_safetensors=True, dtype=dtype, **extra)
    pipe = pipe.to(setup.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, setup: Setup, prompt: str, seed: int):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    # what a plain diffusers user passes: an empty negative prompt (Qwen-Image: with its default true CFG 4.0, as
    # its model card does), no guidance_scale on Qwen-Image; Flux.2's first argument is an image: keywords only
    extra = {"negative_prompt": ""} if setup.family in ("sd15", "sdxl", "sd3", "zimage", "qwenimage") else {}
    if setup.family != "qwenimage":
        extra["guidance_scale"] = setup.guidance
    return pipe(prompt=prompt, num_inference_steps=setup.steps, width=setup.size, height=setup.size, generator=gen,
                **extra).images[0]


def _set_loras(pipe, specs: list[dict], names: list[str]) -> None:
    if specs:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
    elif pipe.get_list_adapters():
        pipe.disable_lora()


def way_original(setup: Setup, jobs: list, out: Path) -> float:
    """(a) the seed's create_pipe + incorplora_safetensor per request, one image each, fp32."""
    import torch

    start = time.perf_counter()
    for i, (prompt, seed, s) in enumerate(jobs):
        pipe = _load(setup, torch.float32)
        names = []
        for j, spec in enumerate(setup.lora_sets[s]):
            pipe.load_lora_weights(spec["source"], weight_name=spec.get("weight_name"), adapter_name=f"l{j}")
            names.append(f"l{j}")
        _set_loras(pipe, setup.lora_sets[s], names)
        _image(pipe, setup, prompt, seed).save(out / f"a{i:04d}.png")
        del pipe
    _sync(setup.device)
    return time.perf_counter() - start


def way_cached(setup: Setup, jobs: list, out: Path, dtype) -> tuple[float, float]:
    """(b) a cached pipeline, each LoRA loaded once, batch 1 (after a one-image warm-up)."""
    pipe = _load(setup, dtype)
    _image(pipe, setup, jobs[0][0], jobs[0][1])
    loaded: set[str] = set()
    start, cpu = time.perf_counter(), time.process_time()
    for i, (prompt, seed, s) in enumerate(jobs):
        names = []
        for spec in setup.lora_sets[s]:
            if spec["name"] not in loaded:
                pipe.load_lora_weights(
                    spec["source"], weight_name=spec.get("weight_name"), adapter_name=spec["name"]
                )
                loaded.add(spec["name"])
            names.append(spec["name"])
        _set_loras(pipe, setup.lora_sets[s], names)
        _image(pipe, setup, prompt, seed).save(out / f"b{i:04d}.png")
    _sync(setup.device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    del pipe
    return seconds, cpu


class SubmitTimer:
    """Patches ImageWriter.submit to add up the time the generating thread spends blocked on hand-off."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    @contextlib.contextmanager
    def active(self):
        from runner.outputs.writer import ImageWriter

        original = ImageWriter.submit

        def timed(writer, *args, **kwargs):
            t = time.perf_counter()
            try:
                return original(writer, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1

        ImageWriter.submit = timed
        try:
            yield self
        finally:
            ImageWriter.submit = original


class SetTimer:
    """Time in LoRA-set switches and pipeline calls, split by whether the batch uses LoRAs (the LoRA overhead)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = {True: 0.0, False: 0.0}
        self.images = {True: 0, False: 0}
        self.batches: list[int] = []

    @contextlib.contextmanager
    def active(self):
        import runner.generate.batch as gb
        from runner.lora.adapters import AdapterManager

        gen, act = gb.generate, AdapterManager.activate

        def timed_generate(pipe, jobs, invariant, *args):  # args: the prompt-embedding cache and its key
            t = time.perf_counter()
            out = gen(pipe, jobs, invariant, *args)  # PIL images: the device has finished
            key = bool(jobs[0].loras)
            self.seconds[key] += time.perf_counter() - t
            self.images[key] += len(jobs)
            self.batches.append(len(jobs))
            return out

        def timed_activate(manager, loras, weights, *blocks):
            t = time.perf_counter()
            act(manager, loras, weights, *blocks)
            _sync(self.device)
            self.seconds[bool(loras) and any(w != 0 for w in weights)] += time.perf_counter() - t

        gb.generate, AdapterManager.activate = timed_generate, timed_activate
        try:
            yield self
        finally:
            gb.generate, AdapterManager.activate = gen, act

    def overhead_pct(self) -> float | None:
        """Per-image time of LoRA images over no-LoRA images, minus 1, in percent."""
        if not (self.images[True] and self.images[False]):
            return None
        per = {k: self.seconds[k] / self.images[k] for k in (True, False)}
        return 100 * (per[True] / per[False] - 1)


def runner_cfg(setup: Setup, variant: str) -> dict:
    """The runner config of the sweep in configuration `variant`."""
    import torch

    base = variant.removesuffix("+bf16").removesuffix("+cudnn_benchmark")
    batch, invariant, perf = VARIANTS[base]
    return {
        "threads": torch.get_num_threads(),  # the same CPU threads as ways (a) and (b)
        "model": {"id": setup.model_id, "dtype": "bf16" if "+bf16" in variant else "auto"},
        "prompts": setup.prompts,
        "seeds": setup.seeds,
        "steps": setup.steps,
        "guidance_scale": None if setup.family == "qwenimage" else setup.guidance,
        "width": setup.size,
        "height": setup.size,
        "device": setup.device,
        "lora_sets": setup.lora_sets,
        "batch_size": batch,
        "batch_invariant": invariant,
        "perf": perf,
        "resume": False,
        "grid": {"enabled": False},
    }


def _memory(device: str) -> float:
    """Bytes in use: allocated GPU memory on cuda, resident set size on cpu."""
    import os

    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.memory_allocated())
    return float(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


last_timing: dict[str, dict] = {}  # variant -> LoRA overhead and batch sizes of its last timed run


def way_runner(setup: Setup, variant: str, out: Path, profile: bool) -> tuple[float, float, str]:
    """(c) runner.run.run after a warm-up (1 prompt x 1 seed x every LoRA set): (seconds, cpu, note)."""
    import torch

    from runner.config import validate
    from runner.run import run

    cfg = runner_cfg(setup, variant)
    torch.backends.cudnn.benchmark = "+cudnn_benchmark" in variant  # cuDNN times conv algorithms (warm-up too)
    # compile variants warm up on one prompt x every seed x every set: every batch shape of the sweep (and every
    # set, which must not recompile: sets are merged into the weights) is compiled before timing
    small = {**cfg, "prompts": setup.prompts[:1], "seeds": setup.seeds if "compile" in variant else setup.seeds[:1]}
    warm = validate(small)
    t = time.perf_counter()
    run(warm, out / "warmup", progress=False)
    warmup = time.perf_counter() - t
    timer, prof, sets = SubmitTimer(), cProfile.Profile() if profile else None, SetTimer(setup.device)
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from runner.generate import sizing

    sizing._TUNED.clear()  # every configuration measures its own batch size (the warm-up is too small to)
    cpu = time.process_time()
    with timer.active(), sets.active():
        if prof:
            prof.enable()
        result = run(validate(cfg), out / "run", progress=False)
        if prof:
            prof.disable()
    _sync(setup.device)
    cpu = time.process_time() - cpu
    torch.backends.cudnn.benchmark = False
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(18)
        print(f"--- cProfile of (c) runner [{variant}] ---\n{text.getvalue()}")
    note = f"writer.submit blocked {timer.seconds:.3f} s over {timer.calls} images; warm-up {warmup:.1f} s"
    overhead = sets.overhead_pct()
    if overhead is not None:
        note += f"; LoRA overhead {overhead:+.1f}%"
    sizes = sorted(set(sets.batches))
    note += f"; batch sizes {sizes if len(sizes) < 6 else sizes[:3] + ['…'] + sizes[-2:]}"
    last_timing[variant] = {"lora_overhead_pct": overhead, "batches": sets.batches}
    if setup.device == "cuda":
        note += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return result.seconds, cpu, note


def lora_switches(setup: Setup, variant: str, switches: int) -> str:
    """Cycle the cached pipeline through the LoRA sets `switches` times: memory drift and switch time."""
    from runner.config import validate
    from runner.generate.fastpath import apply_perf
    from runner.lora.adapters import AdapterManager
    from runner.lora.files import resolve_loras
    from runner.models.loading import load_model

    spec = validate(runner_cfg(setup, variant))
    loaded = load_model(spec.model, spec.device)
    sets = resolve_loras(spec)
    if loaded.adapters is None:
        loaded.adapters = AdapterManager(loaded.pipe, spec.max_loaded_loras)
    apply_perf(loaded, spec.perf, uses_loras=any(sets))
    for s in sets:  # one full cycle first: every adapter loaded
        loaded.adapters.activate(s, tuple(1.0 for _ in s))
    before, t = _memory(setup.device), time.perf_counter()
    for i in range(switches):
        s = sets[i % len(sets)]
        loaded.adapters.activate(s, tuple(1.0 for _ in s))
    seconds, after = time.perf_counter() - t, _memory(setup.device)
    what = "GPU memory allocated" if setup.device == "cuda" else "process RSS"
    return (
        f"LoRA-set switches [{variant}]: {switches} switches over {len(sets)} sets, "
        f"{1000 * seconds / max(1, switches):.1f} ms each; {what} {before / 2**20:.1f} MiB -> "
        f"{after / 2**20:.1f} MiB ({100 * (after - before) / before:+.2f}%)"
    )
