"""Validation of a composed config (schema: schema.py) into a plain, typed `RunSpec`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..common.errors import ConfigError, did_you_mean, first_line
from ..common.paths import strip_weight_ext
from ..prompt.expand import check_sr, parse_sr
from ..prompt.syntax import EMPHASIS, LORA_SCALE_RANGE
from .blocks import BlockSpec, parse_spec
from .hires import check_second_schedulers, hires_combos
from .refiner import refiner_combos
from .schedulers import SCHEDULERS, SCHEDULES, check_pair, effective_schedule, missing_modules
from .schema import (
    EvalConfig,
    EvalModels,
    GridConfig,
    MemoryConfig,
    ModelConfig,
    PerfConfig,
    RunConfig,
    ShardConfig,
    ViewerConfig,
)

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # model.dtype -> the torch dtype
DTYPES = ("auto", *TORCH_DTYPES)
DEVICES = ("auto", "cpu", "cuda", "mps")
PIPELINES = ("auto", "sd", "sdxl")  # or a diffusers pipeline class name (checked against diffusers when loading)
OFFLOAD = ("none", "model", "sequential")
# keys a model group's `settings` may give (each also a top-level key; a value the user sets wins)
SETTING_KEYS = ("steps", "guidance_scale", "true_cfg_scale", "max_sequence_length", "width", "height", "scheduler")
MAX_SEQUENCE = 4096
MAX_STEPS = 1000
MAX_SIDE = 8192
MAX_SEED = 2**64 - 1
MAX_GRID_SIDE = 8192  # 8192² pixels stay under Pillow's decompression-bomb limit (89.5 M pixels)


@dataclass(frozen=True)
class LoraSpec:
    source: str
    weight_name: str | None = None
    scale: float = 1.0
    name: str | None = None
    blocks: BlockSpec | None = None  # LoRA block weights (a preset or weights in block order); None = all 1


def lora_name(spec: LoraSpec) -> str:
    """The display name of an adapter: its `name`, else the stem of its file or source."""
    if spec.name:
        return spec.name
    base = spec.weight_name or spec.source.rstrip("/").split("/")[-1]
    return strip_weight_ext(base) or "lora"


@dataclass(frozen=True)
class PromptSpec:
    prompt: str  # as sent: variants and wildcards expanded, `<lora:…>` tags still in it (they are part of it)
    negative_prompt: str
    template: str | None = None  # as written, when variants/wildcards made `prompt` from it
    loras: tuple[LoraSpec, ...] = ()  # its `<lora:…>` tags, found in lora_dirs (runner/lora/tags.py)


@dataclass(frozen=True)
class RunSpec:
    """A validated run: every value checked and normalised (lists for sweepable keys)."""

    model: ModelConfig
    prompts: tuple[PromptSpec, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    guidance_scale: tuple[float, ...]
    width: tuple[int | None, ...]
    height: tuple[int | None, ...]
    scheduler: tuple[str | None, ...]
    clip_skip: tuple[int | None, ...]
    lora_sets: tuple[tuple[LoraSpec, ...], ...]
    lora_scales: tuple[float, ...]
    device: str
    batch_size: int | None  # None = auto
    batch_invariant: bool | None  # None = auto
    allow_pickle_lora: bool
    max_loaded_loras: int
    resume: bool
    grid: GridConfig
    shard: ShardConfig
    verbose: bool = False
    nan_retry_fp32_vae: bool = False
    perf: PerfConfig = field(default_factory=PerfConfig)
    run_seed: int | None = None  # seeds given as -1 are drawn from it (None: the run dir's, see outputs/rundir)
    viewer: ViewerConfig = field(default_factory=ViewerConfig)
    extra: dict = field(default_factory=dict)
    schedule: tuple[str | None, ...] = (None,)  # A1111 "Schedule type" axis (config/schedulers.py)
    threads: int | None = None  # None = auto (runner.generate.threads)
    # model families (runner/models/families.py): (None,) = unset, the model's settings decide
    true_cfg_scale: tuple[float | None, ...] = (None,)
    max_sequence_length: tuple[int | None, ...] = (None,)
    models: tuple[ModelConfig, ...] = ()  # the model axis, outermost loop; () = (model,)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # checked by runner/eval (config.check_eval)

    @property
    def model_list(self) -> tuple[ModelConfig, ...]:
        return self.models or (self.model,)
    lora_blocks: tuple[BlockSpec | None, ...] = (None,)  # swept block weights (None = each adapter's own)
    lora_dirs: tuple[str, ...] = ()
    prompt_syntax: str = "a1111"  # a1111 | plain (runner/prompt/)
    prompt_sr: tuple[str, ...] = ()  # Prompt S/R: the search term, then the replacements (an axis)
    prompt_seed: int | None = None  # the seed of prompt_mode=random draws (None: not drawn)
    # set by plan.with_prompt_loras: lora_sets[:config_sets] are the config's (0: all), the rest are those sets
    # extended by a prompt's <lora:…> tags; prompt_sets maps (prompt index, config set index) to the set used
    config_sets: int = 0
    prompt_sets: dict | None = None
    hires: tuple = (None,)  # hires. fix combinations (config/hires.py Hires); (None,) = off
    refiner: tuple = (None,)  # refiner values (config/refiner.py Refiner), one per switch_at; (None,) = off
    embedding_dirs: tuple[str, ...] = ()  # textual-inversion folders (models/embeddings.py)
    allow_pickle_embeddings: bool = False
    emphasis: tuple[str, ...] = ("original",)  # A1111 "Emphasis mode" axis (prompt/clip.py EMPHASIS)
    pad_conds: tuple[bool, ...] = (False,)  # A1111 "Pad prompt/negative prompt" axis
    embeddings: tuple = ()  # the embeddings the prompts name (models/embeddings.py resolve, before planning)

    def lora_set_label(self, i: int) -> str:
        """How a message names LoRA set `i`: `lora_sets[i]` for the config's own, else the prompt whose `<lora:…>`
        tags made it (the user never wrote a `lora_sets[i]` for it)."""
        if self.config_sets and i >= self.config_sets:
            p = min((pi for (pi, _), s in (self.prompt_sets or {}).items() if s == i), default=None)
            if p is not None:
                return f"prompts[{p}]'s <lora:…> tags"
        return f"lora_sets[{i}]"


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _as_list(key: str, value: Any) -> list:
    value = _plain(value)
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        raise ConfigError(f"{key}=[] is empty; give at least one value")
    return items


def string_list(key: str, value: Any) -> list[str]:
    """A list of strings (a single string is a list of one), for list keys that are not swept."""
    items = [] if value is None else _plain(value)
    items = list(items) if isinstance(items, list | tuple) else [items]
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"{key} has {bad[0]!r}, which is not a string; give a list of strings")
    return items


def _number(key: str, value: Any, kind: type, lo: float, hi: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not float(value).is_integer()):
        raise ConfigError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value!r} is out of range; valid: {lo:g} to {hi:g}")
    return kind(value)


def _side(key: str, value: Any) -> int | None:
    if value is None:
        return None
    side = _number(key, value, int, 8, MAX_SIDE)
    if side % 8:
        raise ConfigError(f"{key}={side} is not a multiple of 8; try {side // 8 * 8 or 8} or {(side // 8 + 1) * 8}")
    return side


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid{did_you_mean(value, valid)}; valid: {', '.join(valid)}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not valid; valid: true, false")
    return value


def _steps(v: Any) -> int | None:
    return None if v is None else _number("steps", v, int, 1, MAX_STEPS)


def _guidance(key: str) -> Any:
    return lambda v: None if v is None else _number(key, v, float, 0.0, 100.0)


def _sequence(v: Any) -> int | None:
    return None if v is None else _number("max_sequence_length", v, int, 1, MAX_SEQUENCE)


def _scheduler(v: Any) -> str | None:
    return None if v in (None, "null", "default") else _choice("scheduler", v, SCHEDULERS)


SETTING_CHECKS = {"steps": _steps, "guidance_scale": _guidance("guidance_scale"),
                  "true_cfg_scale": _guidance("true_cfg_scale"), "max_sequence_length": _sequence,
                  "width": lambda v: _side("width", v), "height": lambda v: _side("height", v),
                  "scheduler": _scheduler}


def setting(key: str, value: Any, where: str = "") -> tuple:
    """A sweepable setting (scalar or list) checked and normalised to a tuple; `where` prefixes messages."""
    try:
        return tuple(SETTING_CHECKS[key](v) for v in _as_list(key, value))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") if where else exc from exc


def _model_settings(where: str, settings: Any) -> dict[str, Any]:
    settings = _plain(settings) or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}.settings={settings!r} is not a mapping of {', '.join(SETTING_KEYS)}")
    for key, value in settings.items():
        if key not in SETTING_KEYS:
            raise ConfigError(f"{where}.settings has unknown key {key!r}{did_you_mean(key, SETTING_KEYS)}; valid: "
                              f"{', '.join(SETTING_KEYS)}")
        setting(key, value, f"{where}.settings.")
    return settings


def model_group(name: str) -> dict | None:
    """The `conf/model/<name>.yaml` group as a plain dict, or None when there is no such group."""
    from .overrides import CONF_DIR

    path = CONF_DIR / "model" / f"{name}.yaml"
    if "/" in name or not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def model_groups() -> list[str]:
    from .overrides import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _model(where: str, raw: Any) -> ModelConfig:
    """One model config: a ModelConfig node, a group name, a model id/path, or {group: NAME, …keys}."""
    raw = _plain(raw)
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    if isinstance(raw, str):
        group = model_group(raw.strip())
        if group is None and "/" not in raw and not raw.startswith((".", "~", "builtin:")) and \
                not raw.endswith((".safetensors", ".ckpt")):
            import os

            if not os.path.exists(os.path.expanduser(raw)):
                groups = model_groups()
                raise ConfigError(f"{where}={raw!r} is not a model group{did_you_mean(raw, groups)}, a folder, a file "
                                  f"or a hub id owner/name; groups: {', '.join(groups)}")
        raw = group if group is not None else {"id": raw}
    elif isinstance(raw, dict) and "group" in raw:
        name = raw["group"]
        group = model_group(str(name))
        if group is None:
            groups = model_groups()
            raise ConfigError(f"{where}.group={name!r} is not a model group{did_you_mean(str(name), groups)}; "
                              f"valid: {', '.join(groups)}")
        raw = {**group, **{k: v for k, v in raw.items() if k != "group"},
               "settings": {**(group.get("settings") or {}), **(raw.get("settings") or {})}}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}={raw!r} is not valid; use a group name, a model id or {{group: NAME, id: …}}")
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r}{did_you_mean(unknown[0], fields)}; valid: "
                          f"group, {', '.join(fields)}")
    m = ModelConfig(**{**dataclasses.asdict(ModelConfig()), **raw})
    if not isinstance(m.id, str) or not m.id.strip():
        raise ConfigError(f"{where}.id is empty; give a hub id, a diffusers folder, a .safetensors file or use "
                          "model=tiny")
    _choice(f"{where}.dtype", m.dtype, DTYPES)
    if not isinstance(m.pipeline, str) or not m.pipeline.strip():
        raise ConfigError(f"{where}.pipeline={m.pipeline!r} is not valid; valid: auto, sd, sdxl or a diffusers "
                          "pipeline class name (e.g. FluxPipeline)")
    _model_settings(where, m.settings)
    return m


def _models(cfg: DictConfig) -> tuple[ModelConfig, ...]:
    raw = _plain(cfg.get("models")) or []
    if not isinstance(raw, list):
        raw = [raw]
    models = tuple(_model(f"models[{i}]", item) for i, item in enumerate(raw))
    keys = [(m.id, m.revision, m.variant, m.dtype, m.transformer) for m in models]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup:
        raise ConfigError(f"models lists {dup[0]!r} twice; each model may appear once")
    return models


def _memory(mem: Any) -> MemoryConfig:
    if mem is None:
        return MemoryConfig()
    mem = _plain(mem)
    _choice("memory.offload", mem["offload"], OFFLOAD)
    sl = mem["attention_slicing"]
    if not (isinstance(sl, bool) or sl in ("auto", "max") or (isinstance(sl, int) and sl > 0)):
        raise ConfigError(f"memory.attention_slicing={sl!r} is not valid; valid: false, true, auto, max or a "
                          "positive slice size")
    return MemoryConfig(mem["offload"], bool(mem["vae_tiling"]), bool(mem["vae_slicing"]), sl)
def _key(cfg: DictConfig, key: str) -> Any:
    """`cfg.key`, or the schema's default when a config made without the schema lacks it."""
    return cfg.get(key, getattr(RunConfig, key))


def _prompts(cfg: DictConfig) -> tuple[PromptSpec, ...]:
    from ..prompt import MODES, SYNTAXES, expand_prompts, read_prompts_file

    default_neg = cfg.negative_prompt or ""
    items = []
    written = read_prompts_file(cfg.prompts_file) if cfg.get("prompts_file") else _as_list("prompts", cfg.prompts)
    for i, item in enumerate(written):
        if isinstance(item, str):
            prompt, neg = item, default_neg
        elif isinstance(item, dict):
            unknown = set(item) - {"prompt", "negative_prompt"}
            if unknown or not isinstance(item.get("prompt"), str):
                raise ConfigError(
                    f"prompts[{i}]={item!r} is not valid; use a string or {{prompt: ..., negative_prompt: ...}}"
                )
            neg = item.get("negative_prompt")
            neg = default_neg if neg is None else neg  # an explicit '' wins over the global negative prompt
            prompt = item["prompt"]
            if not isinstance(neg, str):
                raise ConfigError(f"prompts[{i}].negative_prompt={neg!r} is not a string")
        else:
            raise ConfigError(f"prompts[{i}]={item!r} is not a string or a {{prompt, negative_prompt}} mapping")
        if not prompt.strip():
            raise ConfigError(f"prompts[{i}] is empty; give some text")
        items.append((prompt, neg))
    syntax = _choice("prompt_syntax", _key(cfg, "prompt_syntax"), SYNTAXES)
    mode = _choice("prompt_mode", _key(cfg, "prompt_mode"), MODES)
    limit = _number("max_prompts", _key(cfg, "max_prompts"), int, 1, 10_000_000)
    count = _number("prompt_count", _key(cfg, "prompt_count"), int, 1, limit)
    seed = _number("prompt_seed", _key(cfg, "prompt_seed"), int, 0, MAX_SEED)
    dirs = string_list("wildcard_dirs", cfg.get("wildcard_dirs"))
    for i, d in enumerate(dirs):
        if not Path(d).expanduser().is_dir():
            raise ConfigError(f"wildcard_dirs[{i}]={d!r} is not an existing folder")
    expanded = expand_prompts(items, syntax, mode, count, seed, dirs, limit)
    return tuple(PromptSpec(p, n, None if p == t else t) for p, n, t in expanded)


def _lora(where: str, item: Any) -> LoraSpec:
    if isinstance(item, str):
        item = {"source": item}
    if not isinstance(item, dict):
        raise ConfigError(f"{where}={item!r} is not valid; use {{source: PATH_OR_HUB_ID, weight_name, scale, name}}")
    keys = ["source", "weight_name", "scale", "name", "blocks"]
    unknown = set(item) - set(keys)
    if unknown:
        key = str(sorted(unknown, key=str)[0])
        raise ConfigError(f"{where} has unknown key {key!r}{did_you_mean(key, keys)}; valid: {', '.join(keys)}")
    source = item.get("source")
    if not isinstance(source, str) or not source.strip() or source.strip() == "null":
        raise ConfigError(f"{where}.source={source!r} is missing; give a hub id, a folder or a file path")
    weight = item.get("weight_name")
    weight = None if weight in (None, "", "null") else weight
    if weight is not None and (not isinstance(weight, str) or "/" in weight or "\\" in weight or ".." in weight):
        raise ConfigError(f"{where}.weight_name={weight!r} is not a plain file name")
    scale = _number(f"{where}.scale", item.get("scale", 1.0), float, *LORA_SCALE_RANGE)
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"{where}.name={name!r} is not a non-empty string")
    return LoraSpec(source.strip(), weight, scale, name, parse_spec(f"{where}.blocks", item.get("blocks")))


def check_unique_names(names: Iterable[str], where: str) -> None:
    """An adapter name appears once in a LoRA set: it names the adapter in peft and in every record. Checked on
    the names a config gives (here) and again on the names derived from files (lora/files.resolve_set)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{where} names adapter {name!r} twice; adapter names in a set must be unique")
        seen.add(name)


def _lora_sets(cfg: DictConfig) -> tuple[tuple[LoraSpec, ...], ...]:
    sets = []
    value = _plain(cfg.lora_sets)
    if not isinstance(value, list | tuple | str | dict | None):
        raise ConfigError(f"lora_sets={value!r} is not valid; give a LoRA (file, folder or hub id) or a list of sets,"
                          " e.g. [[], [{source: x}]]")
    for i, raw in enumerate(_as_list("lora_sets", cfg.lora_sets)):
        raw = [] if raw is None else raw
        if not isinstance(raw, list):
            raw = [raw]
        specs = tuple(_lora(f"lora_sets[{i}][{j}]", item) for j, item in enumerate(raw))
        check_unique_names([s.name for s in specs if s.name], f"lora_sets[{i}]")
        sets.append(specs)
    return tuple(sets)


def _perf(perf: Any) -> PerfConfig:
    if perf is None:
        return PerfConfig()
    perf = _plain(perf)
    _number("perf.writer_threads", perf["writer_threads"], int, 1, 64)
    out = {}
    for key, value in perf.items():
        if key == "writer_threads":
            out[key] = int(value)
        elif key in ("fuse_lora", "compile") and value == "auto":
            out[key] = "auto"
        elif isinstance(value, bool):
            out[key] = value
        else:
            valid = "auto, true, false" if key in ("fuse_lora", "compile") else "true, false"
            raise ConfigError(f"perf.{key}={value!r} is not valid; valid: {valid}")
    return PerfConfig(**out)


def _omegaconf_error(exc: Exception) -> ConfigError:
    """One ConfigError line for a key, type or interpolation that omegaconf rejects."""
    from omegaconf.errors import ConfigKeyError

    key = getattr(exc, "full_key", None) or "config"
    owner = getattr(exc, "object_type", None)
    if isinstance(exc, ConfigKeyError) and dataclasses.is_dataclass(owner):
        names = [f.name for f in dataclasses.fields(owner)]
        extra = did_you_mean(key.rsplit(".", 1)[-1], names)
        valid = ", ".join(names) if len(names) <= 10 else "see `t2i --cfg job` for every key"
        return ConfigError(f"unknown key {key!r}{extra}; valid: {valid}")
    return ConfigError(f"{key}: {first_line(exc)}")


def validate(cfg: DictConfig | dict) -> RunSpec:
    """Check every value of a composed config; raise ConfigError naming the first bad one."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        if isinstance(cfg, dict):
            cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        return _validate(cfg)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc) from exc


def _schedules(cfg: DictConfig) -> list[str | None]:
    """The swept schedule types, each checked against each swept scheduler (a pair diffusers cannot run, or one
    whose Python package is missing, is one line)."""
    scheds = [None if s in (None, "null", "default") else _choice("scheduler", s, SCHEDULERS)
              for s in _as_list("scheduler", cfg.scheduler)]
    schedules = [None if s in (None, "null", "default") else _choice("schedule", s, SCHEDULES)
                 for s in _as_list("schedule", cfg.get("schedule"))]
    for sched in scheds:
        for schedule in schedules:
            why = check_pair(sched, schedule)
            if why:
                raise ConfigError(why)
            missing = missing_modules(sched, effective_schedule(sched, schedule))
            if missing:
                what = f"scheduler={sched}" if sched else f"schedule={schedule}"
                raise ConfigError(f"{what} needs the Python package {missing[0]!r}, which is not installed; "
                                  f"pip install {missing[0]} (it is a dependency of t2i-runner)")
    return schedules


def _threads(threads: Any) -> int | None:
    if threads not in ("auto", None) and (isinstance(threads, bool) or not isinstance(threads, int)
                                          or not 1 <= threads <= 1024):
        raise ConfigError(f"threads={threads!r} is not valid; valid: auto (the cores this process may use) or "
                          "an integer from 1 to 1024")
    return None if threads in ("auto", None) else int(threads)


def _validate(cfg: DictConfig) -> RunSpec:
    # 1. What to load and where: the model (or the model axis), the device.
    model = _model("model", cfg.model)
    models = _models(cfg)
    _choice("device", cfg.device, DEVICES)
    # 2. The sweep's own axes: seeds, schedule types (each against each scheduler).
    seeds = []
    for s in _as_list("seeds", cfg.seeds):
        seed = _number("seeds", s, int, -1, MAX_SEED)
        seeds.append(seed)  # -1 stays: drawn from the run seed (plan.draw_seeds), so shards and resumes agree
    schedules = _schedules(cfg)
    hires = hires_combos(cfg.get("hires"), tuple(string_list("upscaler_dirs", cfg.get("upscaler_dirs"))),
                         bool(cfg.get("allow_pickle_upscalers", False)))
    check_second_schedulers(hires, [(None if s in (None, "null", "default") else s, sd)
                                    for s in _as_list("scheduler", cfg.scheduler) for sd in schedules])
    # 3. How the run is carried out: batching, LoRA multipliers, shards, limits, threads, the server's lists.
    batch = cfg.batch_size
    if batch != "auto":
        batch = _number("batch_size", batch, int, 1, 1024)
    inv = cfg.batch_invariant
    if inv not in ("auto", True, False):
        raise ConfigError(f"batch_invariant={inv!r} is not valid; valid: auto, true, false")
    scales = [1.0] if cfg.lora_scales is None else _as_list("lora_scales", cfg.lora_scales)
    shard = cfg.shard
    _number("shard.count", shard.count, int, 1, 1_000_000)
    _number("shard.index", shard.index, int, 0, shard.count - 1)
    _number("max_loaded_loras", cfg.max_loaded_loras, int, 1, 1000)
    _number("grid.max_size", cfg.grid.max_size, int, 64, MAX_GRID_SIDE)
    _number("grid.min_cell", cfg.grid.min_cell, int, 8, MAX_GRID_SIDE)
    run_seed = None if cfg.get("run_seed") is None else _number("run_seed", cfg.run_seed, int, 0, MAX_SEED)
    threads = _threads(cfg.get("threads", "auto"))
    if cfg.get("server") is not None:
        for key in ("allowed_models", "allowed_lora_dirs", "api_keys"):
            string_list(f"server.{key}", cfg.server.get(key))
    # 4. The prompts and the prompt language's own axes (Prompt S/R, random variants).
    prompts = _prompts(cfg)
    sr = parse_sr(_plain(cfg.get("prompt_sr")))
    check_sr(sr, [t for p in prompts for t in (p.prompt, p.negative_prompt)])
    random_prompts = _key(cfg, "prompt_mode") == "random" and any(p.template for p in prompts)
    # 5. The typed spec: every list key a tuple, every model setting resolved or None (the model's own).
    return RunSpec(
        model=model,
        models=models,
        prompts=prompts,
        seeds=tuple(seeds),
        steps=setting("steps", cfg.steps),
        guidance_scale=setting("guidance_scale", cfg.guidance_scale),
        true_cfg_scale=setting("true_cfg_scale", cfg.get("true_cfg_scale")),
        max_sequence_length=setting("max_sequence_length", cfg.get("max_sequence_length")),
        width=setting("width", cfg.width),
        height=setting("height", cfg.height),
        scheduler=setting("scheduler", cfg.scheduler),
        clip_skip=tuple(None if v in (None, 1) else _number("clip_skip", v, int, 1, 12)
                        for v in _as_list("clip_skip", cfg.clip_skip)),
        lora_sets=_lora_sets(cfg),
        lora_scales=tuple(_number("lora_scales", v, float, *LORA_SCALE_RANGE) for v in scales),
        device=cfg.device,
        batch_size=None if batch == "auto" else batch,
        batch_invariant=None if inv == "auto" else bool(inv),
        allow_pickle_lora=bool(cfg.allow_pickle_lora),
        max_loaded_loras=int(cfg.max_loaded_loras),
        resume=bool(cfg.resume),
        grid=GridConfig(**OmegaConf.to_container(cfg.grid)) if isinstance(cfg.grid, DictConfig) else cfg.grid,
        shard=ShardConfig(int(shard.index), int(shard.count)),
        verbose=bool(cfg.verbose),
        perf=_perf(cfg.get("perf")),
        memory=_memory(cfg.get("memory")),
        nan_retry_fp32_vae=bool(cfg.get("nan_retry_fp32_vae", False)),
        schedule=tuple(schedules),
        threads=threads,
        run_seed=run_seed,
        viewer=_viewer(cfg.get("viewer")),
        lora_blocks=_lora_blocks(cfg.get("lora_blocks")),
        lora_dirs=_lora_dirs(cfg.get("lora_dirs")),
        prompt_syntax=_key(cfg, "prompt_syntax"),
        prompt_sr=sr,
        prompt_seed=int(_key(cfg, "prompt_seed")) if random_prompts else None,
        hires=hires,
        refiner=refiner_combos(cfg.get("refiner")),
        embedding_dirs=tuple(string_list("embedding_dirs", cfg.get("embedding_dirs"))),
        allow_pickle_embeddings=bool(cfg.get("allow_pickle_embeddings", False)),
        emphasis=tuple(_choice("emphasis", v, tuple(EMPHASIS)) for v in _as_list("emphasis", cfg.get("emphasis",
                                                                                                   "original"))),
        pad_conds=tuple(_flag("pad_conds", v) for v in _as_list("pad_conds", cfg.get("pad_conds", False))),
        eval=_eval(cfg.get("eval")),
    )


def _eval(v: Any) -> EvalConfig:
    """The `eval` section (runner/eval checks its values): the schema's EvalConfig, or one made from a mapping."""
    obj = OmegaConf.to_object(v) if isinstance(v, DictConfig) else v
    if obj is None:
        return EvalConfig()
    if isinstance(obj, dict):
        try:
            return EvalConfig(**{**obj, "models": EvalModels(**(obj.get("models") or {}))})
        except TypeError as exc:
            raise ConfigError(f"eval: {first_line(exc)}; see `t2i --cfg job` for its keys") from None
    return obj


def _viewer(v: Any) -> ViewerConfig:
    if v is None:
        return ViewerConfig()
    size = _number("viewer.thumb_size", v.thumb_size, int, 32, 2048)
    return ViewerConfig(enabled=bool(v.enabled), thumb_size=size)


def _lora_blocks(value: Any) -> tuple[BlockSpec | None, ...]:
    """`lora_blocks`: one spec (a preset, a list of weights, "1,0,…") or a list of specs swept as an axis."""
    value = _plain(value)
    if value is None:
        return (None,)
    if isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        return (parse_spec("lora_blocks", value),)  # a single spec
    items = _as_list("lora_blocks", value)
    specs = tuple(parse_spec(f"lora_blocks[{i}]", v) for i, v in enumerate(items))
    if len(set(specs)) != len(specs):
        raise ConfigError(f"lora_blocks={value!r} lists a spec twice; give each once")
    return specs


def _lora_dirs(value: Any) -> tuple[str, ...]:
    value = _plain(value) or []
    if isinstance(value, str):
        value = [value]
    dirs = []
    for i, d in enumerate(value):
        if not isinstance(d, str) or not d.strip():
            raise ConfigError(f"lora_dirs[{i}]={d!r} is not a folder path")
        if not Path(os.path.expanduser(d.strip())).is_dir():
            raise ConfigError(f"lora_dirs[{i}]={d!r} is not an existing folder")
        dirs.append(d.strip())
    return tuple(dirs)
