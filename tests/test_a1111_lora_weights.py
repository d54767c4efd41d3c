"""Weights A1111 applies that the runner used to scale wrongly or drop (issue 24, items 1-4), checked on the merged
weights of tiny SD 1.5 and Flux.1 pipelines against A1111's maths (`extensions-builtin/Lora/network_*.py`):

1. a kohya Flux.1 LoRA's CLIP-L modules (`lora_te1_…`) get alpha/rank once (diffusers' converter scales in place);
2. a LyCORIS `full` module's `diff_b` changes the bias (multiplier × diff_b);
3. a kohya Flux.1 LoRA's T5 modules (`lora_te3_…`, as sd-scripts writes them) change the T5 encoder;
4. a module without `.alpha` in a file where others have one has scale 1 (alpha = rank).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runner.common.errors import ConfigError
from runner.common.hashing import file_sha256
from runner.lora.adapters import AdapterManager
from runner.lora.files import ResolvedLora

RANK = 2


def resolved(path: Path) -> ResolvedLora:
    return ResolvedLora(path.stem, str(path), None, str(path), file_sha256(path))


def pair(state: dict, stem: str, module: torch.nn.Module, gen: torch.Generator, alpha: float | None) -> torch.Tensor:
    """kohya LoRA tensors for `module`; returns up @ down (the change at scale 1 before alpha/rank)."""
    w = module.weight
    down, up = torch.randn(RANK, w.shape[1], generator=gen), torch.randn(w.shape[0], RANK, generator=gen)
    state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"] = down, up
    if alpha is not None:
        state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return up @ down


def merged_changes(pipe, file: Path, weight: float, modules: dict[str, torch.nn.Module], bias: bool = False) -> dict:
    """Each module's weight (or bias) change once the file is active at `weight`, through the merge engine (the
    peft path's adapters are multiplied out by it too, at the scale peft would use)."""
    before = {k: (m.bias if bias else m.weight).detach().clone() for k, m in modules.items()}
    manager = AdapterManager(pipe)
    manager.merge = True
    r = resolved(file)
    manager.activate((r,), (weight,))
    out = {}
    for k, m in modules.items():
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        out[k] = (base.bias if bias else base.weight).detach().float() - before[k].float()
    manager.activate((), ())
    manager._forget(r.adapter)
    return out


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory: pytest.TempPathFactory):
    from runner.models.tiny_families import build_flux1

    return build_flux1(tmp_path_factory.mktemp("flux-pipe"))


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory: pytest.TempPathFactory):
    from runner.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("sd-pipe"))


def flux_file(pipe, tmp: Path, te1: bool = True, te3: bool = False, alpha: float = 1.0) -> tuple[Path, dict]:
    """A kohya Flux.1 LoRA (two transformer modules, CLIP-L attention, T5 attention) and each module's change."""
    gen = torch.Generator().manual_seed(0)
    state: dict = {}
    expected: dict = {}
    tr = pipe.transformer
    for stem, m in (("lora_unet_double_blocks_0_img_attn_proj", tr.transformer_blocks[0].attn.to_out[0]),
                    ("lora_unet_single_blocks_0_linear2", tr.single_transformer_blocks[0].proj_out)):
        pair(state, stem, m, gen, alpha)
    if te1:
        attn = pipe.text_encoder.encoder.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            d = pair(state, f"lora_te1_text_model_encoder_layers_0_self_attn_{name}", getattr(attn, name), gen, alpha)
            expected[f"te1.{name}"] = (getattr(attn, name), d * alpha / RANK)
    if te3:
        att = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention
        for name in ("q", "k", "v", "o"):
            d = pair(state, f"lora_te3_encoder_block_0_layer_0_SelfAttention_{name}", getattr(att, name), gen, alpha)
            expected[f"te3.{name}"] = (getattr(att, name), d * alpha / RANK)
    path = tmp / f"flux_kohya_{int(te1)}{int(te3)}.safetensors"
    save_file(state, str(path))
    return path, expected


def test_flux_kohya_clip_l_scaled_once(flux_pipe, tmp_path: Path) -> None:
    """Item 1: alpha/rank = 0.5 applied once (it was 0.25: diffusers scaled the tensors in place, then again)."""
    path, expected = flux_file(flux_pipe, tmp_path, alpha=1.0)
    changes = merged_changes(flux_pipe, path, 1.0, {k: m for k, (m, _) in expected.items()})
    for k, (_, want) in expected.items():
        torch.testing.assert_close(changes[k], want, rtol=1e-4, atol=1e-5, msg=k)


def test_flux_kohya_t5_keys_applied_to_t5(flux_pipe, tmp_path: Path) -> None:
    """Item 3: `lora_te3_` modules change Flux.1's T5 (text_encoder_2) by up @ down × alpha/rank × multiplier."""
    path, expected = flux_file(flux_pipe, tmp_path, te1=True, te3=True, alpha=1.0)
    for w in (0.5, 1.0):
        changes = merged_changes(flux_pipe, path, w, {k: m for k, (m, _) in expected.items()})
        for k, (_, want) in expected.items():
            torch.testing.assert_close(changes[k], want * w, rtol=1e-4, atol=1e-5, msg=f"{k} at {w}")


def test_flux_t5_keys_for_missing_layer_is_one_line(flux_pipe, tmp_path: Path) -> None:
    """A T5 key naming a layer the model lacks is refused naming it (never dropped)."""
    path, _ = flux_file(flux_pipe, tmp_path, te1=False, te3=True)
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["lora_te3_encoder_block_7_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(RANK, 32)
    state["lora_te3_encoder_block_7_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, RANK)
    bad = tmp_path / "bad_t5.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ConfigError, match="lora_te3_encoder_block_7"):
        AdapterManager(flux_pipe).ensure((resolved(bad),))


def test_module_without_alpha_has_scale_one(sd_pipe, tmp_path: Path) -> None:
    """Item 4: A1111/kohya give a module without `.alpha` alpha = rank; diffusers gave it the file's common alpha."""
    gen = torch.Generator().manual_seed(1)
    state: dict = {}
    blocks = sd_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0]
    mods = {"q": blocks.attn1.to_q, "k": blocks.attn1.to_k, "v": blocks.attn1.to_v}
    want = {}
    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_"
    want["q"] = pair(state, prefix + "to_q", mods["q"], gen, 1.0) * (1.0 / RANK)
    want["k"] = pair(state, prefix + "to_k", mods["k"], gen, 1.0) * (1.0 / RANK)
    want["v"] = pair(state, prefix + "to_v", mods["v"], gen, None)  # no alpha: scale 1
    path = tmp_path / "mixed_alpha.safetensors"
    save_file(state, str(path))
    changes = merged_changes(sd_pipe, path, 1.0, mods)
    for k in mods:
        torch.testing.assert_close(changes[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 2.0])
def test_lycoris_full_diff_b_changes_the_bias(sd_pipe, tmp_path: Path, weight: float) -> None:
    """Item 2: `full` with `diff_b`: bias + multiplier × diff_b (A1111 network_full.py, LyCORIS); weight 0 is the
    base bias exactly."""
    gen = torch.Generator().manual_seed(2)
    ff = sd_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[2]
    proj = sd_pipe.unet.down_blocks[1].attentions[0].proj_out
    state, want = {}, {}
    for stem, m, name in (("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", ff, "ff"),
                          ("lora_unet_down_blocks_1_attentions_0_proj_out", proj, "proj")):
        state[f"{stem}.diff"] = torch.randn(m.weight.shape, generator=gen) * 0.1
        state[f"{stem}.diff_b"] = torch.randn(m.bias.shape, generator=gen) * 0.1
        want[name] = state[f"{stem}.diff_b"]
    path = tmp_path / f"full_diff_b_{weight}.safetensors"
    save_file(state, str(path))
    changes = merged_changes(sd_pipe, path, weight, {"ff": ff, "proj": proj}, bias=True)
    for k in want:
        if weight == 0:
            assert torch.equal(changes[k], torch.zeros_like(changes[k]))
        torch.testing.assert_close(changes[k], want[k] * weight, rtol=1e-5, atol=1e-6, msg=k)


def test_diff_b_on_a_layer_without_bias_is_one_line(sd_pipe, tmp_path: Path) -> None:
    q = sd_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "diff_b_no_bias.safetensors"
    save_file({f"{stem}.diff": torch.zeros(q.weight.shape), f"{stem}.diff_b": torch.ones(q.weight.shape[0])},
              str(path))
    with pytest.raises(ConfigError, match=r"diff_b.*has no bias"):
        AdapterManager(sd_pipe).ensure((resolved(path),))


def test_sd1_kohya_lora_in_ldm_names_is_applied(sd_pipe, tmp_path: Path) -> None:
    """SD 1.x kohya files naming UNet modules by their LDM path (`lora_unet_input_blocks_4_1_…`): A1111 applies
    them; diffusers' loader refused them, so the merge engine (which maps LDM names) applies them."""
    from runner.models.single_file import ldm_module_name, unet_rules

    rules = unet_rules(dict(sd_pipe.unet.config))
    gen = torch.Generator().manual_seed(3)
    state: dict = {}
    want: dict = {}
    mods: dict = {}
    for name, m in sd_pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "ff.net.2")):
            stem = "lora_unet_" + ldm_module_name(name, rules).replace(".", "_")
            assert "_blocks_" in stem and not stem.startswith("lora_unet_down_blocks")
            want[name] = pair(state, stem, m, gen, 1.0) * (1.0 / RANK)
            mods[name] = m
    path = tmp_path / "sd1_ldm_names.safetensors"
    save_file(state, str(path))
    changes = merged_changes(sd_pipe, path, 0.5, mods)
    for k in mods:
        torch.testing.assert_close(changes[k], want[k] * 0.5, rtol=1e-4, atol=1e-5, msg=k)
