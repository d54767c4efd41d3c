"""The A1111/Forge/ComfyUI copy t2i-train writes for Z-Image and Flux.2 uses the models' original module names
(Z-Image: `diffusion_model.layers.N.attention.qkv`, fused; Flux.2: BFL `double_blocks_N_img_attn_qkv`, fused), and
it gives the same result as the diffusers-format file in diffusers' own `load_lora_weights` (pixels) and in this
runner's foreign-format path (each weight's change through the merge engine, and the runner's pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runner.config import validate

MODELS = {"zimage": "tiny-zimage", "flux2": "tiny-flux2"}
RANK, ALPHA = 4, 2.0  # alpha/rank 0.5: a fused module's alpha must keep that scale
PROMPT = "a red square"


def _pipe(family: str):
    from diffusers import DiffusionPipeline

    from runner.models.tiny import ensure_tiny

    return DiffusionPipeline.from_pretrained(str(ensure_tiny(family)))


def _with_lora(family: str, preset: str, std: float):
    """The family's tiny pipeline with a random (non-zero: lora_B ~ N(0, std)) LoRA on a target preset, and the
    preset's target modules."""
    import torch
    from peft import LoraConfig

    from runner.train.families import SPECS, target_modules

    pipe = _pipe(family)
    torch.manual_seed(0)
    targets = target_modules(SPECS[family], preset, None, pipe.transformer)
    pipe.transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                            init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return pipe, targets


def _saved(family: str, folder: Path) -> tuple[Path, Path]:
    """A random (non-zero) LoRA on the family's attention + MLP preset, written by t2i-train's own saver."""

    from runner.train.save import save_lora

    pipe, _ = _with_lora(family, "attn_mlp", 1.0)
    lora = save_lora(folder, "n", pipe, family, {"transformer": pipe.transformer}, {"ss_network_dim": str(RANK)},
                     ALPHA, RANK)
    return lora, folder / "n_kohya.safetensors"


def _diffusers_image(family: str, lora: Path | None) -> np.ndarray:
    pipe = _pipe(family)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        image = pipe(prompt=[PROMPT], num_inference_steps=4, width=32, height=32, guidance_scale=1.0,
                     generator=[torch.Generator("cpu").manual_seed(0)], output_type="pil").images[0]
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    family = request.param
    return family, *_saved(family, tmp_path_factory.mktemp(family))


def test_native_names(saved) -> None:
    from safetensors import safe_open

    from runner.lora.detect import detect_file

    family, _, kohya = saved
    with safe_open(str(kohya), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    if family == "zimage":
        assert "diffusion_model.layers.0.attention.qkv.lora.down.weight" in keys
        assert "diffusion_model.layers.0.attention.out.lora.up.weight" in keys
        assert "diffusion_model.layers.0.feed_forward.w1.lora.down.weight" in keys
        assert not any(".to_q." in k or ".to_out." in k for k in keys), sorted(keys)[:6]
        qkv = "diffusion_model.layers.0.attention.qkv"
    else:
        assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight",
                "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight",
                "lora_unet_single_blocks_0_linear1.lora_down.weight",
                "lora_unet_single_blocks_0_linear2.lora_down.weight"} <= keys
        assert not any("transformer_blocks" in k for k in keys), sorted(keys)[:6]
        qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    with safe_open(str(kohya), "pt") as f:
        assert float(f.get_tensor(qkv + ".alpha")) == ALPHA * 3  # rank 3r: the scale stays alpha / r
    assert meta["ss_network_dim"] == str(RANK)
    assert detect_file(kohya).family == family


def test_diffusers_loads_native_file_to_the_same_pixels(saved) -> None:
    family, lora, kohya = saved
    base, ours, native = (_diffusers_image(family, f) for f in (None, lora, kohya))
    assert np.abs(ours - base).mean() > 1.0  # the LoRA acts
    assert np.abs(ours - native).max() <= 1, np.abs(ours - native).max()


def test_runner_merge_path_equals_peft(saved) -> None:
    """The native file through the runner's own module mapping (merge engine) changes every weight as peft's
    merge of the diffusers file does."""
    from safetensors.torch import load_file

    from runner.lora.detect import detect_state
    from runner.lora.lycoris import file_deltas
    from runner.lora.merge import peft_deltas

    family, lora, kohya = saved
    pipe = _pipe(family)
    pipe.load_lora_weights(str(lora), adapter_name="d")
    want = peft_deltas(pipe, "d", {"transformer": pipe.transformer})
    state = load_file(str(kohya))
    got = file_deltas(pipe, state, detect_state(state), str(kohya))
    assert set(got) == set(want) and len(want) > 8
    for path, delta in got.items():
        base = pipe.transformer.get_submodule(path.removeprefix("transformer.")).get_base_layer().weight.detach()
        torch.testing.assert_close(delta(base), want[path](base), rtol=1e-4, atol=1e-6,
                                   msg=lambda e, p=path: f"{p}: {e}")


def test_runner_gives_the_same_pixels(saved, tmp_path: Path) -> None:
    from runner.run import run

    family, lora, kohya = saved
    sets = [[{"source": str(lora)}], [{"source": str(kohya)}]]
    r = run(validate({"model": {"id": f"builtin:{MODELS[family]}"}, "prompts": [PROMPT], "seeds": [0], "steps": 4,
                      "width": 32, "height": 32, "guidance_scale": 1.0, "lora_sets": sets,
                      "grid": {"enabled": False}}), tmp_path / "out", progress=False)
    img = {e["lora_set"]: np.asarray(Image.open(tmp_path / "out" / e["file"]).convert("RGB")).astype(int)
           for e in r.entries}
    assert np.abs(img[0] - img[1]).max() <= 1


@pytest.mark.parametrize("family", list(MODELS))
def test_all_linear_native_file_applies_every_module(family: str, tmp_path: Path) -> None:
    """With `all_linear`, modules diffusers' Flux.2 kohya converter drops (modulation, norm-out) are still applied:
    the runner counts a fused `qkv` as the three modules it splits into, so the drop sends the file to the merge
    engine; every weight then changes as with the diffusers file."""

    from runner.common.hashing import file_sha256
    from runner.lora.adapters import AdapterManager
    from runner.lora.files import ResolvedLora
    from runner.train.save import save_lora

    pipe, targets = _with_lora(family, "all_linear", 0.3)
    save_lora(tmp_path, "n", pipe, family, {"transformer": pipe.transformer}, {}, ALPHA, RANK)
    changes = {}
    for f in ("n.safetensors", "n_kohya.safetensors"):
        fresh = _pipe(family)
        r = ResolvedLora(f, str(tmp_path / f), None, str(tmp_path / f), file_sha256(tmp_path / f))
        manager = AdapterManager(fresh)
        manager.merge = True  # peft-loaded layers are multiplied out too: every weight's change is comparable
        before = {n: p.detach().clone() for n, p in fresh.transformer.named_parameters() if "lora" not in n}
        manager.activate((r,), (1.0,))
        after = {n.replace(".base_layer", ""): p.detach() for n, p in fresh.transformer.named_parameters()}
        changes[f] = {n: after[n] - w for n, w in before.items()}
    want, got = changes["n.safetensors"], changes["n_kohya.safetensors"]
    moved = [n for n, d in want.items() if float(d.abs().max()) > 0]
    assert len(moved) >= len(targets)
    for n in moved:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=lambda e, n=n: f"{n}: {e}")
