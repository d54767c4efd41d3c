"""Text conditioning: A1111's Clip skip per model family, and each distinct prompt encoded once per text-encoder state.

A sweep repeats prompts (every seed, scale and setting of the same prompt): their embeddings are computed once and
reused while the text encoder is the same (the same LoRAs that reach it, at the same weights). On CPU the text
encoder already runs one prompt at a time (batch invariance), so a cached embedding is bit-identical to the one the
pipeline call would compute. The prompt language (A1111 weights, long prompts) extends `encode` here.
"""

from __future__ import annotations

import contextlib
import types
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

MAX_ENTRIES = 256  # cached (prompt, negative) pairs per pipeline: ~0.5 MB each for SD1.5, ~1.3 MB for SDXL


def clip_skip_applies(pipe: Any) -> bool:
    """Whether A1111 applies Clip skip to this model: only to SD 1.x (OpenAI CLIP-L, quick_gelu).

    SD 2.x reads a fixed penultimate OpenCLIP layer, and SDXL ignores Clip skip by default (its conditioning is
    already the penultimate layer of both encoders; A1111's "Clip skip: 2" on SDXL means that normal layer)."""
    te = getattr(pipe, "text_encoder", None)
    return (getattr(pipe, "text_encoder_2", None) is None and te is not None
            and "clip_skip" in _call_parameters(pipe)
            and getattr(getattr(te, "config", None), "hidden_act", None) == "quick_gelu")


def diffusers_clip_skip(pipe: Any, clip_skip: int | None) -> int | None:
    """diffusers' `clip_skip` (layers skipped) for A1111's Clip skip (1 = the last layer), None where ignored."""
    return clip_skip - 1 if clip_skip and clip_skip > 1 and clip_skip_applies(pipe) else None


def _call_parameters(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


@contextlib.contextmanager
def clip_skip_compat(pipe: Any, enabled: bool) -> Iterator[None]:
    """diffusers' SD clip_skip reads `text_encoder.text_model.final_layer_norm`, which transformers 5 flattened
    away; lend that path for the call only (a permanent `text_model` would change how LoRAs load)."""
    te = getattr(pipe, "text_encoder", None)
    lend = enabled and te is not None and "text_model" not in dir(te) and hasattr(te, "final_layer_norm")
    if lend:
        object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    try:
        yield
    finally:
        if lend:
            object.__delattr__(te, "text_model")


def _kind(pipe: Any) -> str | None:
    """Which `encode_prompt` signature the pipeline has: 'sd' (2 outputs), 'sdxl' (4), else None (not cached)."""
    names = {c.__name__ for c in type(pipe).__mro__}
    if "StableDiffusionXLPipeline" in names:
        return "sdxl"
    if "StableDiffusionPipeline" in names:
        return "sd"
    return None


class PromptEmbeds:
    """Embeddings of (prompt, negative prompt) pairs for one pipeline, keyed by the text encoder's state."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()
        self.encoded = 0  # prompts actually run through the text encoder(s) (tests and benchmarks read it)

    def clear(self) -> None:
        self._cache.clear()

    def call_kwargs(self, pipe: Any, prompts: Sequence[tuple[str, str]], clip_skip: int | None, cfg: bool,
                    te_state: tuple) -> dict:
        """Pipeline-call keyword arguments for `prompts` [(prompt, negative)]: embeddings where the pipeline
        family is known, else the texts. `te_state` names what the text encoder carries (its LoRAs)."""
        kind = _kind(pipe)
        skip = diffusers_clip_skip(pipe, clip_skip)
        if kind is None:
            out = {"prompt": [p for p, _ in prompts], "negative_prompt": [n for _, n in prompts]}
            return out | ({"clip_skip": skip} if "clip_skip" in _call_parameters(pipe) else {})
        rows = [self._encode(pipe, kind, p, n, skip, cfg, te_state) for p, n in prompts]
        import torch

        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {name: torch.cat([r[i] for r in rows]) if rows[0][i] is not None else None
                for i, name in enumerate(names[: len(rows[0])])}

    def _encode(self, pipe: Any, kind: str, prompt: str, negative: str, skip: int | None, cfg: bool,
                te_state: tuple) -> tuple:
        key = (prompt, negative if cfg else None, skip, te_state)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with clip_skip_compat(pipe, skip is not None):
            if kind == "sdxl":
                out = pipe.encode_prompt(prompt=[prompt], device=pipe._execution_device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=cfg, negative_prompt=[negative] if cfg else None,
                                         clip_skip=skip)
            else:
                out = pipe.encode_prompt([prompt], pipe._execution_device, 1, cfg,
                                         negative_prompt=[negative] if cfg else None, clip_skip=skip)
        self.encoded += 1
        out = tuple(out)
        self._cache[key] = out
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return out


def prompt_embeds(holder: Any) -> PromptEmbeds:
    """The PromptEmbeds of a loaded model (created on first use; it lives as long as the cached pipeline)."""
    cache = getattr(holder, "prompt_embeds", None)
    if cache is None:
        cache = PromptEmbeds()
        holder.prompt_embeds = cache
    return cache
