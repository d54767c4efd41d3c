"""Conditioning that changes during sampling: A1111's prompt editing and alternation, and composable `AND` prompts.

Each image gets a plan: its negative prompt's schedule and, per `AND` sub-prompt, a weight and a schedule, every
text encoded once (runner/prompt/schedule.py gives the texts). While the pipeline runs, its calls to the UNet go
through a stand-in: call `i` (counted from 0, as A1111's CFGDenoiser counts them) gets each row's embeddings for
step `i`, and an image with several sub-prompts (or a weight) gets A1111's composable-diffusion guidance

    eps = u + cfg · Σ_k w_k (c_k − u)

by running each further sub-prompt on that image's latent and handing the pipeline `u + Σ w_k (c_k − u)` as its
conditional prediction (its own CFG step then multiplies by cfg). Rows are substituted one by one and the extra
sub-prompts run one image at a time, so an image is computed the same whatever its batch-mates.

Chunk padding as A1111's: the texts of one schedule share a chunk count (its longest), sub-prompts shorter than the
longest repeat their last token vector (`stack_conds`), and the conditional and unconditional sides keep their own
lengths and run as separate UNet calls (A1111's default), or, with `pad_conds`, are padded to each other with
empty-prompt chunks (A1111's "Pad prompt/negative prompt", `Pad conds`). Prompts without prompt editing whose sides
differ in chunk count come here too when they are not padded (generate/batch.py).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..common.errors import ConfigError
from ..prompt.schedule import at_step, is_plain, prompt_schedule, split_and

MAX_TEXTS = 512  # cached encoded texts per pipeline


@dataclass
class Entry:
    end: int  # last denoiser call (A1111's end_at_step) this conditioning is used for
    z: Any  # [1, 77·n, C]
    pooled: Any  # [1, P] (SDXL) or None


@dataclass
class RowPlan:
    """One image's conditioning over the sampling steps."""

    negative: list[Entry]
    subs: list[tuple[float, list[Entry]]]  # (weight, schedule) per AND sub-prompt

    @property
    def composable(self) -> bool:
        return len(self.subs) > 1 or self.subs[0][0] != 1.0


def needs_plan(prompt: str, negative: str) -> bool:
    """Whether a prompt pair uses prompt editing, alternation or AND (A1111 syntax)."""
    from ..prompt.syntax import split_tags

    return not is_plain(split_tags(prompt)[0]) or not is_plain(negative, negative=True)


def _pick(schedule: list[Entry], step: int) -> Entry:
    return schedule[at_step([(e.end, None) for e in schedule], step)]


class _Texts:
    """Encoded texts of one pipeline, keyed by the text encoder's state (LoRAs reaching it) and chunk count."""

    def __init__(self) -> None:
        self.cache: OrderedDict[tuple, tuple] = OrderedDict()
        self.unrestored: set[tuple] = set()  # texts whose emphasis left the mean restore out (prompt.clip)
        self.used: list[tuple] = []  # the texts encode() was asked for since the caller last cleared it

    def encode(self, encoders: list, text: str, chunks: int, device: Any, key: tuple,
               emphasis: str = "original") -> tuple:
        from ..prompt.clip import encode_text

        full = (text, chunks, emphasis, *key)
        self.used.append(full)
        if full not in self.cache:
            flags: set = set()
            self.cache[full] = encode_text(encoders, text, device, chunks, flags, emphasis)
            if flags:
                self.unrestored.add(full)
            while len(self.cache) > MAX_TEXTS:
                self.cache.popitem(last=False)
        self.cache.move_to_end(full)
        return self.cache[full]


def _texts(embeds: Any) -> _Texts:
    texts = getattr(embeds, "scheduled_texts", None)
    if texts is None:
        texts = _Texts()
        embeds.scheduled_texts = texts
    return texts


def _repeat_last(z: Any, length: int) -> Any:
    import torch

    if z.shape[1] >= length:
        return z
    return torch.cat([z, z[:, -1:].repeat(1, length - z.shape[1], 1)], dim=1)


def plan_rows(pipe: Any, kind: str, jobs: Sequence[Any], cfg: bool, skip: int | None, te_state: tuple,
              embeds: Any, hires_steps: int | None = None) -> list[RowPlan]:
    """Each job's RowPlan (embeddings in the text encoder's dtype, on the pipeline's device); with `hires_steps`,
    the plan of a hires. fix pass of that many steps (A1111's hires schedule: `when` past the first pass)."""
    import torch

    from ..prompt.clip import chunk_count
    from ..prompt.syntax import split_tags
    from .prompt_embeds import _encoders

    encoders = _encoders(pipe, kind, skip)
    device = pipe._execution_device
    dtype = encoders[-1].text_encoder.dtype
    mult = 2 if getattr(pipe.scheduler, "order", 1) == 2 else 1  # A1111's total_steps
    steps = jobs[0].steps * mult
    hr = None if hires_steps is None else hires_steps * mult
    texts = _texts(embeds)
    key = (skip, te_state, kind)
    zeros_for_empty = kind == "sdxl" and getattr(pipe.config, "force_zeros_for_empty_prompt", False)

    def encoded(schedule: list[tuple[int, str]], emphasis: str, negative: bool = False) -> list[Entry]:
        n = max(chunk_count(encoders, t, emphasis) for _, t in schedule)
        if negative and zeros_for_empty and all(t == "" for _, t in schedule):
            z, pooled = texts.encode(encoders, "", n, device, key)
            return [Entry(end, torch.zeros_like(z), torch.zeros_like(pooled)) for end, _ in schedule]
        return [Entry(end, *texts.encode(encoders, t, n, device, key, emphasis)) for end, t in schedule]

    plans = []
    for job in jobs:
        emphasis = job.emphasis
        texts.used.clear()
        text, _ = split_tags(job.prompt)
        subs = [(w, encoded(prompt_schedule(t, steps, hr), emphasis)) for t, w in split_and(text)]
        negative = encoded(prompt_schedule(job.negative_prompt, steps, hr), emphasis, negative=True) if cfg else []
        if len(subs) > 1 or subs[0][0] != 1.0:
            if not cfg:
                raise ConfigError(f"prompt {job.prompt!r} uses AND or a :weight (composable diffusion), which "
                                  "needs classifier-free guidance; set guidance_scale above 1")
            longest = max(e.z.shape[1] for _, s in subs for e in s)
            subs = [(w, [Entry(e.end, _repeat_last(e.z, longest), e.pooled) for e in s]) for w, s in subs]
        # with pad_conds, conditional and unconditional sides padded to each other with empty chunks (A1111's
        # "Pad conds"); without, each side keeps its length (conditioning_switch runs them apart)
        cond_len = max(e.z.shape[1] for _, s in subs for e in s)
        neg_len = max([e.z.shape[1] for e in negative], default=cond_len)
        padded = max(cond_len, neg_len) if job.pad_conds else None
        empty = texts.encode(encoders, "", 1, device, key)[0]

        def pad(entries: list[Entry], length: int | None = padded, empty: Any = empty) -> list[Entry]:
            return [Entry(e.end, torch.cat([e.z, *[empty] * (((length or e.z.shape[1]) - e.z.shape[1])
                                                            // empty.shape[1])], dim=1).to(device=device, dtype=dtype),
                          None if e.pooled is None else e.pooled.to(device=device, dtype=dtype)) for e in entries]

        plans.append(RowPlan(pad(negative), [(w, pad(s)) for w, s in subs]))
        if any(u in texts.unrestored for u in texts.used):  # recorded per image, as the unscheduled path does
            embeds.unrestored.add((job.prompt, job.negative_prompt))
    return plans


def call_groups(pipe: Any, kind: str, jobs: Sequence[Any], cfg: bool, skip: int | None, te_state: tuple,
                embeds: Any, hires_steps: int | None = None) -> list[tuple[list[int], dict, list[RowPlan]]]:
    """(rows, pipeline keywords for step 0, plans) per pipeline call; rows of one call share an embedding length."""
    import torch

    plans = plan_rows(pipe, kind, jobs, cfg, skip, te_state, embeds, hires_steps)
    by_length: dict[tuple, list[int]] = {}
    for i, p in enumerate(plans):  # rows of one call share both sides' lengths
        by_length.setdefault((p.subs[0][1][0].z.shape[1], p.negative[0].z.shape[1] if cfg else 0), []).append(i)
    groups = []
    for rows in by_length.values():
        first = [plans[i].subs[0][1][0] for i in rows]
        negs = [plans[i].negative[0] for i in rows] if cfg else []
        prompt_z = torch.cat([e.z for e in first])
        # the pipeline checks that both sides have one shape; unpadded sides of other lengths are stood in for by
        # zeros, which conditioning_switch never hands the UNet (it runs each side with its own embeddings)
        neg_z = torch.cat([e.z for e in negs]) if cfg else None
        kwargs = {"prompt_embeds": prompt_z,
                  "negative_prompt_embeds": neg_z if neg_z is None or neg_z.shape == prompt_z.shape
                  else torch.zeros_like(prompt_z)}
        if kind == "sdxl":
            kwargs |= {"pooled_prompt_embeds": torch.cat([e.pooled for e in first]),
                       "negative_pooled_prompt_embeds": torch.cat([e.pooled for e in negs]) if cfg else None}
        groups.append((rows, kwargs, [plans[i] for i in rows]))
    return groups


def _rows_at(plans: Sequence[RowPlan], step: int, cfg: bool, sub: int = 0) -> tuple[list[Any], list[Any]]:
    """(embeddings, pooled) rows of one UNet call at `step`: negatives first when `cfg` (the pipelines' order)."""
    rows = [_pick(p.negative, step) for p in plans] if cfg else []
    rows += [_pick(p.subs[sub][1], step) for p in plans]
    return [e.z for e in rows], [e.pooled for e in rows]


def _apart(unet: Any, sample: Any, timestep: Any, zs: list[Any], dtype: Any, sides: list[list[int]],
           args: tuple, kwargs: dict) -> Any:
    """One UNet call per side (each side's rows share an embedding length), merged in row order. Under batch
    invariance (generate/batch.py splits the UNet into lone images' calls) each row runs alone, as it would in a
    batch of one, so an image does not depend on its batch-mates."""
    import torch

    from .batch import _take as _take_rows  # the rows of every batched argument (tensors, dicts of them)

    n = sample.shape[0]
    if getattr(vars(unet).get("forward"), "splits_rows", False):
        sides = [[r] for side in sides for r in side]
    outs = []
    for rows in sides:
        res = unet(sample[rows], _take_rows(timestep, rows, n), torch.cat([zs[r] for r in rows]).to(dtype),
                   *(_take_rows(a, rows, n) for a in args), **_take_rows(kwargs, rows, n))
        outs.append(res[0] if isinstance(res, tuple) else res.sample)
    pred = torch.cat(outs)[torch.tensor([r for rows in sides for r in rows]).argsort()]
    return (pred,) if not kwargs.get("return_dict", True) else type(res)(sample=pred)


class _UNetCall:
    """Stands in for the pipeline's UNet during one call: its calls go to `fn`, everything else to the UNet. The
    UNet itself stays as it is (compiled, hooked, batch-split), so torch.compile never traces the per-step choice."""

    def __init__(self, unet: Any, fn: Any) -> None:
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unet, name)


@contextlib.contextmanager
def conditioning_switch(pipe: Any, plans: Sequence[RowPlan] | None) -> Iterator[None]:
    """During one pipeline call, give its UNet each row's conditioning for the current step (and run AND)."""
    if not plans:
        yield
        return
    import torch

    unet = pipe.unet
    calls = [0]
    batch = len(plans)

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        step = calls[0]
        calls[0] += 1
        cfg = encoder_hidden_states.shape[0] == 2 * batch
        zs, pooled = _rows_at(plans, step, cfg)
        dtype = encoder_hidden_states.dtype
        added = kwargs.get("added_cond_kwargs")
        if added is not None and pooled[0] is not None:
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": torch.cat(pooled).to(dtype)}
        if len({z.shape[1] for z in zs}) == 1:
            out = unet(sample, timestep, torch.cat(zs).to(dtype), *args, **kwargs)
        else:  # unpadded sides of different lengths: A1111's separate calls, unconditional rows then conditional
            out = _apart(unet, sample, timestep, zs, dtype, [list(range(batch)), list(range(batch, 2 * batch))],
                         args, kwargs)
        if not cfg or not any(p.composable for p in plans):
            return out
        pred = (out[0] if isinstance(out, tuple) else out.sample).clone()
        for r, plan in enumerate(plans):
            if not plan.composable:
                continue
            u, row = pred[r], batch + r
            total = (pred[row] - u) * plan.subs[0][0]
            for k in range(1, len(plan.subs)):
                entry = _pick(plan.subs[k][1], step)
                one = {**kwargs}
                if added is not None:
                    one["added_cond_kwargs"] = {name: v[row:row + 1] if torch.is_tensor(v) and v.dim() > 0 else v
                                                for name, v in kwargs["added_cond_kwargs"].items()}
                    if entry.pooled is not None:
                        one["added_cond_kwargs"]["text_embeds"] = entry.pooled.to(dtype)
                t = timestep[row:row + 1] if torch.is_tensor(timestep) and timestep.dim() > 0 else timestep
                res = unet(sample[row:row + 1], t, entry.z.to(dtype), *args, **one)
                c_k = (res[0] if isinstance(res, tuple) else res.sample)[0]
                total = total + (c_k - u) * plan.subs[k][0]
            pred[row] = u + total
        return (pred,) if isinstance(out, tuple) else type(out)(sample=pred)

    # the pipeline's attribute only (object.__setattr__: DiffusionPipeline would re-register a component)
    object.__setattr__(pipe, "unet", _UNetCall(unet, forward))
    try:
        yield
    finally:
        object.__setattr__(pipe, "unet", unet)


def check_support(spec: Any, is_sd: bool, label: str, where: str = "") -> None:
    """Before anything loads: a family whose text encoders are not CLIP cannot follow prompt editing, alternation
    or AND (A1111 conditions CLIP per step), and AND needs classifier-free guidance. Never the literal text. Hires.
    fix runs on the same families (their img2img pipelines take the first pass's latents)."""
    hires = [h for h in getattr(spec, "hires", (None,)) if h is not None]
    if hires and not is_sd:
        raise ConfigError(f"{where}hires.scale={hires[0].scale:g} (A1111's Hires. fix) is not available for {label}: "
                          "it runs on SD 1.x/2.x and SDXL; remove the hires keys")
    if getattr(spec, "embeddings", ()) and not is_sd:
        raise ConfigError(f"{where}textual-inversion embedding {spec.embeddings[0].name!r} "
                          f"({spec.embeddings[0].path}) is not available for {label}: embeddings are CLIP token "
                          "vectors (SD 1.x/2.x and SDXL); remove it from the prompt or the embedding_dirs")
    if spec.prompt_syntax != "a1111":
        return
    for i, p in enumerate(spec.prompts):
        if not needs_plan(p.prompt, p.negative_prompt):
            continue
        text = p.prompt if not needs_plan(p.negative_prompt, "") else p.negative_prompt
        if not is_sd:
            raise ConfigError(f"{where}prompts[{i}] {text!r} uses A1111 prompt editing/alternation/AND, which "
                              f"{label} cannot follow (it conditions CLIP per step: SD 1.x/2.x and SDXL only); "
                              "remove it, or set prompt_syntax=plain to use the text as written")
        from ..prompt.syntax import split_tags

        subs = split_and(split_tags(p.prompt)[0])
        low = [g for g in spec.guidance_scale if g is not None and g <= 1]
        if (len(subs) > 1 or subs[0][1] != 1.0) and low:
            raise ConfigError(f"{where}prompts[{i}] {p.prompt!r} uses AND or a :weight (composable diffusion), which "
                              f"needs classifier-free guidance; guidance_scale={low[0]:g} -> try 7")
