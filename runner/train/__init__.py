"""LoRA fine-tuning: `t2i-train` trains a LoRA from a folder of images; `t2i` then sweeps it."""

from .config import TrainRunConfig, TrainSpec, register_configs, validate_train

__all__ = ["TrainRunConfig", "TrainSpec", "register_configs", "validate_train"]
