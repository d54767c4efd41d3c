"""What you asked for is what you get: Clip skip per family (A1111), explicit empty negative prompts, from_image
saying which settings an override changed, prompt embeddings cached without changing a pixel, CPU threads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from runner.config import ConfigError, RunConfig, validate
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.run import run

SIDE = 32


def cfg(model: Path | str, **kw):
    base = {"model": {"id": str(model)}, "prompts": ["a red fox"], "seeds": [3], "steps": 2, "width": SIDE,
            "height": SIDE}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), {**base, **kw})


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def by(result, key: str) -> dict:
    return {e[key]: pixels(result.output_dir / e["file"]) for e in result.entries}


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A tiny random StableDiffusionXLPipeline (two CLIP encoders), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    te_cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tok), projection_dim=32)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(te_cfg), text_encoder_2=CLIPTextModelWithProjection(te_cfg),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
            steps_offset=1))
    out = tmp_path_factory.mktemp("sdxl") / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_clip_skip_is_applied_on_sd1_and_ignored_on_sdxl_like_a1111(tiny_dir: Path, tiny_sdxl: Path,
                                                                     tmp_path: Path) -> None:
    sd1 = run(cfg(tiny_dir, clip_skip=[1, 2]), tmp_path / "sd1", progress=False)
    img = {e["clip_skip"]: e for e in sd1.entries}
    assert img[2]["clip_skip_applied"] is True and img[None]["clip_skip_applied"] is False
    assert not np.array_equal(*by(sd1, "clip_skip").values())
    xl = run(cfg(tiny_sdxl, clip_skip=[1, 2]), tmp_path / "xl", progress=False)
    px = by(xl, "clip_skip")
    assert np.array_equal(px[None], px[2])  # A1111's SDXL conditioning is the penultimate layer whatever Clip skip
    rec, text = read_png_record(str(tmp_path / "xl" / next(e["file"] for e in xl.entries if e["clip_skip"] == 2)))
    assert rec["clip_skip"] == 2 and rec["clip_skip_applied"] is False
    assert parse_infotext(text)["Clip skip"] == "2"  # what A1111 writes for the same setting on SDXL


def test_sdxl_default_conditioning_is_the_penultimate_layer_of_both_encoders(tiny_sdxl: Path) -> None:
    from runner.generate.prompt_embeds import PromptEmbeds
    from runner.models.loading import load_model

    pipe = load_model(validate(cfg(tiny_sdxl)).model, "cpu").pipe
    kw = PromptEmbeds().call_kwargs(pipe, [("a red fox", "")], 2, True, ())
    ids = [t("a red fox", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for t in (pipe.tokenizer, pipe.tokenizer_2)]
    hidden = [te(i, output_hidden_states=True).hidden_states[-2] for te, i in
              zip((pipe.text_encoder, pipe.text_encoder_2), ids, strict=True)]
    import torch

    assert torch.equal(kw["prompt_embeds"], torch.cat(hidden, dim=-1))


def test_an_explicit_empty_negative_prompt_wins_over_the_global_one() -> None:
    spec = validate(cfg("builtin:tiny", negative_prompt="blurry",
                        prompts=[{"prompt": "a fox", "negative_prompt": ""}, {"prompt": "a cat"},
                                 {"prompt": "a dog", "negative_prompt": None}]))
    assert [p.negative_prompt for p in spec.prompts] == ["", "blurry", "blurry"]


@pytest.mark.parametrize("key", ["seeds", "prompts", "steps", "scheduler", "schedule", "clip_skip", "lora_scales",
                                 "guidance_scale", "width", "lora_sets"])
def test_every_list_key_takes_a_single_value(key: str, tiny_dir: Path) -> None:
    from runner.config.overrides import check_override

    value = {"seeds": 1, "prompts": "a red fox", "steps": 4, "scheduler": "euler", "schedule": "karras",
             "clip_skip": 2, "lora_scales": 0.5, "guidance_scale": 5, "width": 32,
             "lora_sets": str(tiny_dir / "loras" / "tiny_kohya.safetensors")}[key]
    check_override(f"{key}={value}")  # the command-line pre-check accepts it
    spec = validate(cfg(tiny_dir, **{key: value}))
    got = getattr(spec, key)
    assert len(got) == 1, got
    if key == "lora_sets":
        assert got[0][0].source == value
    elif key == "prompts":
        assert got[0].prompt == value
    else:
        assert got[0] == value


def test_server_list_keys_take_a_single_value(tmp_path: Path) -> None:
    from runner.server.app import compose_config, create_app

    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path}",
                                     f"server.allowed_lora_dirs={tmp_path}", "server.allowed_models=other/model"]))
    assert app.state.cfg.server.allowed_lora_dirs == str(tmp_path)
    from runner.config import LoraSpec
    from runner.server.forms import FormError, check_lora_access

    lora = tmp_path / "x.safetensors"
    check_lora_access(LoraSpec(str(lora)), app.state.cfg.server)  # inside the one allowed folder
    with pytest.raises(FormError, match="outside the folders"):
        check_lora_access(LoraSpec(str(tmp_path.parent / "y.safetensors")), app.state.cfg.server)
    with pytest.raises(ConfigError, match="server.allowed_models"):
        validate(OmegaConf.merge(cfg("builtin:tiny"), {"server": {"allowed_models": [1]}}))


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("orig")
    res = run(cfg(tiny_dir, threads=2), out, progress=False)
    return out / res.entries[0]["file"]


@pytest.mark.parametrize(("override", "names"), [
    ("clip_skip=2", "clip_skip"), ("schedule=karras", "schedule"), ("steps=3", "steps"),
    ("threads=1", "threads"), ("perf.channels_last=true", "perf"), ("negative_prompt=ugly", "negative_prompt"),
])
def test_from_image_with_a_changed_setting_says_which(original: Path, tmp_path: Path, override: str,
                                                      names: str) -> None:
    from conftest import run_cli

    r = run_cli(f"from_image={original}", override, f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    entry = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert entry["reproduced"]["compared"] is False
    assert entry["reproduced"]["reason"] == f"settings differ: {names}"
    assert f"settings differ: {names}" in r.stdout and "max pixel diff" not in r.stdout


def test_every_record_key_is_classified_for_from_image(original: Path) -> None:
    from runner.outputs.record import DERIVED, PROVENANCE, SETTINGS, SPECIAL

    groups = [set(SETTINGS), set(SPECIAL), set(DERIVED), set(PROVENANCE)]
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # each key in one group only
    rec, _ = read_png_record(str(original))
    assert set(rec) <= set().union(*groups), set(rec) - set().union(*groups)


@pytest.mark.slow
def test_cached_prompt_embeddings_are_bit_identical_and_encoded_once(tiny_dir: Path, lora_a: dict,
                                                                     tmp_path: Path) -> None:
    from runner.generate.prompt_embeds import prompt_embeds
    from runner.models.loading import load_model

    kw = {"prompts": ["a red fox", "a blue car"], "seeds": [1, 2, 3], "lora_sets": [[], [lora_a]],
          "negative_prompt": "blurry", "guidance_scale": [5.0, 7.5]}
    loaded = load_model(validate(cfg(tiny_dir)).model, "cpu")
    cache = prompt_embeds(loaded)
    cache.clear()
    before = cache.encoded
    cached = run(cfg(tiny_dir, **kw), tmp_path / "cached", progress=False)
    # 2 prompts x 2 text-encoder states (lora_a has text-encoder layers): seeds and guidance reuse them
    assert cache.encoded - before == 4 and cached.generated == 24
    import runner.generate.prompt_embeds as pe

    with pytest.MonkeyPatch.context() as mp:  # the pipeline encodes the texts itself, as without the cache
        mp.setattr(pe, "_kind", lambda pipe: None)
        plain = run(cfg(tiny_dir, **kw), tmp_path / "plain", progress=False)
    assert cache.encoded - before == 4
    plain_by_key = {e["key"]: e for e in plain.entries}
    assert set(plain_by_key) == {e["key"] for e in cached.entries}
    for a in cached.entries:
        b = plain_by_key[a["key"]]
        assert np.array_equal(pixels(tmp_path / "cached" / a["file"]), pixels(tmp_path / "plain" / b["file"]))


def test_a_unet_only_lora_shares_the_no_lora_embeddings(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from runner.generate.prompt_embeds import prompt_embeds
    from runner.models.loading import load_model

    state = load_file(str(tiny_dir / "loras" / "tiny_kohya.safetensors"))
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("lora_unet_")}, str(unet_only))
    cache = prompt_embeds(load_model(validate(cfg(tiny_dir)).model, "cpu"))
    cache.clear()
    before = cache.encoded
    res = run(cfg(tiny_dir, prompts=["a lighthouse"], lora_sets=[[], [str(unet_only)]]), tmp_path / "r",
              progress=False)
    assert res.generated == 2 and cache.encoded - before == 1


def test_threads_auto_is_the_cores_this_process_may_use(monkeypatch, tmp_path: Path) -> None:
    import os

    from runner.generate import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "job" / "cpu.max").write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    monkeypatch.setattr(threads, "CGROUP_ROOT", root)
    monkeypatch.setattr(threads, "PROC_CGROUP", proc)
    assert threads.cgroup_cpu_limit() == 1.5 and threads.available_cores() == 2
    (root / "job" / "cpu.max").write_text("max 100000\n")
    assert threads.available_cores() == 6
    (root / "cpu.max").write_text("100000 100000\n")  # a parent's quota limits its children
    assert threads.available_cores() == 1


def test_threads_are_set_recorded_and_validated(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    from runner.generate.threads import available_cores

    res = run(cfg(tiny_dir, threads=1), tmp_path / "one", progress=False)
    assert res.entries[0]["threads"] == 1 and torch.get_num_threads() == 1
    res = run(cfg(tiny_dir), tmp_path / "auto", progress=False)
    assert res.entries[0]["threads"] == available_cores() == torch.get_num_threads()
    with pytest.raises(ConfigError, match=r"threads=0 is not valid; valid: auto"):
        validate(cfg(tiny_dir, threads=0))
