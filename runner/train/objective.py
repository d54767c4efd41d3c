"""The training objective: how a clean latent is noised and what the denoiser must predict, per kind of family.

DDPM (SD 1.x, SDXL): a uniform integer timestep, `add_noise`, target = the noise (or the velocity for
v-prediction models), as diffusers' train_text_to_image_lora. Rectified flow (Flux, SD3, Qwen-Image, Z-Image,
Flux.2): x_t = (1 - s) x0 + s n, target = n - x0, with s drawn by `train.timestep_sampling`:
- `uniform`: s ~ U(0, 1);
- `sigmoid`: s = sigmoid(N(0, 1)) (kohya/ai-toolkit `sigmoid`);
- `logit_normal`: s = sigmoid(N(logit_mean, logit_std)) (SD3 paper, diffusers `weighting_scheme=logit_normal`);
- `shift`: s ~ U(0, 1) then shifted like the model's own inference schedule: s' = shift*s / (1 + (shift-1) s)
  with `train.timestep_shift` (null = the scheduler's `shift`, or for resolution-dependent schedulers the
  exp(mu) of the image's token count, as diffusers' `calculate_shift`).
All draws come from the one CPU generator, so a run (and its resume) is the same on every device.
"""

from __future__ import annotations

import math
from typing import Any

SAMPLING = ("uniform", "sigmoid", "logit_normal", "shift")


def flow_shift(scheduler_config: dict, tokens: int, override: float | None) -> float:
    """The shift for `shift` sampling: the override, else the scheduler's (dynamic: exp(mu) at `tokens`)."""
    if override is not None:
        return float(override)
    c = scheduler_config
    if c.get("use_dynamic_shifting"):
        base, top = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        lo, hi = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        mu = lo + (tokens - base) * (hi - lo) / (top - base)
        return math.exp(mu)
    return float(c.get("shift", 1.0))


def sample_sigmas(n: int, how: str, gen: Any, shift: float, mean: float = 0.0, std: float = 1.0) -> Any:
    """`n` noise levels in (0, 1) drawn from `gen` by the named scheme."""
    import torch

    if how == "uniform" or how == "shift":
        s = torch.rand((n,), generator=gen)
        if how == "shift":
            s = shift * s / (1 + (shift - 1) * s)
        return s
    return torch.sigmoid(torch.randn((n,), generator=gen) * (std if how == "logit_normal" else 1.0)
                         + (mean if how == "logit_normal" else 0.0))


def loss(adapter: Any, latents: Any, cond: dict, gen: Any, opts: Any, noise_sched: Any = None,
         share: tuple[int, int, int] | None = None, level: float | None = None) -> Any:
    """MSE between the denoiser's prediction and the target on one micro-batch of clean latents.

    `share` = (start, stop, total): `latents` are samples start..stop-1 of a global batch of `total` (one process
    of several, dist.py); every draw is made for the global batch and sliced, as one process would draw it.
    `level` in (0, 1) fixes the noise level instead of drawing it (the validation loss, `valloss.py`): the sigma
    of a flow family, the fraction of the DDPM schedule's timesteps."""
    import torch
    import torch.nn.functional as F

    a, b, n = share or (0, latents.shape[0], latents.shape[0])
    noise = torch.randn((n, *latents.shape[1:]), generator=gen)[a:b].to(latents.device, latents.dtype)
    if opts.noise_offset:
        offset = torch.randn((n, latents.shape[1], 1, 1), generator=gen)[a:b]
        noise = noise + opts.noise_offset * offset.to(latents.device, latents.dtype)
    if not adapter.spec.flow:
        n_train = noise_sched.config.num_train_timesteps
        steps_t = (torch.full((latents.shape[0],), min(n_train - 1, int(level * n_train))) if level is not None
                   else torch.randint(0, n_train, (n,), generator=gen)[a:b]).to(latents.device)
        noisy = noise_sched.add_noise(latents, noise, steps_t)
        epsilon = noise_sched.config.prediction_type == "epsilon"
        target = noise if epsilon else noise_sched.get_velocity(latents, noise, steps_t)
        pred = adapter.predict(noisy, steps_t, cond)
    else:
        tokens = latents.shape[-1] * latents.shape[-2] // (4 if adapter.spec.name != "flux2" else 1)
        shift = flow_shift(dict(adapter.pipe.scheduler.config), tokens, opts.timestep_shift)
        sig = (torch.full((latents.shape[0],), float(level)) if level is not None else
               sample_sigmas(n, opts.timestep_sampling, gen, shift, opts.logit_mean, opts.logit_std)[a:b])
        s = sig.to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        target = noise - latents
        pred = adapter.predict(noisy, sig.to(latents.device, latents.dtype), cond)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")
