"""The base model for training (fp32, from any source the runner accepts) and the training precision."""

from __future__ import annotations

from typing import Any

from ..common.errors import ConfigError
from ..config import TORCH_DTYPES
from .config import TrainSpec


def resolve_precision(name: str, device: str):
    """The dtype of the frozen weights: bf16/fp16 on CUDA (auto prefers bf16), fp32 elsewhere."""
    import torch

    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        name = ("bf16" if bf16 else "fp16") if device == "cuda" else "no"
    if name != "no" and device != "cuda":
        raise ConfigError(
            f"train.mixed_precision={name} needs a CUDA GPU (device is {device}); valid: auto, no"
        )
    if name == "bf16" and not bf16:
        raise ConfigError("train.mixed_precision=bf16 is not supported by this GPU; valid: auto, no, fp16")
    return getattr(torch, TORCH_DTYPES.get(name, "float32"))  # "no": fp32


def load_pipe(spec: TrainSpec) -> tuple[Any, str]:
    """A fresh (uncached) pipeline for `spec.model`, fp32 on the CPU, and its trainable family id."""
    import torch

    from ..models.info import model_info
    from ..models.loading import _from_pretrained, _quiet_libraries, load_error
    from .families import family_spec

    info = model_info(spec.model)
    family_spec(info.family.name, f"{info.pipeline} ({info.family.label})")  # found before loading
    if info.pipeline == "Flux2Pipeline":  # Flux.2 [dev]: a Mistral text encoder the Flux.2 adapter does not call
        raise ConfigError(f"model.id={spec.model.id!r} is Flux.2 [dev] (Flux2Pipeline); t2i-train trains Flux.2 "
                          "[klein] (Flux2KleinPipeline) of that family")
    _quiet_libraries()
    try:
        pipe = _from_pretrained(info, torch.float32)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # the same one line `t2i` prints for this model
        raise load_error(info.source, spec.model, exc) from exc
    return pipe, info.family.name


def latent_factor(pipe: Any, adapter: Any) -> int:
    """Image sides must be multiples of this: the VAE's downsampling times the denoiser's patch (packing)."""
    vae = int(getattr(pipe, "vae_scale_factor", 8))
    if adapter.spec.name in ("flux1", "qwenimage", "flux2"):
        return vae * 2  # 2x2 packing of the latent (Flux.2: patchified latents)
    patch = getattr(adapter.denoiser.config, "patch_size", None) or 1
    if adapter.spec.name == "zimage":
        patch = adapter.denoiser.config.all_patch_size[0]
    return vae * int(patch)


def native_size(pipe: Any, adapter: Any) -> int:
    """The model's native training size in pixels (its `sample_size` or default_sample_size)."""
    cfg = adapter.denoiser.config
    if adapter.spec.denoiser == "unet":
        return int(cfg.sample_size) * pipe.vae_scale_factor
    default = getattr(pipe, "default_sample_size", None)
    return int(default or cfg.get("sample_size", 64)) * int(getattr(pipe, "vae_scale_factor", 8))
