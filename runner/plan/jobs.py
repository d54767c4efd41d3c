"""Expand a RunSpec into one ImageJob per image, shard it, and group jobs into batches."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

from ..common.paths import slug
from ..config import LoraSpec, RunSpec, lora_name
from ..config.blocks import BlockSpec, spec_label
from ..config.hires import Hires
from ..config.refiner import Refiner
from ..prompt import replace_sr

KEY_VERSION = 2
RANDOM_SEED = -1  # in `seeds`: draw one from the run seed
AXES = ("prompt", "seed", "lora_set", "lora_scale", "lora_blocks", "steps", "guidance_scale", "scheduler",
        "width", "height", "clip_skip", "schedule", "true_cfg_scale", "max_sequence_length", "prompt_sr",
        "hires_scale", "hires_steps", "hires_denoise", "hires_upscaler", "hires_scheduler", "hires_schedule",
        "emphasis", "pad_conds", "refiner_switch_at")


@dataclass(frozen=True)
class ImageJob:
    """Everything that decides the pixels of one image (with the model of its `model_key`)."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int | None
    height: int | None
    scheduler: str | None
    lora_set: int
    loras: tuple[LoraSpec, ...]
    lora_scale: float | None  # None for the no-LoRA set (the multiplier does not apply)
    model_key: str = ""
    clip_skip: int | None = None  # A1111 semantics: 2 = the penultimate CLIP layer; None = the last
    schedule: str | None = None  # A1111 "Schedule type" (config/schedulers.py); None = the scheduler's own
    lora_ids: tuple[str, ...] = ()  # sha256 of each adapter's file (the key holds them, not the paths)
    true_cfg_scale: float | None = None  # families with true CFG (Flux.1, Qwen-Image); None = not used
    max_sequence_length: int | None = None  # None = the pipeline's own
    model_index: int = 0  # position in the run's model axis (the outermost loop)
    lora_blocks: BlockSpec | None = None  # the swept block weights (`lora_blocks`); None = not swept / no LoRA
    prompt_syntax: str = "plain"  # a1111: weights, BREAK, long prompts, <lora:…> tags (runner/prompt/)
    prompt_sr: str | None = None  # the Prompt S/R value this image's prompts were made with
    base_prompt: str | None = None  # the prompt before Prompt S/R (the grid's `prompt` axis)
    template: str | None = None  # the prompt as written, when variants/wildcards expanded it
    set_name: str | None = None  # the config's LoRA set label when the prompt's <lora:…> tags extend the set
    hires: Hires | None = None  # A1111's Hires. fix (config/hires.py); None = one pass
    embeddings: tuple = ()  # textual inversions its prompts name (models/embeddings.py Embedding)
    emphasis: str = "original"  # A1111's emphasis mode (prompt/clip.py EMPHASIS), with prompt_syntax a1111
    pad_conds: bool = False  # A1111's "Pad prompt/negative prompt", with prompt_syntax a1111
    refiner: Refiner | None = None  # A1111's SDXL Refiner (config/refiner.py); None = the base model alone

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        """The weight given to each adapter of the set: its own scale times the swept multiplier."""
        mult = 1.0 if self.lora_scale is None else self.lora_scale
        return tuple(s.scale * mult for s in self.loras)

    @property
    def adapter_blocks(self) -> tuple[BlockSpec | None, ...]:
        """The block weights of each adapter: its own `blocks`, else the swept `lora_blocks` value."""
        return tuple(s.blocks if s.blocks is not None else self.lora_blocks for s in self.loras)

    @property
    def blocks_label(self) -> str | None:
        """The swept block weights as text (`INS`, `1,0,0.5,…`); None when not swept."""
        return spec_label(self.lora_blocks)

    @cached_property
    def key(self) -> str:
        """The image's identity: a hash of everything its pixels depend on (resume, claims and dedupe use it).

        It covers the model's content (`model_key`: weights and pixel-changing configs, dtype, variant), each
        adapter's file content (`lora_ids`: sha256) with its effective weight, and every generation setting. It
        leaves out how the image is computed (device, library versions, batch size, fast-path flags): those are
        recorded with the image. Version 2; keys of version 1 (file paths instead of hashes) never equal these."""
        ids = self.lora_ids or tuple(f"{s.source}|{s.weight_name}" for s in self.loras)
        blob = json.dumps(
            {"v": KEY_VERSION, "model": self.model_key, "prompt": self.prompt, "negative": self.negative_prompt,
             "seed": self.seed, "steps": self.steps, "cfg": self.guidance_scale, "width": self.width,
             "height": self.height, "scheduler": self.scheduler, "clip_skip": self.clip_skip,
             "schedule": self.schedule, **({"syntax": "a1111"} if self.prompt_syntax == "a1111" else {}),
             # families with true CFG / a sequence length only: absent otherwise, so SD keys stay as they were
             **({"true_cfg": self.true_cfg_scale} if self.true_cfg_scale is not None else {}),
             **({"max_seq": self.max_sequence_length} if self.max_sequence_length is not None else {}),
             **({"hires": dataclasses.astuple(self.hires)} if self.hires is not None else {}),
             **({"ti": [[e.name, e.sha256] for e in self.embeddings]} if self.embeddings else {}),
             # A1111's text options away from their defaults only, so other keys stay as they were
             **({"emphasis": self.emphasis} if self.emphasis != "original" else {}),
             **({"pad": True} if self.pad_conds else {}),
             **({"refiner": [self.refiner.identity or self.refiner.model, self.refiner.switch_at]}
                if self.refiner is not None else {}),
             "loras": [[i, w] + ([spec_label(b)] if b is not None else [])
                       for i, w, b in zip(ids, self.adapter_weights, self.adapter_blocks, strict=True)]},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def group_key(self) -> tuple:
        """Images with equal group keys can share one pipeline call."""
        return (self.model_index, self.lora_set, self.lora_scale, self.scheduler or "", self.steps,
                -1.0 if self.guidance_scale is None else self.guidance_scale, self.width or 0, self.height or 0,
                self.clip_skip or 0, self.schedule or "", self.true_cfg_scale or 0.0, self.max_sequence_length or 0,
                self.blocks_label or "", self.prompt_syntax, self.emphasis, self.pad_conds,
                dataclasses.astuple(self.hires) if self.hires is not None else (),
                dataclasses.astuple(self.refiner) if self.refiner is not None else ())

    @property
    def set_label(self) -> str:
        """The LoRA set by adapter names, each with its own scale when not 1 (`A+B@0`), without the multiplier."""
        return self.set_name if self.set_name is not None else set_label(self.loras)

    @property
    def lora_label(self) -> str:
        if not self.loras:
            return "nolora"
        label = "+".join(slug(lora_name(s), 20) for s in self.loras)
        label = label if self.lora_scale in (None, 1.0) else f"{label}@{self.lora_scale:g}"
        return label if self.lora_blocks is None else f"{label}-{slug(self.blocks_label or '', 24)}"

    def filename(self, number: int) -> str:
        """The file name of this image as number `number` of its run dir (numbers are never reused)."""
        return f"{number:05d}_{self.stem}.png"

    @property
    def stem(self) -> str:
        """Prompt, seed and LoRA set as a file-name-safe text (what the file name says after its number)."""
        return f"{slug(self.prompt)}_s{self.seed}_{slug(self.lora_label, 48)}"

    def axis_value(self, axis: str) -> object:
        """The value of a sweep axis for this image (for grids)."""
        if axis == "prompt":
            return self.prompt if self.base_prompt is None else self.base_prompt
        if axis == "lora_set":
            return self.set_label
        if axis == "lora_blocks":
            return self.blocks_label
        if axis == "refiner_switch_at":
            return None if self.refiner is None else self.refiner.switch_at
        if axis.startswith("hires_"):
            return None if self.hires is None else getattr(self.hires, axis[len("hires_"):])
        return getattr(self, axis)


def set_label(loras: Sequence[LoraSpec]) -> str:
    """A LoRA set by adapter names, each with its own scale when not 1 (`A+B@0`)."""
    if not loras:
        return "nolora"
    return "+".join(lora_name(s) + ("" if s.scale == 1.0 else f"@{s.scale:g}") for s in loras)


def draw_seeds(seeds: Sequence[int], run_seed: int) -> tuple[int, ...]:
    """`seeds` with each -1 replaced by a seed drawn from `run_seed`: the k-th -1 always gets the same seed, so
    shards, resumes and extended sweeps (`[-1]` then `[-1,-1]`) agree on it."""
    out, k = [], 0
    for seed in seeds:
        if seed == RANDOM_SEED:
            digest = hashlib.sha256(f"t2i-seed:{run_seed}:{k}".encode()).digest()
            out.append(int.from_bytes(digest[:4], "big"))
            k += 1
        else:
            out.append(seed)
    return tuple(out)


def expand(spec: RunSpec, model_key: str = "", lora_ids: Sequence[Sequence[str]] | None = None,
           run_seed: int | None = None, model_index: int = 0, start: int = 0) -> list[ImageJob]:
    """Every combination of the run's axes for one model, in a stable order (`index` = start + position).

    `lora_ids[i]` are the sha256 of set i's adapter files (the key holds them; without them, the source paths
    stand in); `run_seed` draws the seeds given as -1 (required when there are any)."""
    seeds = spec.seeds
    if RANDOM_SEED in seeds:
        if run_seed is None:
            raise ValueError("seeds hold -1: give the run_seed to draw them from")
        seeds = draw_seeds(seeds, run_seed)
    jobs: list[ImageJob] = []
    sr_values = spec.prompt_sr or (None,)
    tagged = spec.prompt_sets or {}
    combos = itertools.product(
        enumerate(spec.prompts), seeds, enumerate(spec.lora_sets[: spec.config_sets or None]), spec.lora_scales,
        spec.lora_blocks, spec.steps, spec.guidance_scale, spec.scheduler, spec.width, spec.height, spec.clip_skip,
        spec.schedule, spec.true_cfg_scale, spec.max_sequence_length, sr_values, spec.hires, spec.emphasis,
        spec.pad_conds, spec.refiner,
    )
    seen: set[tuple] = set()
    for ((pi, p), seed, (li, loras), mult, blocks, steps, cfg, sched, w, h, skip, schedule, tcfg, seq, sr, hr, emph,
         pad, ref) in combos:
        prompt, negative = replace_sr(p.prompt, spec.prompt_sr, sr), replace_sr(p.negative_prompt, spec.prompt_sr, sr)
        set_name = None
        if (pi, li) in tagged:  # the prompt's <lora:…> tags extend set li (with_prompt_loras)
            set_name = set_label(loras)
            li = tagged[(pi, li)]
            loras = spec.lora_sets[li]
        scale = mult if loras else None
        blocks = blocks if loras else None
        # a prompt without the S/R search term is the same image for every S/R value: made once
        ident = (pi, seed, li, scale, blocks, steps, cfg, sched, w, h, skip, schedule, tcfg, seq, prompt, negative, hr,
                 emph, pad, ref)
        if ident in seen:  # the no-LoRA set is generated once, whatever the multipliers and blocks
            continue
        seen.add(ident)
        ids = tuple(lora_ids[li]) if lora_ids is not None else ()
        jobs.append(ImageJob(start + len(jobs), prompt, negative, seed, steps, cfg, w, h, sched, li,
                             loras, scale, model_key, skip, schedule, ids, tcfg, seq, model_index, blocks,
                             spec.prompt_syntax, sr, p.prompt if sr is not None else None, p.template, set_name,
                             hr, tuple(e for e in spec.embeddings if e.used_in(prompt, negative)), emph, pad,
                             ref))
    return jobs


def combine_sets(loras: Sequence[LoraSpec], tags: Sequence[LoraSpec]) -> tuple[LoraSpec, ...]:
    """A LoRA set with a prompt's tag LoRAs: each tag is added, or, when the set already has that LoRA (same name
    or file), sets its weight (the prompt is the more specific of the two)."""
    out = list(loras)
    for tag in tags:
        same = [i for i, s in enumerate(out) if lora_name(s) == tag.name or tag.source in (
            s.source, os.path.join(s.source, s.weight_name or ""))]
        if same:
            out[same[0]] = dataclasses.replace(out[same[0]], scale=tag.scale)
        else:
            out.append(tag)
    return tuple(out)


def with_prompt_loras(spec: RunSpec) -> RunSpec:
    """The run with every (prompt, LoRA set) whose prompt has `<lora:…>` tags mapped to the set they make."""
    if not any(p.loras for p in spec.prompts):
        return spec
    config_sets = spec.lora_sets[: spec.config_sets or None]  # (again: the config's own sets)
    n = len(config_sets)
    sets = list(config_sets)
    mapping = {}
    for pi, p in enumerate(spec.prompts):
        if not p.loras:
            continue
        for li, loras in enumerate(config_sets):
            combined = combine_sets(loras, p.loras)
            if combined not in sets:
                sets.append(combined)
            mapping[(pi, li)] = sets.index(combined)
    return dataclasses.replace(spec, lora_sets=tuple(sets), config_sets=n, prompt_sets=mapping)


def shard(jobs: list[ImageJob], index: int, count: int) -> list[ImageJob]:
    """Shard `index` of `count`: a contiguous part of the plan in batch order (so a shard switches LoRA sets as
    rarely as the whole run would). Sizes differ by at most 1; shards are disjoint, deterministic, and together
    the plan."""
    if count == 1:
        return list(jobs)
    ordered = sorted(jobs, key=_batch_order)
    size, extra = divmod(len(ordered), count)
    start = index * size + min(index, extra)
    return ordered[start : start + size + (1 if index < extra else 0)]


def _group_order(key: tuple) -> tuple:
    """Batch groups by model (each loaded once), then LoRA set (each activated once), multiplier and settings."""
    return (key[0], key[1], -1.0 if key[2] is None else key[2], *key[3:])


def _batch_order(job: ImageJob) -> tuple:
    return (*_group_order(job.group_key), job.index)


def batches(jobs: Iterable[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Group jobs that can share a pipeline call: the model first (each loaded once), then LoRA sets (switched
    as rarely as possible)."""
    groups: dict[tuple, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.group_key, []).append(job)
    # model, LoRA set and multiplier first (fewest switches), then plan order: files are numbered as they are
    # made, and grids show values in the order files first show them
    for key in sorted(groups, key=lambda k: (*_group_order(k)[:3], groups[k][0].index)):
        group = groups[key]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]
