"""Families: the config vocabulary per family, the bad-input list of issue 14 (one line, exit 2, nothing written,
nothing loaded), model groups' settings, models as a sweep axis, memory modes and GGUF transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from omegaconf import OmegaConf
from PIL import Image

from runner.config import ConfigError, RunConfig, validate
from runner.models import loading
from runner.models.info import model_info, settings_for
from runner.models.tiny import ensure_tiny
from runner.run import run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def cfg(model_id: str | Path, **kw):
    base = {"model": {"id": str(model_id)}, "prompts": ["a red fox"], "seeds": [1], "steps": 2, "width": 32,
            "height": 32, "device": "cpu"}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), base, kw)


@pytest.fixture(scope="module")
def dirs() -> dict[str, Path]:
    return {f: ensure_tiny(f) for f in ("sd15", "flux1", "zimage", "flux2", "qwenimage")}


def _refused(config, tmp_path: Path, *needles: str) -> str:
    """run() refuses `config` with one ConfigError line holding `needles`, before loading or writing anything."""
    loads = sum(loading.LOADS.values())
    with pytest.raises(ConfigError) as err:
        run(config, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert sum(loading.LOADS.values()) == loads, "nothing may load before the error"
    assert not (tmp_path / "out").exists(), "nothing may be written"
    return msg


@pytest.mark.parametrize(("family", "over", "needles"), [
    ("flux1", {"clip_skip": 2}, ("clip_skip", "Flux.1")),
    ("sd15", {"true_cfg_scale": 4.0}, ("true_cfg_scale", "Stable Diffusion", "guidance_scale")),
    ("sd15", {"max_sequence_length": 128}, ("max_sequence_length", "Stable Diffusion")),
    ("flux1", {"max_sequence_length": 4000}, ("max_sequence_length=4000", "1 to 512")),
    ("flux1", {"negative_prompt": "blurry"}, ("true_cfg_scale", "Flux.1", "negative")),
    ("flux2", {"negative_prompt": "blurry"}, ("negative_prompt", "Flux.2")),
    ("zimage", {"negative_prompt": "blurry", "guidance_scale": 0.0}, ("guidance_scale=0", "Z-Image")),
    ("flux1", {"scheduler": "ddim"}, ("scheduler='ddim'", "Flux.1", "flow_euler")),
    ("sd15", {"scheduler": "flow_euler"}, ("scheduler='flow_euler'", "Stable Diffusion", "euler")),
    ("qwenimage", {"guidance_scale": 3.0}, ("guidance_scale", "true_cfg_scale")),
    ("flux1", {"memory": {"offload": "model"}}, ("memory.offload=model", "device=cpu")),
    ("flux1", {"memory": {"attention_slicing": True}}, ("attention_slicing", "Flux.1")),
])
def test_keys_a_family_cannot_honour(dirs: dict, tmp_path: Path, family: str, over: dict, needles: tuple) -> None:
    _refused(cfg(dirs[family], **over), tmp_path, *needles)


def test_negative_prompt_with_true_cfg_is_used_on_flux(dirs: dict, tmp_path: Path) -> None:
    """True CFG alone moves pixels (by 14 on tiny Flux), so the negative prompt's own effect is shown by changing only
    the negative text: another negative gives another image, the same negative the same image."""
    def image(name: str, negative: str) -> np.ndarray:
        (e,) = run(cfg(dirs["flux1"], negative_prompt=negative, true_cfg_scale=4.0), tmp_path / name,
                   progress=False).entries
        assert e["true_cfg_scale"] == 4.0 and e["negative_prompt"] == negative
        return pixels(tmp_path / name / e["file"])

    blurry, dog, again = image("blurry", "blurry"), image("dog", "a green dog"), image("again", "blurry")
    assert np.abs(blurry - dog).max() > 4, "the negative prompt's text must change the image"
    assert np.array_equal(blurry, again)


def test_lora_for_another_family_names_both(dirs: dict, tmp_path: Path) -> None:
    flux_lora = dirs["flux1"] / "loras" / "tiny_kohya.safetensors"
    msg = _refused(cfg(dirs["sd15"], lora_sets=[[{"source": str(flux_lora)}]]), tmp_path, "Flux", "Stable Diffusion")
    assert "LoRA" in msg
    sd_lora = dirs["sd15"] / "loras" / "tiny_kohya.safetensors"
    _refused(cfg(dirs["zimage"], lora_sets=[[{"source": str(sd_lora)}]]), tmp_path, "Stable Diffusion", "Z-Image")


def test_model_list_typo_is_found_before_the_first_model_loads(tmp_path: Path) -> None:
    _refused(cfg("builtin:tiny", models=["tiny", "tiny-flux"]), tmp_path, "models[1]", "tiny-flux1")
    _refused(cfg("builtin:tiny", models=["tiny", str(tmp_path / "nope")]), tmp_path, "models[1]", "does not exist")


def test_bad_input_on_the_command_line_is_one_line_exit_2(tmp_path: Path) -> None:
    r = run_cli("model=tiny-flux1", "clip_skip=2", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Flux.1" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_group_settings_apply_unless_the_user_sets_the_key() -> None:
    from runner.config.validate import model_group

    def spec_of(**over):
        c = OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": model_group("tiny-flux1")}, over)
        return validate(c)

    s = spec_of()
    got = settings_for(s, model_info(s.model))
    assert got["steps"] == (4,) and got["guidance_scale"] == (3.5,) and got["width"] == (64,)
    got = settings_for(spec_of(steps=2, width=[32, 48]), model_info(s.model))
    assert got["steps"] == (2,) and got["width"] == (32, 48) and got["guidance_scale"] == (3.5,)
    # no group settings: the pipeline's own call defaults (Flux: 28 steps, guidance 3.5)
    plain = validate(OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": {"id": "builtin:tiny-flux1"}}))
    got = settings_for(plain, model_info(plain.model))
    assert got["steps"] == (28,) and got["guidance_scale"] == (3.5,) and got["true_cfg_scale"] == (1.0,)


@pytest.mark.slow
def test_two_family_model_list_makes_one_grid_with_a_model_axis(tmp_path: Path) -> None:
    loads = dict(loading.LOADS)
    c = cfg("builtin:tiny", models=["tiny", {"group": "tiny-flux1", "settings": {"steps": 3}}], seeds=[1, 2],
            steps=None, grid={"x": "model", "y": "seed"})
    result = run(c, tmp_path / "run", progress=False)
    assert result.generated == 4
    by_model = {}
    for e in result.entries:
        by_model.setdefault(e["model"]["family"], []).append(e)
    assert set(by_model) == {"sd15", "flux1"}
    assert {e["steps"] for e in by_model["sd15"]} == {30} and {e["steps"] for e in by_model["flux1"]} == {3}
    for family, n in (("builtin:tiny", 1), ("builtin:tiny-flux1", 1)):
        assert loading.LOADS[family] - loads.get(family, 0) <= n
    assert not any(v.source.location == "builtin:tiny" for v in loading._CACHE.values()), "the first was released"
    (grid,) = result.grids
    with Image.open(grid) as im:
        meta = json.loads(im.text["t2i-grid"])
    assert meta["x"] == "model" and len(meta["x_values"]) == 2 and meta["y"] == "seed"
    again = run(c, tmp_path / "run", progress=False)  # resume across models: nothing left to do
    assert again.generated == 0 and again.skipped == 4
    parts = [run(OmegaConf.merge(c, {"shard": {"index": i, "count": 2}}), tmp_path / f"s{i}", progress=False)
             for i in range(2)]
    assert sorted(e["key"] for p in parts for e in p.entries) == sorted(e["key"] for e in result.entries)


@pytest.mark.slow
def test_memory_modes_pixels_and_record(dirs: dict, tmp_path: Path) -> None:
    """VAE slicing: same pixels; attention slicing: same up to float rounding; VAE tiling: within a tolerance."""
    images = {}

    def image(name: str, model: Path, **mem) -> np.ndarray:
        entries = run(cfg(model, seeds=[1, 2], width=128, height=128, memory=mem), tmp_path / name,
                      progress=False).entries
        e = next(x for x in entries if x["seed"] == 2)
        assert all(e["memory"][k] == v for k, v in mem.items())
        images[name] = {x["seed"]: pixels(tmp_path / name / x["file"]) for x in entries}
        return images[name][2]

    plain = image("plain", dirs["sd15"])
    assert np.array_equal(image("slicing", dirs["sd15"], vae_slicing=True), plain)
    assert np.abs(image("attn", dirs["sd15"], attention_slicing="max") - plain).max() <= 2
    # tiled decoding blends tiles, so it is not exact (measured: mean 2.1, 3% of pixels off by more than 8); a wrong
    # image (the other seed's) is off by a mean of 44 with most pixels off by more than 8
    tiled = np.abs(image("tiling", dirs["sd15"], vae_tiling=True) - plain)
    wrong = np.abs(images["plain"][1] - plain)
    assert wrong.mean() > 20 and (wrong.max(axis=2) > 8).mean() > 0.5
    assert 0 < tiled.mean() <= 4 and tiled.mean() < wrong.mean() / 8, (tiled.mean(), wrong.mean())
    assert (tiled.max(axis=2) > 8).mean() < 0.1
    assert np.array_equal(image("plain-again", dirs["sd15"]), plain), "switches are undone for later runs"


def write_gguf(transformer, path: Path, arch: str = "flux") -> Path:
    """A GGUF of a transformer in diffusers key names: 2-D weights with a last dim divisible by 32 as Q8_0."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), arch)
    for name, tensor in transformer.state_dict().items():
        a = tensor.detach().float().numpy()
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(a, q8)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=q8)
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_transformer_quantized_runs_with_loras(dirs: dict, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    gguf_file = write_gguf(FluxTransformer2DModel.from_pretrained(dirs["flux1"], subfolder="transformer"),
                           tmp_path / "flux-q8.gguf")
    lora = str(dirs["flux1"] / "loras" / "tiny_kohya.safetensors")
    full = run(cfg(dirs["flux1"]), tmp_path / "full", progress=False).entries[0]
    sets = [[], [{"source": lora, "name": "k"}]]
    res = run(cfg(dirs["flux1"], model={"id": str(dirs["flux1"]), "transformer": str(gguf_file)}, lora_sets=sets,
                  lora_scales=[0.0, 1.0]), tmp_path / "q8", progress=False)
    by = {(e["lora_set"], e["lora_scale"]): pixels(tmp_path / "q8" / e["file"]) for e in res.entries}
    assert res.entries[0]["model"]["transformer"] == str(gguf_file)
    assert res.entries[0]["model"]["hash"] != full["model"]["hash"]
    # Q8_0 vs fp32 (measured: max 1, mean 0.05) is far below what another prompt moves tiny Flux by (max 5,
    # mean 1.0): a mean, as a wrong transformer moves the whole image while rounding moves a few pixels
    other = run(cfg(dirs["flux1"], prompts=["a green dog"]), tmp_path / "other", progress=False).entries[0]
    fp32 = pixels(tmp_path / "full" / full["file"])
    prompt_moves = np.abs(pixels(tmp_path / "other" / other["file"]) - fp32).mean()
    assert np.abs(by[(0, None)] - fp32).max() <= 2
    assert np.abs(by[(0, None)] - fp32).mean() < prompt_moves / 4, prompt_moves
    assert np.array_equal(by[(1, 0.0)], by[(0, None)])
    # the LoRA on the quantized transformer is the LoRA on fp32 (within Q8 rounding), not just "some change"
    full_lora = run(cfg(dirs["flux1"], lora_sets=[sets[1]]), tmp_path / "full-lora", progress=False).entries[0]
    fp32_lora = pixels(tmp_path / "full-lora" / full_lora["file"])
    lora_moves = np.abs(fp32_lora - fp32).mean()  # measured 6.1
    assert lora_moves > 2 * prompt_moves
    assert np.abs(by[(1, 1.0)] - fp32_lora).max() <= 2
    assert np.abs(by[(1, 1.0)] - fp32_lora).mean() < lora_moves / 20
    loaded = next(v for v in loading._CACHE.values() if v.config.transformer == str(gguf_file))
    assert any(type(m).__name__ == "GGUFLinear" for m in loaded.pipe.transformer.modules())


def test_gguf_of_another_family_is_refused(dirs: dict, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    gguf_file = write_gguf(FluxTransformer2DModel.from_pretrained(dirs["flux1"], subfolder="transformer"),
                           tmp_path / "flux.gguf")
    model = {"id": str(dirs["zimage"]), "transformer": str(gguf_file)}
    _refused(cfg(dirs["zimage"], model=model), tmp_path, "Flux.1", "Z-Image", "model.transformer")
    model = {"id": str(dirs["flux1"]), "transformer": str(tmp_path / "missing.gguf")}
    _refused(cfg(dirs["flux1"], model=model), tmp_path, "does not exist")
