"""`run(cfg)`: validate → plan → load → generate → write. The CLI and the server are thin shells over this."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .common.errors import ConfigError
from .config import RunSpec, validate
from .generate import faults
from .generate.sizing import BatchSizer
from .outputs.record import build_record, perf_record, summary_note
from .plan import RANDOM_SEED, expand, shard

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
    interrupted: bool = False  # stopped early by Ctrl-C / SIGTERM / preemption (the finished images are kept)
    grids: list[Path] = field(default_factory=list)  # comparison grids written (outputs/grid.py)
    by_others: int = 0  # images of this plan that other writers of the same run dir made meanwhile
    signal: int | None = None  # the signal that stopped the run
    hand_over: Callable[[], None] | None = None  # passes a preemption signal on to submitit (requeue)
    viewer: Path | None = None  # RUN_DIR/index.html (outputs/viewer.py), when viewer.enabled

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0, or the documented code of the signal that stopped the run (130 SIGINT, 143 SIGTERM)."""
        return faults.exit_code(self.signal) if self.interrupted else 0

    def summary(self) -> str:
        others = f", {self.by_others} by other writers" if self.by_others else ""
        return (f"t2i: {self.generated} images generated, {self.skipped} already done{others}, in "
                f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s) -> {self.output_dir}"
                + (" (interrupted; re-run the same command to finish)" if self.interrupted else "")
                + summary_note(self.entries))


def model_identity(loaded: Any) -> tuple[str, str]:
    """(the model part of every image key, the hash of its pixel-changing configs), from the files as they are now:
    what the weights and configs contain (not where they are), dtype, variant and pipeline class."""
    from .common.hashing import config_sha256, model_sha256
    from .models.tiny import ensure_tiny

    src, pipe = loaded.source, loaded.pipe
    folder = {"dir": lambda: Path(src.location), "builtin": ensure_tiny,
              "hub": lambda: Path(pipe.config._name_or_path)}.get(src.kind, lambda: None)()
    weights_at = Path(src.location) if src.kind == "file" else folder
    weights = model_sha256(weights_at) if weights_at is not None and weights_at.exists() else loaded.sha256
    if src.kind == "file" and loaded.config.config:  # a single file's configs come from model.config
        folder = Path(loaded.config.config)
    config_hash = config_sha256(folder) if folder is not None and folder.is_dir() else str(loaded.config.config or "")
    weights = weights or f"{src.location}@{src.revision}"
    return f"{weights}|{config_hash}|{loaded.config.variant}|{loaded.dtype_name}|{type(pipe).__name__}", config_hash


def load_current(spec: RunSpec) -> tuple[Any, str, str]:
    """The model (from the per-process cache when its files did not change since it was loaded, else loaded
    again: a retrained or edited model is never served by a stale pipeline), its key part and config hash."""
    from .models.loading import clear_cache, load_model

    loaded = load_model(spec.model, spec.device)
    key, config_hash = model_identity(loaded)
    if getattr(loaded, "identity", key) != key:
        log.info("%s changed on disk since it was loaded; loading it again", loaded.source.location)
        clear_cache()
        loaded = load_model(spec.model, spec.device)
        key, config_hash = model_identity(loaded)
    loaded.identity = key
    return loaded, key, config_hash


def _viewer(spec: RunSpec, out: Path, done: Iterable[dict], planned: int, skipped: int):
    """The run dir's live viewer and the writer threads' thumbnail hook (both None with viewer.enabled=false)."""
    if not spec.viewer.enabled:
        return None, None
    from .outputs.thumbs import ThumbWriter
    from .outputs.viewer import LiveViewer

    return LiveViewer(out, done, planned, skipped, spec.viewer.thumb_size), ThumbWriter(out, spec.viewer.thumb_size)


def run(cfg: DictConfig | RunSpec, output_dir: str | Path, progress: bool = True,
        on_image: Callable[[dict], None] | None = None, stop: faults.InterruptGuard | None = None) -> RunResult:
    """Generate every image of `cfg` that `output_dir` does not hold yet; other processes may write the same run
    dir at the same time (each image is made by one of them). `stop` (default: a new guard for Ctrl-C and SIGTERM)
    ends the run after the batch in flight once requested (the server's interrupt)."""
    from .outputs.rundir import check_writable, remove_created

    # 1. Check inputs before anything loads: the config, the grid axes, random seeds, a writable run dir
    spec = cfg if isinstance(cfg, RunSpec) else validate(cfg)
    if spec.grid.enabled:
        from .outputs.grid import check_axes

        check_axes(spec.grid)
    if RANDOM_SEED in spec.seeds and spec.shard.count > 1 and spec.run_seed is None:
        raise ConfigError(f"seeds=-1 with shard.count={spec.shard.count}: each shard would draw other seeds; set "
                          "run_seed=INT (the same for every shard), or run the shards as one multirun "
                          f"(-m shard.index=0,...,{spec.shard.count - 1})")
    out = Path(output_dir)
    check_writable(out)
    try:
        with (stop or faults.InterruptGuard()) as stop:
            return _run(spec, out, stop, progress, on_image)
    except ConfigError:
        remove_created(out)  # nothing was written: leave no trace but what was there before
        raise


def _run(spec: RunSpec, out: Path, stop: faults.InterruptGuard, progress: bool,
         on_image: Callable[[dict], None] | None) -> RunResult:
    from tqdm import tqdm

    from .generate.batch import default_size, generate, prompt_tokens
    from .generate.fastpath import apply_perf, image_steps, resolve_perf
    from .generate.prompt_embeds import clip_skip_applies, prompt_embeds
    from .generate.threads import use_threads
    from .lora.adapters import AdapterManager
    from .lora.files import resolve_loras, touches_text_encoder
    from .models.schedulers import preflight
    from .outputs.rundir import RunDir, forget_created
    from .outputs.writer import ImageWriter

    # 2. Load: LoRA files (resolved and hashed), the model (again if its files changed), its adapters
    lora_sets = resolve_loras(spec)
    threads = use_threads(spec.threads)
    loaded, model_key, config_hash = load_current(spec)
    loaded.threads = threads
    pipe = loaded.pipe
    if loaded.adapters is None:
        loaded.adapters = AdapterManager(pipe, spec.max_loaded_loras)
    loaded.adapters.max_loaded = spec.max_loaded_loras
    loaded.adapters.preload(lora_sets)  # a LoRA that does not fit the model fails before any write
    if any((s or 1) > 1 for s in spec.clip_skip) and not clip_skip_applies(pipe):
        log.warning("clip_skip has no effect on %s: as in A1111, Clip skip applies to SD 1.x only (SDXL and SD 2.x "
                    "keep their own text-encoder layer); recorded with clip_skip_applied=false",
                    type(pipe).__name__)
    for i, p in enumerate(spec.prompts):
        for text in (p.prompt, p.negative_prompt):
            n = prompt_tokens(pipe, text) if text else 0
            if n > 77:
                log.warning("prompts[%d] is %d tokens; CLIP reads only the first 77, the rest is ignored", i, n)
    dw, dh = default_size(pipe)
    spec = dataclasses.replace(spec, width=tuple(w or dw for w in spec.width),
                               height=tuple(h or dh for h in spec.height))  # a key names the real size

    # 3. Plan against the run dir: keys from file contents, seeds drawn from the run seed, what is done
    run_dir = RunDir(out).open()
    result = RunResult(out, 0, 0, 0, 0.0)
    start = time.perf_counter()
    try:
        drawn = RANDOM_SEED in spec.seeds
        run_seed = spec.run_seed if spec.run_seed is not None or not drawn else run_dir.run_seed()
        jobs = shard(expand(spec, model_key, [[r.sha256 for r in s] for s in lora_sets], run_seed),
                     spec.shard.index, spec.shard.count)
        preflight(loaded.base_scheduler, {(j.scheduler, j.schedule, j.steps) for j in jobs})  # before any image
        forget_created(out)  # the run has started: what it made is the run's
        done_before = {j.key for j in jobs if j.key in run_dir.done}
        replace = set() if spec.resume else done_before  # resume=false: make them again, each into its own file
        result.planned, result.skipped = len(jobs), len(done_before) if spec.resume else 0
        todo = [j for j in jobs if j.key in replace or j.key not in done_before]
        invariant = loaded.device == "cpu" if spec.batch_invariant is None else spec.batch_invariant
        perf = resolve_perf(spec.perf, loaded.device, image_steps(todo, (dw, dh)))
        apply_perf(loaded, perf, uses_loras=any(lora_sets))
        bar = tqdm(total=len(jobs), initial=result.skipped, unit="img", disable=not progress, dynamic_ncols=True)
        viewer, thumbs = _viewer(spec, out, run_dir.done.values(), len(jobs), result.skipped)

        def finished(entry: dict) -> None:
            result.generated += 1
            result.entries.append(entry)
            bar.update(1)
            if viewer is not None:
                viewer.add(entry)
            if on_image is not None:
                on_image(entry)

        # 4. Generate: claim a batch at a time (other writers claim theirs), write PNGs in background threads
        writer = ImageWriter(run_dir, threads=spec.perf.writer_threads, on_done=finished, after_save=thumbs)
        handler = faults.FaultHandler(pipe, spec.nan_retry_fp32_vae)
        sizer = BatchSizer(spec.batch_size, loaded.device, cap=lambda: handler.cap, probe=not perf.compile,
                           shape_of=lambda j: (model_key, j.width or dw, j.height or dh, j.guidance_scale > 1))
        embeds = prompt_embeds(loaded)
        state = "failed"  # the viewer's last word on this run
        try:
            while not stop.requested:
                claimed = 0
                for batch in sizer.batches(todo):
                    if stop.requested:
                        break
                    # another writer may hold some of the batch: this one makes the rest (a smaller batch)
                    claims = {c.job.key: c for c in run_dir.claim(batch, replace)}
                    if not claims:
                        continue
                    claimed += len(claims)
                    handler.names = {k: c.file for k, c in claims.items()}
                    mine = [j for j in batch if j.key in claims]
                    first = mine[0]
                    loaded.use_scheduler(first.scheduler, first.schedule)
                    loras = lora_sets[first.lora_set]
                    loaded.adapters.activate(loras, first.adapter_weights)
                    # what the text encoder computes with (the cache key): its LoRAs at their weights, and how
                    # they are applied (peft layers or merged weights round differently)
                    te_state = (tuple(sorted(perf_record(loaded).items())),
                                *((r.sha256, w) for r, w in zip(loras, first.adapter_weights, strict=True)
                                  if touches_text_encoder(r)))
                    for made in handler.generate(
                            lambda jobs_, te=te_state: generate(pipe, jobs_, invariant, embeds, te), mine):
                        rec = build_record(made.job, loaded, lora_sets[made.job.lora_set], made.image.width,
                                           made.image.height, made.batch_size, invariant, config_hash)
                        if drawn:
                            rec["run_seed"] = run_seed
                        if "compare" in spec.extra:  # from_image: compare with the original (reproduce/)
                            rec["reproduced"] = spec.extra["compare"](made.image, rec)
                        writer.submit(made.image, faults.annotate(rec, made), claims[made.job.key])
                if not claimed:  # the rest is done, or claimed by writers that are alive
                    break
                done = run_dir.refresh()  # a killed writer's images are free again: take them in the next pass
                todo = [j for j in todo if j.key not in done or (j.key in replace and j.key not in run_dir.mine)]
            writer.close()
            state = "interrupted" if stop.requested and result.generated < len(todo) else "done"
        except OSError as exc:
            raise faults.output_error(exc, out, result.generated) from exc
        except KeyboardInterrupt:
            state = "interrupted"
            raise
        finally:
            faults.close_quietly(writer)
            bar.close()
            if viewer is not None:
                viewer.close(state)
                result.viewer = out / "index.html" if (out / "index.html").is_file() else None
    finally:
        last = run_dir.close()
        result.seconds = time.perf_counter() - start
    done = run_dir.done
    made = {e["key"] for e in result.entries}
    result.by_others = sum(1 for j in jobs if j.key in done and j.key not in made and j.key not in done_before)
    left = [j for j in jobs if j.key not in done or (j.key in replace and j.key not in made)]
    result.interrupted = stop.requested and bool(left)
    result.signal = stop.signum
    result.hand_over = stop.hand_over if stop.preempted and result.interrupted else None

    # 5. Grids over the whole run dir, by the last writer, unless a time limit is near (SIGTERM, preemption)
    if spec.grid.enabled and last and stop.time_limited:
        log.warning("grids not written (a kill may follow %s); re-run the same command to write them",
                    faults.signal_name(stop.signum))
    elif spec.grid.enabled and last:
        from .outputs.grid import write_grids

        with run_dir.grids_lock():
            result.grids = write_grids(out, spec.grid)
    return result
