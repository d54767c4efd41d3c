"""Tiny random scorer models for the evaluation tests (runner/eval/): a CLIP (`CLIPModel` + its processor) and a
DINO ViT (`ViTModel` + its image processor), built from transformers configs with fixed seeds (no network).

They load through the same `from_pretrained` path as `openai/clip-vit-large-patch14` and `facebook/dino-vits16`.
"""

from __future__ import annotations

from pathlib import Path

SCORER_FAMILIES = ("clip", "dino")
IMAGE_SIZE = 32


def build_tiny_clip(dest: Path) -> None:
    """A 2-layer CLIP (32-px images, 8-px patches, 32-dim projection) with the tiny model's byte-level tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from .tiny import _write_tokenizer

    vocab = _write_tokenizer(dest / "tok")
    tokenizer = CLIPTokenizer(str(dest / "tok" / "vocab.json"), str(dest / "tok" / "merges.txt"),
                              model_max_length=77)
    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
            "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
              "image_size": IMAGE_SIZE, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    with torch.no_grad():  # one shared direction in both towers: image-text cosines mostly > 0, as in a real CLIP
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.vision_model.post_layernorm.bias.fill_(0.7)
        model.text_model.final_layer_norm.bias.fill_(0.7)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                               "width": IMAGE_SIZE})
    model.save_pretrained(dest, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(dest)
    for f in (dest / "tok").iterdir():
        f.unlink()
    (dest / "tok").rmdir()


def build_tiny_dino(dest: Path) -> None:
    """A 2-layer ViT (32-px images, 8-px patches, no pooler: DINO's features are the CLS token)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                    image_size=IMAGE_SIZE, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(dest, safe_serialization=True)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(dest)


BUILDERS = {"clip": build_tiny_clip, "dino": build_tiny_dino}
