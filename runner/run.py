"""`run(cfg)`: validate → plan → load → generate → write. The CLI and the server are thin shells over this."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from .config import RunSpec, validate
from .generate import faults
from .generate.sizing import BatchSizer
from .outputs.record import build_record, summary_note
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


def run(cfg: DictConfig | RunSpec, output_dir: str | Path, progress: bool = True,
        on_image: Callable[[dict], None] | None = None) -> RunResult:
    """Generate every image of `cfg` that `output_dir`'s manifest does not already hold."""
    from tqdm import tqdm

    from .generate.batch import default_size, generate, prompt_tokens
    from .generate.fastpath import apply_perf, image_steps, resolve_perf
    from .lora.adapters import AdapterManager
    from .lora.blocks import block_resolver
    from .lora.files import expand_checkpoints, resolve_loras
    from .models.loading import load_model
    from .outputs.manifest import Manifest
    from .outputs.writer import ImageWriter

    spec = expand_checkpoints(cfg if isinstance(cfg, RunSpec) else validate(cfg))  # a glob: one set per file
    if spec.grid.enabled:
        from .outputs.grid import check_axes

        check_axes(spec.grid)
    lora_sets = resolve_loras(spec)
    loaded = load_model(spec.model, spec.device)
    pipe = loaded.pipe
    if loaded.adapters is None:
        loaded.adapters = AdapterManager(pipe, spec.max_loaded_loras)
    loaded.adapters.max_loaded = spec.max_loaded_loras
    loaded.adapters.preload(lora_sets)  # a LoRA that does not fit the model fails before any write
    blocks_of = block_resolver(pipe, spec)  # so does a block-weight list of the wrong length
    model_key = f"{loaded.source.location}@{loaded.source.revision}|{loaded.config.variant}|{loaded.dtype_name}"
    jobs = shard(expand(spec, model_key), spec.shard.index, spec.shard.count)
    for i, p in enumerate(spec.prompts):
        for text in (p.prompt, p.negative_prompt):
            n = prompt_tokens(pipe, text) if text else 0
            if n > 77:
                log.warning("prompts[%d] is %d tokens; CLIP reads only the first 77, the rest is ignored", i, n)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    done = manifest.recover() if spec.resume else {}
    todo = [j for j in jobs if j.key not in done]
    invariant = loaded.device == "cpu" if spec.batch_invariant is None else spec.batch_invariant
    dw, dh = default_size(pipe)
    perf = resolve_perf(spec.perf, loaded.device, image_steps(todo, (dw, dh)))
    apply_perf(loaded, perf, uses_loras=any(lora_sets))
    result = RunResult(out, len(jobs), 0, len(jobs) - len(todo), 0.0)
    bar = tqdm(total=len(jobs), initial=result.skipped, unit="img", disable=not progress, dynamic_ncols=True)

    def finished(entry: dict) -> None:
        result.generated += 1
        result.entries.append(entry)
        bar.update(1)
        if on_image is not None:
            on_image(entry)

    start = time.perf_counter()
    writer = ImageWriter(out, manifest, threads=spec.perf.writer_threads, on_done=finished)
    handler = faults.FaultHandler(pipe, spec.nan_retry_fp32_vae)
    sizer = BatchSizer(spec.batch_size, loaded.device, cap=lambda: handler.cap, probe=not perf.compile,
                       shape_of=lambda j: (model_key, j.width or dw, j.height or dh, j.guidance_scale > 1))
    try:
        with faults.InterruptGuard() as stop:
            for batch in sizer.batches(todo):
                if stop.requested:
                    break
                first = batch[0]
                loaded.use_scheduler(first.scheduler)
                loaded.adapters.activate(lora_sets[first.lora_set], first.adapter_weights,
                                         blocks_of(first.adapter_blocks))
                for made in handler.generate(lambda jobs: generate(pipe, jobs, invariant), batch):
                    rec = build_record(made.job, loaded, lora_sets[made.job.lora_set], made.image.width,
                                       made.image.height, made.batch_size, invariant)
                    if "compare" in spec.extra:  # from_image: compare with the original (reproduce.py)
                        rec["reproduced"] = spec.extra["compare"](made.image, rec)
                    writer.submit(made.image, faults.annotate(rec, made))
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
