"""`train(cfg, output_dir)`: the diffusers LoRA recipe (frozen base, noise-prediction MSE, peft adapters)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..common.io import atomic_write_bytes
from ..common.paths import slug
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


def train(
    cfg: DictConfig | dict | TrainSpec,
    output_dir: str | Path,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train (or continue training) a LoRA on `cfg.data.dir`; write it, checkpoints, loss log, validation."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from tqdm import tqdm

    from ..models.source import resolve_device

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
    pipe = load_pipe(spec)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    size = spec.data.resolution or int(unet.config.sample_size) * pipe.vae_scale_factor
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, te):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    torch.manual_seed(t.seed)
    def lora_config(targets: Any) -> LoraConfig:
        return LoraConfig(r=lo.rank, lora_alpha=spec.alpha, lora_dropout=lo.dropout, init_lora_weights="gaussian",
                          target_modules=list(targets))

    unet.add_adapter(lora_config(lo.target_modules))
    modules = {"unet": unet}
    if lo.text_encoder:
        te.add_adapter(lora_config(lo.text_encoder_target_modules))
        modules["text_encoder"] = te
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if lo.text_encoder:
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    unet.train()
    te.train(lo.text_encoder)
    optimizer = torch.optim.AdamW(
        params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon
    )
    lr_sched = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps
    )
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(
        t.seed
    )  # timesteps, noise and VAE sampling (CPU: same on every device)
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
    if not (run_dir / CONFIG_FILE).exists() or ckpt is None:
        cfg_obj = OmegaConf.structured(dataclasses.asdict(spec))
        atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg_obj).encode("utf-8"))
    prompts = default_prompts(spec, [e.caption for e in examples])
    pred_type = noise_sched.config.prediction_type
    amp = weight_dtype != torch.float32
    micro = t.batch_size
    bar = tqdm(total=t.steps, initial=start_step, unit="step", disable=not spec.progress, dynamic_ncols=True)
    began = time.perf_counter()
    last = None
    try:
        for step in range(start_step + 1, t.steps + 1):
            t0 = time.perf_counter()
            step_loss = 0.0
            for k in range(t.gradient_accumulation):
                position = ((step - 1) * t.gradient_accumulation + k) * micro
                pixels, captions = _batch(examples, spec, size, position)
                ids = tok(
                    captions,
                    max_length=tok.model_max_length,
                    padding="max_length",
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                with torch.enable_grad(), torch.autocast(device_type=device, dtype=weight_dtype, enabled=amp):
                    with torch.no_grad():
                        dist = vae.encode(pixels.to(device, weight_dtype)).latent_dist
                        latents = dist.sample(generator=gen) * vae.config.scaling_factor
                    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
                    if t.noise_offset:
                        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
                        noise = noise + t.noise_offset * offset.to(device, latents.dtype)
                    steps_t = torch.randint(
                        0, noise_sched.config.num_train_timesteps, (latents.shape[0],), generator=gen
                    ).to(device)
                    noisy = noise_sched.add_noise(latents, noise, steps_t)
                    with torch.set_grad_enabled(lo.text_encoder):
                        hidden = te(ids, return_dict=False)[0]
                    target = (
                        noise if pred_type == "epsilon" else noise_sched.get_velocity(latents, noise, steps_t)
                    )
                    pred = unet(noisy, steps_t, hidden, return_dict=False)[0]
                    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                    scaled = loss / t.gradient_accumulation
                    (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss += float(loss.detach()) / t.gradient_accumulation
            if scaler:
                scaler.unscale_(optimizer)
            if t.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = lr_sched.get_last_lr()[0]
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            last = step_loss
            losses.append(step, step_loss, lr, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, step_loss)
            if step % t.checkpoint_every == 0 or step == t.steps:
                folder = save_checkpoint(run_dir, step, state, t.keep_checkpoints)
                plot(losses.rows(), run_dir / "loss.png")
                render(
                    spec,
                    prompts,
                    folder / f"{name}.safetensors",
                    name,
                    size,
                    run_dir / "validation" / f"step-{step:06d}",
                )
    finally:
        bar.close()
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
