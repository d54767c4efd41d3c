"""Model families end to end (issue 14): for every tested family, `t2i-tiny DIR --family F` then a run on DIR
makes images; a foreign-format LoRA loads, changes the output and gives the baseline's exact pixels at scale 0;
`from_image` reproduces an image bit for bit; each image equals the same image generated alone in a fresh process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from runner.config import RunConfig
from runner.models.tiny import TINY_FAMILIES
from runner.models.tiny import main as tiny_main
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.run import run

FOREIGN = {"sd15": "tiny_kohya", "sdxl": "tiny_kohya", "flux1": "tiny_kohya", "qwenimage": "tiny_kohya",
           "zimage": "tiny_aitoolkit", "flux2": "tiny_aitoolkit", "sd3": None}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux1": "FluxPipeline",
             "sd3": "StableDiffusion3Pipeline", "qwenimage": "QwenImagePipeline", "zimage": "ZImagePipeline",
             "flux2": "Flux2KleinPipeline"}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cfg(model_dir: Path, **kw):
    base = {"model": {"id": str(model_dir)}, "prompts": ["a red fox"], "seeds": [1, 2], "steps": 2, "width": 32,
            "height": 32, "device": "cpu"}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), base, kw)


def lora_file(model_dir: Path, family: str) -> Path:
    """The family's example LoRA in its commonest foreign format (diffusers format for SD3: nothing else)."""
    name = FOREIGN[family]
    return model_dir / "loras" / (f"{name}.safetensors" if name else "tiny_style/tiny_style.safetensors")


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per family: `t2i-tiny DIR --family F`, then one run with the no-LoRA set and the foreign LoRA at 0 and 1."""
    out: dict[str, dict] = {}
    root = tmp_path_factory.mktemp("families")
    for family in TINY_FAMILIES:
        model_dir = root / family
        assert tiny_main([str(model_dir), "--family", family]) == 0
        lora = lora_file(model_dir, family)
        run_dir = root / f"run-{family}"
        result = run(cfg(model_dir, lora_sets=[[], [{"source": str(lora), "name": "L"}]], lora_scales=[0.0, 1.0]),
                     run_dir, progress=False)
        out[family] = {"dir": model_dir, "run": run_dir, "entries": result.entries, "lora": lora}
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.slow
def test_family_makes_images_and_foreign_lora_works(family_runs: dict, family: str) -> None:
    r = family_runs[family]
    by = {(e["lora_set"], e["lora_scale"], e["seed"]): pixels(r["run"] / e["file"]) for e in r["entries"]}
    assert len(by) == 6  # 2 seeds x (baseline + scale 0 + scale 1)
    for seed in (1, 2):
        base = by[(0, None, seed)]
        assert base.shape == (32, 32, 3) and base.std() > 0
        assert np.array_equal(by[(1, 0.0, seed)], base), "scale 0 must give the baseline's exact pixels"
        assert np.abs(by[(1, 1.0, seed)].astype(int) - base).max() > 0, "the LoRA must change the output"
    rec = r["entries"][0]
    assert rec["model"]["family"] == family and rec["model"]["pipeline"] == PIPELINES[family]
    with_lora = next(e for e in r["entries"] if e["loras"])
    assert with_lora["loras"][0]["sha256"] and with_lora["loras"][0]["file"] == str(r["lora"])
    png_rec, text = read_png_record(str(r["run"] / with_lora["file"]))
    assert png_rec["model"]["family"] == family and "Lora hashes" in parse_infotext(text)


# The layers each family's example LoRA names, counted by hand from runner/models/tiny_loras.py's layouts: one per
# LoRA module, and three for Flux's fused double-block qkv (diffusers' separate to_q/to_k/to_v, add_q/k/v_proj).
LAYERS = {"sd15": 40, "sdxl": 80, "flux1": 9, "sd3": 15, "qwenimage": 16, "zimage": 16, "flux2": 10}


def layers_named(file: Path) -> int:
    """How many model layers the LoRA file names (read from its keys, not through the runner)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    modules = {re.split(r"[._]lora[._]", k)[0] for k in keys if re.search(r"lora_(down|A)\.weight$", k)}
    return sum(3 if re.search(r"double_blocks[._]\d+[._](img|txt)_attn[._]qkv", m) else 1 for m in modules)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.slow
def test_foreign_lora_lands_on_every_layer_it_names(family_runs: dict, family: str) -> None:
    """Merged at 1.0 (what perf.fuse_lora does), the run's LoRA changes exactly the layers the file names: a loader
    that dropped layers (a one-layer LoRA) or spread one over others fails the count."""
    import torch

    from runner.config.validate import LoraSpec
    from runner.lora.adapters import AdapterManager
    from runner.lora.files import resolve_lora
    from runner.models.loading import load_model

    r = family_runs[family]
    assert layers_named(r["lora"]) == LAYERS[family]
    loaded = load_model(cfg(r["dir"]).model, "cpu")  # the run's pipeline (the process cache)
    manager = loaded.adapters = loaded.adapters or AdapterManager(loaded.pipe)
    lora = resolve_lora(LoraSpec(source=str(r["lora"]), name="L"))
    manager.ensure((lora,))
    parts = {n: m for n in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
             if isinstance(m := getattr(loaded.pipe, n, None), torch.nn.Module)}

    def weights() -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v.detach().clone() for n, m in parts.items() for k, v in m.state_dict().items()}

    before, merge = weights(), manager.merge
    try:
        manager.merge = True
        manager.activate((lora,), (1.0,))
        after = weights()
    finally:
        manager.activate((), ())
        manager.merge = merge
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == LAYERS[family], changed
    assert all(k.endswith(".weight") for k in changed), changed
    assert all(torch.equal(before[k], v) for k, v in weights().items())  # the base weights back, bit for bit


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.slow
def test_from_image_reproduces_bit_identical(family_runs: dict, family: str, tmp_path: Path) -> None:
    from runner.config.overrides import CONF_DIR
    from runner.reproduce.from_image import prepare
    from runner.server.app import compose_config

    r = family_runs[family]
    entry = next(e for e in r["entries"] if e["lora_scale"] == 1.0 and e["seed"] == 2)
    img = r["run"] / entry["file"]
    overrides = [f"from_image={img}"]
    result = run(prepare(compose_config(overrides), overrides, CONF_DIR), tmp_path / "again", progress=False)
    (new,) = result.entries
    assert new["reproduced"]["identical"] is True, new["reproduced"]
    assert np.array_equal(pixels(tmp_path / "again" / new["file"]), pixels(img))  # the records differ (time)


_ALONE = """
import json, sys
from omegaconf import OmegaConf
from runner.config import RunConfig
from runner.run import run
jobs = json.loads(sys.argv[1])
out = {}
for family, (model_dir, lora, run_dir) in jobs.items():
    c = OmegaConf.merge(OmegaConf.structured(RunConfig), {"model": {"id": model_dir}, "prompts": ["a red fox"],
        "seeds": [2], "steps": 2, "width": 32, "height": 32, "device": "cpu",
        "lora_sets": [[{"source": lora, "name": "L"}]], "batch_size": 1})
    (e,) = run(c, run_dir, progress=False).entries
    out[family] = run_dir + "/" + e["file"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_each_family_image_equals_it_alone_in_a_fresh_process(family_runs: dict, tmp_path: Path) -> None:
    """The differential check: seed 2 of the batched sweep (batched with seed 1) == seed 2 alone, elsewhere."""
    jobs = {f: [str(r["dir"]), str(r["lora"]), str(tmp_path / f)] for f, r in family_runs.items()}
    proc = subprocess.run([sys.executable, "-c", _ALONE, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = json.loads(proc.stdout.strip().splitlines()[-1])
    for family, r in family_runs.items():
        batched = next(e for e in r["entries"] if e["lora_scale"] == 1.0 and e["seed"] == 2)
        assert batched["batch_size"] == 2  # it was made in a batch with seed 1
        assert np.array_equal(pixels(Path(alone[family])), pixels(r["run"] / batched["file"])), family


@pytest.mark.parametrize("family", (*TINY_FAMILIES, "sdxl-refiner"))
def test_tiny_vae_encodes_like_a_trained_vae(family: str) -> None:
    """A trained VAE's posterior is narrow (a training latent, a posterior sample, is its mean) and its latents,
    scaled as the pipeline scales them, have about the starting noise's unit std. A random VAE has neither: its
    posterior std is about 1 and its scaled latents were 0.3-40 % of the noise's energy."""
    import torch
    from diffusers import DiffusionPipeline

    from runner.models.tiny import ensure_tiny

    vae = DiffusionPipeline.from_pretrained(str(ensure_tiny(family))).vae
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x.unsqueeze(2) if family == "qwenimage" else x).latent_dist
    drawn = post.sample(torch.Generator().manual_seed(1))
    assert float(post.std.max()) < 0.01, family
    assert float((drawn - post.mean).pow(2).mean() / post.mean.pow(2).mean()) < 1e-3, family
    cfg = vae.config
    scale = getattr(cfg, "scaling_factor", None) or 1.0  # Qwen-Image's latents_std and Flux.2's batch norm: 1
    assert 0.5 < float(post.mean.std()) * scale < 2.0, (family, float(post.mean.std()) * scale)
