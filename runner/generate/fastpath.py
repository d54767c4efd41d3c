"""Fast-path options (`perf:` config) applied to a loaded, cached pipeline before a run's first batch.

Each option is off by default until measured faster (BENCHMARKS.md). `apply_perf` is idempotent and
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
from ..lora.adapters import AdapterManager
from ..lora.fusing import FusingAdapterManager

log = logging.getLogger(__name__)


@dataclass
class PerfState:
    """What has been applied to one cached pipeline."""

    channels_last: bool = False
    fused_qkv: bool = False
    compiled: bool = False


def _state(loaded: Any) -> PerfState:
    state = getattr(loaded, "perf_state", None)
    if state is None:
        state = PerfState()
        loaded.perf_state = state
    return state


def _memory_format(pipe: Any, channels_last: bool) -> None:
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name in ("unet", "vae"):
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


def apply_perf(loaded: Any, perf: PerfConfig, uses_loras: bool) -> PerfState:
    """Bring `loaded.pipe` to the state `perf` asks for; `uses_loras` = the run has a non-empty LoRA set."""
    state = _state(loaded)
    pipe = loaded.pipe
    if perf.channels_last != state.channels_last:
        _memory_format(pipe, perf.channels_last)
        state.channels_last = perf.channels_last
    want_qkv = perf.fuse_qkv and not uses_loras
    if perf.fuse_qkv and uses_loras:
        log.info("perf.fuse_qkv skipped: this run has LoRA sets (fused QKV would bypass the LoRA layers)")
    if want_qkv != state.fused_qkv:
        if want_qkv:
            pipe.fuse_qkv_projections()
        else:
            pipe.unfuse_qkv_projections()
        state.fused_qkv = want_qkv
    if perf.compile and not state.compiled:
        _check_compile(loaded.device)
        pipe.unet.compile(dynamic=False)
        state.compiled = True
    elif not perf.compile and state.compiled:
        pipe.unet._compiled_call_impl = None  # back to eager (nn.Module.compile's own attribute)
        state.compiled = False
    manager = loaded.adapters
    want_fuse = perf.fuse_lora or (perf.compile and uses_loras)
    if manager is not None:
        if want_fuse and type(manager) is AdapterManager:
            manager.__class__ = FusingAdapterManager  # same state, fusing activate()
        elif not want_fuse and isinstance(manager, FusingAdapterManager):
            manager.unfuse()
            manager.__class__ = AdapterManager
    return state
