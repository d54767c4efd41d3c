"""A prompt's `<lora:name:w>` tags as LoRA specs: each name found in `lora_dirs` by file stem (A1111's models/Lora),
so the plan can add them to the image's LoRA set (plan.with_prompt_loras)."""

from __future__ import annotations

import dataclasses
import difflib
import os

from ..common.errors import ConfigError
from ..config import LoraSpec, RunSpec
from ..prompt import split_tags


def resolve_tags(spec: RunSpec, hashes: dict[str, str] | None = None) -> RunSpec:
    """Every prompt's tag LoRAs (`PromptSpec.loras`), found by name in `spec.lora_dirs`, else by the hash
    `hashes[name]` (an A1111 image's `Lora hashes`, for a file renamed since)."""
    if spec.prompt_syntax != "a1111":
        return spec
    hashes = hashes if hashes is not None else spec.extra.get("lora_hashes")  # from_image: the image's hashes
    # from_image: the files the image's record names (checked by hash with its other LoRAs) come first
    recorded = {n: f for n, f in (spec.extra.get("lora_files") or {}).items() if os.path.isfile(f)}
    prompts = []
    for i, p in enumerate(spec.prompts):
        _, tags = split_tags(p.prompt)
        loras = []
        for tag in tags:
            if tag.te != tag.unet:
                raise ConfigError(f"prompts[{i}]: {tag.text} gives the text encoder and the UNet different weights, "
                                  "which is not supported; give one weight, <lora:NAME:W>")
            if any(lo.name == tag.name for lo in loras):
                raise ConfigError(f"prompts[{i}] has two tags for LoRA {tag.name!r}; give it once")
            file = recorded.get(tag.name) or _find(f"prompts[{i}]", tag.name, spec.lora_dirs,
                                                   (hashes or {}).get(tag.name))
            loras.append(LoraSpec(str(file), None, tag.te, tag.name))
        prompts.append(dataclasses.replace(p, loras=tuple(loras)) if loras else p)
    return dataclasses.replace(spec, prompts=tuple(prompts))


def _find(where: str, name: str, dirs: tuple[str, ...], hash_: str | None):
    from .files import _weight_files, find_in_lora_dirs

    if not dirs:
        raise ConfigError(f"{where} has <lora:{name}:…> but lora_dirs is empty; give lora_dirs=[FOLDER] (LoRAs "
                          "there are found by file name)")
    found = find_in_lora_dirs(dirs, name) or (find_in_lora_dirs(dirs, None, hash_) if hash_ else None)
    if found is None:
        stems = sorted({f.stem for f in _weight_files(dirs)})
        close = difflib.get_close_matches(name, stems, n=3, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else f"; there: {', '.join(stems[:10]) or 'none'}"
        raise ConfigError(f"{where}: LoRA {name!r} of <lora:{name}:…> is not in lora_dirs ({', '.join(dirs)}){hint}")
    return found



