"""The base model for training (fp32, from any source the runner accepts) and the training precision."""

from __future__ import annotations

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


def load_pipe(spec: TrainSpec):
    """A fresh (uncached) SD 1.x/2.x pipeline for `spec.model`, fp32 on the CPU."""
    import torch

    from ..models.info import model_info
    from ..models.loading import _from_pretrained, _quiet_libraries, load_error

    info = model_info(spec.model)
    if info.family.name != "sd15":  # found before loading: the model's family from its model_index.json
        raise ConfigError(f"model.id={spec.model.id!r} is a {info.pipeline} ({info.family.label}); t2i-train "
                          "trains LoRAs for Stable Diffusion 1.x/2.x pipelines only")
    _quiet_libraries()
    try:
        pipe = _from_pretrained(info, torch.float32)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # the same one line `t2i` prints for this model
        raise load_error(info.source, spec.model, exc) from exc
    if getattr(pipe, "text_encoder_2", None) is not None or not hasattr(pipe, "unet"):
        raise ConfigError(
            f"model.id={spec.model.id!r} is a {type(pipe).__name__}; t2i-train trains LoRAs for "
            "Stable Diffusion 1.x/2.x pipelines only"
        )
    return pipe
