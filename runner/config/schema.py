"""The Hydra structured-config schema of `t2i` (registered in the ConfigStore as `schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from ..common.errors import ConfigError  # noqa: F401 - part of the schema's API


@dataclass
class ModelConfig:
    id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, diffusers folder or .safetensors file
    revision: str | None = None  # hub revision (branch, tag or commit)
    pipeline: str = "auto"  # auto = model_index.json's class; sd, sdxl or a diffusers pipeline class name
    dtype: str = "auto"  # auto = fp16 on cuda/mps, fp32 on cpu; fp32, fp16, bf16
    variant: str | None = None  # the weight files' variant (e.g. fp16)
    config: str | None = None  # diffusers config (dir or hub id) for single-file checkpoints
    allow_pickle: bool = False  # load pickle (.bin/.ckpt) weights; safetensors only otherwise
    family: str | None = None  # the family a group's settings are for (runner/models/families.py); null = any
    settings: dict[str, Any] = field(default_factory=dict)  # the group's published defaults (steps, size, …)
    transformer: str | None = None  # a transformer checkpoint replacing the model's own (.gguf or .safetensors)


@dataclass
class MemoryConfig:
    """diffusers' memory switches for big models on small machines (recorded per image)."""

    offload: str = "none"  # none | model (enable_model_cpu_offload) | sequential (enable_sequential_cpu_offload)
    vae_tiling: bool = False  # decode in tiles (pixels within a small tolerance of plain)
    vae_slicing: bool = False  # decode a batch one image at a time (same pixels)
    attention_slicing: Any = False  # false | true (= auto) | auto | max | an int slice size


@dataclass
class GridConfig:
    enabled: bool = True  # write labelled comparison grids to RUN_DIR/grids/ after a run
    x: str | None = None  # the axis across (prompt, seed, lora_set, …); null = from the swept axes
    y: str | None = None  # the axis down
    max_size: int = 8192  # largest side of a grid image (at most 8192: no decompression-bomb errors)
    font_size: int = 0  # 0 = derived from cell size
    min_cell: int = 128  # cells never shrink below this side; a bigger grid is split into pages


@dataclass
class ViewerConfig:
    """RUN_DIR/index.html, the interactive viewer (runner/outputs/viewer.py), and its thumbnails."""

    enabled: bool = True  # every run writes RUN_DIR/index.html
    thumb_size: int = 256  # longest side of the JPEG thumbnails in RUN_DIR/thumbs/


@dataclass
class HiresConfig:
    """A1111's Hires. fix (config/hires.py, generate/hires.py): off while `scale` (and resize_*) are unset. The
    first four keys and scheduler, schedule and model take lists (swept)."""

    scale: Any = None  # A1111 "Hires upscale" (e.g. 2); null = off
    steps: Any = 0  # A1111 "Hires steps"; 0 = the first pass's steps
    denoise: Any = 0.7  # A1111 "Denoising strength" of the second pass
    upscaler: Any = "Latent"  # A1111 "Hires upscaler": Latent, Latent (antialiased|bicubic|nearest…), Lanczos, Nearest
    resize_x: int = 0  # A1111 "Resize width to" (instead of scale; 0 = from scale)
    resize_y: int = 0
    prompt: str = ""  # A1111 "Hires prompt"; "" = the image's prompt
    negative_prompt: str = ""
    scheduler: Any = None  # A1111 "Hires sampler" (names as `scheduler`); null = the first pass's
    schedule: Any = None  # A1111 "Hires schedule type" (names as `schedule`); null = the first pass's
    model: Any = None  # A1111 "Hires checkpoint": a model id (as model.id) of the same family; null = the same


@dataclass
class RefinerConfig:
    """A1111's SDXL Refiner (config/refiner.py, generate/refiner.py): a second model that takes over sampling at
    `switch_at` of the steps; off while `model` is null. `switch_at` takes a list (swept)."""

    model: Any = None  # A1111 "Refiner": hub id, diffusers folder or .safetensors file (SDXL); null = off
    switch_at: Any = 0.8  # A1111 "Switch at": the fraction of sampling done by the base model, in (0, 1)
    config: str | None = None  # diffusers configs (dir or hub id) of a single-file refiner, as model.config


@dataclass
class PerfConfig:
    """Fast-path options applied to the loaded pipeline (generate/fastpath.py); `auto` = what measured faster on
    this device (docs/performance.md), resolved per run and recorded per image."""

    channels_last: bool = False  # measured slower on an H200 (extra layout copies) and on cpu
    fuse_qkv: bool = False  # with LoRA sets it merges them (a fused projection would bypass peft's layers)
    fuse_lora: Any = "auto"  # merge each LoRA set into the weights on switch; auto = on for cuda
    compile: Any = "auto"  # torch.compile the denoiser; auto = on for cuda runs long enough to repay the warm-up
    writer_threads: int = 2  # PNG encode/write threads


@dataclass
class ShardConfig:
    index: int = 0  # this job's part of the plan, 0 … count-1
    count: int = 1  # parts the plan is cut into (contiguous, sizes differ by at most 1)


@dataclass
class ServerConfig:
    """`t2i-serve` settings (the `server` group; override e.g. server.port=9000); ignored by `t2i`. The server's
    model, device and batch size are the run config's own (model=..., device=..., batch_size=...)."""

    host: str = "127.0.0.1"  # another address than loopback needs api_keys
    port: int = 8000
    allowed_models: Any = field(default_factory=list)  # model ids allowed besides model.id (a list or one id)
    allowed_lora_dirs: Any = field(default_factory=list)  # local LoRA paths must lie inside one of these
    allow_hub_loras: bool = True  # requests may name LoRAs by hub id
    max_steps: int = 150  # a request with more inference steps gets HTTP 422
    max_images: int = 8  # most images per request (total_nm_img_prompt)
    max_side: int = 1024  # largest width/height a request may ask for
    queue_size: int = 32  # pending requests beyond this get HTTP 503 with Retry-After
    merge_max_images: int = 16  # queued compatible requests are merged into one run up to this many images
    output_dir: str | None = None  # null = outputs/server/<date>/<time>
    run_dirs: list[str] = field(default_factory=list)  # more folders whose run dirs /runs lists and serves
    api_keys: Any = field(default_factory=list)  # bearer tokens every request must carry (none: no auth, loopback only)
    image_url_ttl: int = 3600  # seconds an OpenAI-API image URL (response_format=url) stays valid
    priorities: Any = None  # {API key: int}: a higher one's jobs and sweeps run first (0)
    max_queued_images: int = 1000  # images one API key (or everyone, without keys) may have waiting in the queue


@dataclass
class EvalModels:
    """Each scorer's model: a hub id or a local folder (builtin:tiny-clip / builtin:tiny-dino: tiny random ones)."""

    clip: str = "openai/clip-vit-large-patch14"  # torchmetrics CLIPScore's default
    dino: str = "facebook/dino-vits16"  # the DreamBooth paper's DINO (ViT-S/16)
    pickscore: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    aesthetic: str = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    image_reward: str = "ImageReward-v1.0"
    hpsv2: str = "v2.1"  # the HPS version its package loads


@dataclass
class EvalConfig:
    """Scores of a run's images (runner/eval/): `eval.metrics=[clip_t,lora_effect]` scores images as they are
    written; `t2i-eval RUN_DIR` scores existing run dirs. Results: RUN_DIR/metrics.jsonl."""

    metrics: Any = field(default_factory=list)  # clip_t, clip_i, dino, lora_effect, and extras (runner/eval)
    models: EvalModels = field(default_factory=lambda: EvalModels())
    reference_dir: str | None = None  # clip_i / dino: the images to compare with (e.g. the LoRA's training set)
    make_baseline: bool = True  # lora_effect: make a missing no-LoRA image (into RUN_DIR/baselines/)
    lora_effect_space: str = "clip"  # lora_effect's embedding: clip | dino
    batch_size: int = 16
    device: str = "auto"  # auto = the run's device (t2i-eval: cuda, mps, then cpu)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # list keys are typed Any so a scalar is accepted too (`seeds=1`); validate.py makes every one a list
    prompts: Any = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    negative_prompt: str = ""  # for every prompt without its own
    # the prompt language (runner/prompt/): A1111 syntax, variants/wildcards, prompts files, Prompt S/R
    prompt_syntax: str = "a1111"  # a1111: (weights), [less], BREAK, 75-token chunks, <lora:name:w>; plain: as is
    emphasis: Any = "original"  # A1111 "Emphasis mode": original | no_norm | ignore | none; a list sweeps
    pad_conds: Any = False  # A1111 "Pad prompt/negative prompt": pad the shorter side with empty chunks; a list sweeps
    prompts_file: str | None = None  # one prompt a line (# comments); replaces `prompts`
    prompt_mode: str = "combinatorial"  # {a|b} and __wildcards__: every expansion, or `random` draws
    prompt_count: int = 1  # prompt_mode=random: prompts drawn per template
    prompt_seed: int = 0  # prompt_mode=random: the draws' seed (recorded)
    max_prompts: int = 1000  # more expanded prompts is an error, not a million-image plan
    wildcard_dirs: Any = field(default_factory=list)  # folders of __name__ files (name.txt, one value a line)
    prompt_sr: Any = None  # A1111 Prompt S/R axis: [search, replacement, ...]
    seeds: Any = field(default_factory=lambda: [0])  # -1 draws one from the run seed
    models: Any = field(default_factory=list)  # a model axis: group names, ids or {group, id, …}; [] = model
    steps: Any = None  # null = the model's default (its group's settings, else the pipeline's own)
    guidance_scale: Any = None  # CFG; on Flux.1 the distilled guidance
    true_cfg_scale: Any = None  # Flux.1 / Qwen-Image: real CFG with the negative prompt when > 1
    max_sequence_length: Any = None  # T5/Qwen text encoders: tokens read from the prompt
    width: Any = None  # null = the model's default size; multiples of 8
    height: Any = None  # null = the model's default size; multiples of 8
    scheduler: Any = None  # A1111 "Sampler" (config/schedulers.py): null = the model's own; euler, euler_a, dpmpp_2m, …
    schedule: Any = None  # A1111 "Schedule type": null = A1111's Automatic for it; karras, simple, … (schedulers.py)
    clip_skip: Any = None  # A1111 "Clip skip": 1 = last CLIP layer (null/1 = off), 2 = penultimate, …
    device: str = "auto"  # auto = mps -> cuda -> cpu
    threads: Any = "auto"  # CPU threads for torch: auto = the cores this process may use, or an int
    batch_size: Any = "auto"  # images with the same settings share one pipeline call
    batch_invariant: Any = "auto"  # auto = on cpu: an image is bit-identical whatever its batch-mates
    lora_sets: Any = field(default_factory=lambda: [[]])  # sets of {source, weight_name, scale, name}; [] = no LoRA
    lora_scales: Any = None  # e.g. [0.0, 0.5, 1.0]: multiplies every adapter's scale
    lora_blocks: Any = None  # block-weight specs swept for every adapter without its own `blocks` (presets/lists)
    lora_dirs: list[str] = field(default_factory=list)  # folders where LoRAs are found by file stem or hash
    embedding_dirs: list[str] = field(default_factory=list)  # textual inversions named in prompts (file stem)
    allow_pickle_embeddings: bool = False  # A1111's .pt embeddings (pickle)
    upscaler_dirs: list[str] = field(default_factory=list)  # hires.upscaler model files by stem (A1111's models/ESRGAN)
    allow_pickle_upscalers: bool = False  # .pth/.pt upscaler models (pickle)
    allow_pickle_lora: bool = False  # load pickle LoRA files (.bin, .ckpt, .pt)
    max_loaded_loras: int = 8  # LoRA files kept loaded in one process
    resume: bool = True  # a run dir gets only the images it lacks; false: every image again, each in its own file
    run_seed: int | None = None  # seeds given as -1 are drawn from it; null = the run dir's (or the sweep's)
    output_dir: str | None = None  # the run dir; null = Hydra's run dir (hydra.run.dir)
    grid: GridConfig = field(default_factory=GridConfig)
    viewer: ViewerConfig = field(default_factory=ViewerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    hires: HiresConfig = field(default_factory=HiresConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    from_image: str | None = None  # regenerate from an image's recorded settings (then these overrides)
    strict: bool = True  # from_image: a LoRA or model whose sha256 differs is an error (false: a warning)
    nan_retry_fp32_vae: bool = False  # regenerate all-black (NaN) images with the VAE in fp32
    verbose: bool = False  # tracebacks for unexpected errors


def register_resolvers() -> None:
    """`${t2i.first:A,B}`: A unless it is null or empty, else B (conf/*.yaml: Hydra's run dir is `output_dir` when
    that is set, so Hydra creates no second folder)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("t2i.first"):
        OmegaConf.register_new_resolver("t2i.first", lambda a, b: b if a in (None, "") else a)


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can list it first in its defaults."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RunConfig)
