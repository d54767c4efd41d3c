"""The scorers' models, loaded once per process and source: a CLIP (image and text embeddings, torchmetrics'
CLIPScore conventions) and an image-only backbone (DINO: the CLS token of the last layer, as in the DreamBooth paper).

A source is a hub id, a local folder, or `builtin:tiny-clip` / `builtin:tiny-dino` (tiny random models built
locally, runner/models/tiny_scorers.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError, first_line
from ..common.hashing import file_sha256
from ..models.tiny import builtin_path

_cache: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()
EXAMPLES = {"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dino-vits16"}


def resolve(source: str) -> tuple[str, str]:
    """(what from_pretrained loads, the identity recorded with each score: the hub id, or a local folder's name
    with its weights' hash, so a retrained or swapped model gives new score lines)."""
    local = builtin_path(source) or (Path(source).expanduser() if Path(source).expanduser().exists() else None)
    if local is None:
        return source, source
    weights = sorted(Path(local).glob("*.safetensors")) or sorted(Path(local).glob("*.bin"))
    digest = file_sha256(weights[0])[:12] if weights else "noweights"
    return str(local), f"{Path(local).name}@{digest}"


@dataclass
class Embedder:
    """One loaded image model: `images()` gives L2-normalised embeddings, batched, in inference mode."""

    kind: str  # clip | dino
    source: str
    identity: str
    model: Any
    processor: Any
    device: str
    batch_size: int = 16

    def images(self, images: list[Any]) -> Any:
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[i:i + self.batch_size]]
            inputs = self.processor(images=chunk, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
            with torch.inference_mode():
                if self.kind == "clip":
                    feats = _features(self.model.get_image_features(pixel_values=pixels))
                else:
                    feats = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def texts(self, texts: list[str]) -> Any:
        """CLIP text embeddings (truncated to the text model's 77 positions, as torchmetrics truncates)."""
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor(text=texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings)
            with torch.inference_mode():
                feats = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                               attention_mask=tok["attention_mask"].to(self.device)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def _features(out: Any) -> Any:
    """transformers 5 returns a model output (the projection in `pooler_output`), 4.x a tensor."""
    return out if hasattr(out, "dim") else out.pooler_output


def load_embedder(kind: str, source: str, device: str, batch_size: int = 16, key: str | None = None) -> Embedder:
    """The `kind` model from `source` (cached per process); a source that does not load is a ConfigError naming
    it (`key`: the config key that gave it)."""
    location, identity = resolve(source)
    with _lock:
        cached = _cache.get((kind, identity, device))
        if cached is None:
            cached = _cache[(kind, identity, device)] = _load(kind, source, location, device, key or kind)
    model, processor = cached
    return Embedder(kind, source, identity, model, processor, device, batch_size)


def _load(kind: str, source: str, location: str, device: str, key: str) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # a pooler the checkpoint lacks is unused here (the CLS token is read)
    try:
        if kind == "clip":
            model = CLIPModel.from_pretrained(location, use_safetensors=None)
            processor = CLIPProcessor.from_pretrained(location)
        else:
            model = AutoModel.from_pretrained(location)
            processor = AutoImageProcessor.from_pretrained(location)
    except Exception as exc:  # noqa: BLE001 - every way a model fails to load is the same user error
        raise ConfigError(f"{key}={source!r} does not load as a {kind.upper()} model ({first_line(exc, 160)}); "
                          f"give a hub id such as {EXAMPLES.get(kind, '')!r} or a local folder with its "
                          f"config.json and weights (t2i-tiny DIR --family {kind} writes a tiny one)") from None
    return model.to(device).eval(), processor


def clear() -> None:
    with _lock:
        _cache.clear()
