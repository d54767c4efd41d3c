"""Memory modes (`memory:` config): diffusers' own switches for big models on small machines.

CPU offload (model-level or sequential) is set when the pipeline loads (it replaces moving it to the device; the
load cache keys on it); VAE tiling, VAE slicing and attention slicing are switched on a loaded pipeline and back
off when a later run does not ask for them (the pipeline is cached per process).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..common.errors import ConfigError
from ..config import MemoryConfig
from .families import Family


def check_memory(memory: MemoryConfig, device: str, family: Family, where: str = "") -> None:
    """Refuse, before anything loads, a memory mode this device or family cannot do."""
    if memory.offload != "none" and device == "cpu":
        raise ConfigError(f"memory.offload={memory.offload} moves weights between the CPU and a GPU, but device=cpu "
                          "(everything is on the CPU already); use memory.offload=none, or a GPU device")
    if memory.attention_slicing not in (False, None) and not family.attention_slicing:
        raise ConfigError(f"{where}memory.attention_slicing is not available on {family.label} (diffusers slices the "
                          "attention of UNets only); use memory.vae_tiling / memory.offload, or "
                          "memory.attention_slicing=false")


def record(memory: MemoryConfig | None) -> dict[str, Any]:
    """The memory switches as recorded per image."""
    return asdict(memory or MemoryConfig())


def apply_memory(loaded: Any, memory: MemoryConfig) -> None:
    """Switch VAE tiling/slicing and attention slicing of a loaded pipeline to what `memory` asks for."""
    pipe, vae = loaded.pipe, getattr(loaded.pipe, "vae", None)
    for flag, on, off in (("vae_tiling", "enable_tiling", "disable_tiling"),
                          ("vae_slicing", "enable_slicing", "disable_slicing")):
        want = getattr(memory, flag)
        if want and (vae is None or not hasattr(vae, on)):
            raise ConfigError(f"memory.{flag}=true: the VAE of this {type(pipe).__name__} "
                              f"({type(vae).__name__}) has no {on}(); set memory.{flag}=false")
        if vae is not None and hasattr(vae, off):
            getattr(vae, on if want else off)()
    slicing = memory.attention_slicing
    if slicing in (False, None):
        if loaded.memory is not None and loaded.memory.attention_slicing not in (False, None):
            pipe.disable_attention_slicing()
    else:
        pipe.enable_attention_slicing("auto" if slicing is True else slicing)
    loaded.memory = memory
