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
from .checkpoint import (
    apply_optimizer_settings,
    changed_settings,
    check_resume,
    clean_partial,
    find_resume,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    save_lora,
    settings,
)
from .config import TrainSpec, validate_train
from .data import Example, load_pixels, sample_order, scan
from .losslog import LossLog, plot
from .model import load_pipe, resolve_precision
from .validation import default_prompts, render

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

    @property
    def steps_per_second(self) -> float:
        return (self.steps - self.start_step) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"t2i-train: steps {self.start_step}->{self.steps} in {self.seconds:.1f} s "
            f"({self.steps_per_second:.2f} steps/s), last loss {self.last_loss} -> {self.lora_file}"
        )


def _batch(examples: list[Example], spec: TrainSpec, size: int, position: int):
    import torch

    d, t = spec.data, spec.train
    idx = sample_order(len(examples), t.seed, position, t.batch_size)
    pixels = [
        load_pixels(
            examples[i], size, d.crop, d.flip, torch.Generator().manual_seed((t.seed << 32) + position + j)
        )
        for j, i in enumerate(idx)
    ]
    return torch.stack(pixels), [examples[i].caption for i in idx]


@dataclass
class _Denoiser:
    """What a training step reads: the frozen base (VAE, text encoder, tokenizer) around the UNet being adapted,
    the noise schedule, and the one CPU generator of timesteps, noise and VAE samples (the same on every device)."""

    unet: Any
    vae: Any
    te: Any
    tok: Any
    noise_sched: Any
    device: str
    dtype: Any
    gen: Any
    train_te: bool

    def loss(self, pixels: Any, captions: list[str], noise_offset: float) -> Any:
        """The diffusers recipe's loss on one micro-batch: MSE of the UNet's prediction against the noise (or
        the velocity, for v-prediction models), under autocast when training in mixed precision."""
        import torch
        import torch.nn.functional as F

        ids = self.tok(captions, max_length=self.tok.model_max_length, padding="max_length", truncation=True,
                       return_tensors="pt").input_ids.to(self.device)
        amp = self.dtype != torch.float32
        with torch.autocast(device_type=self.device, dtype=self.dtype, enabled=amp):
            with torch.no_grad():
                dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
                latents = dist.sample(generator=self.gen) * self.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=self.gen).to(self.device, latents.dtype)
            if noise_offset:
                offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=self.gen)
                noise = noise + noise_offset * offset.to(self.device, latents.dtype)
            steps_t = torch.randint(0, self.noise_sched.config.num_train_timesteps, (latents.shape[0],),
                                    generator=self.gen).to(self.device)
            noisy = self.noise_sched.add_noise(latents, noise, steps_t)
            with torch.set_grad_enabled(self.train_te):
                hidden = self.te(ids, return_dict=False)[0]
            epsilon = self.noise_sched.config.prediction_type == "epsilon"
            target = noise if epsilon else self.noise_sched.get_velocity(latents, noise, steps_t)
            pred = self.unet(noisy, steps_t, hidden, return_dict=False)[0]
            return F.mse_loss(pred.float(), target.float(), reduction="mean")


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


def _add_lora(spec: TrainSpec, unet: Any, te: Any) -> tuple[dict[str, Any], list]:
    """peft LoRA layers on the UNet (and the text encoder with lora.text_encoder): the modules and their
    trainable parameters, kept in fp32 under mixed precision."""
    from peft import LoraConfig

    lo = spec.lora

    def lora_config(targets: Any) -> LoraConfig:
        return LoraConfig(r=lo.rank, lora_alpha=spec.alpha, lora_dropout=lo.dropout, init_lora_weights="gaussian",
                          target_modules=list(targets))

    _check_targets("lora.target_modules", lo.target_modules, unet)
    unet.add_adapter(lora_config(lo.target_modules))
    modules = {"unet": unet}
    if lo.text_encoder:
        _check_targets("lora.text_encoder_target_modules", lo.text_encoder_target_modules, te)
        te.add_adapter(lora_config(lo.text_encoder_target_modules))
        modules["text_encoder"] = te
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if spec.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if lo.text_encoder:
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    unet.train()
    te.train(lo.text_encoder)
    return modules, params


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

    # 1. Check inputs before the model loads: the config, the images, the checkpoint to resume and its fit.
    spec = cfg if isinstance(cfg, TrainSpec) else validate_train(cfg)
    t, lo = spec.train, spec.lora
    examples = scan(spec.data)
    name = lo.name or slug(Path(spec.data.dir).expanduser().resolve().name, 60)
    run_dir = Path(output_dir)
    ckpt = find_resume(spec.resume, run_dir)
    if ckpt is not None and spec.resume not in ("auto", False):
        run_dir = ckpt.parent.parent  # resume=PATH continues that run in its own folder
    fprint = fingerprint(spec, name)
    start_step = check_resume(ckpt, fprint) if ckpt is not None else 0
    changed = changed_settings(ckpt, spec) if ckpt is not None else {}
    device = resolve_device(spec.device)
    weight_dtype = resolve_precision(t.mixed_precision, device)

    # 2. Load the base model, frozen on the device, and add the trainable LoRA layers.
    pipe = load_pipe(spec)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    size = spec.data.resolution or int(unet.config.sample_size) * pipe.vae_scale_factor
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, te):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    torch.manual_seed(t.seed)
    modules, params = _add_lora(spec, unet, te)

    # 3. Optimizer, LR schedule, loss scaler (fp16 only) and the generator: the state a checkpoint holds.
    optimizer = torch.optim.AdamW(
        params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon
    )
    lr_sched = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps
    )
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(t.seed)  # timesteps, noise and VAE sampling (CPU: same on every device)
    lora_writer = _lora_writer(name, unet, te if lo.text_encoder else None, lo.rank, spec.alpha)
    state = {
        "modules": modules,
        "optimizer": optimizer,
        "lr_scheduler": lr_sched,
        "generator": gen,
        "scaler": scaler,
        "lora": lora_writer,
        "info": {"fingerprint": fprint, "settings": settings(spec)},
    }

    # 4. The run dir: resume from the checkpoint (weights, optimizer and random state, loss log) or start one.
    losses = LossLog(run_dir / "loss.csv")
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_partial(run_dir)
    if ckpt is not None:
        load_checkpoint(ckpt, state)
        apply_optimizer_settings(optimizer, lr_sched, spec)
        losses.truncate(start_step)
        news = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        log.warning("resuming from %s (step %d): LoRA weights, optimizer state, random state and loss log come from "
                    "the checkpoint; %s", ckpt, start_step, f"changed settings applied: {news}" if news else
                    "settings unchanged")
    else:
        losses.truncate(0)  # a fresh start (no checkpoint to resume): an earlier attempt's rows are not this run's
    if not (run_dir / CONFIG_FILE).exists() or ckpt is None:
        cfg_obj = OmegaConf.structured(dataclasses.asdict(spec))
        atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg_obj).encode("utf-8"))
    prompts = default_prompts(spec, [e.caption for e in examples])

    # 5. Train: accumulate micro-batch gradients, step; checkpoint (with validation images) every N steps.
    denoiser = _Denoiser(unet, vae, te, tok, noise_sched, device, weight_dtype, gen, lo.text_encoder)
    bar = tqdm(total=t.steps, initial=start_step, unit="step", disable=not spec.progress, dynamic_ncols=True)
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
                position = ((step - 1) * t.gradient_accumulation + k) * t.batch_size
                with torch.enable_grad():  # loading a model turns autograd off process-wide (models/loading.py)
                    loss = denoiser.loss(*_batch(examples, spec, size, position), t.noise_offset)
                    scaled = loss / t.gradient_accumulation
                    (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss += float(loss.detach()) / t.gradient_accumulation
            lr = _apply_gradients(optimizer, lr_sched, scaler, params, t.max_grad_norm)
            last = step_loss
            losses.append(step, step_loss, lr, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, step_loss)
            if step % t.checkpoint_every == 0 or step == t.steps:
                folder = save_checkpoint(run_dir, step, state, t.keep_checkpoints)
                plot(losses.rows(), run_dir / "loss.png")
                if not guard.requested:  # a kill follows a SIGTERM soon: no validation images then
                    render(spec, prompts, folder / f"{name}.safetensors", name, size,
                           run_dir / "validation" / f"step-{step:06d}")
            elif guard.requested:
                save_checkpoint(run_dir, step, state, t.keep_checkpoints)
                plot(losses.rows(), run_dir / "loss.png")
            if guard.requested and step < t.steps:
                log.warning("stopped at step %d of %d; checkpoint written", step, t.steps)
                raise Interrupted(guard.signum or signal.SIGINT)
    finally:
        guard.__exit__()
        bar.close()

    # 6. Write the LoRA (diffusers + kohya files) and the loss plot.
    seconds = time.perf_counter() - began
    lora_file = lora_writer(run_dir)
    plot(losses.rows(), run_dir / "loss.png")
    return TrainResult(
        run_dir, lora_file, run_dir / f"{name}_kohya.safetensors", start_step, t.steps, last, seconds
    )


def _lora_writer(name: str, unet: Any, te: Any | None, rank: int, alpha: float) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        return save_lora(folder, name, unet, te, rank, alpha)

    return write
