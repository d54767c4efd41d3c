"""The run config: the Hydra schema (schema.py), its validation into a typed RunSpec (validate.py), and the
command-line override pre-check (overrides.py)."""

from ..common.errors import ConfigError
from .schema import (
    GridConfig,
    MemoryConfig,
    ModelConfig,
    PerfConfig,
    RunConfig,
    ServerConfig,
    ShardConfig,
    ViewerConfig,
    register_configs,
)
from .validate import (
    DEVICES,
    DTYPES,
    MAX_SEED,
    PIPELINES,
    TORCH_DTYPES,
    LoraSpec,
    PromptSpec,
    RunSpec,
    lora_name,
    validate,
)

__all__ = [
    "DEVICES", "DTYPES", "MAX_SEED", "PIPELINES", "TORCH_DTYPES", "ConfigError", "GridConfig", "LoraSpec",
    "MemoryConfig",
    "ModelConfig", "PerfConfig", "PromptSpec", "RunConfig", "RunSpec", "ServerConfig", "ShardConfig", "ViewerConfig",
    "lora_name",
    "register_configs", "validate",
]

register_configs()  # so any Hydra compose of conf/ (t2i, t2i-serve, tests) finds the `schema` its defaults list
