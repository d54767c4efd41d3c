"""Benchmark models without the hub: a full-size SD1.5-architecture pipeline (random weights) and LoRAs.

The configs are Stable Diffusion 1.5's published ones (unet/, vae/ and text_encoder/ config.json of
stable-diffusion-v1-5, the text encoder being CLIP ViT-L/14's text tower); only the tokenizer is the small
local byte-level vocab of runner/models/tiny.py (speed does not depend on the vocab, and no download is needed).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
CLIP_L14_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    vocab_size=49408,
)
EULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_sd15(device: str = "cpu", seed: int = 0) -> Any:
    """A StableDiffusionPipeline with SD1.5's architecture and random weights, built on `device` (fp32)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from runner.models.tiny import _write_tokenizer

    tok_dir = Path(tempfile.mkdtemp(prefix="sd15-tok-"))
    try:
        n_tok = _write_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer(
            str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77
        )
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **CLIP_L14_TEXT, bos_token_id=n_tok - 2, eos_token_id=n_tok - 1, pad_token_id=n_tok - 1
            )
        )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(**EULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_lora(
    unet: Any,
    out_dir: Path,
    rank: int = 16,
    seed: int = 1,
    std: float = 0.01,
    weight_name: str = "pytorch_lora_weights.safetensors",
) -> Path:
    """Write a random rank-`rank` UNet LoRA (attention layers) for `unet` into `out_dir`; return the file."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    name = f"bench_{seed}"
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False),
        adapter_name=name,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in unet.named_parameters():
            if f"lora_A.{name}." in pname or f"lora_B.{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * std)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()
    }
    unet.delete_adapters(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state, weight_name=weight_name)
    return out_dir / weight_name


def ensure_sd15(root: Path, device: str = "cpu", n_loras: int = 2, rank: int = 16) -> tuple[Path, list[Path]]:
    """Write the random SD1.5 pipeline (fp32 safetensors) and `n_loras` LoRAs under `root` once."""
    model_dir, lora_root = root / "sd15-random", root / "loras"
    loras = [lora_root / f"lora{i}" / "pytorch_lora_weights.safetensors" for i in range(n_loras)]
    if (model_dir / "model_index.json").is_file() and all(p.is_file() for p in loras):
        return model_dir, loras
    pipe = build_sd15(device)
    tmp = root / ".sd15-random.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    for i, path in enumerate(loras):
        make_lora(pipe.unet, path.parent, rank=rank, seed=i + 1)
    return model_dir, loras
