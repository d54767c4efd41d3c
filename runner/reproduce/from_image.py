"""`from_image=IMG`: an image's record becomes the base config; each new image is then compared with it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..common.errors import ConfigError
from ..config import TORCH_DTYPES, LoraSpec, RunSpec, validate
from ..config.hires import config_from_record as hires_config
from ..config.refiner import config_from_record as refiner_config
from ..models.embeddings import check_recorded
from ..outputs.record import SETTINGS
from .inspect import FOREIGN, read_record

log = logging.getLogger(__name__)
DTYPES = {torch_name: name for name, torch_name in TORCH_DTYPES.items()}  # recorded torch dtype -> model.dtype
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


def _text(value: Any) -> Any:
    """Escape OmegaConf interpolation in recorded text so it stays literal."""
    return value.replace("${", "\\${") if isinstance(value, str) else value


def _unscale(weights: list[float], mult: float) -> tuple[list[float], float]:
    """Per-adapter scales and the multiplier that give exactly the recorded effective weights."""
    if mult != 0:
        for scales in ([round(w / mult, 6) for w in weights], [w / mult for w in weights]):
            if all(s * mult == w and abs(s) <= 10 for s, w in zip(scales, weights, strict=True)):
                return scales, mult
    if mult == 0:
        return [1.0] * len(weights), 0.0
    return list(weights), 1.0


def model_config(m: dict) -> dict:
    """The `model` config that loads the same weights as a record's `model` entry."""
    kind = m.get("kind")
    mid = m.get("location") if kind in ("dir", "file") else m.get("id")
    mid = (m.get("location") or "builtin:tiny") if kind == "builtin" else mid
    return {"id": mid, "revision": m.get("revision") if kind == "hub" else None,
            "pipeline": PIPELINES.get(m.get("pipeline"), "auto"), "dtype": DTYPES.get(m.get("dtype"), "auto"),
            "variant": m.get("variant"), "config": m.get("config"), "transformer": m.get("transformer"),
            "family": None, "settings": {}}


def record_config(rec: dict) -> dict:
    """The config keys a record fixes (everything that changes pixels); absent values are left out."""
    out: dict[str, Any] = {"prompts": [_text(rec.get("prompt", ""))],
                           "negative_prompt": _text(rec.get("negative_prompt") or "")}
    if rec.get("seed") is not None:
        out["seeds"] = [rec["seed"]]
    # the prompt is read as the image read it: A1111 syntax for A1111's images; our records from before the prompt
    # language were plain text; an expanded prompt is not a template any more
    out["prompt_syntax"] = rec.get("prompt_syntax") or ("a1111" if rec.get("source_format") == FOREIGN else "plain")
    # A1111's text options; a record from before they were keys (no `emphasis`) was padded whenever lengths differed
    out["emphasis"] = rec.get("emphasis") or "original"
    out["pad_conds"] = rec["pad_conds"] if "emphasis" in rec else out["prompt_syntax"] == "a1111"
    out["prompt_sr"] = None
    out["prompts_file"] = None
    for key in ("steps", "guidance_scale", "width", "height", "clip_skip", "true_cfg_scale", "max_sequence_length"):
        if rec.get(key) is not None:
            out[key] = rec[key]
    out["hires"] = hires_config(rec)
    out["refiner"] = refiner_config(rec)
    if rec.get("hires_upscaler_file"):  # ours: found again by name in its folder (A1111's: upscaler_dirs=...)
        out["upscaler_dirs"] = [str(Path(rec["hires_upscaler_file"]).parent)]
    files = [e["file"] for e in rec.get("embeddings") or [] if e.get("file")]
    if files:  # ours: the folders the embeddings were in (A1111's infotext has hashes only: embedding_dirs=...)
        out["embedding_dirs"] = sorted({str(Path(f).parent) for f in files})
    if rec.get("source_format") == FOREIGN:
        for key in ("scheduler", "schedule"):
            if rec.get(key):
                out[key] = rec[key]
        return out
    out["scheduler"] = rec.get("scheduler")
    out["schedule"] = rec.get("schedule")
    if rec.get("threads") and str(rec.get("device")).startswith("cpu"):  # thread count changes CPU rounding
        out["threads"] = rec["threads"]
    out["model"] = model_config(rec["model"])
    loras = rec.get("loras") or []
    mult = 1.0 if rec.get("lora_scale") is None else rec["lora_scale"]
    scales, mult = _unscale([lo["scale"] for lo in loras], mult)
    out["lora_sets"] = [[{"source": lo["source"], "weight_name": lo.get("weight_name"), "scale": s,
                          "name": lo["name"], **({"blocks": lo["blocks"]} if lo.get("blocks") else {})}
                         for lo, s in zip(loras, scales, strict=True)]]
    out["lora_scales"] = [mult]
    out["device"] = str(rec.get("device") or "auto").split(":")[0]
    out["batch_invariant"] = bool(rec.get("batch_invariant"))
    if rec.get("memory"):  # VAE tiling and attention slicing change pixels slightly: reuse them
        out["memory"] = {k: rec["memory"][k] for k in ("offload", "vae_tiling", "vae_slicing", "attention_slicing")
                         if k in rec["memory"]}
    out["models"] = []  # the image's own model, not a model axis
    if rec.get("perf"):  # fast-path options change pixels by float rounding: reuse them
        out["perf"] = {k: bool(rec["perf"].get(k)) for k in ("channels_last", "fuse_qkv", "fuse_lora", "compile")}
    return out


def explicit_keys(overrides: Iterable[str], conf_dir: Path) -> set[str]:
    """Config keys the user set on the command line (a group override, `model=tiny`, sets its package)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: set[str] = set()
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        key = ov.key_or_group
        if key.startswith("hydra") or key == "from_image":
            continue
        option = conf_dir / key / f"{ov.value()}.yaml"
        if "." not in key and "/" not in key and (conf_dir / key).is_dir() and option.is_file():
            text = option.read_text(encoding="utf-8")
            if "@package _global_" in text.split("\n\n")[0]:
                keys.update(str(k) for k in (OmegaConf.load(option) or {}))
                continue
        keys.add(key)
    return keys


def _complain(msg: str, strict: bool) -> None:
    if strict:
        raise ConfigError(f"{msg}; pass strict=false to run anyway")
    log.warning("%s; running anyway (strict=false)", msg)


def _check_model(img: str, rec: dict, spec: RunSpec, strict: bool) -> None:
    from ..common.hashing import config_sha256, model_sha256
    from ..models.source import resolve_source
    from ..models.tiny import builtin_path

    m = rec["model"]
    try:
        source = resolve_source(spec.model)
    except ConfigError as exc:
        raise ConfigError(f"{img} was made with model {spec.model.id!r}, which is not available here "
                          f"({exc}); give model.id=... to use another") from exc
    weights = {"builtin": lambda: builtin_path(source.location),
               "hub": lambda: None}.get(source.kind, lambda: Path(source.location))()
    if m.get("hash") and weights is not None and model_sha256(weights) != m["hash"]:
        _complain(f"model {source.location} is not the one {img} was made with (sha256 {m['hash'][:12]}…)",
                  strict)
    configs = Path(spec.model.config) if source.kind == "file" and spec.model.config else weights
    if m.get("config_hash") and configs is not None and configs.is_dir() and config_sha256(configs) != m[
            "config_hash"]:
        _complain(f"the configs of model {configs} (scheduler_config.json, ...) changed since {img} was made",
                  strict)


def _check_hires_model(img: str, rec: dict, spec: RunSpec, strict: bool) -> None:
    """The Hires checkpoint of our image must be the same files (its recorded sha256), as the model must."""
    from ..common.hashing import model_sha256

    m = rec.get("hires_model") or {}
    path = Path(m.get("location") or "")
    if m.get("hash") and m.get("kind") in ("dir", "file") and path.exists() and model_sha256(path) != m["hash"]:
        _complain(f"hires.model {path} is not the one {img} was made with (sha256 {m['hash'][:12]}…)", strict)


def _check_loras(img: str, rec: dict, spec: RunSpec, strict: bool) -> RunSpec:
    """Each recorded LoRA must resolve with its recorded sha256; a file that moved is found in `lora_dirs`."""
    from ..lora.files import find_in_lora_dirs, resolve_lora

    loras = list(spec.lora_sets[0]) if spec.lora_sets else []
    for i, lo in enumerate(rec.get("loras") or []):
        try:
            spec_ = LoraSpec(lo["source"], lo.get("weight_name"), 1.0, lo["name"])
            got = resolve_lora(spec_, spec.allow_pickle_lora)
        except ConfigError as exc:
            found = find_in_lora_dirs(spec.lora_dirs, lo["name"], lo["sha256"]) if spec.lora_dirs else None
            if found is None:
                where = f"lora_dirs ({', '.join(spec.lora_dirs)})" if spec.lora_dirs else "no lora_dirs given"
                raise ConfigError(f"{img} used LoRA {lo['name']!r}, which is not available here ({exc}; {where}); "
                                  "give lora_dirs=[FOLDER] or lora_sets=... to use others") from exc
            log.info("LoRA %r of %s found in lora_dirs: %s", lo["name"], img, found)
            if i < len(loras):
                loras[i] = dataclasses.replace(loras[i], source=str(found), weight_name=None)
            continue
        if got.sha256 != lo["sha256"]:
            _complain(f"LoRA {lo['name']!r} ({got.file}) has sha256 {got.sha256[:12]}…, but {img} was made "
                      f"with {lo['sha256'][:12]}…", strict)
    if not loras:
        return spec
    return dataclasses.replace(spec, lora_sets=(tuple(loras), *spec.lora_sets[1:]))


def foreign_loras(rec: dict, dirs: Sequence[str]) -> list[dict]:
    """The LoRA set of an image that names its LoRAs only by name and hash (A1111's `Lora hashes`: AutoV3, or
    AutoV2/full SHA-256): each file found in `dirs`, its weight from the record or the prompt's `<lora:…>` tag
    (which, read as A1111 syntax, also applies it: lora/tags.py; plan.combine_sets keeps one entry per LoRA)."""
    from ..lora.files import find_in_lora_dirs
    from ..prompt import split_tags

    tags = {t.name: t.unet for t in split_tags(str(rec.get("prompt") or ""))[1]}
    out = []
    for lo in rec.get("loras") or []:
        found = find_in_lora_dirs(dirs, lo.get("name"), lo.get("sha256"))
        if found is None and lo.get("name") and (found := find_in_lora_dirs(dirs, lo["name"])) is not None:
            log.warning("LoRA %r: no file in lora_dirs has hash %s; using %s, found by name", lo["name"],
                        lo.get("sha256"), found)
        if found is None:
            raise ConfigError(f"LoRA {lo.get('name')!r} (hash {lo.get('sha256')}) is not in lora_dirs "
                              f"({', '.join(dirs)}); add the folder that holds it, or give lora_sets=[[...]]")
        scale = lo.get("scale") if lo.get("scale") is not None else tags.get(lo.get("name"), 1.0)
        out.append({"source": str(found), "name": lo["name"], "scale": scale})
    return out


def _check_foreign(img: str, rec: dict, given: set[str], strict: bool) -> None:
    if rec.get("loras") and "lora_sets" not in given:
        names = ", ".join(lo["name"] for lo in rec["loras"])
        _complain(f"{img} used LoRAs known only by name and hash ({names}); give lora_dirs=[FOLDER] (searched by "
                  "name and hash) or lora_sets=[[...]]", strict)
    if "model" not in given and "model.id" not in given:
        log.warning("%s was made with model %r (hash %s) elsewhere; using model.id from the config", img,
                    rec["model"].get("name"), rec["model"].get("hash"))
    if rec.get("ignored"):
        log.warning("%s: not supported here, ignored: %s", img, ", ".join(rec["ignored"]))
    if rec.get("no_equivalent"):
        log.warning("%s: no diffusers equivalent for %s; using %s instead", img, "; ".join(rec["no_equivalent"]),
                    "the model's own scheduler" if not rec.get("scheduler") else
                    f"scheduler={rec['scheduler']}" + (f" schedule={rec['schedule']}" if rec.get("schedule") else
                                                       " with A1111's Automatic schedule for it"))


def _foreign_refiner(merged: DictConfig, rec: dict, img: str, given: set[str], strict: bool) -> None:
    """An A1111 image's `Refiner: NAME [hash]`: found by name and hash beside the model (A1111 keeps checkpoints
    in one folder) unless refiner.model is given; its switch point from `Refiner switch at`."""
    from ..models.refiner import find_refiner

    ref = rec.get("refiner")
    if not ref or given & {"refiner", "refiner.model"}:
        return
    if "refiner.switch_at" not in given:
        OmegaConf.update(merged, "refiner.switch_at", rec["refiner_switch_at"], merge=False, force_add=True)
    model = Path(str(OmegaConf.select(merged, "model.id", default="")))
    folders = [model.parent] if model.exists() else []
    found = find_refiner(ref["name"], ref.get("hash"), folders)
    if found is None:
        where = f" in {folders[0]}" if folders else ""
        _complain(f"{img} was refined with {ref['name']!r} (hash {ref.get('hash')}), not found{where}; give "
                  "refiner.model=PATH", strict)
        return
    log.info("%s: refiner %r found at %s", img, ref["name"], found)
    OmegaConf.update(merged, "refiner.model", str(found), merge=False, force_add=True)


def _for_family(merged: DictConfig, rec: dict, img: str, given: set[str]) -> None:
    """An A1111/Forge/ComfyUI image's settings on the model they run on now, read as those tools read them there:
    on a flow-matching model (Flux, SD3, …) their "Euler" is flow Euler (config/schedulers.for_flow); on a
    guidance-distilled one (Flux.1) Forge's "Distilled CFG Scale" is the guidance and "CFG scale" the real CFG
    (Forge writes both for every model, so only the model can tell)."""
    from ..config.schedulers import for_flow
    from ..models.families import G_DISTILLED
    from ..models.info import model_info

    info = model_info(validate(merged).model)
    distilled = (rec.get("ignored") or {}).get("Distilled CFG Scale")
    if info.traits.guidance == G_DISTILLED and distilled is not None and not given & {"guidance_scale",
                                                                                      "true_cfg_scale"}:
        cfg = rec.get("guidance_scale")
        rec["ignored"].pop("Distilled CFG Scale")  # used: not in the "ignored" warning
        OmegaConf.update(merged, "guidance_scale", float(distilled), merge=False, force_add=True)
        if cfg not in (None, 1.0):
            OmegaConf.update(merged, "true_cfg_scale", cfg, merge=False, force_add=True)
    if not info.family.flow or not rec.get("scheduler") or given & {"scheduler", "schedule"}:
        return
    scheduler, schedule, lost = for_flow(rec["scheduler"], rec.get("schedule"))
    OmegaConf.update(merged, "scheduler", scheduler, merge=False, force_add=True)
    OmegaConf.update(merged, "schedule", schedule, merge=False, force_add=True)
    if lost:
        log.warning("%s: no flow-matching equivalent for %s; using %s", img, "; ".join(lost),
                    f"scheduler={scheduler}" if scheduler else "the model's own scheduler")


def prepare(cfg: DictConfig, overrides: Iterable[str], conf_dir: Path) -> RunSpec:
    """The RunSpec of `t2i from_image=IMG ...`: the image's settings, then the user's own overrides on top."""
    img = str(cfg.from_image)
    try:
        rec = read_record(img)
    except ConfigError as exc:
        raise ConfigError(f"from_image: {exc}") from exc
    given = explicit_keys(overrides, conf_dir)
    merged = OmegaConf.merge(cfg, record_config(rec))
    for key in sorted(given):
        value = OmegaConf.select(cfg, key, default=None)
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    dirs = [str(d) for d in (OmegaConf.select(merged, "lora_dirs", default=None) or [])]
    foreign = rec.get("source_format") == FOREIGN
    if foreign and rec.get("loras") and dirs and "lora_sets" not in given:
        OmegaConf.update(merged, "lora_sets", [foreign_loras(rec, dirs)], merge=False, force_add=True)
        given = given | {"lora_sets"}  # the image's LoRAs, found by hash: nothing to warn about
    if foreign:
        _for_family(merged, rec, img, given)
        _foreign_refiner(merged, rec, img, given, bool(cfg.get("strict", True)))
    spec = validate(merged)
    strict = bool(cfg.get("strict", True))
    for problem in check_recorded(img, rec.get("embeddings") or [], spec):
        _complain(problem, strict)
    if foreign:
        _check_foreign(img, rec, given, strict)
    else:
        if not given & {"model", "model.id", "model.revision"}:
            _check_model(img, rec, spec, strict)
        if not given & {"hires", "hires.model"}:
            _check_hires_model(img, rec, spec, strict)
        if "lora_sets" not in given:
            spec = _check_loras(img, rec, spec, strict)
        if "device" not in given:
            from ..models.source import resolve_device

            try:
                resolve_device(spec.device)
            except ConfigError as exc:
                raise ConfigError(f"{img} was made on {spec.device}, which is not available here; add "
                                  f"device=cpu to regenerate it anyway (pixels will differ) ({exc})") from exc
    extra = {**spec.extra, "from_image": img, "compare": Original(img, rec).compare,
             # a prompt's <lora:…> tags whose file was renamed are found by the hash the image recorded
             "lora_hashes": {lo["name"]: lo["sha256"] for lo in rec.get("loras") or [] if lo.get("sha256")},
             # ... and found first in the file the image's record names (no lora_dirs needed)
             "lora_files": {} if foreign else {lo.name: str(Path(lo.source, lo.weight_name or "")) for lo in
                                               (spec.lora_sets[0] if spec.lora_sets else ()) if lo.name}}
    return dataclasses.replace(spec, extra=extra)


class Original:
    """The image a run reproduces: compares new images that have its settings, pixel by pixel."""

    def __init__(self, path: str, record: dict) -> None:
        self.path = str(Path(path).resolve())
        self.record = record
        self._pixels: Any = None

    def differences(self, rec: dict) -> list[str]:
        """Settings (and device class) in which `rec` differs from the original's."""
        a, b = self.record, rec
        out = [k for k in SETTINGS if k in a and a.get(k) != b.get(k)]  # a key older records lack: not compared
        if [(lo["sha256"], lo["scale"]) for lo in a.get("loras") or []] != \
                [(lo["sha256"], lo["scale"]) for lo in b.get("loras") or []]:
            out.append("loras")
        out += [f"model.{k}" for k in ("hash", "dtype") if a["model"].get(k) != b["model"].get(k)]
        if (a.get("refiner") or {}).get("hash") != (b.get("refiner") or {}).get("hash"):
            out.append("refiner")
        if a["model"].get("config_hash") and a["model"]["config_hash"] != b["model"].get("config_hash"):
            out.append("model.config_hash")  # an edited scheduler_config.json etc. (older records lack it)
        if str(a.get("device")).split(":")[0] != str(b.get("device")).split(":")[0]:
            out.append("device")
        elif str(a.get("device")).startswith("cpu") and a.get("threads") and a.get("threads") != b.get("threads"):
            out.append("threads")
        invariant = a.get("batch_invariant") and b.get("batch_invariant")
        if not invariant and a.get("batch_size") != b.get("batch_size"):
            out.append("batch")
        return out

    def compare(self, image: Any, rec: dict) -> dict:
        """The `reproduced` entry of a new image: identical / max pixel diff when comparable, else why not."""
        import numpy as np
        from PIL import Image

        out: dict[str, Any] = {"source": self.path, "compared": False, "identical": None,
                               "max_pixel_diff": None}
        if self.record.get("source_format") == FOREIGN:
            return {**out, "reason": "the original was not made by t2i-runner"}
        diff = self.differences(rec)
        if diff:
            return {**out, "reason": "settings differ: " + ", ".join(diff)}
        if self._pixels is None:
            with Image.open(self.path) as im:
                self._pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
        new = np.asarray(image.convert("RGB"), dtype=np.int16)
        if new.shape != self._pixels.shape:
            return {**out, "reason": f"size differs: {new.shape} vs {self._pixels.shape}"}
        worst = int(np.abs(new - self._pixels).max())
        out.update(compared=True, identical=worst == 0, max_pixel_diff=worst)
        changed = sorted(k for k, v in (self.record.get("versions") or {}).items()
                         if k != "t2i-runner" and (rec.get("versions") or {}).get(k) != v)
        if changed:
            out["versions_differ"] = changed
        return out
