"""Tiny pipelines with random weights, built locally (no network), for tests and demos.

`t2i-tiny DIR` writes the tiny Stable Diffusion 1.5 pipeline as a normal diffusers folder plus two example LoRAs in
`DIR/loras/`: a diffusers-format file with a non-default weight name and a kohya/A1111-format file.
`t2i-tiny DIR --family F` writes a tiny pipeline of family F (tiny_families.py) and its example LoRAs: one in
diffusers format and one in the family's commonest foreign format (tiny_loras.py).
`t2i-tiny DIR --family clip|dino` writes a tiny random scorer model for `t2i-eval` (tiny_scorers.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..common.errors import ConfigError, task_wrapper
from ..common.paths import cache_root
from .tiny_scorers import BUILDERS as SCORERS
from .tiny_scorers import SCORER_FAMILIES

TINY_ID = "builtin:tiny"  # the SD1.5 tiny model; `builtin:tiny-<family>` for the others
TINY_VERSION = "2"  # 2: the VAE encoder is conditioned like a trained one (condition_vae)
TINY_FAMILIES = ("sd15", "sdxl", "flux1", "sd3", "qwenimage", "zimage", "flux2")
REFINER_FAMILIES = ("sdxl-refiner",)  # second models for A1111's Refiner (not text-to-image pipelines)
TINY_SIZE = 64  # default image side in pixels
DIFFUSERS_LORA = ("tiny_style", "tiny_style.safetensors")  # (directory, non-default weight_name)
KOHYA_LORA = "tiny_kohya.safetensors"
TINY_UNET = {  # the tiny UNet's config (tests vary it to make LoRAs for "another model")
    "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": TINY_SIZE // 2, "in_channels": 4,
    "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SINGLE_FILE = "tiny.safetensors"  # `t2i-tiny --single-file`: the weights as one LDM-layout checkpoint


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _write_tokenizer(path: Path) -> int:
    """Write a byte-level BPE vocab/merges for CLIPTokenizer; return the vocab size."""
    chars = list(_bytes_to_unicode().values())
    merges = ["t h", "e r", "th e</w>", "a n", "i n", "o n", "r e", "e d</w>"]
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    for m in merges:
        vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def condition_final_norm(text_encoder) -> None:
    """Give a random CLIP text encoder's final LayerNorm a trained-looking affine part.

    Freshly initialised it is weight 1, bias 0, so every token's output has mean 0 and A1111's emphasis mean
    restore (old mean / new mean) divides float noise by float noise: its result then depended on the installed
    versions' float rounding (a black image in one CI run). Real CLIP's final norm has a bias with a clear mean."""
    import torch

    norm = text_encoder.text_model.final_layer_norm if hasattr(text_encoder, "text_model") else \
        text_encoder.final_layer_norm
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(norm.weight.shape, generator=gen))
        norm.bias.copy_(0.3 + 0.1 * torch.randn(norm.bias.shape, generator=gen))


def condition_vae(vae, logvar: float = -12.0) -> None:
    """Give a random VAE's encoder two properties of a trained one, which training and image-to-image rely on.

    1. A narrow posterior (std exp(logvar / 2), about 0.0025). Freshly initialised, the log-variance half is
       about 0, so the posterior std is about 1 and a latent sampled from it (as kohya, ai-toolkit and diffusers'
       training scripts encode) is mostly a fresh draw: 67-97 % of each tiny family's training latent was noise,
       which no LoRA can memorise.
    2. Latents at the denoiser's scale: a family's scaling factor (and latents_std) is chosen so that scaled
       latents have unit std, as the sampler's starting noise has; a random encoder's means are far smaller
       (Z-Image's scaled latents had 0.6 % of the noise's energy, SD 1.x's 0.3 %), so a training image was
       nearly invisible beside the noise. The means are scaled to the std the family's scaling undoes (also the
       std of the latents the decoder gets from a generation)."""
    import torch

    layer = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    half = layer.weight.shape[0] // 2  # DiagonalGaussianDistribution: the first half is the mean, then logvar
    cfg = vae.config
    if getattr(cfg, "scaling_factor", None):  # AutoencoderKL: the denoiser sees (x - shift) * scaling_factor
        raw_std = 1.0 / cfg.scaling_factor
    elif getattr(cfg, "latents_std", None):  # Qwen-Image: (x - latents_mean) / latents_std
        raw_std = float(sum(cfg.latents_std) / len(cfg.latents_std))
    else:  # Flux.2: its batch norm's running statistics (0 and 1 untrained)
        raw_std = 1.0
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(4, 3, TINY_SIZE, TINY_SIZE, generator=gen)
    solid = torch.rand(4, 3, 1, 1, generator=gen).expand(4, 3, TINY_SIZE, TINY_SIZE)
    images = torch.cat([noise, solid]) * 2 - 1
    if isinstance(layer, torch.nn.Conv3d):  # a video VAE (Qwen-Image's): (batch, channels, frames, height, width)
        images = images.unsqueeze(2)
    with torch.no_grad():
        layer.weight[half:].zero_()
        layer.bias[half:].fill_(logvar)
        gain = raw_std / float(vae.encode(images).latent_dist.mean.std())
        layer.weight[:half].mul_(gain)
        layer.bias[:half].mul_(gain)


def build_tiny_pipeline(tmp: Path):
    """Build the deterministic tiny StableDiffusionPipeline (same weights on every machine)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = _write_tokenizer(tmp / "tok")
    tokenizer = CLIPTokenizer(str(tmp / "tok" / "vocab.json"), str(tmp / "tok" / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_SIZE,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            layer_norm_eps=1e-5,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    condition_final_norm(text_encoder)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _random_lora_layers(pipe, rank: int, seed: int, text_encoder: bool):
    """Attach a LoRA with non-zero random weights; return (unet_state, text_encoder_state) in peft naming."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    te_state = None
    if text_encoder:
        te_cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                            init_lora_weights=False)
        pipe.text_encoder.add_adapter(te_cfg)
    gen = torch.Generator().manual_seed(seed)
    for module in [pipe.unet] + ([pipe.text_encoder] if text_encoder else []):
        for name, p in module.named_parameters():
            if "lora_" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    unet_state = get_peft_model_state_dict(pipe.unet)
    if text_encoder:
        te_state = get_peft_model_state_dict(pipe.text_encoder)
    return unet_state, te_state


def _te2_state(pipe, seed: int):
    """SDXL: a random LoRA on the second text encoder too."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    pipe.text_encoder_2.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    gen = torch.Generator().manual_seed(seed + 100)
    for name, p in pipe.text_encoder_2.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return get_peft_model_state_dict(pipe.text_encoder_2)


def write_example_loras(model_dir: Path, out: Path) -> None:
    """Write the two example LoRAs for a tiny SD1.5/SDXL model into `out` (a `loras/` folder)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from ..lora.kohya import to_kohya  # the one home of the kohya key layout (a fixture may borrow it)

    out.mkdir(parents=True, exist_ok=True)
    for seed in (1, 2):
        pipe = DiffusionPipeline.from_pretrained(str(model_dir))
        unet_state, te_state = _random_lora_layers(pipe, rank=4, seed=seed, text_encoder=True)
        te2_state = _te2_state(pipe, seed) if getattr(pipe, "text_encoder_2", None) is not None else None
        if seed == 1:
            extra = {"text_encoder_2_lora_layers": te2_state} if te2_state is not None else {}
            type(pipe).save_lora_weights(out / DIFFUSERS_LORA[0], unet_lora_layers=unet_state,
                                         text_encoder_lora_layers=te_state, weight_name=DIFFUSERS_LORA[1], **extra)
        else:
            save_file(to_kohya(unet_state, te_state, alpha=4, te2_state=te2_state), str(out / KOHYA_LORA),
                      metadata={"ss_network_dim": "4"})


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def build_family(family: str, tmp: Path):
    """The tiny pipeline of `family` (one of TINY_FAMILIES)."""
    if family == "sd15":
        pipe = build_tiny_pipeline(tmp)
    else:
        from .tiny_families import BUILDERS

        pipe = BUILDERS[family](tmp)
    condition_vae(pipe.vae)
    return pipe


def _save_pipeline(pipe, tmp: Path) -> None:
    if pipe is None:
        return
    pipe.save_pretrained(tmp / "model", safe_serialization=True)
    for scratch in ("tok", "clip-tok"):
        shutil.rmtree(tmp / scratch, ignore_errors=True)
    for item in (tmp / "model").iterdir():
        item.rename(tmp / item.name)
    (tmp / "model").rmdir()


def write_tiny(dest: Path, loras: bool = True, family: str = "sd15") -> Path:
    """Write the tiny pipeline of `family` (and example LoRAs) to `dest` atomically; return `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dest.parent))
    _quiet()  # no progress bars: the model may be built on first use inside a run
    try:
        if family in SCORER_FAMILIES:  # a scorer model for runner/eval: no pipeline, no LoRAs
            SCORERS[family](tmp)
            loras = False
            pipe = None
        else:
            pipe = build_family(family, tmp)
        _save_pipeline(pipe, tmp)
        if family in REFINER_FAMILIES:  # A1111 runs no LoRA on the refiner
            pass
        elif loras and family in ("sd15", "sdxl"):
            write_example_loras(tmp, tmp / "loras")
        elif loras:
            from .tiny_loras import write_family_loras

            write_family_loras(family, pipe, tmp / "loras")
        (tmp / "TINY_VERSION").write_text(TINY_VERSION)
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest} exists and is not empty")
        if dest.exists():
            dest.rmdir()
        tmp.chmod(0o755)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def tiny_family(model_id: str) -> str | None:
    """The family of a built-in tiny id (`builtin:tiny` = sd15, `builtin:tiny-flux1` …), else None."""
    if model_id in (TINY_ID, "tiny"):
        return "sd15"
    for prefix in (f"{TINY_ID}-", "tiny-"):
        if model_id.startswith(prefix) and model_id[len(prefix):] in TINY_FAMILIES:
            return model_id[len(prefix):]
    return None


def builtin_path(source: str) -> Path | None:
    """The local path of a `builtin:tiny[-family][/sub/path]` source (building the model on first use), else None."""
    if not source.startswith(TINY_ID):
        return None
    head, _, rest = source.partition("/")
    family = tiny_family(head) or next((f for f in SCORER_FAMILIES + REFINER_FAMILIES if head == f"{TINY_ID}-{f}"),
                                       None)
    if family is None:
        return None
    return ensure_tiny(family) / rest if rest else ensure_tiny(family)


def ensure_tiny(family: str = "sd15") -> Path:
    """Return the cached tiny model directory of `family`, building it on first use."""
    dest = cache_root() / (f"tiny-v{TINY_VERSION}" if family == "sd15" else f"tiny-{family}-v{TINY_VERSION}")
    if (dest / "TINY_VERSION").is_file():
        return dest
    try:
        return write_tiny(dest, family=family)
    except FileExistsError:  # another process built it concurrently
        if (dest / "TINY_VERSION").is_file():
            return dest
        raise


@task_wrapper("t2i-tiny")
def main(argv: list[str] | None = None) -> int:
    """Console entry: `t2i-tiny DIR`."""
    parser = argparse.ArgumentParser(prog="t2i-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="destination folder (must not exist or be empty)")
    parser.add_argument("--family", default="sd15", choices=TINY_FAMILIES + REFINER_FAMILIES + SCORER_FAMILIES,
                        help="model family of the tiny pipeline, sdxl-refiner: a tiny SDXL refiner (refiner.model="
                             "DIR), or clip/dino: a tiny scorer model for t2i-eval (default: sd15)")
    parser.add_argument("--no-loras", action="store_true", help="skip the example LoRAs")
    parser.add_argument("--single-file", action="store_true",
                        help=f"also write DIR/{SINGLE_FILE}: the same weights as one LDM-layout checkpoint")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an unexpected error")
    args = parser.parse_args(argv)
    dest = Path(args.dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest} exists and is not an empty folder; choose a new path")
    if args.single_file and args.family != "sd15":
        raise ConfigError(f"--single-file writes an SD1.5 (LDM) checkpoint; it does not apply to "
                          f"--family {args.family}")
    write_tiny(dest, loras=not args.no_loras, family=args.family)
    use = f"t2i-eval --{args.family}-model {dest}" if args.family in SCORER_FAMILIES else \
        f"refiner.model={dest}" if args.family in REFINER_FAMILIES else f"model.id={dest}"
    print(f"tiny {args.family} model written to {dest} (load with {use})")
    if args.single_file:
        from .single_file import export_single_file

        export_single_file(dest, dest / SINGLE_FILE)
        print(f"single-file checkpoint: {dest / SINGLE_FILE} (load with model.id={dest / SINGLE_FILE} "
              f"model.config={dest})")
    if not args.no_loras and args.family not in SCORER_FAMILIES + REFINER_FAMILIES:
        files = sorted(str(p) for p in (dest / "loras").rglob("*.safetensors"))
        print(f"example LoRAs: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
