"""Text conditioning: A1111's Clip skip per model family, and each distinct prompt encoded once per text-encoder state.

A sweep repeats prompts (every seed, scale and setting of the same prompt): their embeddings are computed once and
reused while the text encoder is the same (the same LoRAs that reach it, at the same weights). On CPU the text
encoder already runs one prompt at a time (batch invariance), so a cached embedding is bit-identical to the one the
pipeline call would compute. With `prompt_syntax: a1111` the CLIP families (SD 1.x/2.x, SDXL) are conditioned
by A1111's rules (runner/prompt/clip.py: weights, BREAK, 75-token chunks); other families get the words without
the syntax, with one warning.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

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


def syntax_applies(pipe: Any) -> bool:
    """Whether A1111's prompt syntax conditions this pipeline (its text encoders are CLIP: SD 1.x/2.x, SDXL)."""
    return _kind(pipe) is not None


def pads_conds(pipe: Any, prompt: str, negative: str, emphasis: str = "original") -> bool:
    """Whether the prompt and the negative prompt have different chunk counts by A1111's rules: with `pad_conds`
    the shorter is padded with empty chunks (A1111's "Pad prompt/negative prompt", infotext `Pad conds: True`);
    without it (A1111's default) the conditional and unconditional sides run as separate UNet calls."""
    from ..prompt.clip import chunk_count
    from ..prompt.syntax import split_tags

    kind = _kind(pipe)
    if kind is None:
        return False
    encoders = _encoders(pipe, kind, None)
    return chunk_count(encoders, split_tags(prompt)[0], emphasis) != chunk_count(encoders, negative, emphasis)


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
        self.warned = False  # the one warning that the syntax does not apply to this family
        self.encoded = 0  # prompts actually run through the text encoder(s) (tests and benchmarks read it)
        # (prompt, negative) pairs whose emphasis left A1111's mean restore out (prompt.clip.MEAN_RESTORE_MIN)
        self.unrestored: set[tuple[str, str]] = set()

    def clear(self) -> None:
        self._cache.clear()

    def call_groups(self, pipe: Any, prompts: Sequence[tuple[str, str]], clip_skip: int | None, cfg: bool,
                    te_state: tuple, syntax: str = "plain", emphasis: str = "original",
                    pad: bool = False) -> list[tuple[list[int], dict]]:
        """Pipeline-call keyword arguments for `prompts` [(prompt, negative)], as (row indices, kwargs) per pipeline
        call: embeddings where the family is known (rows of one call have embeddings of one length: a prompt is
        never padded because of its batch-mates), else the texts. `te_state` names what the text encoder carries;
        `emphasis` and `pad` are A1111's emphasis mode and "Pad prompt/negative prompt" (prompt/clip.py)."""
        kind = _kind(pipe)
        skip = diffusers_clip_skip(pipe, clip_skip)
        if kind is None:
            if syntax == "a1111":
                prompts = [(self.plain_words(pipe, p), n) for p, n in prompts]
            out = {"prompt": [p for p, _ in prompts], "negative_prompt": [n for _, n in prompts]}
            return [(list(range(len(prompts))), out | ({"clip_skip": skip} if "clip_skip" in _call_parameters(pipe)
                                                       else {}))]
        rows = [self._encode(pipe, kind, p, n, skip, cfg, te_state, syntax, emphasis, pad) for p, n in prompts]
        import torch

        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        by_length: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_length.setdefault(r[0].shape[1], []).append(i)
        return [(idx, {name: torch.cat([rows[i][k] for i in idx]) if rows[idx[0]][k] is not None else None
                       for k, name in enumerate(names[: len(rows[0])])}) for idx in by_length.values()]

    def call_kwargs(self, pipe: Any, prompts: Sequence[tuple[str, str]], clip_skip: int | None, cfg: bool,
                    te_state: tuple, syntax: str = "plain", emphasis: str = "original", pad: bool = False) -> dict:
        """`call_groups` for prompts that share one pipeline call."""
        groups = self.call_groups(pipe, prompts, clip_skip, cfg, te_state, syntax, emphasis, pad)
        if len(groups) != 1:
            raise ValueError("these prompts have embeddings of different lengths; use call_groups")
        return groups[0][1]

    def plain_words(self, pipe: Any, prompt: str) -> str:
        """`prompt` without A1111 syntax, for a family it does not apply to (one warning per pipeline)."""
        from ..prompt.syntax import has_syntax, strip_syntax

        if has_syntax(prompt) and not self.warned:
            log.warning("%s's text encoders are not CLIP: A1111 prompt syntax (weights, BREAK, <lora:> tags as "
                        "text) is removed and the words are used as written (recorded as prompt_syntax_applied="
                        "false)", type(pipe).__name__)
            self.warned = True
        return strip_syntax(prompt)

    def _encode(self, pipe: Any, kind: str, prompt: str, negative: str, skip: int | None, cfg: bool,
                te_state: tuple, syntax: str, emphasis: str = "original", pad: bool = False) -> tuple:
        key = (prompt, negative if cfg else None, skip, te_state, syntax, emphasis, pad)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if syntax == "a1111":
            unrestored: set = set()
            out = _encode_a1111(pipe, kind, prompt, negative, skip, cfg, unrestored, emphasis, pad)
            if unrestored and (prompt, negative) not in self.unrestored:
                self.unrestored.add((prompt, negative))
                log.warning("emphasis of %r / %r: the text encoder's output has a mean of ~0, so A1111's mean "
                            "restore would divide by float noise (a black image in A1111); the weights are "
                            "applied without it (recorded as emphasis_mean_restored=false)", prompt, negative)
        else:
            with clip_skip_compat(pipe, skip is not None):
                if kind == "sdxl":
                    out = pipe.encode_prompt(prompt=[prompt], device=pipe._execution_device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=cfg,
                                             negative_prompt=[negative] if cfg else None, clip_skip=skip)
                else:
                    out = pipe.encode_prompt([prompt], pipe._execution_device, 1, cfg,
                                             negative_prompt=[negative] if cfg else None, clip_skip=skip)
        self.encoded += 1
        out = tuple(out)
        self._cache[key] = out
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return out


def _encoders(pipe: Any, kind: str, skip: int | None) -> list:
    """The CLIP encoders of a pipeline with the layer each one conditions on (as its `encode_prompt` reads it)."""
    from ..prompt.clip import Encoder

    if kind == "sd":
        layer = None if skip is None else -(skip + 1)
        return [Encoder(pipe.tokenizer, pipe.text_encoder, layer, final_norm=skip is not None)]
    layer = -2 if skip is None else -(skip + 2)  # SDXL: the penultimate layer of both, no final norm
    pairs = [(pipe.tokenizer, pipe.text_encoder, False), (pipe.tokenizer_2, pipe.text_encoder_2, True)]
    return [Encoder(tok, te, layer, pooled=pooled) for tok, te, pooled in pairs if te is not None]


def _encode_a1111(pipe: Any, kind: str, prompt: str, negative: str, skip: int | None, cfg: bool,
                  unrestored: set | None = None, emphasis: str = "original", pad: bool = False) -> tuple:
    """(prompt, negative[, pooled, negative pooled]) embeddings by A1111's rules: tags removed from the prompt,
    each at its own chunk count unless `pad` (A1111's "Pad prompt/negative prompt": the shorter padded with
    empty-prompt chunks), an empty SDXL negative prompt as zeros (A1111 and diffusers'
    force_zeros_for_empty_prompt)."""
    import torch

    from ..prompt.clip import chunk_count, encode_text
    from ..prompt.syntax import split_tags

    encoders = _encoders(pipe, kind, skip)
    device = pipe._execution_device
    text, _ = split_tags(prompt)
    n_pos = chunk_count(encoders, text, emphasis)
    n_neg = chunk_count(encoders, negative, emphasis) if cfg else 0
    if pad:
        n_pos = n_neg = max(n_pos, n_neg)
    pos, pooled = encode_text(encoders, text, device, n_pos, unrestored, emphasis)
    neg = neg_pooled = None
    if cfg and kind == "sdxl" and negative == "" and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        empty, _ = encode_text(encoders, "", device)
        neg = torch.cat([torch.zeros_like(empty), *[empty] * (n_neg - 1)], dim=1)
        neg_pooled = torch.zeros_like(pooled)
    elif cfg:
        neg, neg_pooled = encode_text(encoders, negative, device, n_neg, unrestored, emphasis)
    dtype = encoders[-1].text_encoder.dtype
    cast = [None if t is None else t.to(dtype=dtype, device=device) for t in (pos, neg, pooled, neg_pooled)]
    return tuple(cast[:2]) if kind == "sd" else tuple(cast)


def prompt_embeds(holder: Any) -> PromptEmbeds:
    """The PromptEmbeds of a loaded model (created on first use; it lives as long as the cached pipeline)."""
    cache = getattr(holder, "prompt_embeds", None)
    if cache is None:
        cache = PromptEmbeds()
        holder.prompt_embeds = cache
    return cache
