"""Generate one batch: one CPU `torch.Generator` per image, optionally bit-identical to generating it alone."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..plan import ImageJob
from .prompt_embeds import PromptEmbeds

log = logging.getLogger(__name__)


def _take(value: Any, idx: list[int], n: int) -> Any:
    import torch

    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        return value[idx]
    if isinstance(value, dict):
        return {k: _take(v, idx, n) for k, v in value.items()}
    return value


def _merge(parts: list[Any], groups: list[list[int]], n: int) -> Any:
    import torch

    first = parts[0]
    if torch.is_tensor(first):
        if first.dim() == 0 or first.shape[0] != len(groups[0]):
            return first
        out = first.new_empty((n, *first.shape[1:]))
        for part, idx in zip(parts, groups, strict=True):
            out[idx] = part
        return out
    if isinstance(first, dict):  # transformers/diffusers ModelOutput are ordered dicts
        return type(first)(**{k: _merge([p[k] for p in parts], groups, n) for k in first})
    if isinstance(first, tuple | list):
        return type(first)(_merge([p[i] for p in parts], groups, n) for i in range(len(first)))
    return first


def _split(fn: Callable, pairs: Callable[[], bool]) -> Callable:
    """Wrap `fn` so a batch runs as the same sub-batches a lone image would (CFG pairs or single rows)."""

    def wrapped(sample, *args, **kwargs):
        n = sample.shape[0]
        paired = pairs() and n % 2 == 0
        groups = [[i, n // 2 + i] for i in range(n // 2)] if paired else [[i] for i in range(n)]
        if len(groups) == 1:
            return fn(sample, *args, **kwargs)
        parts = [fn(_take(sample, g, n), *(_take(a, g, n) for a in args), **_take(kwargs, g, n)) for g in groups]
        return _merge(parts, groups, n)

    return wrapped


@contextlib.contextmanager
def batch_invariant(pipe: Any, enabled: bool) -> Iterator[None]:
    """Within the block, each image's numbers do not depend on its batch-mates (exact on CPU)."""
    if not enabled:
        yield
        return
    patched: list[tuple[Any, str]] = []

    def cfg() -> bool:
        return bool(getattr(pipe, "do_classifier_free_guidance", False))

    targets = [("unet", "forward", cfg), ("text_encoder", "forward", lambda: False),
               ("text_encoder_2", "forward", lambda: False), ("vae", "decode", lambda: False)]
    for attr, method, pairs in targets:
        module = getattr(pipe, attr, None)
        if module is not None:
            setattr(module, method, _split(getattr(module, method), pairs))
            patched.append((module, method))
    try:
        yield
    finally:
        for module, method in patched:
            delattr(module, method)


def default_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's native (width, height)."""
    side = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    return side, side


def prompt_tokens(pipe: Any, prompt: str) -> int:
    """Number of CLIP tokens in `prompt` (without truncation)."""
    tok = getattr(pipe, "tokenizer", None)
    return len(tok(prompt, truncation=False).input_ids) if tok is not None else 0


def generate(pipe: Any, jobs: Sequence[ImageJob], invariant: bool, embeds: PromptEmbeds | None = None,
             te_state: tuple = ()) -> list[Any]:
    """Run one pipeline call for `jobs` (same group) and return their PIL images, in order.

    `embeds` caches prompt embeddings across calls; `te_state` identifies what the text encoder carries now."""
    import torch

    from ..models.schedulers import quiet_schedulers, seed_noise

    first = jobs[0]
    width, height = first.width, first.height
    if width is None or height is None:
        dw, dh = default_size(pipe)
        width, height = width or dw, height or dh
    generators = [torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs]
    # the pipelines' own rule for classifier-free guidance (negative prompts are encoded only when it is on)
    cfg = first.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    seed_noise(pipe.scheduler, [j.seed for j in jobs])
    with batch_invariant(pipe, invariant), torch.inference_mode(), quiet_schedulers():
        text = (embeds or PromptEmbeds(0)).call_kwargs(
            pipe, [(j.prompt, j.negative_prompt) for j in jobs], first.clip_skip, cfg, te_state)
        out = pipe(
            **text,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            width=width,
            height=height,
            generator=generators,
            output_type="pil",
        )
    return list(out.images)
