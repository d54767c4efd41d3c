"""Single-file (original LDM layout) checkpoints: export, exact round trip, CLI loading, hashes and errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from runner.config import ConfigError, ModelConfig
from runner.models.single_file import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    export_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
from runner.outputs.metadata import parse_infotext, read_png_record

ARGS = ("prompts=[a red fox,a blue car]", "seeds=[5]", "steps=2", "width=32", "height=32")


@pytest.fixture(scope="module")
def tiny_file(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as one LDM-layout .safetensors, outside tiny_dir (whose folder hash must not change)."""
    return export_single_file(tiny_dir, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_export_writes_the_ldm_layout(tiny_dir: Path, tiny_file: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    with safe_open(str(tiny_file), "pt") as f:
        keys = set(f.keys())
        q_shape = f.get_slice(VAE_PREFIX + "encoder.mid.attn_1.q.weight").get_shape()
    n = sum(len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    assert len(keys) == n
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for k in keys)
    for key in (
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.2.0.op.weight",
        "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.1.2.conv.weight",
        "output_blocks.1.1.proj_out.weight",
        "time_embed.2.bias",
        "out.2.weight",
    ):
        assert UNET_PREFIX + key in keys, key
    for key in (
        "encoder.down.0.downsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "encoder.norm_out.weight",
        "decoder.mid.block_2.conv1.bias",
    ):
        assert VAE_PREFIX + key in keys, key
    assert CLIP_PREFIX + "embeddings.position_embedding.weight" in keys  # transformers-4 / A1111 names
    assert CLIP_PREFIX + "encoder.layers.1.self_attn.q_proj.weight" in keys
    assert len(q_shape) == 4  # LDM stores VAE attention projections as 1x1 convs


def test_diffusers_single_file_loader_restores_every_weight_exactly(tiny_dir: Path, tiny_file: Path) -> None:
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    got = StableDiffusionPipeline.from_single_file(
        str(tiny_file), config=str(tiny_dir), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(got, name).state_dict()
        assert set(a) == set(b), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k}"


SD15_UNET = {
    "sample_size": 64,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD2_UNET = {
    **SD15_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SDXL_UNET = {
    "sample_size": 128,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


# diffusers module names that never occur in an LDM checkpoint
DIFFUSERS_ONLY = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "resnets",
    "attentions",
    "samplers",
    "conv_shortcut",
    "time_embedding",
    "time_emb_proj",
    "group_norm",
    "conv_norm_out",
    "add_embedding",
    "attn_1.to_",
)
# a sample of real SD1.5 LDM key names (the first up block has no attention: its upsampler is `.1.conv`)
SD15_UNET_KEYS = (
    "input_blocks.0.0.weight",
    "input_blocks.3.0.op.weight",
    "input_blocks.9.0.op.weight",
    "input_blocks.4.0.skip_connection.weight",
    "input_blocks.8.1.proj_in.weight",
    "input_blocks.11.0.out_layers.3.weight",
    "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "middle_block.2.emb_layers.1.bias",
    "output_blocks.2.1.conv.weight",
    "output_blocks.5.2.conv.weight",
    "output_blocks.8.2.conv.weight",
    "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "time_embed.0.weight",
    "out.0.weight",
    "out.2.bias",
)
SD15_VAE_KEYS = (
    "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.3.block.1.conv2.bias",
    "encoder.down.2.downsample.conv.weight",
    "decoder.up.0.block.2.norm2.weight",
    "decoder.up.1.block.0.nin_shortcut.weight",
    "decoder.up.3.upsample.conv.weight",
    "decoder.mid.block_1.conv1.weight",
    "encoder.mid.attn_1.q.weight",
    "encoder.norm_out.bias",
    "decoder.conv_out.weight",
    "quant_conv.weight",
    "post_quant_conv.bias",
)


@pytest.mark.parametrize(("name", "config"), [("sd15", SD15_UNET), ("sd2", SD2_UNET), ("sdxl", SDXL_UNET)])
def test_full_size_unet_layouts_invert_diffusers_conversion(name: str, config: dict) -> None:
    """Full-size UNets (weights on the meta device): diffusers' own LDM->diffusers conversion undoes ours."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, dict(unet.config))
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state) and all(back[k] is state[k] for k in state)
    assert (CHECKPOINT_KEY_NAMES["v1"] in ldm) == (name != "sdxl")  # diffusers' SD1/2 detection key
    assert not [k for k in ldm if any(t in k for t in DIFFUSERS_ONLY)]
    if name == "sd15":  # names and count as in v1-5-pruned-emaonly.safetensors
        assert len(ldm) == 686
        assert {UNET_PREFIX + k for k in SD15_UNET_KEYS} <= set(ldm)


def test_full_size_vae_layout_inverts_diffusers_conversion() -> None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    state = vae.state_dict()
    ldm = vae_to_ldm(state, dict(vae.config))
    assert len(ldm) == 248 and {VAE_PREFIX + k for k in SD15_VAE_KEYS} <= set(ldm)
    assert not [k for k in ldm if any(t in k for t in DIFFUSERS_ONLY)]
    assert ldm[VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)


def test_unknown_unet_weight_is_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match="no LDM equivalent"):
        unet_to_ldm(
            {"mystery_block.weight": torch.zeros(1)}, {"block_out_channels": (32,), "layers_per_block": 1}
        )


def test_cli_single_file_gives_the_same_pixels_as_the_folder(
    tiny_dir: Path, tiny_file: Path, tmp_path: Path
) -> None:
    r_file = run_cli(
        f"model.id={tiny_file}",
        f"model.config={tiny_dir}",
        *ARGS,
        f"hydra.run.dir={tmp_path / 'f'}",
        cwd=tmp_path,
    )
    assert r_file.returncode == 0, r_file.stderr
    r_dir = run_cli(f"model.id={tiny_dir}", *ARGS, f"hydra.run.dir={tmp_path / 'd'}", cwd=tmp_path)
    assert r_dir.returncode == 0, r_dir.stderr
    files = sorted(p.name for p in (tmp_path / "f").glob("*.png"))
    assert len(files) == 2 and files == sorted(p.name for p in (tmp_path / "d").glob("*.png"))
    for name in files:
        a, b = pixels(tmp_path / "f" / name), pixels(tmp_path / "d" / name)
        assert np.array_equal(a, b), f"{name}: max |diff| {np.abs(a.astype(int) - b.astype(int)).max()}"
    sha = hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    rec, text = read_png_record(str(tmp_path / "f" / files[0]))
    assert rec["model"]["kind"] == "file" and rec["model"]["hash"] == sha and rec["model"]["name"] == "tiny"
    assert parse_infotext(text)["Model hash"] == sha[:10]
    lines = [json.loads(x) for x in (tmp_path / "f" / "manifest.jsonl").read_text().splitlines()]
    assert {x["model"]["hash"] for x in lines} == {sha}
    dir_rec, _ = read_png_record(str(tmp_path / "d" / files[0]))
    assert dir_rec["model"]["kind"] == "dir" and dir_rec["model"]["hash"] != sha


def _one_line_error(r, tmp_path: Path) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2i: error:") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    return err[0]


def test_single_file_without_model_config_offline_says_to_set_it(tiny_file: Path, tmp_path: Path) -> None:
    r = run_cli(f"model.id={tiny_file}", *ARGS, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    line = _one_line_error(r, tmp_path)
    assert str(tiny_file) in line and "model.config=" in line and "offline" in line


def test_ckpt_is_refused_without_allow_pickle(tiny_file: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_file))}, ckpt)
    r = run_cli(
        f"model.id={ckpt}",
        f"model.config={tiny_file.parent}",
        *ARGS,
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    line = _one_line_error(r, tmp_path)
    assert "pickle" in line and "model.allow_pickle=true" in line


def test_ckpt_loads_with_allow_pickle(tiny_dir: Path, tiny_file: Path, tmp_path: Path) -> None:
    from runner.models.loading import load_model

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_file))}, ckpt)
    loaded = load_model(ModelConfig(id=str(ckpt), config=str(tiny_dir), allow_pickle=True), "cpu")
    assert loaded.source.kind == "file" and loaded.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    ref = load_file(str(tiny_file))
    assert torch.equal(
        loaded.pipe.unet.state_dict()["conv_in.weight"], ref[UNET_PREFIX + "input_blocks.0.0.weight"]
    )


def test_corrupt_single_file_is_a_load_error_not_a_pickle_hint(tiny_dir: Path, tmp_path: Path) -> None:
    from runner.models.loading import load_model

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not load") as err:
        load_model(ModelConfig(id=str(bad), config=str(tiny_dir)), "cpu")
    assert "allow_pickle" not in str(err.value) and "\n" not in str(err.value)


def test_t2i_tiny_single_file_flag(tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from runner.models.tiny import SINGLE_FILE, main

    assert main([str(tmp_path / "m"), "--no-loras", "--single-file"]) == 0
    out = tmp_path / "m" / SINGLE_FILE
    assert str(out) in capsys.readouterr().out
    assert out.read_bytes() == tiny_file.read_bytes()  # same deterministic tiny weights, same bytes
