"""Full-size benchmark models per family without the hub: each family's published architecture (the
config.json values of its reference checkpoint) with random weights, plus two random LoRAs, for
`bench_sweep.py --full --family F` on a GPU. Tokenizers are the runner's small local ones (speed does not depend
on the vocabulary); embedding tables keep the real vocabulary sizes.

Reference checkpoints: SDXL base 1.0, FLUX.1-dev, SD3.5 Large, Qwen-Image, Z-Image-Turbo, FLUX.2-klein-4B.
Disk: the pipelines are saved in bf16 (Qwen-Image with its 7B text encoder is ~57 GB; the others 8-32 GB).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960)
VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
             layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)


def _clip(cfg: dict, projection: bool, n_tok: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = CLIPTextConfig(**cfg, bos_token_id=n_tok - 2, eos_token_id=n_tok - 1, pad_token_id=n_tok - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(c)


def _t5() -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**T5_XXL))


def build(family: str, tmp: Path) -> Any:
    """The full-size pipeline of `family` with random weights (call under a device/dtype context)."""
    import diffusers as d
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from runner.models.tiny_families import clip_tokenizer, qwen_tokenizer, t5_tokenizer

    tok, n_tok = clip_tokenizer(tmp)
    if family == "sdxl":
        unet = d.UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = d.AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              scaling_factor=0.13025, sample_size=1024)
        return d.StableDiffusionXLPipeline(vae=vae, unet=unet, text_encoder=_clip(CLIP_L, False, n_tok),
                                           text_encoder_2=_clip(CLIP_G, True, n_tok), tokenizer=tok, tokenizer_2=tok,
                                           scheduler=d.EulerDiscreteScheduler(timestep_spacing="leading"))
    if family == "flux1":
        t5_tok, _ = t5_tokenizer()
        transformer = d.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
        vae = d.AutoencoderKL(**VAE16, shift_factor=0.1159, scaling_factor=0.3611, sample_size=1024)
        sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        return d.FluxPipeline(scheduler=sched, vae=vae, text_encoder=_clip(CLIP_L, False, n_tok), tokenizer=tok,
                              text_encoder_2=_t5(), tokenizer_2=t5_tok, transformer=transformer)
    if family == "sd3":
        t5_tok, _ = t5_tokenizer()
        transformer = d.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
        vae = d.AutoencoderKL(**VAE16, shift_factor=0.0609, scaling_factor=1.5305, sample_size=1024)
        return d.StableDiffusion3Pipeline(
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer,
            text_encoder=_clip(CLIP_L, True, n_tok), tokenizer=tok, text_encoder_2=_clip(CLIP_G, True, n_tok),
            tokenizer_2=tok, text_encoder_3=_t5(), tokenizer_3=t5_tok)
    qtok, _ = qwen_tokenizer()
    if family == "qwenimage":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        transformer = d.QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
        te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                         "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                         "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                         "rope_theta": 1000000.0},
            vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "out_hidden_size": 3584},
            hidden_size=3584, vocab_size=152064))
        sched = d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                  base_image_seq_len=256, max_image_seq_len=8192, shift=1.0,
                                                  time_shift_type="exponential")
        return d.QwenImagePipeline(transformer=transformer, vae=d.AutoencoderKLQwenImage(), scheduler=sched,
                                   text_encoder=te, tokenizer=qtok)
    if family == "zimage":
        transformer = d.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
            n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
        vae = d.AutoencoderKL(**VAE16, shift_factor=0.1159, scaling_factor=0.3611, sample_size=1024)
        return d.ZImagePipeline(transformer=transformer, vae=vae, text_encoder=Qwen3Model(Qwen3Config(**QWEN3_4B)),
                                tokenizer=qtok, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0))
    if family == "flux2":
        transformer = d.Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3 * QWEN3_4B["hidden_size"], timestep_guidance_channels=256,
            axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
        sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        return d.Flux2KleinPipeline(scheduler=sched, vae=d.AutoencoderKLFlux2(), transformer=transformer,
                                    text_encoder=Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B)), tokenizer=qtok,
                                    is_distilled=True)
    raise ValueError(f"no full-size benchmark model for family {family!r}")


def ensure_family(family: str, root: Path, device: str = "cuda") -> tuple[Path, list[Path]]:
    """Write the random full-size `family` pipeline (bf16) and two random rank-4 attention LoRAs under `root`."""
    import torch

    from runner.models.tiny_loras import diffusers_lora

    model_dir, lora_dir = root / f"{family}-random", root / f"{family}-loras"
    loras = [lora_dir / f"lora{i}.safetensors" for i in range(2)]
    if (model_dir / "model_index.json").is_file() and all(p.is_file() for p in loras):
        return model_dir, loras
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root if root.is_dir() else None))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            pipe = build(family, tmp)
    finally:
        torch.set_default_dtype(default)
    shutil.rmtree(model_dir, ignore_errors=True)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    for i, path in enumerate(loras):
        if family == "sdxl":
            from models import make_lora

            make_lora(pipe.unet, lora_dir / f"l{i}", rank=16, seed=i + 1, weight_name=path.name)
            shutil.move(str(lora_dir / f"l{i}" / path.name), path)
        else:
            state = {k: (v * 0.02).to(torch.bfloat16).contiguous() for k, v in diffusers_lora(pipe, seed=i + 1).items()}
            save_file(state, str(path))
    shutil.rmtree(tmp, ignore_errors=True)
    return model_dir, loras
