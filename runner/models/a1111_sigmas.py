"""A1111's sigma schedules, computed as A1111 v1.10 computes them, and handed to the diffusers schedulers.

diffusers derives sigmas from timestep spacings ("linspace", "trailing") and three sigma transforms (Karras,
exponential, beta). A1111's "SGM Uniform" and "Simple" have no such option (diffusers' trailing spacing is up to 2.1%
off), A1111's DPM2 samplers drop the next-to-last sigma of a one-step-longer schedule, and diffusers' Euler a takes
no sigma transform at all. For those, the scheduler class is wrapped so that its `set_timesteps` uses the sigmas
below (the formulas of A1111's `modules/sd_schedulers.py` over k-diffusion's `DiscreteSchedule`: the model's
1000 training sigmas, log-linearly interpolated between timesteps); tests/test_reference_a1111_sigmas.py compares
them with A1111's own numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

BETA_ALPHA = BETA_BETA = 0.6  # A1111's defaults for the Beta schedule (shared_options: beta_dist_alpha/beta)


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The training sigmas by timestep (k-diffusion's CompVisDenoiser), float32."""
    ac = alphas_cumprod.to(torch.float32)
    return ((1 - ac) / ac) ** 0.5


def t_to_sigma(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fractional timestep's sigma: log-sigma interpolated linearly between its two timesteps."""
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * table.log()[low] + w * table.log()[high]).exp()


def sigma_to_t(table: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of a sigma (the inverse of t_to_sigma)."""
    log_table, log_sigma = table.log(), sigma.log()
    dists = log_sigma - log_table[:, None]
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_table.shape[0] - 2)
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).view(sigma.shape)


def _uniform(n: int, table: torch.Tensor) -> torch.Tensor:
    return t_to_sigma(table, torch.linspace(len(table) - 1, 0, n))


def _sgm_uniform(n: int, table: torch.Tensor) -> torch.Tensor:
    # from the timestep of sigma_max to that of sigma_min in n + 1 points, the last (sigma_min) left out
    start, end = sigma_to_t(table, table[-1]), sigma_to_t(table, table[0])
    return t_to_sigma(table, torch.linspace(start, end, n + 1)[:-1])


def _simple(n: int, table: torch.Tensor) -> torch.Tensor:
    # every (len/n)-th training sigma from the top, the index truncated (not rounded as diffusers' trailing does)
    ss = len(table) / n
    return torch.tensor([float(table[-(1 + int(x * ss))]) for x in range(n)])


def _karras(n: int, table: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
    lo, hi = table[0].item() ** (1 / rho), table[-1].item() ** (1 / rho)
    return (hi + torch.linspace(0, 1, n) * (lo - hi)) ** rho


def _exponential(n: int, table: torch.Tensor) -> torch.Tensor:
    return torch.linspace(math.log(table[-1].item()), math.log(table[0].item()), n).exp()


def _beta(n: int, table: torch.Tensor) -> torch.Tensor:
    from scipy import stats

    lo, hi = table[0].item(), table[-1].item()
    ts = stats.beta.ppf(1 - np.linspace(0, 1, n), BETA_ALPHA, BETA_BETA)
    return torch.tensor(lo + ts * (hi - lo), dtype=torch.float32)


SIGMA_FUNCTIONS = {"uniform": _uniform, "sgm_uniform": _sgm_uniform, "simple": _simple, "karras": _karras,
                   "exponential": _exponential, "beta": _beta}


def a1111_sigmas(schedule: str, n: int, alphas_cumprod: torch.Tensor, discard_penultimate: bool = False) -> np.ndarray:
    """A1111's n step sigmas for `schedule` (without the final 0). `discard_penultimate`: its DPM2 samplers build
    n + 1 and drop the next-to-last one (`discard_next_to_last_sigma`)."""
    table = model_sigmas(alphas_cumprod)
    sigmas = SIGMA_FUNCTIONS[schedule](n + 1 if discard_penultimate else n, table).float()
    if discard_penultimate:
        sigmas = sigmas[:-1]
    return sigmas.numpy().astype(np.float64)


_CLASSES: dict[tuple, type] = {}


def with_a1111_sigmas(cls: type, schedule: str, discard_penultimate: bool = False) -> type:
    """`cls` with A1111's sigmas for `schedule`: a subclass of the same name and module (the pipeline records the
    class by those), built once per (class, schedule)."""
    key = (cls, schedule, discard_penultimate)
    if key in _CLASSES:
        return _CLASSES[key]

    def sigmas(self: Any, n: int) -> np.ndarray:
        return a1111_sigmas(schedule, n, self.alphas_cumprod, discard_penultimate)

    if hasattr(cls, "_convert_to_karras"):
        # the Karras path of diffusers' k-style schedulers turns any decreasing sigmas into their timesteps, step
        # pairs (Heun, DPM2) and final sigma, so the schedule replaces the Karras formula there (the config turns
        # that path on: runner/models/schedulers.py)
        def _convert_to_karras(self: Any, in_sigmas: Any, num_inference_steps: int | None = None) -> np.ndarray:
            # (LMS and DPM++ SDE pass only their n spaced sigmas)
            return sigmas(self, num_inference_steps or len(in_sigmas))

        body: dict[str, Any] = {"_convert_to_karras": _convert_to_karras}
    else:
        # Euler a (no sigma option): its own steps, then A1111's sigmas and their timesteps in their place, as
        # diffusers' Euler does with explicit sigmas
        def set_timesteps(self: Any, num_inference_steps: int, device: Any = None, **kw: Any) -> None:
            cls.set_timesteps(self, num_inference_steps, device=device, **kw)
            s = torch.from_numpy(sigmas(self, num_inference_steps)).float()
            t = sigma_to_t(model_sigmas(self.alphas_cumprod), s)
            self.timesteps = t.to(device=device or "cpu", dtype=self.timesteps.dtype)
            self.sigmas = torch.cat([s, s.new_zeros(1)]).to(device=device or "cpu")

        body = {"set_timesteps": set_timesteps}
    sub = type(cls.__name__, (cls,), {**body, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                      "a1111_schedule": schedule})
    _CLASSES[key] = sub
    return sub


def step_sigmas(scheduler: Any, steps: int) -> list[float]:
    """The distinct sigmas a scheduler steps through at `steps` (Heun's and DPM2's step pairs repeat each sigma in
    diffusers' list), ending in the final one: what A1111's `get_sigmas` returns."""
    scheduler.set_timesteps(steps, device="cpu")
    out: list[float] = []
    for s in scheduler.sigmas.tolist():
        if not out or s != out[-1]:
            out.append(float(s))
    return out
