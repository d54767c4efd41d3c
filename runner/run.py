"""`run(cfg)`: validate → plan → load → generate → write. The CLI and the server are thin shells over this."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .common.errors import ConfigError, interrupted_code
from .config import RunSpec, validate
from .config.validate import SETTING_KEYS
from .generate import faults
from .generate.sizing import BatchSizer
from .lora.tags import resolve_tags
from .models.embeddings import resolve as resolve_embeddings
from .outputs.record import build_record, perf_record, summary_note
from .plan import RANDOM_SEED, expand, shard, with_prompt_loras

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
    with_others: int = 0  # images of this plan other writers were still making when this one finished
    signal: int | None = None  # the signal that stopped the run
    hand_over: Callable[[], None] | None = None  # passes a preemption signal on to submitit (requeue)
    viewer: Path | None = None  # RUN_DIR/index.html (outputs/viewer.py), when viewer.enabled

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0, or the documented code of the signal that stopped the run (130 SIGINT, 143 SIGTERM)."""
        return interrupted_code(self.signal) if self.interrupted else 0

    def summary(self) -> str:
        others = f", {self.by_others} by other writers" if self.by_others else ""
        others += f", {self.with_others} still being made by other writers" if self.with_others else ""
        return (f"t2i: {self.generated} images generated, {self.skipped} already done{others}, in "
                f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s) -> {self.output_dir}"
                + (" (interrupted; re-run the same command to finish)" if self.interrupted else "")
                + summary_note(self.entries))


@dataclass
class ModelPlan:
    """One model of the run's model axis: what it is (read before loading), the run as this model sees it, and
    its identity in image keys (from the files' contents, outputs/rundir's content keys)."""

    info: Any  # runner.models.info.ModelInfo
    spec: RunSpec  # the run with this model's resolved settings
    refiner: Any = None  # runner.models.refiner.RefinerInfo of the run's refiner (None: none)
    key: str = ""  # the model part of every image key
    config_hash: str = ""  # the hash of its pixel-changing configs (recorded)
    name: str = ""  # its name in records when the axis holds another model of the same folder name


def plan_models(spec: RunSpec, lora_sets: list[tuple]) -> list[ModelPlan]:
    """Resolve and check every model of the run before the first loads: its family, its settings (user keys,
    group settings, pipeline defaults), the keys its family cannot honour, memory modes and LoRA families."""
    from .generate.refiner import check_refiners
    from .generate.scheduled import check_support
    from .lora.detect import check_family
    from .models.hires_model import hires_model_infos
    from .models.info import check_model, check_transformer_file, model_infos, spec_for
    from .models.memory import check_memory
    from .models.refiner import identity as refiner_identity
    from .models.refiner import with_identity
    from .models.source import resolve_device

    device = resolve_device(spec.device)
    plans = []
    for i, info in enumerate(model_infos(spec)):
        where = f"models[{i}] ({info.config.id}): " if spec.models else ""
        mspec = spec_for(spec, info)
        check_model(spec, info, {k: getattr(mspec, k) for k in SETTING_KEYS}, where)
        check_memory(spec.memory, device, info.family, where)
        check_transformer_file(info, where)
        check_support(mspec, info.family.is_sd, info.family.label, where)
        refiner = check_refiners(mspec, info.family, where)
        if refiner is not None:  # its weights are part of every image key
            mspec = with_identity(mspec, refiner_identity(refiner))
        hires_model_infos(spec, info, where)  # hires.model: found, of the same family
        for s, loras in enumerate(lora_sets):
            for r in loras:
                check_family(r.file, info.family, info.config.id, f"{where}{spec.lora_set_label(s)}: ")
        plans.append(ModelPlan(info, mspec, refiner, *info.identity(spec.device)))
    for p in plans:  # two folders named alike (runs/a/model, runs/b/model): the model axis tells them apart
        same = [q for q in plans if q.info.source.display == p.info.source.display and q.key != p.key]
        if same:
            p.name = "/".join(Path(p.info.source.location).parts[-2:])
    return plans


def _load(plan: ModelPlan, spec: RunSpec, lora_sets: list[tuple], threads: Any, jobs: list) -> Any:
    """Load one model of the axis (again if its files changed since this process loaded it: a retrained or edited
    model is never served by a stale pipeline) with its LoRA adapters (checked against it), check its scheduler x
    steps pairs, and set its memory switches."""
    from .config.hires import preflight_pairs as hires_preflight
    from .generate.prompt_embeds import clip_skip_applies
    from .lora.adapters import AdapterManager
    from .lora.blocks import block_resolver
    from .models.embeddings import apply_embeddings
    from .models.hires_model import hires_model_infos, load_hires_models
    from .models.loading import clear_cache, load_model
    from .models.memory import apply_memory
    from .models.refiner import attach as attach_refiner
    from .models.schedulers import preflight
    from .models.upscalers import upscaler as hires_upscaler

    loaded = load_model(plan.info.config, spec.device, plan.info, spec.memory.offload)
    if getattr(loaded, "identity", plan.key) != plan.key:
        log.info("%s changed on disk since it was loaded; loading it again", loaded.source.location)
        clear_cache()
        loaded = load_model(plan.info.config, spec.device, plan.info, spec.memory.offload)
    loaded.identity = plan.key
    loaded.threads = threads
    if loaded.adapters is None:
        loaded.adapters = AdapterManager(loaded.pipe, spec.max_loaded_loras)
    loaded.adapters.max_loaded = spec.max_loaded_loras
    loaded.adapters.preload(lora_sets)  # a LoRA that does not fit the model fails before any write
    preflight(loaded.base_scheduler, {(j.scheduler, j.schedule, j.steps) for j in jobs}  # before its images
              | hires_preflight(jobs))
    for file in sorted({j.hires.upscaler_file for j in jobs if j.hires is not None and j.hires.upscaler_file}):
        hires_upscaler(file, loaded.pipe.device)  # hires. fix model upscalers: loaded once, before any image
    load_hires_models(loaded, spec, hires_model_infos(spec, plan.info))  # hires.model: loaded once
    loaded.blocks_of = block_resolver(loaded.pipe, spec)  # so does a block-weight list of the wrong length
    if loaded.family.is_sd and any((s or 1) > 1 for s in spec.clip_skip) and not clip_skip_applies(loaded.pipe):
        log.warning("clip_skip has no effect on %s: as in A1111, Clip skip applies to SD 1.x only (SDXL and SD 2.x "
                    "keep their own text-encoder layer); recorded with clip_skip_applied=false",
                    type(loaded.pipe).__name__)
    apply_memory(loaded, spec.memory)
    apply_embeddings(loaded, spec.embeddings)
    attach_refiner(loaded, plan.refiner)
    _warn_long_prompts(loaded, spec)
    return loaded


def _warn_long_prompts(loaded: Any, spec: RunSpec) -> None:
    from .generate.batch import prompt_tokens

    if loaded.family is None or loaded.family.max_sequence is not None:
        return  # T5/Qwen text encoders read max_sequence_length tokens, not CLIP's 77
    if spec.prompt_syntax == "a1111" and loaded.family.is_sd:
        return  # A1111's 75-token chunks: every token counts
    for i, p in enumerate(spec.prompts):
        for text in (p.prompt, p.negative_prompt):
            n = prompt_tokens(loaded.pipe, text) if text else 0
            if n > 77:
                log.warning("prompts[%d] is %d tokens; CLIP reads only the first 77, the rest is ignored "
                            "(prompt_syntax=a1111 reads them all)", i, n)


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
    from .lora.files import expand_checkpoints
    from .outputs.rundir import check_writable, remove_created

    # 1. Check inputs before anything loads: the config, the grid axes, random seeds, a writable run dir
    spec = expand_checkpoints(cfg if isinstance(cfg, RunSpec) else validate(cfg))  # a glob: one set per file
    spec = with_prompt_loras(resolve_tags(spec))  # <lora:…> tags: found in lora_dirs, combined with lora_sets
    spec = resolve_embeddings(spec)  # textual inversions the prompts name, found in embedding_dirs
    if spec.grid.enabled:
        from .outputs.grid import check_axes

        check_axes(spec.grid, tuple(spec.extra.get("labels") or ()))
    if RANDOM_SEED in spec.seeds and spec.shard.count > 1 and spec.run_seed is None:
        raise ConfigError(f"seeds=-1 with shard.count={spec.shard.count}: each shard would draw other seeds; set "
                          "run_seed=INT (the same for every shard), or run the shards as one multirun "
                          f"(-m shard.index=0,...,{spec.shard.count - 1})")
    out = Path(output_dir)
    check_writable(out)
    try:
        live = _live_scorer(spec, out)  # eval.metrics: checked and its models loaded before the first image
        with (stop or faults.InterruptGuard()) as stop:
            return _run(spec, out, stop, progress, on_image, live)
    except ConfigError:
        remove_created(out)  # nothing was written: leave no trace but what was there before
        raise


def _live_scorer(spec: RunSpec, out: Path) -> Any:
    """The writer-side scorer of `eval.metrics` (runner/eval/live.py), or None."""
    if not spec.eval.metrics:
        return None
    from .eval.live import LiveScorer, check_run_eval
    from .models.source import resolve_device

    names = check_run_eval(spec.eval, spec.lora_sets)
    device = resolve_device(spec.device if spec.eval.device == "auto" else spec.eval.device)
    return LiveScorer(out, spec.eval, names, device)


def _run(spec: RunSpec, out: Path, stop: faults.InterruptGuard, progress: bool,
         on_image: Callable[[dict], None] | None, live: Any = None) -> RunResult:
    from tqdm import tqdm

    from .generate.threads import use_threads
    from .lora.files import resolve_loras
    from .models.loading import release
    from .outputs.rundir import RunDir, forget_created
    from .outputs.writer import ImageWriter

    # 2. Check every model of the axis and the LoRA files against it (read, hashed; nothing loads yet)
    lora_sets = resolve_loras(spec)
    plans = plan_models(spec, lora_sets)
    threads = use_threads(spec.threads)

    # 3. Plan against the run dir: the model outermost, keys from file contents, seeds drawn from the run seed
    run_dir = RunDir(out).open()
    result = RunResult(out, 0, 0, 0, 0.0)
    start = time.perf_counter()
    try:
        drawn = RANDOM_SEED in spec.seeds
        run_seed = spec.run_seed if spec.run_seed is not None or not drawn else run_dir.run_seed()
        ids = [[r.sha256 for r in s] for s in lora_sets]
        jobs: list = []
        for i, plan in enumerate(plans):
            jobs += expand(plan.spec, plan.key, ids, run_seed, model_index=i, start=len(jobs))
        jobs = shard(jobs, spec.shard.index, spec.shard.count)
        done_before = {j.key for j in jobs if j.key in run_dir.done}
        replace = set() if spec.resume else done_before  # resume=false: make them again, each into its own file
        result.planned, result.skipped = len(jobs), len(done_before) if spec.resume else 0
        todo = [j for j in jobs if j.key in replace or j.key not in done_before]
        todo_models = sorted({j.model_index for j in todo}) or [0]

        # 4. Load the first model that has work (LoRAs and schedulers checked against it) before any image
        loaded = _load(plans[todo_models[0]], spec, lora_sets, threads,
                       [j for j in todo if j.model_index == todo_models[0]])
        forget_created(out)  # the run has started: what it made is the run's
        invariant = loaded.device == "cpu" if spec.batch_invariant is None else spec.batch_invariant
        bar = tqdm(total=len(jobs), initial=result.skipped, unit="img", disable=not progress, dynamic_ncols=True)
        viewer, thumbs = _viewer(spec, out, run_dir.done.values(), len(jobs), result.skipped)
        if live is not None:
            live.start(list(run_dir.done.values()))

        lock = threading.Lock()

        def finished(entry: dict) -> None:  # called by the writer threads: one at a time
            with lock:
                result.generated += 1
                result.entries.append(entry)
                bar.update(1)
                if viewer is not None:
                    viewer.add(entry)
                if on_image is not None:
                    on_image(entry)
                if live is not None:
                    live.add(entry)

        # 5. Generate model by model (each loaded once, the previous one released), a claimed batch at a time
        writer = ImageWriter(run_dir, threads=spec.perf.writer_threads, on_done=finished, after_save=thumbs,
                             labels=spec.extra.get("labels"))
        made_by = _Batches(run_dir, replace, lora_sets, spec, invariant, writer, stop,
                           run_seed if drawn else None)
        state = "failed"  # the viewer's last word on this run
        try:
            for n, m in enumerate(todo_models):
                if stop.requested:
                    break
                mine = [j for j in todo if j.model_index == m]
                if n > 0:  # the next model of the axis: the previous one is released first
                    release(loaded)
                    loaded = _load(plans[m], spec, lora_sets, threads, mine)
                made_by.model(loaded, plans[m], mine)
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
    result.with_others = 0 if stop.requested else len(left)  # claimed by live writers: the counts add up
    result.signal = stop.signum
    result.hand_over = stop.hand_over if stop.preempted and result.interrupted else None

    # 6. Grids over the whole run dir, by the last writer, unless a time limit is near (SIGTERM, preemption)
    if spec.grid.enabled and last and stop.time_limited:
        log.warning("grids not written (a kill may follow %s); re-run the same command to write them",
                    faults.signal_name(stop.signum))
    elif spec.grid.enabled and last:
        from .outputs.grid import write_grids

        with run_dir.grids_lock():
            result.grids = write_grids(out, spec.grid)

    # 7. Scores (eval.metrics): the rest of the images (missing baselines made), then the summary and plots
    if live is not None:
        live.close(lambda cfg, where: run(cfg, where, progress=False), finish=not result.interrupted)
        if last and not result.interrupted:
            from .eval.summary import write_summary

            log.info("%s", write_summary(out, spec.eval))
    return result


def _cfg(job: Any) -> bool:
    """Whether a job runs the denoiser twice per step (CFG or true CFG): a batch-size shape component."""
    return (job.guidance_scale or 0) > 1 or (job.true_cfg_scale or 0) > 1


@dataclass
class _Batches:
    """Makes the images of one model at a time: claims each batch in the run dir (other writers claim theirs),
    switches LoRA sets and schedulers, generates, records and queues the images for writing."""

    run_dir: Any  # outputs.rundir.RunDir
    replace: set  # keys made again in place (resume=false)
    lora_sets: list[tuple]
    spec: RunSpec
    invariant: bool
    writer: Any  # outputs.writer.ImageWriter
    stop: faults.InterruptGuard
    run_seed: int | None  # recorded when seeds were drawn from it

    def model(self, loaded: Any, plan: ModelPlan, todo: list) -> None:
        """Every image of `todo` (all of one model); a killed writer's claims are taken over in a later pass."""
        from .generate.batch import default_size
        from .generate.fastpath import apply_perf, image_steps, resolve_perf
        from .generate.prompt_embeds import prompt_embeds

        dw, dh = default_size(loaded.pipe)
        perf = resolve_perf(self.spec.perf, loaded.device, image_steps(todo, (dw, dh)))
        apply_perf(loaded, perf, uses_loras=any(self.lora_sets))
        handler = faults.FaultHandler(loaded.pipe, self.spec.nan_retry_fp32_vae)
        sizer = BatchSizer(self.spec.batch_size, loaded.device, cap=lambda: handler.cap, probe=not perf.compile,
                           shape_of=lambda j: (j.model_key, j.width or dw, j.height or dh, _cfg(j)))
        embeds = prompt_embeds(loaded)
        while not self.stop.requested:
            claimed = 0
            for batch in sizer.batches(todo):
                if self.stop.requested:
                    break
                claimed += self._batch(loaded, plan, handler, embeds, batch)
            if not claimed:  # the rest is done, or claimed by writers that are alive
                break
            done = self.run_dir.refresh()  # a killed writer's images are free again: take them in the next pass
            todo = [j for j in todo if j.key not in done or (j.key in self.replace and j.key not in self.run_dir.mine)]

    def _batch(self, loaded: Any, plan: ModelPlan, handler: Any, embeds: Any, batch: list) -> int:
        """One batch: the part of it no other writer holds. Returns how many images this writer claimed."""
        from .config.blocks import spec_label
        from .generate.batch import generate
        from .lora.files import touches_text_encoder

        # another writer may hold some of the batch: this one makes the rest (a smaller batch)
        claims = {c.job.key: c for c in self.run_dir.claim(batch, self.replace)}
        if not claims:
            return 0
        handler.names = {k: c.file for k, c in claims.items()}
        mine = [j for j in batch if j.key in claims]
        first = mine[0]
        loaded.use_scheduler(first.scheduler, first.schedule)
        loras = self.lora_sets[first.lora_set]
        loaded.adapters.activate(loras, first.adapter_weights, loaded.blocks_of(first.adapter_blocks))
        # what the text encoder computes with (the cache key): its LoRAs at their weights and block weights, and
        # how they are applied (peft layers or merged weights round differently)
        te_state = (tuple(sorted(perf_record(loaded).items())),
                    *((r.sha256, w, spec_label(b)) for r, w, b in zip(loras, first.adapter_weights,
                                                                     first.adapter_blocks, strict=True)
                      if touches_text_encoder(r)))
        pipe = loaded.pipe
        for made in handler.generate(lambda js, te=te_state: generate(pipe, js, self.invariant, embeds, te), mine):
            size = made.image.info.get("first_pass", made.image.size)  # hires. fix: A1111's Size is the first's
            rec = build_record(made.job, loaded, self.lora_sets[made.job.lora_set], *size, made.batch_size,
                               self.invariant, plan.config_hash, made.image.info.get("refiner_from", -1))
            if plan.name:
                rec["model"]["name"] = plan.name
            if self.run_seed is not None:
                rec["run_seed"] = self.run_seed
            if self.spec.prompt_seed is not None:
                rec["prompt_seed"] = self.spec.prompt_seed
            if "compare" in self.spec.extra:  # from_image: compare with the original (reproduce/)
                rec["reproduced"] = self.spec.extra["compare"](made.image, rec)
            self.writer.submit(made.image, faults.annotate(rec, made), claims[made.job.key])
        return len(claims)
