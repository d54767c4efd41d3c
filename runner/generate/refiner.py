"""A1111's Refiner: the second model takes over inside the one sampling run, as A1111 does it.

A1111 (modules/sd_samplers_common.py `apply_refiner`, called by the CFG denoiser before every model call) reads the
call's sigma, takes the index t of the nearest of the model's training sigmas, and switches models for good once
`(999 - t) / 1000 >= switch_at`; the sampler goes on with its own sigmas, history and noise, and the refiner's
conditioning is the same prompts encoded by the refiner's text encoder(s) (an SDXL refiner: aesthetic score 6 for
the prompt, 2.5 for the negative, A1111's defaults). After sampling the refiner's VAE decodes, since the refiner is
the loaded model then.

Here the base pipeline runs its whole call; its UNet calls go through a stand-in that applies that same rule to
the scheduler's current sigma and, from the switch on, calls the refiner's UNet with the refiner's conditioning.
diffusers' own split (`denoising_end` on the base, then the refiner's img2img with `denoising_start`) restarts the
sampler instead: a multistep sampler (DPM++ 2M) loses its history and an ancestral one draws its noise anew, and
its cut-off (`t >= round(1000 - 1000 * switch_at)`) differs from A1111's where timesteps are not whole numbers
(Karras schedules); docs/differences-from-a1111.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from ..common.errors import ConfigError

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # A1111's sdxl_refiner_high/low_aesthetic_score defaults


def completed_ratio(scheduler: Any, timestep: Any) -> Any:
    """A1111's `completed_ratio` of the denoiser call at the scheduler's current step: `(N-1 - t) / N` (float32,
    as A1111 computes it in torch) with t the index of the training sigma nearest the step's sigma; schedulers
    without sigmas (DDIM-like) give the timestep itself, as A1111's timestep samplers do."""
    import torch

    ac = scheduler.alphas_cumprod
    n = len(ac)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "step_index"):
        i = scheduler.step_index
        if i is None:  # before the first step() of schedulers that start counting there
            i = getattr(scheduler, "begin_index", None) or 0
        table = ((1 - ac.float()) / ac.float()) ** 0.5
        t = torch.argmin(torch.abs(table - sigmas[i].float().cpu()))
    else:
        t = torch.as_tensor(timestep).max().to(dtype=torch.int64).cpu()
    return (n - 1 - t) / n


def switch_step(scheduler: Any, steps: int, switch_at: float) -> int | None:
    """The first step (0-based) the refiner runs for `steps` steps of `scheduler` (None: it never takes over);
    the same rule as during sampling, on a fresh copy of the scheduler (tests, docs)."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps, device="cpu")
    for i, t in enumerate(sched.timesteps):
        if hasattr(sched, "_step_index"):
            sched._step_index = i
        if not bool(completed_ratio(sched, t) < switch_at):
            return i
    return None


def check_refiners(spec: Any, base_family: Any, where: str = "") -> Any:
    """The run's refiner checked against its base model and its other keys (None: no refiner)."""
    refs = [r for r in getattr(spec, "refiner", (None,)) if r is not None]
    if not refs:
        return None
    from ..models.refiner import refiner_info

    info = refiner_info(refs[0], spec.model, base_family, where)
    hires = [h for h in spec.hires if h is not None]
    if hires:
        raise ConfigError(f"{where}refiner.model with hires.scale={hires[0].scale:g}: a refiner with Hires. fix is "
                          "not supported here (A1111's 'Hires fix refiner pass' option); remove one of them")
    from .scheduled import needs_plan

    if spec.prompt_syntax == "a1111":
        for i, p in enumerate(spec.prompts):
            if needs_plan(p.prompt, p.negative_prompt):
                raise ConfigError(f"{where}prompts[{i}] {p.prompt!r} uses prompt editing/alternation/AND, which is "
                                  "not supported together with refiner.model here; remove one of them")
    return info


class _Conditioning:
    """The refiner's conditioning for the rows of one base call (negatives first with CFG, as the pipelines), in the
    job's emphasis mode and "Pad prompt/negative prompt". Unpadded sides of different lengths (or rows of different
    lengths) cannot share one UNet call: then `rows` holds each UNet row's own conditioning, run one by one, as
    A1111 runs such sides apart (generate/scheduled.py does the same for the base)."""

    def __init__(self, ref: Any, jobs: Sequence[Any], cfg: bool, width: int, height: int, device: Any) -> None:
        import torch

        from .prompt_embeds import PromptEmbeds

        first = jobs[0]
        if ref.embeds is None:
            ref.embeds = PromptEmbeds()
        dtype = ref.pipe.unet.dtype
        texts = []
        for j in jobs:  # one row at a time: a row's embeddings never depend on its batch-mates
            [(_, text)] = ref.embeds.call_groups(ref.text, [(j.prompt, j.negative_prompt)], None, cfg, ("refiner",),
                                                 first.prompt_syntax, first.emphasis, first.pad_conds)
            texts.append(text)
        pooled_dim = int(texts[0]["pooled_prompt_embeds"].shape[-1])
        size = (height, width)
        add, neg_add = ref.pipe._get_add_time_ids(size, (0, 0), size, AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, size,
                                                  (0, 0), size, dtype=dtype, text_encoder_projection_dim=pooled_dim)
        # UNet rows in the pipelines' order: negatives first (with CFG), then prompts
        sides = ([(t["negative_prompt_embeds"], t["negative_pooled_prompt_embeds"], neg_add) for t in texts]
                 if cfg else []) + [(t["prompt_embeds"], t["pooled_prompt_embeds"], add) for t in texts]
        sides = [(z.to(device, dtype), pooled.to(device, dtype), ids.to(device)) for z, pooled, ids in sides]
        self.rows = sides if len({z.shape[1] for z, _, _ in sides}) > 1 else None
        if self.rows is None:
            self.z = torch.cat([z for z, _, _ in sides])
            self.pooled = torch.cat([p for _, p, _ in sides])
            self.time_ids = torch.cat([i for _, _, i in sides])

    def __call__(self, unet: Any, sample: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        """The refiner UNet's output for the call's rows (one call, or one per row when lengths differ)."""
        import torch

        if self.rows is None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
            return unet(sample, timestep, self.z, *args, **kwargs)
        kwargs.pop("return_dict", None)
        outs = []
        for i, (z, pooled, ids) in enumerate(self.rows):
            t = timestep[i:i + 1] if torch.is_tensor(timestep) and timestep.ndim and len(timestep) > 1 else timestep
            outs.append(unet(sample[i:i + 1], t, z, *args, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                             return_dict=False, **kwargs)[0])
        return (torch.cat(outs),)


class _CFGView:
    """What generate.batch.batch_invariant needs of a pipeline, for the refiner's modules in the base's call."""

    def __init__(self, base: Any, unet: Any, vae: Any) -> None:
        self._base, self.unet, self.vae = base, unet, vae

    @property
    def do_classifier_free_guidance(self) -> bool:
        return bool(getattr(self._base, "do_classifier_free_guidance", False))


@contextlib.contextmanager
def refiner_switch(pipe: Any, jobs: Sequence[Any], cfg: bool, width: int, height: int, invariant: bool,
                   taken: list[int | None]) -> Iterator[None]:
    """During one base pipeline call, hand sampling to the refiner at A1111's switch point (jobs of one call share
    their refiner and switch_at) and decode with its VAE. `taken[0]` becomes the step the refiner took over at."""
    refiner = jobs[0].refiner if jobs else None
    ref = getattr(pipe, "_t2i_refiner", None)
    if refiner is None:
        yield
        return
    if ref is None:
        raise RuntimeError("refiner.model is set but no refiner was loaded beside this pipeline")
    from .batch import batch_invariant
    from .scheduled import _UNetCall

    cond = _Conditioning(ref, jobs, cfg, width, height, pipe._execution_device)
    unet, vae = pipe.unet, pipe.vae
    calls = [0]

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if taken[0] is None and not bool(completed_ratio(pipe.scheduler, timestep) < refiner.switch_at):
            taken[0] = calls[0]
        calls[0] += 1
        if taken[0] is None:
            return unet(sample, timestep, encoder_hidden_states, *args, **kwargs)
        kwargs.pop("cross_attention_kwargs", None)  # the base's LoRA scale: no LoRA runs on the refiner
        kwargs.pop("added_cond_kwargs", None)
        return cond(ref.pipe.unet, sample.to(ref.pipe.unet.dtype), timestep, *args, **kwargs)

    own_vae = ref.pipe.vae if ref.pipe.vae is not vae else None
    object.__setattr__(pipe, "unet", _UNetCall(unet, forward))
    try:
        with batch_invariant(_CFGView(pipe, ref.pipe.unet, own_vae), invariant):
            if own_vae is not None:  # A1111 decodes with the loaded model's VAE: the refiner's by then
                object.__setattr__(pipe, "vae", _Decoder(vae, own_vae, taken))
            yield
    finally:
        object.__setattr__(pipe, "unet", unet)
        object.__setattr__(pipe, "vae", vae)


class _Decoder:
    """The base pipeline's VAE, decoding with the refiner's once the refiner took over (A1111: the loaded model's
    VAE decodes); everything else (configs, dtype checks) is the base VAE's."""

    def __init__(self, base: Any, own: Any, taken: list) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_own", own)
        object.__setattr__(self, "_taken", taken)

    def decode(self, z: Any, *args: Any, **kwargs: Any) -> Any:
        if self._taken[0] is None:
            return self._base.decode(z, *args, **kwargs)
        vae = self._own
        if z.dtype == vae.dtype:
            return vae.decode(z, *args, **kwargs)
        # the pipeline upcast its own VAE for a fp16 decode (force_upcast) and the latents with it: the same here
        own = vae.dtype
        vae.to(dtype=z.dtype)
        try:
            return vae.decode(z, *args, **kwargs)
        finally:
            vae.to(dtype=own)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)
