"""A sweep submitted to the server: the run's config (YAML text, or the same mapping as JSON) checked by the same
code as `t2i` (`validate`, then every model and LoRA file planned as `run` plans them) and by the server's limits
for the whole sweep, before anything is queued.

A sweep sets the run's axes and settings only. What would reach the server's own files or machine is the
server's (`device`, `output_dir`, `lora_dirs`, `prompts_file`, …): a sweep that sets it is refused, by name. Every
problem found is one line naming its key, so the page can show each beside its field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ..common.errors import ConfigError, first_line
from ..config import ModelConfig, RunConfig, RunSpec, validate
from ..config.validate import string_list
from ..lora.files import resolve_loras
from ..lora.tags import resolve_tags
from ..plan import RANDOM_SEED, expand, with_prompt_loras
from ..run import plan_models
from .forms import FormError, allowed_models, check_lora_access, model_dict

# the keys a sweep may set: the run's axes and the settings of its images, grids and viewer
SWEEP_KEYS = ("prompts", "negative_prompt", "prompt_syntax", "prompt_mode", "prompt_count", "prompt_seed",
              "prompt_sr", "seeds", "model", "models", "steps", "guidance_scale", "true_cfg_scale",
              "max_sequence_length", "width", "height", "scheduler", "schedule", "clip_skip", "batch_size",
              "lora_sets", "lora_scales", "lora_blocks", "run_seed", "grid",
              "emphasis", "pad_conds")  # not `viewer`: the page follows it
_KNOWN = tuple(f.name for f in dataclasses.fields(RunConfig))
_LEAD = re.compile(r"^(?:\S+: )?([a-z_]+)")  # the key an error line starts with (`steps=…`, `lora_sets[1]…`)


@dataclass
class Problem:
    field: str  # the config key (the page's field), or "yaml" for the text as a whole
    message: str


class SweepError(Exception):
    """A sweep the server refuses: an HTTP status and one line per problem."""

    def __init__(self, status: int, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.status = status
        self.problems = problems

    def as_json(self) -> dict[str, Any]:
        return {"detail": str(self), "errors": [dataclasses.asdict(p) for p in self.problems]}


@dataclass
class Sweep:
    """A checked sweep: its spec, its images, and its config as text (kept with the run)."""

    spec: RunSpec
    planned: int
    source: str
    family: str | None
    models: list[str] = field(default_factory=list)


def field_of(message: str) -> str:
    m = _LEAD.match(message)
    key = m.group(1) if m else ""
    return key if key in _KNOWN else "yaml"


def load_body(body: Any) -> tuple[dict[str, Any], str]:
    """The sweep mapping and its YAML text from a request body: YAML text, a JSON mapping, or
    `{"yaml": TEXT}` / `{"config": MAPPING}`."""
    if isinstance(body, bytes | str):
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or first_line(exc)
            raise SweepError(400, [Problem("yaml", f"the YAML does not parse{where}: {problem}")]) from exc
        if data is None:
            data = {}
    else:
        data = body
        if isinstance(data, dict) and set(data) == {"yaml"} and isinstance(data["yaml"], str):
            return load_body(data["yaml"])
        if isinstance(data, dict) and set(data) == {"config"}:
            data = data["config"]
        text = None
    if not isinstance(data, dict):
        raise SweepError(400, [Problem("yaml", f"a sweep is a mapping of run-config keys (prompts, seeds, …), "
                                               f"not a {type(data).__name__}")])
    return data, text if text is not None else yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _allowed_ids(cfg: DictConfig) -> dict[str, str]:
    """Every model id this server allows -> the name it is allowed under."""
    out = {}
    for name in allowed_models(cfg):
        out[name] = name
        mid = model_dict(name, cfg).get("id")
        if isinstance(mid, str):
            out[mid] = name
    return out


def _keys(data: dict[str, Any], cfg: DictConfig) -> tuple[dict[str, Any], list[Problem]]:
    """The sweep's keys as overrides of the server's config; a problem for every key it may not set."""
    problems, out = [], {}
    allowed = _allowed_ids(cfg)
    for key, value in data.items():
        if key not in _KNOWN:
            from ..common.errors import did_you_mean

            problems.append(Problem("yaml", f"{key}: not a run-config key{did_you_mean(str(key), SWEEP_KEYS)}; "
                                            f"a sweep sets {', '.join(SWEEP_KEYS)}"))
        elif key not in SWEEP_KEYS:
            problems.append(Problem(key, f"{key}: the server's setting, not a sweep's (a sweep sets "
                                         f"{', '.join(SWEEP_KEYS)})"))
        elif key == "model":
            name = value.get("id") if isinstance(value, dict) else value
            if not isinstance(name, str) or name not in allowed:
                problems.append(Problem("model", f"model={name!r} is not allowed on this server; valid: "
                                                 f"{', '.join(allowed_models(cfg))}"))
            else:
                out[key] = model_dict(allowed[name], cfg)
        elif key == "models":
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                name = item.get("id") or item.get("group") if isinstance(item, dict) else item
                if not isinstance(name, str) or name not in allowed:
                    problems.append(Problem("models", f"models[{i}]={name!r} is not allowed on this server; "
                                                      f"valid: {', '.join(allowed_models(cfg))}"))
            out[key] = items
        else:
            out[key] = value
    return out, problems


def _limits(spec: RunSpec, planned: int, server: DictConfig, steps: list[int], own_steps: bool) -> list[Problem]:
    problems = []
    if planned > server.max_images:
        problems.append(Problem("seeds", f"images={planned} is too many for this server; valid: 1 to "
                                         f"{server.max_images} for a whole sweep (server.max_images); sweep fewer "
                                         "prompts, seeds, LoRA sets or settings"))
    for side in ("width", "height"):
        big = [v for v in getattr(spec, side) if v is not None and v > server.max_side]
        if big:
            problems.append(Problem(side, f"{side}={big[0]} is too large; valid: 8 to {server.max_side}, a "
                                          "multiple of 8 (server.max_side)"))
    high = [s for s in steps if s is not None and s > server.max_steps]
    if high:
        default = "" if own_steps else " (the model's default)"
        problems.append(Problem("steps", f"steps={high[0]}{default} is above this server's limit; valid: 1 to "
                                         f"{server.max_steps} (server.max_steps)"))
    return problems


def _validated(cfg: DictConfig, overrides: dict[str, Any], model: dict | None, fixed: dict[str, Any]) -> RunSpec:
    try:
        merged = OmegaConf.merge(cfg, overrides, fixed)
        if model is not None:  # the sweep's model replaces the server's (a merge would mix two groups)
            merged.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
        return validate(merged)
    except ConfigError as exc:
        raise SweepError(422, [Problem(field_of(str(exc)), str(exc))]) from exc
    except Exception as exc:  # noqa: BLE001 - OmegaConf's type errors are the sweep's (a list where a map goes)
        raise SweepError(422, [Problem(field_of(str(exc)), first_line(exc))]) from exc


def check_sweep(body: Any, cfg: DictConfig) -> Sweep:
    """The checked sweep of a request body on this server, or SweepError (400 unreadable, 403 not allowed,
    422 invalid or over the server's limits) with one line per problem."""
    server = cfg.server
    # 1. Read it; every key it may not set is a problem of its own
    data, text = load_body(body)
    overrides, problems = _keys(data, cfg)
    if problems:
        raise SweepError(403 if all(p.field != "yaml" for p in problems) else 422, problems)

    # 2. The server's config with the sweep's keys, checked by `t2i`'s own validation; the server's settings stay.
    #    validate() stops at the first bad value: the keys are then checked one at a time, for a line each.
    allowed_dirs = tuple(string_list("server.allowed_lora_dirs", server.allowed_lora_dirs))
    model = overrides.pop("model", None)
    fixed = {"output_dir": None, "shard": {"index": 0, "count": 1}, "resume": True, "lora_dirs": list(allowed_dirs)}
    try:
        spec = _validated(cfg, overrides, model, fixed)
    except SweepError as exc:
        alone = []
        for key in overrides:
            try:
                _validated(cfg, {key: overrides[key]}, model, fixed)
            except SweepError as one:
                alone += [p for p in one.problems if p.message not in {q.message for q in alone}]
        raise SweepError(422, alone or exc.problems) from exc

    # 3. Every LoRA file (sets and prompt tags) in the folders this server allows, every model allowed
    try:
        spec = resolve_tags(dataclasses.replace(spec, lora_dirs=allowed_dirs))
        for i, s in enumerate(spec.lora_sets):
            for lo in s:
                try:
                    check_lora_access(lo, server)
                except FormError as exc:
                    raise SweepError(exc.status, [Problem("lora_sets", f"lora_sets[{i}]: {exc.message}")]) from exc
        for lo in (lo for p in spec.prompts for lo in p.loras):
            check_lora_access(lo, server)
    except FormError as exc:
        raise SweepError(exc.status, [Problem("prompts", exc.message)]) from exc
    except ConfigError as exc:
        raise SweepError(422, [Problem(field_of(str(exc)), str(exc))]) from exc
    ids = _allowed_ids(cfg)
    for i, m in enumerate(spec.model_list):
        if m.id not in ids:
            raise SweepError(403, [Problem("models", f"models[{i}]={m.id!r} is not allowed on this server; valid: "
                                                     f"{', '.join(allowed_models(cfg))}")])

    # 4. Plan it as `run` does (every model's family and settings, LoRA files read and hashed; nothing loads)
    try:
        tagged = with_prompt_loras(spec)
        sets = resolve_loras(tagged)
        plans = plan_models(tagged, sets)
        lora_ids = [[r.sha256 for r in s] for s in sets]
        seed = 0 if RANDOM_SEED in spec.seeds else None
        jobs = [j for i, p in enumerate(plans) for j in expand(p.spec, p.key, lora_ids, seed, model_index=i)]
    except ConfigError as exc:
        raise SweepError(422, [Problem(field_of(str(exc)), str(exc))]) from exc
    steps = sorted({s for p in plans for s in p.spec.steps if s is not None})
    problems = _limits(spec, len(jobs), server, steps, "steps" in data)
    if problems:
        raise SweepError(422, problems)
    return Sweep(spec, len(jobs), text, plans[0].info.family.name, [p.info.config.id for p in plans])


def starter_yaml(cfg: DictConfig, lora_files: list[str]) -> str:
    """The page's starting sweep: the server's prompt and model, its allowed models and LoRA folders noted."""
    dirs = string_list("server.allowed_lora_dirs", cfg.server.allowed_lora_dirs)
    models = allowed_models(cfg)
    lines = ["# A sweep: every combination of the lists below (keys as in `t2i --cfg job`).",
             f"# Models this server allows: {', '.join(models)}",
             f"# LoRA folders this server allows: {', '.join(dirs) or '(none)'}"]
    lines += [f"#   {f}" for f in lora_files[:20]]
    prompts = OmegaConf.to_container(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else [cfg.prompts]
    body = {"prompts": prompts[:2], "seeds": [0, 1], "models": models[:1], "lora_sets": [[]]}
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
