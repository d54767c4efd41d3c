"""A1111's Hires. fix: the first pass at the given size, its result upscaled, then an img2img pass at the larger size.

Sizes are A1111's (`StableDiffusionProcessingTxt2Img.calculate_target_resolution`, modules/processing.py): the
target is `int(side · scale)`, or `hires.resize_x`/`resize_y` (one of them: the other keeps the aspect ratio; both:
cover then crop the latents centrally). Upscalers: A1111's latent modes (`torch.nn.functional.interpolate` of the
first pass's latents), its plain pixel resamplers (the decoded image resized with Pillow, then encoded again) and
model upscalers such as ESRGAN (models/upscalers.py: the decoded image through the model, then Lanczos to the size).
The second pass is diffusers' img2img pipeline made from the loaded one (`from_pipe`: the same components, nothing
loaded twice), with a fresh CPU generator per image seeded with the image's seed (as A1111 draws the second pass's
noise from the seed again), with its own sampler and schedule where `hires.scheduler`/`hires.schedule` name one
(A1111's Hires sampler / Hires schedule type), and runs exactly `hires.steps` steps: the last ones of a schedule of
`int(steps / denoise)`, as A1111's img2img does with a given step count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config.hires import LATENT_MODES


def model_upscale(im: Any, scale: float, run: Callable[[Any], Any]) -> Any:
    """A1111's `Upscaler.upscale` (modules/upscaler.py): the model run at its native factor until the image covers
    `scale` (at most 3 times), then Lanczos to the size rounded down to a multiple of 8."""
    from PIL import Image

    dest = (int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8))
    for _ in range(3):
        if im.width >= dest[0] and im.height >= dest[1] and scale != 1:
            break
        before = im.size
        im = run(im)
        if im.size == before:
            break
    return im if im.size == dest else im.resize(dest, resample=Image.LANCZOS)


def upscale(pipe: Any, latents: Any, upscaler: str, width: int, height: int, truncate: tuple[int, int],
            model_file: str = "") -> Any:
    """The first pass's latents made the second pass's input: latents (latent modes) or PIL images (pixel modes,
    and a model upscaler's file). `truncate`: latent columns and rows cropped centrally."""
    import torch

    tx, ty = truncate
    f = int(pipe.vae_scale_factor)
    if upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[upscaler]
        out = torch.nn.functional.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias)
        return out[:, :, ty // 2: out.shape[2] - (ty + 1) // 2, tx // 2: out.shape[3] - (tx + 1) // 2]
    from PIL import Image

    vae = pipe.vae
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="pil")
    out = []
    for im in images:
        scale = max(width / im.width, height / im.height)
        if upscaler == "Nearest" and scale > 1:
            im = im.resize((int(im.width * scale), int(im.height * scale)), resample=Image.NEAREST)
        elif model_file and scale > 1:  # A1111's images.resize_image with an upscaler model
            from ..models.upscalers import upscaler as load_upscaler

            im = model_upscale(im, scale, load_upscaler(model_file, pipe.device))
        if im.size != (width, height):
            im = im.resize((width, height), resample=Image.LANCZOS)
        if tx or ty:
            im = im.crop((tx // 2 * f, ty // 2 * f, width - (tx + 1) // 2 * f, height - (ty + 1) // 2 * f))
        out.append(im)
    return out


def img2img_pipe(pipe: Any) -> Any:
    """The loaded pipeline's img2img sibling, sharing every component (made once per pipeline; its components are
    the loaded pipeline's current ones at every call: a run swaps the scheduler, a retry the VAE)."""
    cached = getattr(pipe, "_t2i_img2img", None)
    if cached is None:
        from diffusers import AutoPipelineForImage2Image

        cached = AutoPipelineForImage2Image.from_pipe(pipe)
        cached.set_progress_bar_config(disable=True)
        pipe._t2i_img2img = cached
    for name, component in pipe.components.items():
        if name in cached.components and cached.components[name] is not component:
            setattr(cached, name, component)
    return cached


def hires_scheduler(pipe: Any, name: str | None, schedule: str | None) -> Any:
    """The second pass's scheduler: built from the model's own scheduler as the first pass's are (LoadedModel),
    or, for a pipeline used without the runner's loader, from its current one."""
    scheduler_for = getattr(pipe, "_t2i_scheduler_for", None)
    if scheduler_for is not None:
        return scheduler_for(name, schedule)
    from ..models.schedulers import build_scheduler

    return build_scheduler(pipe.scheduler, name, schedule)


def second_pass(pipe: Any, jobs: list, latents: Any, call: dict,
                text_groups: Callable[[Any, list, int], list]) -> list:
    """The hires. fix pass of one first-pass call's images: upscale, then img2img at the target size; PIL images
    in job order. `call` holds the first pass's pipeline keywords (CFG and the like carry over); `text_groups(pipe,
    jobs, hires_steps)` gives the second pass's conditioning (rows, keywords, plans) as the first pass's, from the
    text encoders of the pass's model (a Hires checkpoint's own, as A1111 computes them after loading it)."""
    import dataclasses

    import torch

    from ..config.hires import second_pass_steps, target_size
    from ..models.schedulers import seed_noise
    from .scheduled import conditioning_switch

    hr = jobs[0].hires
    f = int(pipe.vae_scale_factor)
    width, height = latents.shape[3] * f, latents.shape[2] * f
    tw, th, tx, ty = target_size(width, height, hr.scale, hr.resize_x, hr.resize_y, f)
    upscaled = upscale(pipe, latents, hr.upscaler, tw, th, (tx, ty), hr.upscaler_file)
    second = pipe._t2i_hires_models[hr.model].pipe if hr.model else pipe  # A1111's Hires checkpoint
    i2i = img2img_pipe(second)
    if hr.scheduler or hr.schedule or second is not pipe:  # A1111's Hires sampler / Hires schedule type
        i2i.scheduler = hires_scheduler(second, *hr.second_scheduler(jobs[0].scheduler, jobs[0].schedule))
    steps = hr.second_steps(jobs[0].steps)
    total, strength = second_pass_steps(steps, hr.denoise)
    keep = {k: v for k, v in call.items() if k not in ("num_inference_steps", "width", "height", "prompt",
                                                         "negative_prompt", "clip_skip")}
    hr_jobs = [dataclasses.replace(j, prompt=hr.prompt or j.prompt, negative_prompt=hr.negative_prompt
                                   or j.negative_prompt) for j in jobs]
    images: list[Any] = [None] * len(jobs)
    for rows, text, *plans in text_groups(second, hr_jobs, steps):
        seed_noise(i2i.scheduler, [jobs[i].seed for i in rows])
        image = upscaled[rows] if torch.is_tensor(upscaled) else [upscaled[i] for i in rows]
        generators = [torch.Generator(device="cpu").manual_seed(jobs[i].seed) for i in rows]
        with conditioning_switch(i2i, plans[0] if plans else None):
            out = i2i(**keep, **text, image=image, strength=strength, num_inference_steps=total,
                      generator=generators, output_type="pil")
        for i, im in zip(rows, out.images, strict=True):
            im.info["first_pass"] = (width, height)  # the record's size (A1111's `Size`), not written to the PNG
            images[i] = im
    return images
