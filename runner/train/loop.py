"""`train(cfg, output_dir)`: the diffusers LoRA recipe (frozen base, noise-prediction MSE, peft adapters)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..common.errors import ConfigError, did_you_mean
from ..common.io import atomic_write_bytes
from ..common.paths import slug
from ..generate.faults import Interrupted, InterruptGuard
from . import objective
from .cache import LatentSource, TextSource, View, cache_dir
from .checkpoint import (
    apply_optimizer_settings,
    changed_settings,
    check_resume,
    clean_partial,
    find_resume,
    fingerprint,
    load_checkpoint,
    prune,
    save_checkpoint,
    settings,
)
from .config import TrainSpec, validate_train
from .data import (
    Example,
    bucket_batch,
    bucket_items,
    sample_order,
    scan,
    training_caption,
)
from .dist import setup
from .families import Flux1, make_adapter, target_modules
from .losslog import LossLog, plot
from .metadata import kohya_metadata
from .model import latent_factor, load_pipe, native_size, resolve_precision
from .optim import Ema, make_optimizer
from .quant import quantize_denoiser
from .save import save_lora
from .validation import default_prompts, render
from .valloss import ValLog, make_measure, validation_examples, write_best_lora

log = logging.getLogger(__name__)
CONFIG_FILE = "train_config.yaml"


@dataclass
class TrainResult:
    """What a training run did and where it wrote."""

    run_dir: Path
    lora_file: Path
    kohya_file: Path
    start_step: int
    steps: int
    last_loss: float | None
    seconds: float
    best: dict | None = None  # {step, loss, checkpoint} by validation loss (validation.dir), else None

    @property
    def steps_per_second(self) -> float:
        return (self.steps - self.start_step) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"t2i-train: steps {self.start_step}->{self.steps} in {self.seconds:.1f} s "
            f"({self.steps_per_second:.2f} steps/s), last loss {self.last_loss} -> {self.lora_file}"
            + (f"; best validation loss {self.best['loss']:.4g} at step {self.best['step']}" if self.best else "")
        )


def _batch(examples: list[Example], spec: TrainSpec, size: int, position: int, buckets: list | None,
           count: int) -> tuple[list[View], list[str]]:
    """The micro-batch of `count` (the global batch: train.batch_size x processes) at `position` of the seeded
    sample stream: the image views (one size) and training captions."""
    import torch

    d, t = spec.data, spec.train
    if buckets:
        chosen = bucket_batch(buckets, t.seed, count, position // count)
        idx, sizes = [i for i, _ in chosen], [s for _, s in chosen]
    else:
        idx = sample_order(len(examples), t.seed, position, count)
        sizes = [size] * len(idx)
    views = [View(examples[i], sizes[j], (t.seed << 32) + position + j) for j, i in enumerate(idx)]
    # the caption's own draws (dropout, tag order) from a generator of its own: the pixels stay as without them
    captions = [training_caption(examples[i].caption, d, torch.Generator().manual_seed(
        ((t.seed << 32) + position + j) ^ 0x9E3779B97F4A7C15)) for j, i in enumerate(idx)]
    return views, captions


def _check_targets(key: str, targets: Any, model: Any) -> None:
    """Each target names a layer of `model` as peft matches it (the full name or its last parts); peft itself
    ignores a wrong name beside a right one, and raises a raw ValueError when none matches."""
    import torch

    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in layers):
            names = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ConfigError(f"{key}: {t!r} names no layer of the model{did_you_mean(t, names)}; valid layer "
                              f"names: {', '.join(names[:24])}{', …' if len(names) > 24 else ''}")


def _add_lora(spec: TrainSpec, adapter: Any) -> tuple[dict[str, Any], list]:
    """peft adapters on the denoiser (and the text encoders with lora.text_encoder): the modules by pipeline
    component name and their trainable parameters, kept in fp32 under mixed precision."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    lo, fam = spec.lora, adapter.spec

    def lora_config(targets: Any) -> Any:
        if lo.type == "loha":
            return LoHaConfig(r=lo.rank, alpha=spec.alpha, module_dropout=lo.dropout, target_modules=list(targets))
        if lo.type == "lokr":
            return LoKrConfig(r=lo.rank, alpha=spec.alpha, module_dropout=lo.dropout, target_modules=list(targets))
        return LoraConfig(r=lo.rank, lora_alpha=spec.alpha, lora_dropout=lo.dropout, init_lora_weights="gaussian",
                          use_dora=lo.type == "dora", target_modules=list(targets))

    denoiser = adapter.denoiser
    if lo.target_modules:
        _check_targets("lora.target_modules", lo.target_modules, denoiser)
    targets = target_modules(fam, lo.preset, lo.target_modules, denoiser)
    if not targets:
        raise ConfigError(f"lora.preset={lo.preset} matches no module of this {fam.name} model; give "
                          "lora.target_modules=[...] explicitly")
    if lo.text_encoder and not fam.text_encoders:
        raise ConfigError(f"lora.text_encoder=true: a {fam.name} LoRA holds the transformer only (its diffusers "
                          "loader takes no text-encoder LoRA); valid: false")
    denoiser.add_adapter(lora_config(targets))
    modules = {fam.denoiser: denoiser}
    if lo.text_encoder:
        for comp, te in adapter.modules().items():
            if comp.startswith("text_encoder"):
                _check_targets("lora.text_encoder_target_modules", lo.text_encoder_target_modules, te)
                te.add_adapter(lora_config(lo.text_encoder_target_modules))
                modules[comp] = te
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if spec.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for comp, te in modules.items():
            if comp.startswith("text_encoder"):
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    for m in modules.values():
        m.train(True)
    return modules, params


def _all_reduce(ddp: Any, params: list, step_loss: float) -> float:
    """Sum the adapter gradients and the step's loss over the processes (each already weighted by its share of
    the global batch): the gradient and loss of the global batch. One process: unchanged."""
    import torch

    if ddp.world == 1:
        return step_loss
    for p in params:
        if p.grad is None:  # a process whose shares were all empty
            p.grad = torch.zeros_like(p)
    total = torch.tensor([step_loss], dtype=torch.float64, device=params[0].device)
    ddp.sum_([p.grad for p in params] + [total])
    return float(total.item())


def _apply_gradients(optimizer: Any, lr_sched: Any, scaler: Any, params: list, max_grad_norm: float) -> float:
    """Clip (unscaled) gradients, step the optimizer and the LR schedule; the LR this step used."""
    import torch

    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr = lr_sched.get_last_lr()[0]
    lr_sched.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def train(
    cfg: DictConfig | dict | TrainSpec,
    output_dir: str | Path,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train (or continue training) a LoRA on `cfg.data.dir`; write it, checkpoints, loss log, validation."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    from ..models.source import resolve_device
    from ..models.tiny import builtin_path

    # 1. Check inputs before the model loads: the config, the images, the checkpoint to resume and its fit.
    spec = cfg if isinstance(cfg, TrainSpec) else validate_train(cfg)
    t, lo = spec.train, spec.lora
    examples = scan(spec.data)
    cache = cache_dir(spec.data)
    val_examples = validation_examples(spec)
    name = lo.name or slug(Path(spec.data.dir).expanduser().resolve().name, 60)
    device = resolve_device(spec.device)
    ddp = setup(device)  # one process, or one of `accelerate launch`'s (dist.py); process 0 writes every file
    run_dir = Path(ddp.from_main(str(output_dir)))  # Hydra's dir of process 0 (the others' may be a second off)
    ckpt = find_resume(spec.resume, run_dir)
    if ckpt is not None and spec.resume not in ("auto", False):
        run_dir = ckpt.parent.parent  # resume=PATH continues that run in its own folder
    fprint = fingerprint(spec, name)
    start_step = check_resume(ckpt, fprint) if ckpt is not None else 0
    changed = changed_settings(ckpt, spec, ddp.world) if ckpt is not None else {}
    weight_dtype = resolve_precision(t.mixed_precision, device)

    # 2. Load the base model, frozen on the device, and add the trainable LoRA layers. A built-in tiny model is
    # built by process 0 alone, the others waiting: once torch.distributed is up, transformers writes weights on
    # rank 0 only, so a build on another rank would miss its text encoder's
    if ddp.main:
        builtin_path(spec.model.id)
    ddp.barrier()
    pipe, family = load_pipe(spec)
    adapter = make_adapter(family, pipe, device, weight_dtype)
    if isinstance(adapter, Flux1):
        adapter.guidance = t.guidance_scale
    factor = latent_factor(pipe, adapter)
    size = spec.data.resolution or native_size(pipe, adapter)
    if size % factor:
        raise ConfigError(f"data.resolution={size} is not a multiple of {factor} (this {family} model's latent "
                          f"factor); try {max(factor, size // factor * factor)} or {(size // factor + 1) * factor}")
    for side in spec.data.buckets or []:
        if side % factor:
            raise ConfigError(f"data.buckets has {side}, not a multiple of {factor} (this {family} model's latent "
                              f"factor); try {max(factor, side // factor * factor)} or {(side // factor + 1) * factor}")
    buckets = bucket_items(examples, list(spec.data.buckets), factor) if spec.data.buckets else None
    noise_sched = None if adapter.spec.flow else DDPMScheduler.from_config(pipe.scheduler.config)
    for module in adapter.frozen():
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    if t.quantize_base:
        count = quantize_denoiser(adapter.denoiser, t.quantize_base)
        log.info("train.quantize_base=%s: %d Linear layers of the %s quantized", t.quantize_base, count,
                 adapter.spec.denoiser)
    torch.manual_seed(t.seed)
    modules, params = _add_lora(spec, adapter)

    # 3. Optimizer, LR schedule, loss scaler (fp16 only) and the generator: the state a checkpoint holds.
    optimizer = make_optimizer(params, t)
    ema = Ema(params, t.ema_decay) if t.ema_decay else None
    lr_sched = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps
    )
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(t.seed)  # timesteps, noise and VAE sampling (CPU: same on every device)
    lora_writer = _lora_writer(name, pipe, family, modules, spec, ema)
    state = {
        "modules": modules,
        "optimizer": optimizer,
        "lr_scheduler": lr_sched,
        "generator": gen,
        "scaler": scaler,
        "lora": lora_writer,
        "info": {"fingerprint": fprint, "settings": settings(spec, ddp.world)},
        "ema": ema,
    }

    # 4. The run dir: resume from the checkpoint (weights, optimizer and random state, loss log) or start one.
    losses = LossLog(run_dir / "loss.csv")
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(run_dir)
    if ckpt is not None:
        load_checkpoint(ckpt, state)
        apply_optimizer_settings(optimizer, lr_sched, spec)
        if ddp.main:
            losses.truncate(start_step)
        news = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        log.warning("resuming from %s (step %d): LoRA weights, optimizer state, random state and loss log come from "
                    "the checkpoint; %s", ckpt, start_step, f"changed settings applied: {news}" if news else
                    "settings unchanged")
    elif ddp.main:
        losses.truncate(0)  # a fresh start (no checkpoint to resume): an earlier attempt's rows are not this run's
    if ddp.main and (not (run_dir / CONFIG_FILE).exists() or ckpt is None):
        cfg_obj = OmegaConf.structured(dataclasses.asdict(spec))
        atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg_obj).encode("utf-8"))
    prompts = default_prompts(spec, [e.caption for e in examples])
    # validation loss (validation.dir): at the start of a fresh run (the base), then at every checkpoint
    # (process 0 alone: it writes the files, and the measure needs no other process)
    measure = make_measure(adapter, noise_sched, spec, val_examples, size, modules) \
        if val_examples and ddp.main else None
    vlog = ValLog(run_dir)
    if ddp.main and (measure is not None or vlog.path.exists()):
        vlog.truncate(start_step if ckpt is not None else -1)
    if ddp.main and ckpt is None:
        vlog.best_path.unlink(missing_ok=True)
    if measure is not None and ckpt is None:
        vlog.append(0, measure())

    # 5. Train: accumulate micro-batch gradients, step; checkpoint (with validation images) every N steps.
    step_loss_of = _micro_batch_loss(adapter, noise_sched, spec, gen, LatentSource(adapter, spec.data, cache),
                                     TextSource(adapter, spec.data, cache, bool(lo.text_encoder)))
    bar = tqdm(total=t.steps, initial=start_step, unit="step", disable=not (spec.progress and ddp.main),
               dynamic_ncols=True)
    global_batch = t.batch_size * ddp.world
    began = time.perf_counter()
    last = None
    # Ctrl-C / SIGTERM (SLURM preemption, a time limit: a grace period comes before the kill): finish the step,
    # checkpoint it, exit 130 / 143; the same command resumes from there
    guard = InterruptGuard().__enter__()
    try:
        for step in range(start_step + 1, t.steps + 1):
            t0 = time.perf_counter()
            step_loss = 0.0
            for k in range(t.gradient_accumulation):
                position = ((step - 1) * t.gradient_accumulation + k) * global_batch
                views, captions = _batch(examples, spec, size, position, buckets, global_batch)
                a, b = ddp.share(len(views))  # this process's samples of the global micro-batch
                if b > a:
                    part = (b - a) / len(views)  # its weight in the global mean (1.0 for one process)
                    with torch.enable_grad():  # loading a model turns autograd off process-wide (models/loading.py)
                        loss = step_loss_of(views[a:b], captions[a:b], (a, b, len(views)))
                        scaled = loss * part / t.gradient_accumulation
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    step_loss += float(loss.detach()) * part / t.gradient_accumulation
                ddp.sync_generator(gen)
            step_loss = _all_reduce(ddp, params, step_loss)
            lr = _apply_gradients(optimizer, lr_sched, scaler, params, t.max_grad_norm)
            if ema is not None:
                ema.update()
            last = step_loss
            if ddp.main:
                losses.append(step, step_loss, lr, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, step_loss)
            stop = ddp.any(guard.requested)  # every process stops at the same step
            if ddp.main and (step % t.checkpoint_every == 0 or step == t.steps):
                val = measure() if measure is not None else None
                folder = save_checkpoint(run_dir, step, state, t.keep_checkpoints)
                if val is not None:
                    _record_validation(vlog, val, step, folder, name, run_dir, t.keep_checkpoints)
                plot(losses.rows(), run_dir / "loss.png")
                if not stop:  # a kill follows a SIGTERM soon: no sample images then
                    render(spec, prompts, folder / f"{name}.safetensors", name, size, run_dir / "samples", step)
            elif ddp.main and stop:
                save_checkpoint(run_dir, step, state, t.keep_checkpoints)
                plot(losses.rows(), run_dir / "loss.png")
            if stop and step < t.steps:
                log.warning("stopped at step %d of %d; checkpoint written", step, t.steps)
                raise Interrupted(guard.signum or signal.SIGINT)
    finally:
        guard.__exit__()
        bar.close()

    # 6. Write the LoRA (diffusers + kohya files) and the loss plot.
    seconds = time.perf_counter() - began
    lora_file = run_dir / f"{name}.safetensors"
    if ddp.main:
        lora_file = lora_writer(run_dir)
        plot(losses.rows(), run_dir / "loss.png")
    result = TrainResult(
        run_dir, lora_file, run_dir / f"{name}_kohya.safetensors", start_step, t.steps, last, seconds,
        vlog.best() if measure is not None else None,
    )
    if ddp.main:
        _write_summary(result, vlog.rows() if measure is not None else [])
    ddp.barrier()  # the files exist when any process returns
    return result


def _record_validation(vlog: ValLog, val: float, step: int, folder: Path, name: str, run_dir: Path,
                       keep: int) -> None:
    """Log a checkpoint's validation loss; a new best becomes `checkpoints/best.json` and `NAME_best.*`."""
    vlog.append(step, val)
    best = vlog.best()
    if best is None or val < best["loss"]:
        write_best_lora(folder, name, run_dir, step, val)
        vlog.set_best(step, val, folder)
        prune(run_dir, keep)  # the previous best is an ordinary checkpoint again
        log.info("step %d: validation loss %.5g (best so far)", step, val)
    else:
        log.info("step %d: validation loss %.5g (best %.5g at step %d)", step, val, best["loss"], best["step"])


def _write_summary(result: TrainResult, val_rows: list[tuple[int, float]]) -> None:
    """`summary.json`: what the run wrote, its last training loss and (validation.dir) its best checkpoint."""
    import json

    doc = {"steps": result.steps, "last_loss": result.last_loss, "lora": result.lora_file.name,
           "kohya": result.kohya_file.name, "best": result.best,
           "best_lora": f"{result.lora_file.stem}_best.safetensors" if result.best else None,
           "val_loss": [{"step": s, "loss": v} for s, v in val_rows]}
    atomic_write_bytes(result.run_dir / "summary.json", json.dumps(doc, indent=1).encode("utf-8"))


def _micro_batch_loss(adapter: Any, noise_sched: Any, spec: TrainSpec, gen: Any, latents_of: LatentSource,
                      cond_of: TextSource) -> Callable[[list[View], list[str], tuple[int, int, int]], Any]:
    """The loss of one micro-batch (views, captions, their share of the global batch): encode the images and
    captions with the frozen parts (the captions with gradients when a text encoder trains), then the family's
    objective, under autocast when training in mixed precision."""
    import torch

    amp = adapter.dtype != torch.float32

    def loss_of(views: list[View], captions: list[str], share: tuple[int, int, int]) -> Any:
        with torch.autocast(device_type=adapter.device, dtype=adapter.dtype, enabled=amp):
            with torch.no_grad():
                latents = latents_of(views, gen, share)
            cond = cond_of(captions)
            return objective.loss(adapter, latents, cond, gen, spec.train, noise_sched, share)

    return loss_of


def _lora_writer(name: str, pipe: Any, family: str, modules: dict[str, Any], spec: TrainSpec, ema: Any
                 ) -> Callable[[Path], Path]:
    import contextlib

    def write(folder: Path) -> Path:
        with ema.swapped() if ema is not None else contextlib.nullcontext():  # the average, when EMA is on
            return save_lora(folder, name, pipe, family, modules, kohya_metadata(spec, family, name), spec.alpha,
                             spec.lora.rank)

    return write
