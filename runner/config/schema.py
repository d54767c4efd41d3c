"""The Hydra structured-config schema of `t2i` (registered in the ConfigStore as `schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from ..common.errors import ConfigError  # noqa: F401 - part of the schema's API


@dataclass
class ModelConfig:
    id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None
    pipeline: str = "auto"
    dtype: str = "auto"
    variant: str | None = None
    config: str | None = None  # diffusers config (dir or hub id) for single-file checkpoints
    allow_pickle: bool = False


@dataclass
class GridConfig:
    enabled: bool = True
    x: str | None = None
    y: str | None = None
    max_size: int = 8192
    font_size: int = 0  # 0 = derived from cell size


@dataclass
class PerfConfig:
    """Fast-path options applied to the loaded pipeline (generate/fastpath.py); `auto` = what measured faster on
    this device (BENCHMARKS.md), resolved per run and recorded per image."""

    channels_last: bool = False  # measured slower on an H200 (extra layout copies) and on cpu
    fuse_qkv: bool = False  # with LoRA sets it merges them (a fused projection would bypass peft's layers)
    fuse_lora: Any = "auto"  # merge each LoRA set into the weights on switch; auto = on for cuda
    compile: Any = "auto"  # torch.compile the denoiser; auto = on for cuda runs long enough to repay the warm-up
    writer_threads: int = 2  # PNG encode/write threads


@dataclass
class ShardConfig:
    index: int = 0
    count: int = 1


@dataclass
class ServerConfig:
    """`t2i-serve` settings (conf/server/default.yaml); ignored by `t2i`."""

    host: str = "127.0.0.1"
    port: int = 8000
    allowed_models: list[str] = field(default_factory=list)  # model ids allowed besides model.id
    allowed_lora_dirs: list[str] = field(default_factory=list)  # local LoRA paths must lie inside one of these
    allow_hub_loras: bool = True
    max_steps: int = 150
    max_images: int = 8
    max_side: int = 1024
    queue_size: int = 32
    merge_max_images: int = 16  # queued compatible requests are merged into one run up to this many images
    output_dir: str | None = None  # null = outputs/server/<date>/<time>


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: list[Any] = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    negative_prompt: str = ""
    seeds: list[Any] = field(default_factory=lambda: [0])
    steps: Any = 30
    guidance_scale: Any = 7.5
    width: Any = None
    height: Any = None
    scheduler: Any = None
    clip_skip: Any = None  # A1111 "Clip skip": 1 = last CLIP layer (null/1 = off), 2 = penultimate, …
    device: str = "auto"
    batch_size: Any = "auto"
    batch_invariant: Any = "auto"
    lora_sets: list[Any] = field(default_factory=lambda: [[]])
    lora_scales: Any = None
    lora_blocks: Any = None  # block-weight specs swept for every adapter without its own `blocks` (presets/lists)
    lora_dirs: list[str] = field(default_factory=list)  # folders where LoRAs are found by file stem or hash
    allow_pickle_lora: bool = False
    max_loaded_loras: int = 8
    resume: bool = True
    output_dir: str | None = None
    grid: GridConfig = field(default_factory=GridConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    from_image: str | None = None
    strict: bool = True
    nan_retry_fp32_vae: bool = False  # regenerate all-black (NaN) images with the VAE in fp32
    verbose: bool = False


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can list it first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RunConfig)
