"""LyCORIS on a transformer family end to end (issue 16 × 14): a LoHa in kohya's Flux.1 names (the fused BFL
`img_attn_qkv` and `linear1` modules) on the tiny Flux.1 model — each part lands on its own diffusers module, scale 0
is the baseline's exact pixels, and the image equals the same image generated alone in a fresh process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from runner.config import RunConfig, validate
from runner.run import run

RANK, ALPHA = 2, 1.0


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cfg(model_dir: Path, **kw):
    base = {"model": {"id": str(model_dir)}, "prompts": ["a red fox"], "seeds": [3], "steps": 2, "width": 32,
            "height": 32, "device": "cpu", "grid": {"enabled": False}}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), base, kw)


# factors of this spread make a LoHa that moves tiny Flux's pixels well beyond rounding (at 0.3 the whole LoHa moved
# them by a mean of 0.05, so an image test could not tell it from no LoHa at all)
LOHA_STD = 1.0


def loha(out_features: int, in_features: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """LoHa tensors for one [out, in] weight and the delta they mean: (w1a @ w1b) * (w2a @ w2b) * alpha / rank."""
    t = {"hada_w1_a": torch.randn(out_features, RANK, generator=g) * LOHA_STD,
         "hada_w1_b": torch.randn(RANK, in_features, generator=g) * LOHA_STD,
         "hada_w2_a": torch.randn(out_features, RANK, generator=g) * LOHA_STD,
         "hada_w2_b": torch.randn(RANK, in_features, generator=g) * LOHA_STD,
         "alpha": torch.tensor(ALPHA)}
    delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (ALPHA / RANK)
    return t, delta


@pytest.fixture(scope="module")
def flux(tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny Flux.1 model and a LoHa file for it in kohya's Flux names, with the delta of each diffusers module."""
    from runner.models.loading import load_model

    root = tmp_path_factory.mktemp("flux-loha")
    model_dir = tiny_flux_dir
    tr = load_model(validate(cfg(model_dir)).model, "cpu").pipe.transformer
    inner = tr.transformer_blocks[0].attn.to_q.weight.shape[0]
    mlp = tr.single_transformer_blocks[0].proj_mlp.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    qkv, d = loha(3 * inner, inner, g)
    state.update({f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in qkv.items()})
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        expected[f"transformer_blocks.0.attn.{name}"] = d[i * inner:(i + 1) * inner]
    lin, d = loha(3 * inner + mlp, inner, g)
    state.update({f"lora_unet_single_blocks_0_linear1.{k}": v for k, v in lin.items()})
    for i, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        expected[f"single_transformer_blocks.0.{name}"] = d[i * inner:(i + 1) * inner]
    expected["single_transformer_blocks.0.proj_mlp"] = d[3 * inner:]
    path = root / "flux_loha.safetensors"
    save_file(state, str(path))
    return {"dir": model_dir, "file": path, "expected": expected}


def test_each_part_of_a_fused_flux_module_lands_on_its_own_module(flux: dict) -> None:
    from runner.lora.adapters import AdapterManager
    from runner.lora.files import resolve_loras
    from runner.models.loading import load_model

    spec = validate(cfg(flux["dir"], lora_sets=[[{"source": str(flux["file"]), "name": "loha"}]]))
    (loha_set,) = resolve_loras(spec)
    pipe = load_model(spec.model, "cpu").pipe
    modules = dict(pipe.transformer.named_modules())
    base = {path: modules[path].weight.detach().clone() for path in flux["expected"]}
    mgr = AdapterManager(pipe)
    mgr.activate(loha_set, (1.0,))
    for path, delta in flux["expected"].items():
        torch.testing.assert_close(modules[path].weight.detach() - base[path], delta, rtol=1e-4, atol=1e-5,
                                   msg=path)
    mgr.activate((), ())
    for path, w in base.items():  # the base weights come back exactly
        assert torch.equal(modules[path].weight.detach(), w), path


@pytest.mark.slow
def test_flux_loha_scale_0_is_the_baseline_and_equals_a_fresh_process(flux: dict, tmp_path: Path) -> None:
    source = str(flux["file"])
    out = tmp_path / "sweep"
    result = run(cfg(flux["dir"], lora_sets=[[], [{"source": source, "name": "loha"}]],
                     lora_scales=[0.0, 0.5, 1.0]), out, progress=False)
    img = {(e["lora_set"], e["lora_scale"]): pixels(out / e["file"]).astype(int) for e in result.entries}
    assert len(img) == 4
    assert np.array_equal(img[(1, 0.0)], img[(0, None)]), "scale 0 must give the baseline's exact pixels"
    # the LoHa acts, and at its scale: half way is neither the baseline nor the full LoHa (a LoHa merged at 1.0
    # whatever the scale, or not at all, fails); the merged weights themselves are checked against lycoris above
    base, half, full = img[(0, None)], img[(1, 0.5)], img[(1, 1.0)]
    assert np.abs(full - base).mean() > np.abs(half - base).mean() > 2, "the LoHa must change the output"
    assert np.abs(full - half).max() > 4 and np.abs(half - base).max() > 4
    # differential: the half-scale LoHa image, made alone by `t2i` in a new process, is the same image
    proc = run_cli(f"model.id={flux['dir']}", "prompts=[a red fox]", "seeds=[3]", "steps=2", "width=32",
                   "height=32", "device=cpu", f"lora_sets=[[{{source: '{source}', name: loha}}]]", "lora_scales=[0.5]",
                   "grid.enabled=false", f"hydra.run.dir={tmp_path / 'alone'}", cwd=tmp_path, isolated=True)
    assert proc.returncode == 0, proc.stderr
    (alone,) = (tmp_path / "alone").glob("*.png")
    assert np.array_equal(pixels(alone), half)
