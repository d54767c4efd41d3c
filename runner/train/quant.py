"""Training on a quantized base (`train.quantize_base=int8`): the denoiser's Linear weights stored in int8
(torchao's `Int8WeightOnlyConfig`, per-channel scales; matmuls dequantize on the fly) under peft's adapters,
which peft wraps as its `TorchaoLoraLinear` — the QLoRA recipe: the frozen base in a quarter of its fp32 memory
(half of bf16), the adapter and its optimizer in full precision. Convolutions, norms, embeddings, the VAE and the
text encoders stay as they are. The `train-quant` extra (`pip install 't2i-runner[train-quant]'`) installs
torchao; asked for without it, one line says so before the model loads.
"""

from __future__ import annotations

from typing import Any

from ..common.errors import ConfigError

QUANTIZE = ("int8",)


def check_quantize(value: str | None) -> None:
    """ConfigError for an unknown mode, or when torchao is not installed."""
    if value is None:
        return
    if value not in QUANTIZE:
        raise ConfigError(f"train.quantize_base={value!r} is not valid; valid: null, {', '.join(QUANTIZE)}")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"train.quantize_base={value} needs the torchao package, which is not installed: pip "
                          "install 't2i-runner[train-quant]' (or torchao); or use train.quantize_base=null") from exc


def quantize_denoiser(denoiser: Any, mode: str) -> int:
    """Quantize the weights of every Linear layer of `denoiser` in place (before the adapters are added); the
    number of layers quantized."""
    import warnings

    import torch

    # peft's note that merging into int8 weights needs a requantizer: the trainer saves adapters, never merges
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(denoiser, Int8WeightOnlyConfig())
    return sum(1 for m in denoiser.modules() if isinstance(m, torch.nn.Linear) and is_quantized(m.weight))


def is_quantized(weight: Any) -> bool:
    """Whether a weight is a torchao quantized tensor."""
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)
