"""`run(cfg)`: validate → plan → load → generate → write. The CLI and the server are thin shells over this."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .config import RunSpec, validate
from .config.validate import SETTING_KEYS
from .generate import faults
from .generate.sizing import BatchSizer
from .outputs.record import build_record, perf_record, summary_note
from .plan import expand, shard

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run did: counts, timing, where it wrote, and the manifest entries of this run's images."""

    output_dir: Path
    planned: int
    generated: int
    skipped: int
    seconds: float
    entries: list[dict] = field(default_factory=list)
    interrupted: bool = False  # stopped early by Ctrl-C (the finished images are kept)
    grids: list[Path] = field(default_factory=list)  # comparison grids written (outputs/grid.py)

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"t2i: {self.generated} images generated, {self.skipped} already done, in {self.seconds:.1f} s "
                f"({self.images_per_second:.2f} images/s) -> {self.output_dir}"
                + (" (interrupted; re-run the same command to finish)" if self.interrupted else "")
                + summary_note(self.entries))




@dataclass
class ModelPlan:
    """One model of the run's model axis: what it is (read before loading) and the run as this model sees it."""

    info: Any  # runner.models.info.ModelInfo
    spec: RunSpec  # the run with this model's resolved settings


def plan_models(spec: RunSpec, lora_sets: list[tuple]) -> list[ModelPlan]:
    """Resolve and check every model of the run before the first loads: its family, its settings (user keys,
    group settings, pipeline defaults), the keys its family cannot honour, memory modes and LoRA families."""
    from .lora.family_keys import check_lora_family
    from .models.info import check_model, check_transformer_file, model_infos, spec_for
    from .models.memory import check_memory
    from .models.source import resolve_device

    device = resolve_device(spec.device)
    plans = []
    for i, info in enumerate(model_infos(spec)):
        where = f"models[{i}] ({info.config.id}): " if spec.models else ""
        mspec = spec_for(spec, info)
        check_model(spec, info, {k: getattr(mspec, k) for k in SETTING_KEYS}, where)
        check_memory(spec.memory, device, info.family, where)
        check_transformer_file(info, where)
        for s, loras in enumerate(lora_sets):
            for r in loras:
                check_lora_family(r.file, info.family, info.config.id, f"{where}lora_sets[{s}]: ")
        plans.append(ModelPlan(info, mspec))
    return plans


def _load(plan: ModelPlan, spec: RunSpec, lora_sets: list[tuple], threads: Any, jobs: list) -> Any:
    """Load one model of the axis with its LoRA adapters (checked against it), check its scheduler x steps
    pairs, and set its memory switches."""
    from .generate.prompt_embeds import clip_skip_applies
    from .lora.adapters import AdapterManager
    from .models.loading import load_model
    from .models.memory import apply_memory
    from .models.schedulers import preflight

    loaded = load_model(plan.info.config, spec.device, plan.info, spec.memory.offload)
    loaded.threads = threads
    if loaded.adapters is None:
        loaded.adapters = AdapterManager(loaded.pipe, spec.max_loaded_loras)
    loaded.adapters.max_loaded = spec.max_loaded_loras
    loaded.adapters.preload(lora_sets)  # a LoRA that does not fit the model fails before any write
    preflight(loaded.base_scheduler, {(j.scheduler, j.schedule, j.steps) for j in jobs})  # before its images
    if loaded.family.is_sd and any((s or 1) > 1 for s in spec.clip_skip) and not clip_skip_applies(loaded.pipe):
        log.warning("clip_skip has no effect on %s: as in A1111, Clip skip applies to SD 1.x only (SDXL and SD 2.x "
                    "keep their own text-encoder layer); recorded with clip_skip_applied=false",
                    type(loaded.pipe).__name__)
    apply_memory(loaded, spec.memory)
    _warn_long_prompts(loaded, spec)
    return loaded


def _warn_long_prompts(loaded: Any, spec: RunSpec) -> None:
    from .generate.batch import prompt_tokens

    if loaded.family is None or loaded.family.max_sequence is not None:
        return  # T5/Qwen text encoders read max_sequence_length tokens, not CLIP's 77
    for i, p in enumerate(spec.prompts):
        for text in (p.prompt, p.negative_prompt):
            n = prompt_tokens(loaded.pipe, text) if text else 0
            if n > 77:
                log.warning("prompts[%d] is %d tokens; CLIP reads only the first 77, the rest is ignored", i, n)


def run(cfg: DictConfig | RunSpec, output_dir: str | Path, progress: bool = True,
        on_image: Callable[[dict], None] | None = None) -> RunResult:
    """Generate every image of `cfg` that `output_dir`'s manifest does not already hold."""
    from tqdm import tqdm

    from .generate.threads import use_threads
    from .lora.files import resolve_loras
    from .models.loading import release
    from .outputs.manifest import Manifest
    from .outputs.writer import ImageWriter

    # 1. Check inputs: the config, grid axes, LoRA files and every model of the axis (nothing loads yet)
    spec = cfg if isinstance(cfg, RunSpec) else validate(cfg)
    if spec.grid.enabled:
        from .outputs.grid import check_axes

        check_axes(spec.grid)
    lora_sets = resolve_loras(spec)
    plans = plan_models(spec, lora_sets)
    threads = use_threads(spec.threads)
    # 2. Plan every image, the model outermost (index = position in the whole plan), then shard
    jobs: list = []
    for i, plan in enumerate(plans):
        jobs += expand(plan.spec, plan.info.key(spec.device), model_index=i, start=len(jobs))
    jobs = shard(jobs, spec.shard.index, spec.shard.count)
    # 3. Load the first model that has work (LoRAs and schedulers checked against it) before anything is written
    out = Path(output_dir)
    manifest = Manifest(out)
    done = manifest.recover() if spec.resume and out.is_dir() else {}
    todo = [j for j in jobs if j.key not in done]
    todo_models = sorted({j.model_index for j in todo}) or [0]
    mine = [j for j in todo if j.model_index == todo_models[0]]
    loaded = _load(plans[todo_models[0]], spec, lora_sets, threads, mine)
    out.mkdir(parents=True, exist_ok=True)
    invariant = loaded.device == "cpu" if spec.batch_invariant is None else spec.batch_invariant
    result = RunResult(out, len(jobs), 0, len(jobs) - len(todo), 0.0)
    bar = tqdm(total=len(jobs), initial=result.skipped, unit="img", disable=not progress, dynamic_ncols=True)

    def finished(entry: dict) -> None:
        result.generated += 1
        result.entries.append(entry)
        bar.update(1)
        if on_image is not None:
            on_image(entry)

    # 4. Generate model by model: each loaded once, the previous one released
    start = time.perf_counter()
    writer = ImageWriter(out, manifest, threads=spec.perf.writer_threads, on_done=finished)
    try:
        with faults.InterruptGuard() as stop:
            for n, m in enumerate(todo_models):
                if stop.requested:
                    break
                mine = [j for j in todo if j.model_index == m]
                if n > 0:  # the next model of the axis: the previous one is released first
                    release(loaded)
                    loaded = _load(plans[m], spec, lora_sets, threads, mine)
                _generate_model(loaded, mine, lora_sets, spec, invariant, writer, stop)
        writer.close()
        result.interrupted = stop.requested and result.generated + result.skipped < result.planned
    except OSError as exc:
        raise faults.output_error(exc, out, result.generated) from exc
    finally:
        faults.close_quietly(writer)
        bar.close()
        result.seconds = time.perf_counter() - start
    if spec.grid.enabled:  # grids cover the whole run dir's manifest, not only this run's images
        from .outputs.grid import write_grids

        result.grids = write_grids(out, spec.grid)
    return result


def _cfg(job: Any) -> bool:
    """Whether a job runs the denoiser twice per step (CFG or true CFG): a batch-size shape component."""
    return (job.guidance_scale or 0) > 1 or (job.true_cfg_scale or 0) > 1


def _generate_model(loaded: Any, jobs: list, lora_sets: list[tuple], spec: RunSpec, invariant: bool, writer: Any,
                    stop: Any) -> None:
    """Every image of one model: fast path resolved for its work, batches sized, LoRA sets switched, images
    generated, recorded and queued for writing."""
    from .generate.batch import default_size, generate
    from .generate.fastpath import apply_perf, image_steps, resolve_perf
    from .generate.prompt_embeds import prompt_embeds
    from .lora.files import touches_text_encoder

    dw, dh = default_size(loaded.pipe)
    perf = resolve_perf(spec.perf, loaded.device, image_steps(jobs, (dw, dh)))
    apply_perf(loaded, perf, uses_loras=any(lora_sets))
    handler = faults.FaultHandler(loaded.pipe, spec.nan_retry_fp32_vae)
    sizer = BatchSizer(spec.batch_size, loaded.device, cap=lambda: handler.cap, probe=not perf.compile,
                       shape_of=lambda j: (j.model_key, j.width or dw, j.height or dh, _cfg(j)))
    embeds = prompt_embeds(loaded)
    pipe = loaded.pipe
    for batch in sizer.batches(jobs):
        if stop.requested:
            break
        first = batch[0]
        loaded.use_scheduler(first.scheduler, first.schedule)
        loras = lora_sets[first.lora_set]
        loaded.adapters.activate(loras, first.adapter_weights)
        # what the text encoder computes with (the cache key): its LoRAs at their weights, and how they are
        # applied (peft layers or merged weights round differently)
        te_state = (tuple(sorted(perf_record(loaded).items())),
                    *((r.sha256, w) for r, w in zip(loras, first.adapter_weights, strict=True)
                      if touches_text_encoder(r)))
        for made in handler.generate(lambda js, te=te_state: generate(pipe, js, invariant, embeds, te), batch):
            rec = build_record(made.job, loaded, lora_sets[made.job.lora_set], made.image.width,
                               made.image.height, made.batch_size, invariant)
            if "compare" in spec.extra:  # from_image: compare with the original (reproduce.py)
                rec["reproduced"] = spec.extra["compare"](made.image, rec)
            writer.submit(made.image, faults.annotate(rec, made))
