"""Expand a RunSpec into one ImageJob per image, shard it, and group jobs into batches."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..common.paths import slug
from ..config import LoraSpec, RunSpec, lora_name

AXES = ("prompt", "seed", "lora_set", "lora_scale", "steps", "guidance_scale", "scheduler", "width", "height",
        "clip_skip", "schedule", "true_cfg_scale", "max_sequence_length")


@dataclass(frozen=True)
class ImageJob:
    """Everything that decides the pixels of one image (with the model of its `model_key`)."""

    index: int
    prompt_index: int
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
    true_cfg_scale: float | None = None  # families with true CFG (Flux.1, Qwen-Image); None = not used
    max_sequence_length: int | None = None  # None = the pipeline's own
    model_index: int = 0  # position in the run's model axis (the outermost loop)

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        """The weight given to each adapter of the set: its own scale times the swept multiplier."""
        mult = 1.0 if self.lora_scale is None else self.lora_scale
        return tuple(s.scale * mult for s in self.loras)

    @property
    def key(self) -> str:
        """A stable id of the image's content, used by resume and sharding."""
        blob = json.dumps(
            [self.model_key, self.prompt, self.negative_prompt, self.seed, self.steps, self.guidance_scale,
             self.width, self.height, self.scheduler,
             [[s.source, s.weight_name, w] for s, w in zip(self.loras, self.adapter_weights, strict=True)]]
            + ([self.clip_skip] if self.clip_skip else [])  # absent when off: keys of older runs stay valid
            + ([{"schedule": self.schedule}] if self.schedule else [])
            + ([["true_cfg", self.true_cfg_scale]] if self.true_cfg_scale is not None else [])
            + ([["max_seq", self.max_sequence_length]] if self.max_sequence_length is not None else []),
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def group_key(self) -> tuple:
        """Images with equal group keys can share one pipeline call."""
        return (self.model_index, self.lora_set, self.lora_scale, self.scheduler or "", self.steps,
                -1.0 if self.guidance_scale is None else self.guidance_scale, self.width or 0, self.height or 0,
                self.clip_skip or 0, self.schedule or "", self.true_cfg_scale or 0.0, self.max_sequence_length or 0)

    @property
    def lora_label(self) -> str:
        if not self.loras:
            return "nolora"
        label = "+".join(slug(lora_name(s), 20) for s in self.loras)
        return label if self.lora_scale in (None, 1.0) else f"{label}@{self.lora_scale:g}"

    @property
    def filename(self) -> str:
        return f"{self.index:05d}_{slug(self.prompt)}_s{self.seed}_{slug(self.lora_label, 48)}.png"

    def axis_value(self, axis: str) -> object:
        """The value of a sweep axis for this image (for grids)."""
        if axis == "prompt":
            return self.prompt
        if axis == "lora_set":
            return self.lora_label.split("@")[0]
        return getattr(self, axis)


def expand(spec: RunSpec, model_key: str = "", model_index: int = 0, start: int = 0) -> list[ImageJob]:
    """Every combination of the run's axes for one model, in a stable order (index = start + position)."""
    jobs: list[ImageJob] = []
    combos = itertools.product(
        enumerate(spec.prompts), spec.seeds, enumerate(spec.lora_sets), spec.lora_scales, spec.steps,
        spec.guidance_scale, spec.scheduler, spec.width, spec.height, spec.clip_skip, spec.schedule,
        spec.true_cfg_scale, spec.max_sequence_length,
    )
    seen: set[tuple] = set()
    for (pi, p), seed, (li, loras), mult, steps, cfg, sched, w, h, skip, schedule, tcfg, seq in combos:
        scale = mult if loras else None
        ident = (pi, seed, li, scale, steps, cfg, sched, w, h, skip, schedule, tcfg, seq)
        if ident in seen:  # the no-LoRA set is generated once, whatever the multipliers
            continue
        seen.add(ident)
        jobs.append(ImageJob(start + len(jobs), pi, p.prompt, p.negative_prompt, seed, steps, cfg, w, h, sched, li,
                             loras, scale, model_key, skip, schedule, tcfg, seq, model_index))
    return jobs


def shard(jobs: list[ImageJob], index: int, count: int) -> list[ImageJob]:
    """Shard `index` of `count`: a deterministic, disjoint slice; all shards together are the plan."""
    if count == 1:
        return list(jobs)
    return [j for j in jobs if int(j.key, 16) % count == index]


def batches(jobs: Iterable[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Group jobs that can share a pipeline call: the model first (each loaded once), then LoRA sets (switched
    as rarely as possible)."""
    groups: dict[tuple, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.group_key, []).append(job)
    for key in sorted(groups, key=lambda k: (k[0], k[1], -1.0 if k[2] is None else k[2], *k[3:])):
        group = groups[key]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]
