"""Generate one batch: one CPU `torch.Generator` per image, optionally bit-identical to generating it alone."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..models.families import Traits, call_kwargs, traits_of
from ..plan import ImageJob
from . import scheduled
from .hires import second_pass
from .prompt_embeds import PromptEmbeds, _kind, diffusers_clip_skip, pads_conds
from .refiner import refiner_switch

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

    wrapped.splits_rows = True  # scheduled._apart: rows it hands over one side at a time are run alone too
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
    """The pipeline's native (width, height) (what it makes when width/height are not given)."""
    unet = getattr(pipe, "unet", None)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    if unet is not None:
        side = int(unet.config.sample_size or 64) * scale
    else:  # transformer pipelines: default_sample_size latents (Flux, SD3, Qwen-Image, Flux.2), else 1024 px
        side = int(getattr(pipe, "default_sample_size", 1024 // scale)) * scale
    return side, side


def prompt_tokens(pipe: Any, prompt: str) -> int:
    """Number of CLIP tokens in `prompt` (without truncation)."""
    tok = getattr(pipe, "tokenizer", None)
    return len(tok(prompt, truncation=False).input_ids) if tok is not None else 0


def batch_kwargs(traits: Traits, jobs: Sequence[ImageJob], embeds: PromptEmbeds | None = None,
                 pipe: Any = None) -> dict[str, Any]:
    """The pipeline-call keywords of one batch (same settings, one image per job), mapped for its family. A
    family the A1111 syntax does not apply to (text encoders not CLIP) gets the words without it."""
    first = jobs[0]
    prompts, negatives = [j.prompt for j in jobs], [j.negative_prompt for j in jobs]
    if first.prompt_syntax == "a1111" and not traits.family.is_sd:
        embeds = embeds or PromptEmbeds(0)
        prompts = [embeds.plain_words(pipe, p) for p in prompts]
        negatives = [embeds.plain_words(pipe, n) for n in negatives]
    return call_kwargs(traits, prompts, negatives, first.steps, first.guidance_scale, first.true_cfg_scale,
                       first.max_sequence_length, first.clip_skip, first.width, first.height)


def _uses_cfg(pipe: Any, job: ImageJob) -> bool:
    """The pipelines' own rule for classifier-free guidance (negative prompts are encoded only when it is on)."""
    return job.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def _sd_text(pipe: Any, jobs: Sequence[ImageJob], embeds: PromptEmbeds | None,
             te_state: tuple, hires_steps: int | None = None) -> list[tuple]:
    """SD-class pipelines: the prompts as (cached) embeddings with A1111's Clip skip and, with `prompt_syntax:
    a1111`, its weights and chunks (prompt_embeds.py); one group of rows per embedding length, with each row's
    per-step plan where prompts change during sampling."""
    first = jobs[0]
    cfg = _uses_cfg(pipe, first)
    if first.prompt_syntax == "a1111" and any(
            scheduled.needs_plan(j.prompt, j.negative_prompt)
            or (cfg and not j.pad_conds and pads_conds(pipe, j.prompt, j.negative_prompt, j.emphasis)) for j in jobs):
        # prompt editing, alternation, AND: per-step conditioning (generate/scheduled.py); in a hires. fix pass
        # by A1111's hires schedule. Unpadded sides of different chunk counts: separate UNet calls (scheduled.py)
        return scheduled.call_groups(pipe, _kind(pipe), jobs, cfg, diffusers_clip_skip(pipe, first.clip_skip),
                                     te_state, embeds or PromptEmbeds(0), hires_steps)
    return (embeds or PromptEmbeds(0)).call_groups(
        pipe, [(j.prompt, j.negative_prompt) for j in jobs], first.clip_skip, cfg, te_state, first.prompt_syntax,
        first.emphasis, first.pad_conds)


def _call(pipe: Any, traits: Traits, jobs: Sequence[ImageJob], invariant: bool, embeds: PromptEmbeds | None,
          te_state: tuple) -> list[Any]:
    import torch

    from ..models.schedulers import quiet_schedulers, seed_noise

    kwargs = batch_kwargs(traits, jobs, embeds, pipe)
    if traits.family.is_sd:
        width, height = default_size(pipe)
        kwargs.update(width=jobs[0].width or width, height=jobs[0].height or height)
    generators = [torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs]
    images: list[Any] = [None] * len(jobs)
    with batch_invariant(pipe, invariant), torch.inference_mode(), quiet_schedulers():
        if traits.family.is_sd:  # text as embeddings; clip_skip is applied while encoding
            for key in ("prompt", "negative_prompt", "clip_skip"):
                kwargs.pop(key, None)
            groups = _sd_text(pipe, jobs, embeds, te_state)
        else:
            groups = [(list(range(len(jobs))), {})]
        for rows, text, *plans in groups:  # one call, unless long prompts give embeddings of several lengths
            seed_noise(pipe.scheduler, [jobs[i].seed for i in rows])
            hires = traits.family.is_sd and jobs[0].hires is not None  # A1111's Hires. fix: latents, then img2img
            taken: list[int | None] = [None]  # A1111's Refiner: the call the refiner took over at
            with scheduled.conditioning_switch(pipe, plans[0] if plans else None), \
                    refiner_switch(pipe, [jobs[i] for i in rows],
                                   jobs[0].refiner is not None and _uses_cfg(pipe, jobs[0]), kwargs.get("width"),
                                   kwargs.get("height"), invariant, taken):
                out = pipe(**kwargs, **text, generator=[generators[i] for i in rows],
                           output_type="latent" if hires else "pil")
            if jobs[0].refiner is not None:
                for image in out.images:
                    image.info["refiner_from"] = -1 if taken[0] is None else taken[0]  # read by the record
            if hires:
                out.images = second_pass(pipe, [jobs[i] for i in rows], out.images, kwargs,
                                         lambda p, hj, n: _sd_text(p, hj, embeds if p is pipe else None,
                                                                   te_state if p is pipe else (), n))
            for i, image in zip(rows, out.images, strict=True):
                images[i] = image
    return images


def generate(pipe: Any, jobs: Sequence[ImageJob], invariant: bool, embeds: PromptEmbeds | None = None,
             te_state: tuple = (), traits: Traits | None = None) -> list[Any]:
    """Run one pipeline call for `jobs` (same group) and return their PIL images, in order.

    `embeds` caches prompt embeddings across calls (SD-class pipelines); `te_state` identifies what the text
    encoder carries now. Batch invariance: SD-class pipelines split the batch inside their UNet/encoders/VAE
    (batch_invariant); the other families run one call per image, which is exactly "the image generated alone".
    """
    if traits is None:  # read once per pipeline from its live configs (its family, guidance, true CFG …)
        traits = getattr(pipe, "_t2i_traits", None) or traits_of(pipe)
        pipe._t2i_traits = traits
    split = traits.family.invariant_split
    if invariant and not split and len(jobs) > 1:
        return [image for job in jobs for image in _call(pipe, traits, [job], False, embeds, te_state)]
    return _call(pipe, traits, jobs, invariant and split, embeds, te_state)
