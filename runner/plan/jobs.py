"""Expand a RunSpec into one ImageJob per image, shard it, and group jobs into batches."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..common.paths import slug
from ..config import LoraSpec, RunSpec, lora_name
from ..config.blocks import BlockSpec, spec_label

AXES = ("prompt", "seed", "lora_set", "lora_scale", "lora_blocks", "steps", "guidance_scale", "scheduler", "width",
        "height", "clip_skip")


@dataclass(frozen=True)
class ImageJob:
    """Everything that decides the pixels of one image (the model is shared by the run)."""

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
    lora_blocks: BlockSpec | None = None  # the swept block weights (`lora_blocks`); None = not swept / no LoRA

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

    @property
    def key(self) -> str:
        """A stable id of the image's content, used by resume and sharding."""
        blob = json.dumps(
            [self.model_key, self.prompt, self.negative_prompt, self.seed, self.steps, self.guidance_scale,
             self.width, self.height, self.scheduler,
             [[s.source, s.weight_name, w] + ([spec_label(b)] if b is not None else [])
              for s, w, b in zip(self.loras, self.adapter_weights, self.adapter_blocks, strict=True)]]
            + ([self.clip_skip] if self.clip_skip else []),  # absent when off: keys of older runs stay valid
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def group_key(self) -> tuple:
        """Images with equal group keys can share one pipeline call."""
        return (self.lora_set, self.lora_scale, self.scheduler or "", self.steps, self.guidance_scale,
                self.width or 0, self.height or 0, self.clip_skip or 0, self.blocks_label or "")

    @property
    def lora_label(self) -> str:
        if not self.loras:
            return "nolora"
        label = "+".join(slug(lora_name(s), 20) for s in self.loras)
        label = label if self.lora_scale in (None, 1.0) else f"{label}@{self.lora_scale:g}"
        return label if self.lora_blocks is None else f"{label}-{slug(self.blocks_label or '', 24)}"

    @property
    def filename(self) -> str:
        return f"{self.index:05d}_{slug(self.prompt)}_s{self.seed}_{slug(self.lora_label, 48)}.png"

    def axis_value(self, axis: str) -> object:
        """The value of a sweep axis for this image (for grids)."""
        if axis == "prompt":
            return self.prompt
        if axis == "lora_set":
            return "+".join(slug(lora_name(s), 20) for s in self.loras) if self.loras else "nolora"
        if axis == "lora_blocks":
            return self.blocks_label
        return getattr(self, axis)


def expand(spec: RunSpec, model_key: str = "") -> list[ImageJob]:
    """Every combination of the run's axes, in a stable order (index = position in the plan)."""
    jobs: list[ImageJob] = []
    combos = itertools.product(
        enumerate(spec.prompts), spec.seeds, enumerate(spec.lora_sets), spec.lora_scales, spec.lora_blocks,
        spec.steps, spec.guidance_scale, spec.scheduler, spec.width, spec.height, spec.clip_skip,
    )
    seen: set[tuple] = set()
    for (pi, p), seed, (li, loras), mult, blocks, steps, cfg, sched, w, h, skip in combos:
        scale = mult if loras else None
        blocks = blocks if loras else None
        ident = (pi, seed, li, scale, blocks, steps, cfg, sched, w, h, skip)
        if ident in seen:  # the no-LoRA set is generated once, whatever the multipliers and blocks
            continue
        seen.add(ident)
        jobs.append(ImageJob(len(jobs), pi, p.prompt, p.negative_prompt, seed, steps, cfg, w, h, sched, li,
                             loras, scale, model_key, skip, blocks))
    return jobs


def shard(jobs: list[ImageJob], index: int, count: int) -> list[ImageJob]:
    """Shard `index` of `count`: a deterministic, disjoint slice; all shards together are the plan."""
    if count == 1:
        return list(jobs)
    return [j for j in jobs if int(j.key, 16) % count == index]


def batches(jobs: Iterable[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Group jobs that can share a pipeline call, ordered so LoRA sets switch as rarely as possible."""
    groups: dict[tuple, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.group_key, []).append(job)
    for key in sorted(groups, key=lambda k: (k[0], -1.0 if k[1] is None else k[1], *k[2:])):
        group = groups[key]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]
