"""Per-family training adapters: what differs between families, behind one interface the training loop calls.

A family adapter answers four questions and nothing else: how a caption becomes the denoiser's conditioning
(`encode`, the pipeline's own `encode_prompt`), how an image becomes the latent the denoiser learns
(`latents`: VAE, scaling/shift or the family's normalisation), how the denoiser is called on a noisy latent
(`predict`: packing, position ids, guidance embedding, timestep convention), and which modules a preset targets.
The noising and the loss are the loop's (`objective.py`): DDPM noise/v-prediction for the SD UNets, rectified flow
(target = noise - x0, the diffusers/ai-toolkit convention) for every flow-matching family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..common.errors import ConfigError

PRESETS = ("attn", "attn_mlp", "all_linear", "all")
_SD_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_SD_MLP = ["ff.net.0.proj", "ff.net.2"]
_JOINT_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out"]


@dataclass(frozen=True)
class FamilySpec:
    """The static part of a trainable family: its id, denoiser, objective and target-module presets."""

    name: str
    denoiser: str  # pipeline attribute: unet | transformer
    flow: bool  # rectified flow (else DDPM noise / v-prediction)
    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    text_encoders: tuple[str, ...] = ()  # components a text-encoder LoRA may train (diffusers' loader takes them)
    latent_factor: int = 8  # image side must be a multiple of this (VAE factor x patch size)
    notes: dict[str, str] = field(default_factory=dict)


SPECS: dict[str, FamilySpec] = {s.name: s for s in (
    FamilySpec("sd15", "unet", False, tuple(_SD_ATTN), tuple(_SD_MLP), ("text_encoder",)),
    FamilySpec("sdxl", "unet", False, tuple(_SD_ATTN), tuple(_SD_MLP), ("text_encoder", "text_encoder_2")),
    FamilySpec("flux1", "transformer", True, tuple(_JOINT_ATTN),
               ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"),
               ("text_encoder",), 16),
    FamilySpec("sd3", "transformer", True, tuple(_JOINT_ATTN),
               ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
               ("text_encoder", "text_encoder_2"), 16),
    FamilySpec("qwenimage", "transformer", True, tuple(_JOINT_ATTN),
               ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"), (), 16),
    FamilySpec("zimage", "transformer", True, ("attention.to_q", "attention.to_k", "attention.to_v",
                                               "attention.to_out.0"),
               ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"), (), 16),
    FamilySpec("flux2", "transformer", True, ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                              "attn.to_add_out", "attn.to_qkv_mlp_proj", "attn.to_out"),
               ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"), (), 16),
)}


def family_spec(name: str, label: str = "") -> FamilySpec:
    """The trainable family `name`; a one-line ConfigError naming the trainable ones otherwise."""
    if name not in SPECS:
        raise ConfigError(f"t2i-train cannot train a {label or name} model (family {name!r}); trainable "
                          f"families: {', '.join(SPECS)}")
    return SPECS[name]


def target_modules(spec: FamilySpec, preset: str, explicit: list[str] | None, model: Any) -> list[str]:
    """The module names a LoRA targets: an explicit list, or the family's preset present in `model`.

    `all_linear` is every Linear of the denoiser (peft's `all-linear`, output layer included); `all` adds every
    Conv2d (kohya's LoCon: the UNets' resnet, sampler, input and output convolutions; the transformers have none,
    or only a patch embedding). Presets resolve to full module paths."""
    import torch

    if explicit:
        return list(explicit)
    if preset == "all":
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if preset == "all_linear":
        return names
    wanted = spec.attn + (spec.mlp if preset == "attn_mlp" else ())
    # full paths of Linear layers only: a suffix can also name a container (Flux.2's double-block `attn.to_out`
    # is a ModuleList, its single-block one a Linear), which peft would refuse
    return [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]


def _suffix(name: str) -> str:
    """The part of a module path after its last block index (`transformer_blocks.3.attn.to_q` -> `attn.to_q`)."""
    parts = name.split(".")
    idx = max((i for i, p in enumerate(parts) if p.isdigit() and i < len(parts) - 1), default=-1)
    if idx < 0:
        return ""  # a top-level projection (x_embedder, proj_out, time embeddings): not a block module
    tail = parts[idx + 1:]
    return ".".join(tail) if tail else ""


class TrainAdapter:
    """One family's answers for the training loop (see the module docstring)."""

    def __init__(self, spec: FamilySpec, pipe: Any, device: str, dtype: Any) -> None:
        self.spec, self.pipe, self.device, self.dtype = spec, pipe, device, dtype
        self.denoiser = getattr(pipe, spec.denoiser)
        self.vae = pipe.vae

    # -- conditioning ----------------------------------------------------------------------------------------
    def encode(self, captions: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def collate(self, conds: list[dict[str, Any]]) -> dict[str, Any]:
        """One batch's conditioning from each caption's own `encode([caption])` (what the text cache holds):
        tensors joined on the batch axis, per-caption lists joined."""
        import torch

        return {k: ([x for c in conds for x in c[k]] if isinstance(conds[0][k], list)
                    else torch.cat([c[k] for c in conds])) for k in conds[0]}

    # -- latents ---------------------------------------------------------------------------------------------
    def vae_params(self, pixels: Any) -> Any:
        """The VAE posterior's parameters (mean and log-variance, diffusers' `latent_dist.parameters`): the
        deterministic part of encoding, which the latent cache holds; sampling draws from the run's generator."""
        return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters

    def _vae_sample(self, params: Any, gen: Any, share: tuple[int, int, int] | None = None) -> Any:
        """A posterior sample, as diffusers' `latent_dist.sample(gen)` draws it (CPU noise in the parameters'
        dtype); with `share` (start, stop, total) the noise is drawn for the global batch and sliced."""
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(params)
        a, b, n = share or (0, params.shape[0], params.shape[0])
        noise = torch.randn((n, *dist.mean.shape[1:]), generator=gen, dtype=params.dtype)[a:b]
        return dist.mean + dist.std * noise.to(params.device)

    def latents_from(self, params: Any, gen: Any, share: tuple[int, int, int] | None = None) -> Any:
        """The training latents of a batch of `vae_params`: a posterior sample, scaled (and shifted) as the family
        expects."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (self._vae_sample(params, gen, share) - shift) * cfg.scaling_factor

    def latents(self, pixels: Any, gen: Any) -> Any:
        return self.latents_from(self.vae_params(pixels), gen)

    # -- denoiser --------------------------------------------------------------------------------------------
    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        """The denoiser's output for `noisy` at `t` (DDPM: integer timesteps; flow: sigma in [0, 1]), in the
        shape of `noisy`; flow families return the velocity noise - x0."""
        raise NotImplementedError

    def modules(self) -> dict[str, Any]:
        """Components that take a LoRA: the denoiser and the text encoders the family may train."""
        out = {"denoiser": self.denoiser}
        for name in self.spec.text_encoders:
            if getattr(self.pipe, name, None) is not None:
                out[name] = getattr(self.pipe, name)
        return out

    def frozen(self) -> list[Any]:
        return [m for m in (getattr(self.pipe, n, None) for n in ("vae", self.spec.denoiser, "text_encoder",
                                                                   "text_encoder_2", "text_encoder_3"))
                if m is not None]


class SD15(TrainAdapter):
    def encode(self, captions: list[str]) -> dict[str, Any]:
        embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        return self.denoiser(noisy, t, cond["encoder_hidden_states"], return_dict=False)[0]


class SDXL(TrainAdapter):
    def encode(self, captions: list[str]) -> dict[str, Any]:
        p = self.pipe
        embeds, _, pooled, _ = p.encode_prompt(captions, None, self.device, 1, False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        import torch

        h, w = (s * self.pipe.vae_scale_factor for s in noisy.shape[-2:])
        # (original size, crop top-left, target size): the whole image, uncropped, at its trained size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=noisy.dtype, device=noisy.device)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids.repeat(noisy.shape[0], 1)}
        return self.denoiser(noisy, t, cond["encoder_hidden_states"], added_cond_kwargs=added,
                             return_dict=False)[0]


class SD3(TrainAdapter):
    def encode(self, captions: list[str]) -> dict[str, Any]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(captions, None, None, self.device, 1, False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        return self.denoiser(hidden_states=noisy, timestep=t * 1000, return_dict=False, **cond)[0]


def _flux_pack(x: Any) -> Any:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_unpack(x: Any, c: int, h: int, w: int) -> Any:
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class Flux1(TrainAdapter):
    guidance = 1.0  # set by the loop from train.guidance_scale (the distilled guidance embedding of Flux.1-dev)

    def encode(self, captions: list[str]) -> dict[str, Any]:
        embeds, pooled, text_ids = self.pipe.encode_prompt(captions, None, device=self.device,
                                                           max_sequence_length=self.max_sequence)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def collate(self, conds: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().collate([{k: v for k, v in c.items() if k != "txt_ids"} for c in conds])
        return {**out, "txt_ids": conds[0]["txt_ids"]}  # (sequence, 3): the same for every caption, no batch axis

    @property
    def max_sequence(self) -> int:
        return min(512, int(getattr(self.pipe.tokenizer_2, "model_max_length", 512)))

    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        import torch

        b, c, h, w = noisy.shape
        ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = (torch.full((b,), float(self.guidance), device=noisy.device, dtype=torch.float32)
                    if self.denoiser.config.guidance_embeds else None)
        out = self.denoiser(hidden_states=_flux_pack(noisy), timestep=t, guidance=guidance, img_ids=ids,
                            return_dict=False, **cond)[0]
        return _flux_unpack(out, c, h, w)


class QwenImage(TrainAdapter):
    def encode(self, captions: list[str]) -> dict[str, Any]:
        embeds, mask = self.pipe.encode_prompt(captions, device=self.device)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    def collate(self, conds: list[dict[str, Any]]) -> dict[str, Any]:
        """Each caption's embeddings padded with zeros to the longest, and the mask of the real tokens (None
        when all are real): what the pipeline's `encode_prompt` builds for a batch."""
        import torch

        embeds = [c["encoder_hidden_states"][0] for c in conds]
        masks = [c["encoder_hidden_states_mask"][0] if c["encoder_hidden_states_mask"] is not None
                 else torch.ones(e.shape[0], dtype=torch.long, device=e.device)
                 for c, e in zip(conds, embeds, strict=True)]
        longest = max(e.shape[0] for e in embeds)
        embeds = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
        mask = torch.stack([torch.cat([m, m.new_zeros(longest - m.shape[0])]) for m in masks])
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": None if mask.all() else mask}

    def vae_params(self, pixels: Any) -> Any:
        return self.vae.encode(pixels.to(self.device, self.vae.dtype).unsqueeze(2)).latent_dist.parameters

    def _vae_sample(self, params: Any, gen: Any, share: tuple[int, int, int] | None = None) -> Any:
        return super()._vae_sample(params, gen, share)[:, :, 0]

    def latents_from(self, params: Any, gen: Any, share: tuple[int, int, int] | None = None) -> Any:
        import torch

        cfg = self.vae.config
        x = self._vae_sample(params, gen, share)
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(x)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(x)
        return (x - mean) / std

    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        b, c, h, w = noisy.shape
        shapes = [[(1, h // 2, w // 2)]] * b
        out = self.denoiser(hidden_states=_flux_pack(noisy), timestep=t, guidance=None, img_shapes=shapes,
                            return_dict=False, **cond)[0]
        return _flux_unpack(out, c, h, w)


class ZImage(TrainAdapter):
    def encode(self, captions: list[str]) -> dict[str, Any]:
        # a copy: the pipeline writes its chat-templated prompts into the list it is given
        embeds, _ = self.pipe.encode_prompt(list(captions), device=self.device, do_classifier_free_guidance=False)
        return {"cap_feats": list(embeds)}

    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        import torch

        # Z-Image's transformer takes 1 - sigma and predicts x0 - noise (its pipeline negates the output)
        out = self.denoiser(list(noisy.unsqueeze(2).unbind(0)), 1.0 - t, cond["cap_feats"], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


class Flux2(TrainAdapter):
    def encode(self, captions: list[str]) -> dict[str, Any]:
        layers = getattr(self.pipe.text_encoder.config, "num_hidden_layers", 27)
        out_layers = (9, 18, 27) if layers >= 27 else (layers,)
        embeds, text_ids = self.pipe.encode_prompt(captions, device=self.device, text_encoder_out_layers=out_layers)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    def latents_from(self, params: Any, gen: Any, share: tuple[int, int, int] | None = None) -> Any:
        import torch

        x = self.pipe._patchify_latents(self._vae_sample(params, gen, share))
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(x)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(x)
        return (x - mean) / std

    def predict(self, noisy: Any, t: Any, cond: dict[str, Any]) -> Any:
        b, c, h, w = noisy.shape
        ids = self.pipe._prepare_latent_ids(noisy).to(noisy.device)
        packed = self.pipe._pack_latents(noisy)
        out = self.denoiser(hidden_states=packed, timestep=t, guidance=None, img_ids=ids, return_dict=False,
                            **cond)[0][:, : packed.shape[1]]
        return out.permute(0, 2, 1).reshape(b, c, h, w)


ADAPTERS: dict[str, type[TrainAdapter]] = {"sd15": SD15, "sdxl": SDXL, "sd3": SD3, "flux1": Flux1,
                                            "qwenimage": QwenImage, "zimage": ZImage, "flux2": Flux2}


def make_adapter(family: str, pipe: Any, device: str, dtype: Any) -> TrainAdapter:
    """The adapter of a loaded pipeline's family."""
    return ADAPTERS[family](SPECS[family], pipe, device, dtype)
