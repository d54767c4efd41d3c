"""Fast-path options (`perf:` config) applied to a loaded, cached pipeline before a run's first batch.

Each option is off by default until measured faster (docs/performance.md). `apply_perf` is idempotent and
reversible: the pipeline is cached per process, so a run that turns an option off gets the plain one back.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

from ..common.errors import ConfigError
from ..config import PerfConfig

log = logging.getLogger(__name__)


@dataclass
class PerfState:
    """What has been applied to one cached pipeline."""

    channels_last: bool = False
    fused_qkv: bool = False
    compiled: bool = False
    hooked: bool = False  # the merge engine refreshes fused projections after each merge


def _state(loaded: Any) -> PerfState:
    if getattr(loaded, "perf_state", None) is None:
        loaded.perf_state = PerfState()  # lives as long as the cached pipeline
    return loaded.perf_state


def _memory_format(pipe: Any, channels_last: bool) -> None:
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name in ("unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(memory_format=fmt)


def _check_compile(device: str) -> None:
    import torch

    if not hasattr(torch, "compile"):
        raise ConfigError("perf.compile=true needs torch>=2.0; valid here: perf.compile=false")
    if device == "mps":
        raise ConfigError("perf.compile=true is not supported on device=mps; valid here: perf.compile=false")
    if device == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        raise ConfigError(
            "perf.compile=true on cpu needs a C++ compiler (g++ or $CXX) on PATH; "
            "install one or set perf.compile=false"
        )


# torch.compile repays its warm-up (~47 s for an SD1.5 UNet at batch 16 on an H200) once it has saved that much:
# 1.78 ms per image-step at 512x512 there (0.2068 -> 0.1533 s/image at 30 steps), so from ~26,000 image-steps
# (pixel-weighted; ~880 images of 30 steps at 512x512). docs/performance.md has the measurement.
COMPILE_AUTO_MIN_IMAGE_STEPS = 26_000


def image_steps(jobs: Any, default_size: tuple[int, int]) -> float:
    """Denoising work of `jobs` in 512x512 image-steps (what compile's saving scales with)."""
    dw, dh = default_size
    return sum(j.steps * (j.width or dw) * (j.height or dh) / 512**2 for j in jobs)


def resolve_perf(perf: PerfConfig, device: str, work: float) -> PerfConfig:
    """The `auto` options made concrete for this run: fuse_lora on cuda (LoRA sets cost what the base costs,
    measured +0.5 %..-3.6 % there vs +11.5 % unmerged); compile on cuda from COMPILE_AUTO_MIN_IMAGE_STEPS of work."""
    import dataclasses

    fuse = device == "cuda" if perf.fuse_lora == "auto" else bool(perf.fuse_lora)
    compile_ = (device == "cuda" and work >= COMPILE_AUTO_MIN_IMAGE_STEPS) if perf.compile == "auto" \
        else bool(perf.compile)
    return dataclasses.replace(perf, fuse_lora=fuse, compile=compile_)


def refresh_fused_projections(pipe: Any) -> None:
    """Rebuild every fused QKV/KV projection from its current to_q/to_k/to_v weights.

    diffusers copies the weights into `to_qkv` once, when fusing; a LoRA merged or restored afterwards would
    leave the fused copy stale (a previous set's LoRA baked into later images), so every merge calls this.
    """
    import torch
    from diffusers.models.attention_processor import Attention

    with torch.no_grad():
        for part in _parts(pipe):
            for module in part.modules():
                if not (isinstance(module, Attention) and getattr(module, "fused_projections", False)):
                    continue
                if hasattr(module, "to_qkv"):
                    module.to_qkv.weight.copy_(torch.cat([module.to_q.weight, module.to_k.weight,
                                                          module.to_v.weight]))
                if hasattr(module, "to_kv") and module.is_cross_attention:
                    module.to_kv.weight.copy_(torch.cat([module.to_k.weight, module.to_v.weight]))


def _parts(pipe: Any) -> list[Any]:
    return [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer", "vae")) if m is not None]


def _unfuse_qkv(pipe: Any) -> None:
    """Back to separate projections, dropping the fused copies (they would only hold memory)."""
    from diffusers.models.attention_processor import Attention

    pipe.unfuse_qkv_projections()
    for part in _parts(pipe):
        for module in part.modules():
            if isinstance(module, Attention) and getattr(module, "fused_projections", False):
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(module, name):
                        delattr(module, name)
                module.fused_projections = False


def apply_perf(loaded: Any, perf: PerfConfig, uses_loras: bool) -> PerfState:
    """Bring `loaded.pipe` to the state `perf` asks for; `uses_loras` = the run has a non-empty LoRA set.

    LoRA sets are merged into the weights (the merge engine) with `fuse_lora`, and also whenever fused QKV or
    compile is on: fused projections would bypass peft's unmerged LoRA layers, and compiled code would
    recompile per set. Every image records the resulting state (outputs/record.py `perf`).
    """
    perf = resolve_perf(perf, loaded.device, 0.0)  # an unresolved `auto` means a short run (run() resolves it)
    state = _state(loaded)
    pipe = loaded.pipe
    manager = loaded.adapters
    # 1. Merge or compute LoRA sets
    merge = perf.fuse_lora or (uses_loras and (perf.fuse_qkv or perf.compile))
    if manager is not None:
        if not state.hooked:  # every merge refreshes fused projections (a no-op while none are fused)
            manager.engine.after_apply.append(lambda: refresh_fused_projections(pipe))
            state.hooked = True
        if manager.merge and not merge:
            manager.engine.apply([])  # base weights back; peft computes the sets from now on
        manager.merge = merge
    # 2. Memory format
    if perf.channels_last != state.channels_last:
        _memory_format(pipe, perf.channels_last)
        state.channels_last = perf.channels_last
    # 3. Fused QKV, built from the weights as they are now (the merge engine keeps it current)
    if perf.fuse_qkv != state.fused_qkv:
        if perf.fuse_qkv:
            pipe.fuse_qkv_projections()
        else:
            _unfuse_qkv(pipe)
        state.fused_qkv = perf.fuse_qkv
    # 4. torch.compile of the denoiser
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if perf.compile and not state.compiled:
        _check_compile(loaded.device)
        denoiser.compile(dynamic=False)
        state.compiled = True
    elif not perf.compile and state.compiled:
        denoiser._compiled_call_impl = None  # back to eager (nn.Module.compile's own attribute)
        state.compiled = False
    return state
