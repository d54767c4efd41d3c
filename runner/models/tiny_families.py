"""Tiny random pipelines of every tested family (no network): `t2i-tiny DIR --family F`.

Component sizes follow diffusers' own `tests/pipelines/<family>/…get_dummy_components`; the text encoders are
built from configs and the tokenizers from small local vocabularies (CLIP byte-level BPE, a T5 Unigram, a Qwen
byte-level BPE with its special tokens and a Qwen3-style chat template), so nothing is downloaded. Each builder
seeds torch before every component, so a family's tiny weights are the same on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<think>", "</think>"]
# A Qwen3-style chat template (Z-Image and Flux.2-klein call apply_chat_template with enable_thinking)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)


def _seed() -> None:
    import torch

    torch.manual_seed(0)


def clip_tokenizer(tmp: Path) -> tuple[Any, int]:
    """The tiny byte-level CLIP tokenizer (shared with the SD1.5 tiny model) and its vocab size."""
    from transformers import CLIPTokenizer

    from .tiny import _write_tokenizer

    n = _write_tokenizer(tmp / "clip-tok")
    return CLIPTokenizer(str(tmp / "clip-tok" / "vocab.json"), str(tmp / "clip-tok" / "merges.txt"),
                         model_max_length=77), n


def clip_encoder(vocab: int, hidden: int = 32, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seed()
    cfg = CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=hidden,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5,
                         vocab_size=vocab, max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_tokenizer() -> tuple[Any, int]:
    """A T5 Unigram tokenizer over single characters (`<pad>`=0, `</s>`=1, `<unk>`=2)."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{c}", -3.0) for c in chars] + [(c, -4.0) for c in chars + chars.upper()]
    return T5Tokenizer(vocab=pieces, extra_ids=0), len(pieces)


def t5_encoder(vocab: int, d_model: int = 32) -> Any:
    from transformers import T5Config, T5EncoderModel

    _seed()
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def qwen_tokenizer() -> tuple[Any, dict[str, int]]:
    """A byte-level Qwen2 tokenizer with Qwen's special tokens and chat template; returns it and the token ids."""
    from transformers import Qwen2Tokenizer

    from .tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    merges = [("Ġ", "a"), ("t", "h"), ("e", "r"), ("i", "n")]
    vocab = {c: i for i, c in enumerate(chars + ["".join(m) for m in merges])}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, bos_token=None)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.model_max_length = 4096
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    return tok, {**ids, "vocab_size": len(tok)}


def _sdxl_unet(seed: int, cross_attention_dim: int, add_dim: int) -> Any:
    """The tiny SDXL UNet shape: `add_dim` = time ids x 8 + the pooled text width."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=add_dim,
        cross_attention_dim=cross_attention_dim, norm_num_groups=32)


def _sdxl_vae_and_scheduler() -> tuple[Any, Any]:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    _seed()
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=64)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return vae, scheduler


def build_sdxl(tmp: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    tok, n = clip_tokenizer(tmp)
    unet = _sdxl_unet(0, 64, 80)  # 80 = 6 time ids (size, crop, target size) x 8 + 32
    vae, scheduler = _sdxl_vae_and_scheduler()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=clip_encoder(n), text_encoder_2=clip_encoder(n, 32, True),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler)


def build_sdxl_refiner(tmp: Path) -> Any:
    """A tiny SDXL refiner (A1111's Refiner): the second text encoder only (the refiner's UNet conditions on it
    alone), aesthetic-score time ids (`requires_aesthetics_score`), and the tiny SDXL's text encoder 2 and VAE
    weights (seeded alike), as the real refiner shares them with the base."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    tok, n = clip_tokenizer(tmp)
    text_encoder_2 = clip_encoder(n, 32, True)
    # another UNet than the base's (the real refiner is another network); 72 = 5 time ids (size, crop, aesthetic
    # score) x 8 + 32
    unet = _sdxl_unet(1, 32, 72)
    vae, scheduler = _sdxl_vae_and_scheduler()
    return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
                                            tokenizer_2=tok, unet=unet, scheduler=scheduler,
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


def build_flux1(tmp: Path) -> Any:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    (tok, n), (t5_tok, n5) = clip_tokenizer(tmp), t5_tokenizer()  # Flux.1 and SD3: CLIP + T5
    _seed()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    _seed()
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_encoder(n), tokenizer=tok,
                        text_encoder_2=t5_encoder(n5), tokenizer_2=t5_tok, transformer=transformer)
    pipe.tokenizer_2.model_max_length = 512
    return pipe


def build_sd3(tmp: Path) -> Any:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline as Pipe

    (tok, n), (t5_tok, n5) = clip_tokenizer(tmp), t5_tokenizer()  # Flux.1 and SD3: CLIP + T5
    _seed()
    # joint_attention_dim = T5 width >= the two CLIP widths together; pooled = the two CLIP projections together
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=32)
    _seed()
    vae = AutoencoderKL(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return Pipe(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=clip_encoder(n, 16, True),
                tokenizer=tok, text_encoder_2=clip_encoder(n, 16, True), tokenizer_2=tok,
                text_encoder_3=t5_encoder(n5), tokenizer_3=t5_tok)


def build_qwenimage(tmp: Path) -> Any:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel as Transformer
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok, ids = qwen_tokenizer()
    _seed()
    transformer = Transformer(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
                              axes_dims_rope=(8, 4, 4))
    _seed()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    _seed()
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": ids["vocab_size"], "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        hidden_size=16, vocab_size=ids["vocab_size"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|image_pad|>"],
        image_token_id=ids["<|image_pad|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift=1.0,
                                                time_shift_type="exponential")
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                             tokenizer=tok)


def build_zimage(tmp: Path) -> Any:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok, ids = qwen_tokenizer()
    _seed()
    # axes_lens as in the real model's proportions: diffusers' test value [256, 32, 32] fails at native size
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[1024, 256, 256])
    with torch.no_grad():  # created with torch.empty: fix them, or the weights differ from run to run
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    _seed()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=0.3611,
                        shift_factor=0.1159, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    _seed()
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=ids["vocab_size"], max_position_embeddings=512,
                                          pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                          tokenizer=tok)


def build_flux2(tmp: Path) -> Any:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel as Transformer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok, ids = qwen_tokenizer()
    layers, hidden = 27, 16  # the pipeline stacks hidden states 9, 18 and 27: joint_attention_dim = 3 x hidden
    _seed()
    transformer = Transformer(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=256,
                              axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)
    _seed()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=hidden, intermediate_size=16, num_hidden_layers=layers,
                                                num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                                vocab_size=ids["vocab_size"], max_position_embeddings=1024,
                                                pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]))
    _seed()
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer)


BUILDERS = {"sdxl": build_sdxl, "flux1": build_flux1, "sd3": build_sd3, "qwenimage": build_qwenimage,
            "zimage": build_zimage, "flux2": build_flux2, "sdxl-refiner": build_sdxl_refiner}
