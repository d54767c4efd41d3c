"""LyCORIS / DoRA deltas against independent computations, and `detect` on every file kind (no pipeline runs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from runner.common.errors import ConfigError
from runner.lora.detect import detect, detect_state, parse_modules, training_summary
from runner.lora.lycoris import DoraDelta, LoraDelta, dora_per_output, module_delta


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 20)
        self.conv = nn.Conv2d(8, 6, 3)


def _ours(layer, adapter: str, prefix: str, alpha: float) -> torch.Tensor:
    """Our Delta of a peft LyCORIS layer, built only from the tensors it would write to a file."""
    state = {f"lora_unet_x.{name}": p[adapter].detach().clone() for name in (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if adapter in (p := getattr(layer, name, {}))}
    state["lora_unet_x.alpha"] = torch.tensor(alpha)
    info = detect_state(state)
    mod = info.modules["lora_unet_x"]
    assert info.problem() is None and mod.kind == prefix
    tensors = {k.split(".", 1)[1].removeprefix(prefix[:4] + "_").removeprefix("hada_"): v for k, v in state.items()}
    base = layer.get_base_layer().weight
    return module_delta(mod, tensors, tuple(base.shape))(base)


@pytest.mark.parametrize("effective_conv", [False, True])
def test_loha_delta_equals_peft_loha(effective_conv: bool) -> None:
    from peft import LoHaConfig, inject_adapter_in_model

    cfg = LoHaConfig(r=3, alpha=2.0, target_modules=["lin", "conv"], init_weights=False,
                     use_effective_conv2d=effective_conv)
    net = inject_adapter_in_model(cfg, Net())
    for layer in (net.lin, net.conv):
        ref = layer.get_delta_weight("default")
        assert ref.abs().max() > 0
        torch.testing.assert_close(_ours(layer, "default", "loha", 2.0), ref, rtol=1e-5, atol=1e-6)
    assert ("default" in net.conv.hada_t1) == effective_conv  # the Tucker form was exercised


@pytest.mark.parametrize(("decompose_both", "effective_conv"), [(False, False), (True, True)])
def test_lokr_delta_equals_peft_lokr(decompose_both: bool, effective_conv: bool) -> None:
    from peft import LoKrConfig, inject_adapter_in_model

    cfg = LoKrConfig(r=1, alpha=3.0, target_modules=["lin", "conv"], init_weights=False,
                     decompose_both=decompose_both, use_effective_conv2d=effective_conv)
    net = inject_adapter_in_model(cfg, Net())
    for layer in (net.lin, net.conv):
        # peft scales by alpha/r always, LyCORIS only when a factor is low-rank: compare such layers
        assert "default" in layer.lokr_w2_a or "default" in layer.lokr_w1_a
        ref = layer.get_delta_weight("default")
        torch.testing.assert_close(_ours(layer, "default", "lokr", 3.0), ref, rtol=1e-5, atol=1e-6)
    assert ("default" in net.conv.lokr_t2) == effective_conv


def test_lokr_with_two_full_factors_ignores_alpha() -> None:
    """A1111/LyCORIS: alpha/rank applies only to a decomposed factor; two full factors are w1 ⊗ w2 as stored."""
    w1, w2 = torch.randn(4, 3), torch.randn(5, 4)
    state = {"lora_unet_x.lokr_w1": w1, "lora_unet_x.lokr_w2": w2, "lora_unet_x.alpha": torch.tensor(8.0)}
    mod = detect_state(state).modules["lora_unet_x"]
    delta = module_delta(mod, {"w1": w1, "w2": w2}, (20, 12))(torch.zeros(20, 12))
    torch.testing.assert_close(delta, torch.kron(w1, w2))


@pytest.mark.parametrize("tucker", [False, True])
def test_locon_delta_equals_the_convolutions_it_stands_for(tucker: bool) -> None:
    """A LoCon module is down (k×k) -> [mid (k×k)] -> up (1×1) convolutions: the merged kernel does the same."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 9, 9, generator=g)
    base = torch.zeros(6, 8, 3, 3)
    up = torch.randn(6, 4, 1, 1, generator=g)
    if tucker:
        down, mid = torch.randn(4, 8, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g)
        chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid), up)
    else:
        down, mid = torch.randn(4, 8, 3, 3, generator=g), None
        chain = F.conv2d(F.conv2d(x, down), up)
    merged = LoraDelta(up, down, mid, scale=0.5)(base)
    torch.testing.assert_close(F.conv2d(x, merged), 0.5 * chain, rtol=1e-4, atol=1e-4)


def test_dora_per_output_equals_peft_dora_merge() -> None:
    """peft's DoRA merge (magnitude per output row) = base + our decomposed change at multiplier 1."""
    from peft import LoraConfig, inject_adapter_in_model

    net = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["lin"], use_dora=True,
                                             init_lora_weights=False), Net())
    layer = net.lin
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    base = layer.get_base_layer().weight.detach().clone()
    inner = LoraDelta(layer.lora_B["default"].weight, layer.lora_A["default"].weight, None, 2 / 4)
    magnitude = layer.lora_magnitude_vector["default"].weight.detach()
    assert dora_per_output(tuple(magnitude.shape), tuple(base.shape), peft=True)
    ours = base + DoraDelta(inner, magnitude, per_output=True)(base)
    layer.merge(adapter_names=["default"])
    torch.testing.assert_close(ours, layer.get_base_layer().weight, rtol=1e-5, atol=1e-6)


def test_dora_per_input_is_a1111s_decomposition() -> None:
    """A1111 `apply_weight_decompose`: merged * (dora_scale / column norm of merged) - base, column = input."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 5, generator=g)
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    scale = torch.rand(1, 5, generator=g) + 0.5
    assert not dora_per_output((1, 5), (6, 5), peft=False) and dora_per_output((6, 1), (6, 5), peft=False)
    merged = base + 0.25 * up @ down
    expected = merged * (scale / merged.norm(dim=0, keepdim=True)) - base
    got = DoraDelta(LoraDelta(up, down, None, 0.25), scale, per_output=False)(base)
    torch.testing.assert_close(got, expected)
    # the decomposed change restores the magnitudes: every input column of base + delta has norm dora_scale
    torch.testing.assert_close((base + got).norm(dim=0), scale.reshape(-1))


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_detect_names_each_kind() -> None:
    lin = {"lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32)}
    cases = {
        "kohya LoRA": {".lora_down.weight": (4, 32), ".lora_up.weight": (32, 4), ".alpha": ()},
        "kohya LoCon": {".lora_down.weight": (4, 32, 3, 3), ".lora_up.weight": (32, 4, 1, 1)},
        "kohya LoCon (Tucker)": {".lora_down.weight": (4, 32, 1, 1), ".lora_mid.weight": (4, 4, 3, 3),
                                 ".lora_up.weight": (32, 4, 1, 1)},
        "LyCORIS LoHa": {".hada_w1_a": (32, 4), ".hada_w1_b": (4, 32), ".hada_w2_a": (32, 4),
                         ".hada_w2_b": (4, 32)},
        "LyCORIS LoKr": {".lokr_w1": (4, 4), ".lokr_w2_a": (8, 2), ".lokr_w2_b": (2, 8)},
        "LyCORIS full (diff)": {".diff": (32, 32)},
        "kohya LoRA + DoRA": {".lora_down.weight": (4, 32), ".lora_up.weight": (32, 4), ".dora_scale": (1, 32)},
    }
    (module, _), = lin.items()
    for label, parts in cases.items():
        info = detect({module + k: v for k, v in parts.items()}, {module + ".alpha": 2.0})
        assert info.format == label, (label, info.format)
        assert info.problem() is None
        assert info.needs_merge == any(t in label for t in ("LoHa", "LoKr", "full", "Tucker", "DoRA"))
    diffusers = detect({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 32),
                        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (32, 4)})
    assert diffusers.format == "diffusers LoRA" and not diffusers.needs_merge
    mixed = detect({**{"lora_unet_a_b.hada_" + p: s for p, s in (("w1_a", (8, 2)), ("w1_b", (2, 8)),
                                                                   ("w2_a", (8, 2)), ("w2_b", (2, 8)))},
                    "lora_unet_c_d.lora_down.weight": (4, 8), "lora_unet_c_d.lora_up.weight": (8, 4)})
    assert mixed.format in ("LyCORIS LoHa + LoRA", "LyCORIS LoRA + LoHa") and mixed.ranks == [2, 4]


@pytest.mark.parametrize(("parts", "message"), [
    ({"hada_w1_a": (8, 2), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}, "has hada_w1_a, hada_w2_a, hada_w2_b but "
     "no hada_w1_b"),
    ({"hada_w1_a": (8, 2), "hada_w1_b": (3, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)},
     r"mismatched ranks: hada_w1_a \[8, 2\], hada_w1_b \[3, 8\]"),
    ({"lora_up.weight": (8, 4)}, "has lora_up but no lora_down"),
    ({"lora_up.weight": (8, 4), "lora_down.weight": (2, 8)}, r"mismatched ranks: lora_up is \[8, 4\] but "
     r"lora_down is \[2, 8\]"),
    ({"lokr_w1": (2, 2), "lokr_w2_a": (4, 2)}, "has lokr_w2_a but not lokr_w2 or both"),
    ({"oft_blocks": (4, 2, 2)}, r"is OFT/BOFT \(oft_blocks\), a LyCORIS type this runner does not apply"),
    ({"a1.weight": (4, 8), "a2.weight": (8, 4), "b1.weight": (4, 8), "b2.weight": (8, 4)}, "is GLoRA"),
    ({"on_input": (), "weight": (8,)}, r"is \(IA\)³"),
])
def test_structural_problems_are_one_line(parts: dict, message: str) -> None:
    import re

    info = detect({f"lora_unet_x.{k}": v for k, v in parts.items()})
    assert info.is_adapter
    why = info.problem()
    assert why is not None and re.search(message, why), why
    assert why.startswith("module lora_unet_x ") and "\n" not in why


def test_a_model_checkpoint_is_no_adapter() -> None:
    info = detect({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                   "model.diffusion_model.input_blocks.0.0.bias": (320,),
                   "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)})
    assert not info.is_adapter and info.problem() == "no LoRA weights in it" and len(info.unmatched) == 3


def _sd_lora(prefix: str, names: list[str], ctx: int, te: dict[str, int]) -> dict:
    shapes = {}
    for n in names:
        width = ctx if "attn2_to_k" in n or "attn2_to_v" in n else 320
        shapes[f"lora_unet_{n}.lora_down.weight"] = (4, width)
        shapes[f"lora_unet_{n}.lora_up.weight"] = (320, 4)
    for p, width in te.items():
        shapes[f"{p}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = (4, width)
        shapes[f"{p}text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = (width, 4)
    return shapes


@pytest.mark.parametrize(("shapes", "family"), [
    (_sd_lora("", ["down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"], 768, {"lora_te_": 768}), "sd15"),
    (_sd_lora("", ["down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"], 1024, {"lora_te_": 1024}),
     "sd2"),
    (_sd_lora("", ["input_blocks_4_1_transformer_blocks_0_attn2_to_k"], 2048,
              {"lora_te1_": 768, "lora_te2_": 1280}), "sdxl"),
    (_sd_lora("", ["input_blocks_7_1_transformer_blocks_3_attn1_to_q"], 0, {}), "sdxl"),  # depth > 1
    (_sd_lora("", ["down_blocks_0_attentions_1_proj_in"], 0, {"lora_te_": 768}), "sd15"),  # no cross-attention
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 4),
      "lora_unet_single_blocks_0_linear1.lora_down.weight": (4, 3072),
      "lora_unet_single_blocks_0_linear1.lora_up.weight": (21504, 4)}, "flux1"),
    ({"diffusion_model.single_blocks.0.linear1.lokr_w1": (9, 1),
      "diffusion_model.single_blocks.0.linear1.lokr_w2": (3072, 3072)}, "flux2"),  # 9x its input: Flux.2
    ({"double_blocks.0.processor.proj_lora1.down.weight": (16, 3072),
      "double_blocks.0.processor.proj_lora1.up.weight": (3072, 16)}, "flux1"),  # XLabs
    ({"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": (4, 3072),
      "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight": (27648, 4)}, "flux2"),
    ({"lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_down.weight": (4, 3072),
      "lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_up.weight": (12288, 4)}, "qwenimage"),
    ({"diffusion_model.layers.0.attention.to_q.lora_A.weight": (4, 3840),
      "diffusion_model.layers.0.attention.to_q.lora_B.weight": (3840, 4)}, "zimage"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": (4, 1536),
      "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": (4608, 4)}, "sd3"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 1536),
      "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (1536, 4)}, "sd3"),  # width 1536: SD3
])
def test_detect_family(shapes: dict, family: str) -> None:
    info = detect(shapes)
    assert info.family == family, (info.family, info.family_candidates)


def test_ambiguous_dit_keys_give_candidates() -> None:
    info = detect({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4)})
    assert info.family is None and set(info.family_candidates) == {"flux1", "qwenimage", "flux2"}
    assert "Flux.1 or" in info.family_name()


def test_training_metadata_summary() -> None:
    meta = {"ss_sd_model_name": "v1-5-pruned.safetensors", "ss_resolution": "(512, 512)", "ss_num_epochs": "10",
            "ss_steps": "1500", "ss_tag_frequency": '{"10_sks": {"sks dog": 40, "grass": 3}, "5_x": {"grass": 2, '
            '"sks dog": 5, "collar": 9}}'}
    out = training_summary(meta, top=2)
    assert out["base model"] == "v1-5-pruned.safetensors" and out["epochs"] == "10" and out["steps"] == "1500"
    assert out["top tags"] == ["sks dog", "collar"]
    assert training_summary({"ss_tag_frequency": "not json"}) == {}


def test_alpha_and_rank_scale_like_a1111() -> None:
    state = {"lora_unet_x.lora_down.weight": torch.ones(4, 3), "lora_unet_x.lora_up.weight": torch.ones(2, 4),
             "lora_unet_x.alpha": torch.tensor(2.0)}
    mod, = parse_modules(_shapes(state), {"lora_unet_x.alpha": 2.0})[0].values()
    delta = module_delta(mod, {"up": state["lora_unet_x.lora_up.weight"],
                               "down": state["lora_unet_x.lora_down.weight"]}, (2, 3))(torch.zeros(2, 3))
    assert math.isclose(float(delta[0, 0]), 4 * 2.0 / 4)  # rank 4, alpha 2: x0.5
    no_alpha, = parse_modules(_shapes(state))[0].values()
    assert no_alpha.alpha is None  # A1111: no alpha -> scale 1


# LBW's own tables and default presets (hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py)
LBW_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
          *(f"OUT{i:02d}" for i in range(3, 12))]
LBW_26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
LBW_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
LBW_20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
LBW_PRESETS = """NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""


class _Pipe:
    def __init__(self, unet) -> None:
        self.unet = unet


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_block_tables_are_lbws_for_sd15_and_sdxl() -> None:
    from test_single_file import SD15_UNET, SDXL_UNET

    from runner.lora.blocks import model_blocks

    sd15 = model_blocks(_Pipe(_meta_unet(SD15_UNET)))
    assert list(sd15.short) == LBW_17 and list(sd15.full) == LBW_26
    for line in LBW_PRESETS.splitlines():
        name, values = line.split(":")
        weights = sd15.weights(name, "blocks")
        assert [weights[b] for b in LBW_17] == [float(v) for v in values.split(",")], name
    sdxl = model_blocks(_Pipe(_meta_unet(SDXL_UNET)))
    assert list(sdxl.short) == LBW_12 and list(sdxl.full) == LBW_20
    assert [k for k, v in sdxl.weights("INS", "b").items() if v] == ["BASE", *(f"IN{i:02d}" for i in range(6))]
    assert [k for k, v in sdxl.weights("OUTS", "b").items() if v] == ["BASE", *(f"OUT{i:02d}" for i in range(3, 9))]
    # module paths land in LDM blocks
    assert sdxl.block_of("unet.down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q") == "IN05"
    assert sdxl.block_of("unet.up_blocks.0.attentions.2.proj_out") == "OUT02"
    assert sdxl.block_of("unet.mid_block.resnets.1.conv1") == "M00"
    assert sdxl.block_of("text_encoder_2.encoder.layers.3.mlp.fc1") == "BASE"
    assert sdxl.block_of("unet.time_embedding.linear_1") is None and sdxl.block_of("unet.conv_in") == "IN00"


def test_block_specs_bad_input_is_one_line() -> None:
    from test_single_file import SD15_UNET

    from runner.config.blocks import parse_spec
    from runner.lora.blocks import model_blocks

    assert parse_spec("b", "outs") == "OUTS" and parse_spec("b", "1, 0,0.5") == (1.0, 0.0, 0.5)
    assert parse_spec("b", [1, 0]) == (1.0, 0.0) and parse_spec("b", None) is None
    with pytest.raises(ConfigError, match=r"b='OUTSS' is not a block-weight preset \(did you mean 'OUTS'\?\)"):
        parse_spec("b", "OUTSS")
    with pytest.raises(ConfigError, match=r"b\[1\]='R' is not a number"):
        parse_spec("b", "1,R,0")
    table = model_blocks(_Pipe(_meta_unet(SD15_UNET)))
    with pytest.raises(ConfigError, match=r"b has 12 block weights; this model takes 17 or 26 \(BASE, IN01, "):
        table.weights(tuple([1.0] * 12), "b")
    assert table.function("ALL", "b") is None and table.function((1.0,) * 26, "b") is None
    ins = table.function("INS", "b")
    assert ins("unet.down_blocks.0.attentions.0.proj_in") == 1.0 and ins("unet.up_blocks.3.resnets.0.conv1") == 0
    assert ins("unet.conv_out") == 1.0  # outside every block: kept, as the extension does
    short = table.function(tuple([1.0] * 17), "b")  # a short list leaves conv-only blocks at 0 (the extension)
    assert short("unet.down_blocks.0.downsamplers.0.conv") == 0.0 and short("unet.mid_block.attentions.0.proj_in") == 1


class _FluxPipe:
    """A pipeline stand-in holding a full-size Flux.1 transformer on the meta device (shapes only)."""

    def __init__(self) -> None:
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            self.transformer = FluxTransformer2DModel(guidance_embeds=True)


def _kohya_flux_lora(g: torch.Generator) -> dict:
    state = {}
    for name, (out, inp) in {"double_blocks_0_img_attn_qkv": (9216, 3072), "double_blocks_1_txt_attn_qkv": (9216, 3072),
                             "single_blocks_3_linear1": (21504, 3072), "double_blocks_0_img_mlp_0": (12288, 3072),
                             "single_blocks_0_linear2": (3072, 15360)}.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, inp, generator=g)
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.01
        state[f"lora_unet_{name}.alpha"] = torch.tensor(1.0)
    return state


def test_flux_kohya_names_split_fused_modules_as_diffusers_does() -> None:
    """Flux.1 kohya/BFL modules (fused qkv, linear1) land on diffusers' separate projections with the rows
    diffusers' own converter gives them (`_convert_kohya_flux_lora_to_diffusers`, an independent mapping)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from runner.lora.lycoris import file_deltas

    pipe = _FluxPipe()
    state = _kohya_flux_lora(torch.Generator().manual_seed(0))
    info = detect_state(state)
    assert info.family == "flux1" and info.format == "kohya LoRA"
    ours = file_deltas(pipe, state, info, "flux.safetensors")
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in state.items()})
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in theirs})
    assert sorted(ours) == paths and len(paths) == 3 + 3 + 4 + 1 + 1
    for path in paths:
        shape = tuple(pipe.transformer.get_submodule(path.partition(".")[2]).weight.shape)
        expected = theirs[f"{path}.lora_B.weight"] @ theirs[f"{path}.lora_A.weight"]
        torch.testing.assert_close(ours[path](torch.zeros(shape)), expected, rtol=1e-4, atol=1e-6)


def test_flux_lokr_on_a_fused_qkv_is_the_kronecker_product_split_by_rows() -> None:
    from runner.lora.lycoris import file_deltas

    w1, w2 = torch.randn(3, 1), torch.randn(3072, 3072) * 0.01
    state = {"lora_unet_double_blocks_2_img_attn_qkv.lokr_w1": w1,
             "lora_unet_double_blocks_2_img_attn_qkv.lokr_w2": w2}
    info = detect_state(state)
    assert info.family == "flux1" and info.needs_merge
    deltas = file_deltas(_FluxPipe(), state, info, "lokr.safetensors")
    full = torch.kron(w1, w2)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        got = deltas[f"transformer.transformer_blocks.2.attn.{name}"](torch.zeros(3072, 3072))
        torch.testing.assert_close(got, full[i * 3072:(i + 1) * 3072])
    lokr_z = detect({"diffusion_model.layers.0.attention.to_q.lokr_w1": (4, 4),
                     "diffusion_model.layers.0.attention.to_q.lokr_w2": (960, 960)})
    assert lokr_z.family == "zimage" and not lokr_z.needs_merge  # diffusers loads Z-Image LoKr itself


def test_flux_block_table_is_lbws_61() -> None:
    from runner.lora.blocks import model_blocks

    pipe = _FluxPipe()
    table = model_blocks(pipe)
    assert len(table.short) == len(table.full) == 61 and table.short[:4] == ("CLIP", "T5", "IN", "D00")
    assert table.short[-2:] == ("S37", "OUT")
    assert table.block_of("transformer.transformer_blocks.18.attn.to_q") == "D18"
    assert table.block_of("transformer.single_transformer_blocks.7.proj_mlp") == "S07"
    assert table.block_of("transformer.x_embedder") == "IN" and table.block_of("transformer.proj_out") == "OUT"
    assert table.block_of("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") == "T5"
    with pytest.raises(ConfigError, match="'INS' is a preset for SD UNets; for this model use ALL, NONE, ALL0.5 or "
                                          "a list of 61 weights"):
        table.weights("INS", "blocks")
    only_double = table.function(tuple([1.0] * 22 + [0.0] * 39), "blocks")
    assert only_double("transformer.transformer_blocks.3.ff.net.2") == 1.0
    assert only_double("transformer.single_transformer_blocks.3.proj_out") == 0.0


def test_from_image_keeps_each_adapters_block_weights() -> None:
    from runner.reproduce.from_image import record_config

    rec = {"prompt": "p", "seed": 1, "steps": 2, "guidance_scale": 7.0, "width": 32, "height": 32,
           "scheduler": None, "lora_scale": 1.0, "device": "cpu", "batch_invariant": True,
           "model": {"kind": "builtin", "id": "builtin:tiny"},
           "loras": [{"name": "a", "source": "a.safetensors", "weight_name": None, "scale": 1.0, "sha256": "0" * 64,
                      "blocks": "INS"},
                     {"name": "b", "source": "b.safetensors", "weight_name": None, "scale": 0.5, "sha256": "1" * 64,
                      "blocks": "1,0,0.5,0,0"},
                     {"name": "c", "source": "c.safetensors", "weight_name": None, "scale": 1.0, "sha256": "2" * 64}]}
    sets = record_config(rec)["lora_sets"]
    assert [lo.get("blocks") for lo in sets[0]] == ["INS", "1,0,0.5,0,0", None]
