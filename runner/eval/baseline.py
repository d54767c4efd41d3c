"""`lora_effect`'s baselines: for each LoRA image, the image with the same prompt, seed, settings and model but
no LoRA — found in the run (a `lora_sets: [[]]` entry), else made on demand into RUN_DIR/baselines/ (a run dir of
its own, so the run's manifest stays as the run wrote it) and recorded as made in each score line."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError
from ..outputs.record import SETTINGS
from ..prompt.syntax import split_tags

log = logging.getLogger(__name__)
BASELINES = "baselines"
Generate = Callable[[Any, Path], Any]  # run.run(cfg, output_dir): the generator of missing baselines
# perf and memory change pixels by float rounding only; the fused-LoRA switch differs by design between the two
ROUNDING_ONLY = ("perf", "memory")


def has_loras(entry: dict) -> bool:
    return bool(entry.get("loras"))


def settings_key(entry: dict) -> str:
    """What an image and its baseline share: every pixel setting (the prompt without its LoRA tags) and model."""
    rec = {k: entry.get(k) for k in SETTINGS if k not in ROUNDING_ONLY}
    if entry.get("prompt_syntax") == "a1111":
        rec["prompt"] = split_tags(rec.get("prompt") or "")[0]
    model = entry.get("model") or {}
    rec["model"] = model.get("hash") or model.get("id") if isinstance(model, dict) else model
    return json.dumps(rec, sort_keys=True, default=str)


def baseline_entries(folder: Path) -> list[dict]:
    """The images of RUN_DIR/baselines/ (made earlier on demand), files relative to the run dir."""
    from ..outputs.manifest import Manifest

    sub = Path(folder) / BASELINES
    return [{**e, "file": f"{BASELINES}/{e['file']}", "made": True} for e in Manifest(sub).entries()
            if (sub / e["file"]).is_file()]


def find(entries: Iterable[dict], folder: Path) -> dict[str, dict]:
    """Settings key -> its baseline entry (the run's own first, then those made on demand)."""
    out: dict[str, dict] = {}
    for e in [*entries, *baseline_entries(folder)]:
        if not has_loras(e):
            out.setdefault(settings_key(e), e)
    return out


def missing(entries: Iterable[dict], found: dict[str, dict]) -> list[dict]:
    return [e for e in entries if has_loras(e) and settings_key(e) not in found]


def check(missing_count: int, make: bool, generate: Generate | None) -> None:
    if missing_count and not make:
        raise ConfigError(f"lora_effect: {missing_count} LoRA image(s) have no baseline (the same prompt, seed and "
                          "settings without LoRAs) in the run, and eval.make_baseline=false; add [] to lora_sets, "
                          "or set eval.make_baseline=true (t2i-eval: drop --no-make-baseline)")
    if missing_count and generate is None:
        raise ConfigError(f"lora_effect: {missing_count} LoRA image(s) have no baseline and none can be made here")


def baseline_config(entry: dict) -> Any:
    """The run config of `entry`'s baseline: its record's settings with no LoRA."""
    from omegaconf import OmegaConf

    from ..config.schema import RunConfig
    from ..reproduce.from_image import record_config

    rec = record_config(entry)
    rec.update(lora_sets=[[]], lora_scales=None, prompt_syntax=entry.get("prompt_syntax") or "plain")
    if rec.get("perf"):
        rec["perf"]["fuse_lora"] = "auto"
    if entry.get("prompt_syntax") == "a1111":
        rec["prompts"] = [split_tags(entry.get("prompt") or "")[0].replace("${", "\\${")]
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), rec)
    cfg.grid.enabled = False
    cfg.viewer.enabled = False
    return cfg


def make(entries: list[dict], folder: Path, generate: Generate) -> None:
    """Generate the baselines of `entries` into RUN_DIR/baselines/ (one run per distinct settings; resumable)."""
    seen = set()
    for e in entries:
        k = settings_key(e)
        if k in seen:
            continue
        seen.add(k)
        generate(baseline_config(e), Path(folder) / BASELINES)
