"""Training config schema (Hydra structured configs) and its validation into a typed `TrainSpec`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..common.errors import ConfigError
from ..config import DEVICES, ModelConfig
from ..config.validate import _choice, _number, _side
from .families import PRESETS
from .objective import SAMPLING
from .optim import OPTIMIZERS, check_optimizer
from .quant import check_quantize

CAPTION_SOURCES = ("auto", "txt", "jsonl", "fixed")
CROPS = ("center", "random")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class DataConfig:
    dir: str | None = None  # folder of images (png, jpg, jpeg, webp, bmp)
    caption: str | None = None  # one instance prompt (all images with captions=fixed, else the fallback)
    captions: str = "auto"  # auto | txt (same-name .txt) | jsonl (metadata.jsonl: file_name, text) | fixed
    resolution: int | None = None  # square side in pixels, multiple of 8; null = the model's native size
    crop: str = "center"  # center | random
    buckets: list[int] | None = None  # aspect-ratio buckets at these resolutions (sides of the square of equal area,
    # e.g. [512, 768, 1024]: every image at each, at its own aspect ratio); null = one square data.resolution
    flip: bool = False  # random horizontal flip
    trigger: str | None = None  # replaces `[trigger]` in captions; prepended ("TRIGGER, caption") where absent
    caption_dropout: float = 0.0  # probability of training a sample on the empty caption
    shuffle_tags: bool = False  # shuffle the comma-separated tags of each caption every time it is drawn
    keep_tokens: int = 0  # ... keeping the first N tags in place (kohya's keep_tokens)
    min_size: int = 32  # images with a side below this (pixels) are skipped, one line each
    cache_latents: bool = False  # keep each image view's VAE posterior on disk (cache_dir), reused across runs
    cache_text: bool = False  # keep each caption's text-encoder output on disk (frozen text encoders)
    cache_dir: str | None = None  # null = DATA_DIR/.t2i-cache (beside the images, as kohya's and ai-toolkit's)


ADAPTER_TYPES = ("lora", "dora", "loha", "lokr")


@dataclass
class LoraConfig:
    type: str = "lora"  # lora | dora | loha | lokr (peft's LoraConfig / use_dora / LoHaConfig / LoKrConfig)
    rank: int = 16
    alpha: float | None = None  # null = rank (scale 1.0)
    dropout: float = 0.0
    preset: str = "attn"  # attn | attn_mlp | all_linear | all (linear + conv): the family's target modules
    target_modules: list[str] | None = None  # explicit module names (peft suffix match); null = the preset
    text_encoder: bool = False  # also train a LoRA on the text encoder
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    name: str | None = None  # file stem of the saved LoRA; null = the data folder's name


@dataclass
class OptimConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt; use lr=1.0)
    ema_decay: float | None = None  # e.g. 0.999: the saved LoRA is the moving average of the trained weights
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    noise_offset: float = 0.0
    timestep_sampling: str = "sigmoid"  # flow families: uniform | sigmoid | logit_normal | shift (objective.py)
    logit_mean: float = 0.0  # logit_normal sampling
    logit_std: float = 1.0
    timestep_shift: float | None = None  # shift sampling; null = the model scheduler's shift
    guidance_scale: float = 1.0  # Flux.1-dev's distilled guidance embedding during training (ai-toolkit: 1.0)
    mixed_precision: str = "auto"  # auto = bf16 (fp16 if unsupported) on CUDA, fp32 on cpu/mps | no | fp16 | bf16
    gradient_checkpointing: bool = False
    quantize_base: str | None = None  # null | int8: the frozen denoiser's Linear weights in int8 (torchao; quant.py)
    seed: int = 0
    checkpoint_every: int = 500  # and at the last step; each writes a resumable checkpoint + validation images
    keep_checkpoints: int = 0  # 0 = keep all


@dataclass
class ValidationConfig:
    prompts: list[str] | None = None  # null = up to 2 captions of the data set; [] = no validation images
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str | None = None
    include_base: bool = False  # also render the base model (no LoRA) for comparison
    dir: str | None = None  # held-out images (captions as data.*): validation loss at every checkpoint, best kept


@dataclass
class TrainRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    device: str = "auto"  # auto = mps -> cuda -> cpu
    resume: Any = (
        "auto"  # auto (continue this run dir's last checkpoint) | false | PATH (run or checkpoint dir)
    )
    output_dir: str | None = None  # null = Hydra's run dir
    progress: bool = True
    verbose: bool = False


def register_configs() -> None:
    """Register the schema so `conf/train.yaml` can list it first in its defaults."""
    from ..config.schema import register_resolvers

    register_resolvers()
    ConfigStore.instance().store(name="train_schema", node=TrainRunConfig)


@dataclass(frozen=True)
class TrainSpec:
    """A validated training run (plain dataclasses, every value checked)."""

    model: ModelConfig
    data: DataConfig
    lora: LoraConfig
    train: OptimConfig
    validation: ValidationConfig
    device: str
    resume: str | bool  # "auto", False, or a path
    output_dir: str | None
    progress: bool
    verbose: bool

    @property
    def alpha(self) -> float:
        return float(self.lora.rank if self.lora.alpha is None else self.lora.alpha)


def _modules(key: str, value: list[str]) -> list[str]:
    if not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{key}={value!r} is not valid; give module names such as {UNET_TARGETS}")
    return list(value)


def validate_train(cfg: DictConfig | dict) -> TrainSpec:
    """Check every value of a composed training config; raise ConfigError naming the first bad one."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainRunConfig), cfg)
    c = OmegaConf.to_object(cfg)
    d, lo, t, v = c.data, c.lora, c.train, c.validation
    if not isinstance(d.dir, str) or not d.dir.strip():
        raise ConfigError("data.dir is not set; give the folder of training images (data.dir=PATH)")
    _choice("data.captions", d.captions, CAPTION_SOURCES)
    if d.captions == "fixed" and not (d.caption or "").strip():
        raise ConfigError(
            "data.captions=fixed needs data.caption (the instance prompt), e.g. data.caption='a sks cat'"
        )
    _side("data.resolution", d.resolution)
    if d.buckets is not None:
        if not d.buckets:
            raise ConfigError("data.buckets=[] is empty; give resolutions such as [512, 768] or null")
        for side in d.buckets:
            _side("data.buckets", side)
    _choice("data.crop", d.crop, CROPS)
    if d.trigger is not None and not d.trigger.strip():
        raise ConfigError("data.trigger='' is empty; give the trigger word (data.trigger=sks) or null")
    _number("data.caption_dropout", d.caption_dropout, float, 0.0, 1.0)
    _number("data.keep_tokens", d.keep_tokens, int, 0, 1000)
    _number("data.min_size", d.min_size, int, 1, 100_000)
    _choice("lora.type", lo.type, ADAPTER_TYPES)
    _number("lora.rank", lo.rank, int, 1, 1024)
    if lo.alpha is not None:
        _number("lora.alpha", lo.alpha, float, 1e-6, 1e6)
    _number("lora.dropout", lo.dropout, float, 0.0, 0.99)
    _choice("lora.preset", lo.preset, PRESETS)
    if lo.target_modules is not None:
        lo.target_modules = _modules("lora.target_modules", lo.target_modules)
    lo.text_encoder_target_modules = _modules(
        "lora.text_encoder_target_modules", lo.text_encoder_target_modules
    )
    if lo.name is not None and (not lo.name.strip() or any(ch in lo.name for ch in "/\\") or ".." in lo.name):
        raise ConfigError(f"lora.name={lo.name!r} is not a plain file stem")
    _number("train.steps", t.steps, int, 1, 10_000_000)
    _number("train.batch_size", t.batch_size, int, 1, 4096)
    _number("train.gradient_accumulation", t.gradient_accumulation, int, 1, 4096)
    _number("train.lr", t.lr, float, 0.0, 10.0)
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    check_optimizer(t.optimizer)
    if t.ema_decay is not None:
        _number("train.ema_decay", t.ema_decay, float, 0.0, 0.999999)
    _choice("train.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS)
    _number("train.lr_warmup_steps", t.lr_warmup_steps, int, 0, 10_000_000)
    _number("train.max_grad_norm", t.max_grad_norm, float, 0.0, 1e9)
    _number("train.noise_offset", t.noise_offset, float, 0.0, 1.0)
    _choice("train.timestep_sampling", t.timestep_sampling, SAMPLING)
    _number("train.logit_std", t.logit_std, float, 1e-6, 100.0)
    if t.timestep_shift is not None:
        _number("train.timestep_shift", t.timestep_shift, float, 1e-3, 1000.0)
    _number("train.guidance_scale", t.guidance_scale, float, 0.0, 100.0)
    _choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    check_quantize(t.quantize_base)
    _number("train.seed", t.seed, int, 0, 2**32 - 1)
    _number("train.checkpoint_every", t.checkpoint_every, int, 1, 10_000_000)
    _number("train.keep_checkpoints", t.keep_checkpoints, int, 0, 1_000_000)
    if v.prompts is not None and not all(isinstance(p, str) and p.strip() for p in v.prompts):
        raise ConfigError(f"validation.prompts={v.prompts!r} has an empty prompt")
    for s in v.seeds:
        _number("validation.seeds", s, int, 0, 2**64 - 1)
    _number("validation.steps", v.steps, int, 1, 1000)
    if v.dir is not None and (not isinstance(v.dir, str) or not v.dir.strip()):
        raise ConfigError(f"validation.dir={v.dir!r} is empty; give a folder of held-out images or null")
    _choice("device", c.device, DEVICES)
    resume = c.resume
    if resume in (None, False, "false", "no", "never"):
        resume = False
    elif resume in (True, "true", "auto"):
        resume = "auto"
    elif not isinstance(resume, str) or not resume.strip():
        raise ConfigError(f"resume={resume!r} is not valid; valid: auto, false, or a run/checkpoint folder")
    return TrainSpec(c.model, d, lo, t, v, c.device, resume, c.output_dir, bool(c.progress), bool(c.verbose))
