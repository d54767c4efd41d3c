"""The named scorers: what each needs (a model, reference images, a no-LoRA baseline, a package), what it
writes, and how it scores a batch of images.

- `clip_t`: torchmetrics' CLIPScore, 100 * max(cos(image, text), 0), on the image's prompt as expanded, without
  A1111 weights, BREAKs or `<lora:…>` tags.
- `clip_i`, `dino`: the mean cosine similarity of the image to each reference image (`eval.reference_dir`) in
  CLIP-image or DINO (CLS token) space: the DreamBooth paper's subject fidelity.
- `lora_effect`: how far a LoRA moves an image from the same prompt/seed/settings image without LoRAs:
  1 - cos in CLIP or DINO space (`eval.lora_effect_space`), plus the pixel distances `lora_effect_ssim`
  (1 - SSIM) and `lora_effect_mad` (mean absolute difference, 0..1).
- extras, each skipped with one line when its package is absent: `pickscore` (a CLIP model: transformers only),
  `aesthetic` (simple-aesthetics-predictor), `image_reward` (image-reward), `hpsv2` (hpsv2).

A scorer's `version` goes into every line it writes: a formula change gives new lines, never mixed ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, did_you_mean
from ..config.schema import EvalConfig
from ..prompt.syntax import strip_syntax
from .models import Embedder, load_embedder, resolve

log = logging.getLogger(__name__)
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Scorer:
    name: str
    version: int
    columns: tuple[str, ...]  # the values it writes (the summary's columns)
    model: str | None = None  # its eval.models key
    reference: bool = False  # compares with eval.reference_dir
    baseline: bool = False  # compares with the no-LoRA image
    module: str | None = None  # an extra's import name (None: in the core dependencies)
    pip: str | None = None  # and its PyPI name
    higher: tuple[bool, ...] = (True,)  # per column: is higher more (fidelity, effect)


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("clip_t", 1, ("clip_t",), model="clip"),
    Scorer("clip_i", 1, ("clip_i",), model="clip", reference=True),
    Scorer("dino", 1, ("dino",), model="dino", reference=True),
    Scorer("lora_effect", 1, ("lora_effect", "lora_effect_ssim", "lora_effect_mad"), baseline=True,
           higher=(True, True, True)),
    Scorer("pickscore", 1, ("pickscore",), model="pickscore"),
    Scorer("aesthetic", 1, ("aesthetic",), model="aesthetic", module="aesthetics_predictor",
           pip="simple-aesthetics-predictor"),
    Scorer("image_reward", 1, ("image_reward",), model="image_reward", module="ImageReward", pip="image-reward"),
    Scorer("hpsv2", 1, ("hpsv2",), model="hpsv2", module="hpsv2", pip="hpsv2"),
)}
SPACES = ("clip", "dino")


def prompt_text(entry: dict) -> str:
    """The words the image was made from: the expanded prompt without A1111 weights, BREAKs and tags."""
    text = entry.get("prompt") or ""
    if entry.get("prompt_syntax", "plain") == "a1111":
        text = strip_syntax(text)
    return " ".join(text.split())


def reference_images(folder: str) -> list[Path]:
    root = Path(folder).expanduser()
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())


def models_of(cfg: EvalConfig) -> dict[str, str]:
    """eval.models as a dict (a dataclass from the schema, a mapping from a hand-made config)."""
    m = cfg.models
    return dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m or {})


def metric_names(value: Any) -> list[str]:
    """`eval.metrics` as a list of names (a comma-separated string too)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


def check_eval(cfg: EvalConfig, metrics: list[str] | None = None) -> list[str]:
    """Check an eval config before anything loads (unknown metric, reference dir, space); returns the metric
    names."""
    names = metric_names(cfg.metrics if metrics is None else metrics)
    for n in names:
        if n not in SCORERS:
            raise ConfigError(f"unknown metric {n!r} in eval.metrics{did_you_mean(n, list(SCORERS))}; valid: "
                              f"{', '.join(SCORERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.metrics={names} lists a metric twice; give each once")
    if cfg.lora_effect_space not in SPACES:
        raise ConfigError(f"eval.lora_effect_space={cfg.lora_effect_space!r} is not one of {', '.join(SPACES)}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"eval.batch_size={cfg.batch_size!r} is not a positive integer; try 16")
    needs_ref = [n for n in names if SCORERS[n].reference]
    if needs_ref:
        ref = cfg.reference_dir
        if not ref:
            raise ConfigError(f"{', '.join(needs_ref)} compare with reference images: set eval.reference_dir=DIR "
                              "(t2i-eval --reference-dir DIR), e.g. the LoRA's training images")
        if not Path(ref).expanduser().is_dir():
            raise ConfigError(f"eval.reference_dir={ref!r} is not a folder")
        if not reference_images(ref):
            raise ConfigError(f"eval.reference_dir={ref!r} has no images ({', '.join(IMAGE_EXT)}); "
                              "give the folder of the LoRA's training images")
    for n in names:
        key = SCORERS[n].model
        if key and not models_of(cfg).get(key):
            raise ConfigError(f"metric {n} needs eval.models.{key} (a hub id or a local folder)")
    return names


def reference_identity(folder: str) -> str:
    """A hash of the reference images' names and contents: a changed reference set gives new score lines."""
    h = hashlib.sha256()
    root = Path(folder).expanduser()
    for p in reference_images(folder):
        h.update(os.fsencode(str(p.relative_to(root))))
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


@dataclass
class Session:
    """The scorers of one evaluation, loaded once: `score()` turns a batch of images into metrics lines."""

    cfg: EvalConfig
    names: list[str]
    device: str
    say: Callable[[str], None] = print
    active: list[Scorer] = field(default_factory=list)
    embedders: dict[str, Embedder] = field(default_factory=dict)
    refs: dict[str, Any] = field(default_factory=dict)
    ref_id: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Session:
        """Load every model the metrics need (a model that does not load: ConfigError); extras whose package is
        absent are skipped with one line."""
        for n in self.names:
            s = SCORERS[n]
            if s.module and importlib.util.find_spec(s.module) is None:
                self.say(f"t2i-eval: {n} skipped: its package is not installed (pip install {s.pip}; model "
                         f"eval.models.{s.model}={models_of(self.cfg).get(s.model)!r})")
                continue
            self.active.append(s)
        for s in self.active:
            for kind in self._spaces(s):
                if kind not in self.embedders:
                    self.embedders[kind] = load_embedder(kind, models_of(self.cfg)[kind], self.device,
                                                         self.cfg.batch_size, key=f"eval.models.{kind}")
            if s.module or s.name == "pickscore":
                self.extras[s.name] = _load_extra(s, self.cfg, self.device)
        if any(s.reference for s in self.active):
            from PIL import Image

            files = reference_images(self.cfg.reference_dir)
            self.ref_id = reference_identity(self.cfg.reference_dir)
            images = [Image.open(f).convert("RGB") for f in files]
            for kind in {k for s in self.active if s.reference for k in self._spaces(s)}:
                self.refs[kind] = self.embedders[kind].images(images)
        return self

    def _spaces(self, s: Scorer) -> list[str]:
        if s.name == "lora_effect":
            return [self.cfg.lora_effect_space]
        return [s.model] if s.model in SPACES else []

    def signature(self, s: Scorer) -> dict:
        """What makes a score line comparable with another: scorer version, model identity, references."""
        if s.name == "lora_effect":
            model = self.embedders[self.cfg.lora_effect_space].identity
        elif s.model in SPACES:
            model = self.embedders[s.model].identity
        else:
            model = resolve(models_of(self.cfg).get(s.model) or "")[1]
        sig = {"version": s.version, "model": model}
        if s.reference:
            sig["ref"] = self.ref_id
        return sig

    def score(self, s: Scorer, entries: list[dict], images: list[Any],
              baselines: list[Any] | None = None) -> list[dict[str, float]]:
        """The values of `s` for each image (`baselines`: the no-LoRA image of each, for lora_effect)."""
        if s.name == "clip_t":
            emb = self.embedders["clip"]
            cos = (emb.images(images) * emb.texts([prompt_text(e) for e in entries])).sum(-1)
            return [{"clip_t": 100.0 * max(float(c), 0.0)} for c in cos]
        if s.reference:
            sims = self.embedders[s.model].images(images) @ self.refs[s.model].T
            return [{s.name: float(v)} for v in sims.mean(dim=1)]
        if s.name == "lora_effect":
            from .pixels import pixel_distances

            emb = self.embedders[self.cfg.lora_effect_space]
            cos = (emb.images(images) * emb.images(baselines or [])).sum(-1)
            return [{"lora_effect": 1.0 - float(c), **pixel_distances(im, b)}
                    for c, im, b in zip(cos, images, baselines or [], strict=True)]
        return self.extras[s.name](entries, images)


def _load_extra(s: Scorer, cfg: EvalConfig, device: str) -> Callable[[list[dict], list[Any]], list[dict]]:
    """The scoring function of an extra (its package's own API, its model from eval.models)."""
    from ..common.errors import first_line

    source = models_of(cfg).get(s.model)
    try:
        return EXTRA_LOADERS[s.name](source, cfg, device)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that does not load is a user error
        raise ConfigError(f"eval.models.{s.model}={source!r} does not load for {s.name} ({first_line(exc, 160)}); "
                          "give a hub id or a local folder") from None


def _pickscore(source: str, cfg: EvalConfig, device: str) -> Callable:
    """PickScore (Kirstain et al. 2023): a fine-tuned CLIP-H; score = logit_scale * cos(image, text)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    proc_source = models_of(cfg).get("pickscore_processor") or source
    processor = AutoProcessor.from_pretrained(resolve(proc_source)[0])
    model = AutoModel.from_pretrained(resolve(source)[0]).to(device).eval()

    def score(entries: list[dict], images: list[Any]) -> list[dict]:
        from .models import _features

        im = processor(images=[i.convert("RGB") for i in images], return_tensors="pt").to(device)
        tx = processor(text=[prompt_text(e) for e in entries], padding=True, truncation=True, max_length=77,
                       return_tensors="pt").to(device)
        with torch.inference_mode():
            a = torch.nn.functional.normalize(_features(model.get_image_features(**im)).float(), dim=-1)
            b = torch.nn.functional.normalize(_features(model.get_text_features(**tx)).float(), dim=-1)
        return [{"pickscore": float(v)} for v in model.logit_scale.exp().float().cpu() * (a * b).sum(-1).cpu()]

    return score


def _aesthetic(source: str, cfg: EvalConfig, device: str) -> Callable:
    """The LAION aesthetic predictor v2 (simple-aesthetics-predictor): a linear head on CLIP-L image features."""
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPProcessor

    model = AestheticsPredictorV2Linear.from_pretrained(resolve(source)[0]).to(device).eval()
    processor = CLIPProcessor.from_pretrained(resolve(source)[0])

    def score(entries: list[dict], images: list[Any]) -> list[dict]:
        inputs = processor(images=[i.convert("RGB") for i in images], return_tensors="pt").to(device)
        with torch.inference_mode():
            logits = model(**inputs).logits
        return [{"aesthetic": float(v)} for v in logits.flatten().cpu()]

    return score


def _image_reward(source: str, cfg: EvalConfig, device: str) -> Callable:
    """ImageReward (Xu et al. 2023) through its package's `load(name).score(prompt, images)`."""
    import ImageReward as RM  # noqa: N814 - the package's own name

    model = RM.load(source, device=device)

    def score(entries: list[dict], images: list[Any]) -> list[dict]:
        out = []
        for e, im in zip(entries, images, strict=True):
            v = model.score(prompt_text(e), [im])
            out.append({"image_reward": float(v[0] if isinstance(v, list) else v)})
        return out

    return score


def _hpsv2(source: str, cfg: EvalConfig, device: str) -> Callable:
    """HPSv2 (Wu et al. 2023) through its package's `score(images, prompt, hps_version=…)`."""
    import hpsv2

    def score(entries: list[dict], images: list[Any]) -> list[dict]:
        return [{"hpsv2": float(hpsv2.score([im], prompt_text(e), hps_version=source)[0])}
                for e, im in zip(entries, images, strict=True)]

    return score


EXTRA_LOADERS = {"pickscore": _pickscore, "aesthetic": _aesthetic, "image_reward": _image_reward, "hpsv2": _hpsv2}
