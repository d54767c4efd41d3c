"""The LoRA files people have, end to end on the tiny model: LyCORIS LoHa/LoKr/LoCon, DoRA, mixed sets, block
weights, the checkpoint/epoch axis, AutoV3 hashes, lora_dirs, and their bad input."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import live_tensors, run_cli, run_program
from lora_zoo import lycoris_state, write
from omegaconf import OmegaConf
from PIL import Image

from runner.config import ConfigError, LoraSpec, ModelConfig, RunConfig
from runner.lora.adapters import AdapterManager
from runner.lora.files import resolve_lora
from runner.models import loading
from runner.outputs.grid import read_grid_info
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.run import run

KINDS = ("loha", "loha_tucker", "lokr", "lokr_full", "locon", "locon_tucker", "full", "dora")


def cfg(tiny_dir: Path, **kw):
    base = {"model": {"id": str(tiny_dir)}, "prompts": ["a red cat"], "seeds": [1], "steps": 2, "width": 32,
            "height": 32, "device": "cpu", "batch_size": 4}
    return OmegaConf.merge(OmegaConf.structured(RunConfig), base, kw)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def by(result, out: Path, *keys: str) -> dict:
    return {tuple(e[k] for k in keys): pixels(out / e["file"]) for e in result.entries}


def pipe_of(tiny_dir: Path):
    return loading.load_model(ModelConfig(id=str(tiny_dir)), "cpu").pipe


def manager(tiny_dir: Path) -> AdapterManager:
    loaded = loading.load_model(ModelConfig(id=str(tiny_dir)), "cpu")
    if loaded.adapters is None:
        loaded.adapters = AdapterManager(loaded.pipe)
    return loaded.adapters


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Path]:
    """One file per kind for the tiny SD model (kohya module names, LyCORIS tensor names)."""
    d = tmp_path_factory.mktemp("zoo")
    pipe = pipe_of(tiny_dir)
    files = {kind: write(lycoris_state(pipe, kind), d / f"{kind}.safetensors") for kind in KINDS if kind != "dora"}
    files["dora"] = write(lycoris_state(pipe, "lora", dora=True), d / "dora.safetensors")
    files["lora"] = write(lycoris_state(pipe, "lora", seed=3), d / "lora.safetensors",
                          metadata={"ss_network_module": "networks.lora", "ss_num_epochs": "4",
                                    "ss_tag_frequency": '{"5_cat": {"sks cat": 12, "red": 3}}'})
    return files


@pytest.fixture(scope="module")
def every_kind(zoo: dict, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("kinds") / "run"
    sets = [[]] + [[{"source": str(zoo[k]), "name": k}] for k in KINDS]
    result = run(cfg(tiny_dir, lora_sets=sets, lora_scales=[0.0, 1.0], grid={"enabled": False}), out,
                 progress=False)
    return result, out


def test_each_kind_loads_changes_the_output_and_scale_zero_is_the_baseline(every_kind, tiny_dir: Path) -> None:
    result, out = every_kind
    images = by(result, out, "lora_set", "lora_scale")
    base = images[(0, None)]
    for i, kind in enumerate(KINDS, 1):
        assert np.array_equal(images[(i, 0.0)], base), f"{kind}: scale 0 is not the baseline"
        assert np.abs(images[(i, 1.0)] - base).max() > 10, f"{kind}: the file does not change the image"
    mgr = manager(tiny_dir)
    assert mgr.loads >= len(KINDS) and {r.adapter for r in mgr.loaded.values()} >= mgr.merge_only
    rec, _ = read_png_record(str(out / result.entries[-1]["file"]))
    assert rec["loras"][0]["autov3"] and rec["loras"][0]["name"] == KINDS[-1]


@pytest.mark.slow
def test_a_lycoris_image_is_the_same_alone_in_a_fresh_process(every_kind, zoo: dict, tiny_dir: Path,
                                                               tmp_path: Path) -> None:
    """Differential: the LoHa image of the sweep, generated alone by `t2i` in a new process, byte for byte."""
    result, out = every_kind
    entry = next(e for e in result.entries if e["loras"] and e["loras"][0]["name"] == "loha" and e["lora_scale"])
    proc = run_cli(f"model.id={tiny_dir}", "prompts=[a red cat]", "seeds=[1]", "steps=2", "width=32", "height=32",
                   "device=cpu", f"lora_sets=[[{{source: '{zoo['loha']}', name: loha}}]]", "grid.enabled=false",
                   f"hydra.run.dir={tmp_path / 'alone'}", cwd=tmp_path, isolated=True)
    assert proc.returncode == 0, proc.stderr
    alone = next((tmp_path / "alone").glob("*.png"))
    assert np.array_equal(pixels(alone), pixels(out / entry["file"]))


@pytest.mark.slow
def test_mixed_set_of_a_lora_and_a_loha(zoo: dict, tiny_dir: Path, tmp_path: Path) -> None:
    lora, loha = {"source": str(zoo["lora"]), "name": "k"}, {"source": str(zoo["loha"]), "name": "h"}
    sets = [[lora], [loha], [lora, loha], [{**lora, "scale": 1.0}, {**loha, "scale": 0.0}],
            [{**lora, "scale": 0.0}, {**loha, "scale": 1.0}]]
    result = run(cfg(tiny_dir, lora_sets=sets, grid={"enabled": False}), tmp_path / "r", progress=False)
    img = {e["lora_set"]: pixels(tmp_path / "r" / e["file"]) for e in result.entries}
    assert np.abs(img[2] - img[0]).max() > 10 and np.abs(img[2] - img[1]).max() > 10  # both act together
    assert np.array_equal(img[3], img[0]) and np.array_equal(img[4], img[1])  # a weight-0 member adds nothing


@pytest.mark.slow
def test_hundred_switches_keep_memory_flat(zoo: dict, tiny_dir: Path) -> None:
    mgr = manager(tiny_dir)
    mgr.max_loaded = 8
    pipe = pipe_of(tiny_dir)
    r = {k: resolve_lora(LoraSpec(str(zoo[k]))) for k in ("lora", "loha", "lokr", "dora", "locon")}
    sets = [((r["loha"],), (1.0,)), ((r["lora"], r["loha"]), (1.0, 0.5)), ((r["lokr"],), (0.7,)), ((), ()),
            ((r["dora"], r["locon"]), (1.0, 1.0)), ((r["loha"],), (0.0,))]
    for loras, weights in sets:
        mgr.activate(loras, weights)

    def tensors() -> int:
        params = sum(p.numel() for c in (pipe.unet, pipe.text_encoder) for p in c.parameters())
        return params + sum(t.numel() for t in mgr.engine._pristine.values())

    before, live, loads = tensors(), live_tensors(), mgr.loads
    for i in range(100):
        mgr.activate(*sets[i % len(sets)])
    assert tensors() == before and mgr.loads == loads  # no copies, no reloads
    assert live_tensors() == live  # not one tensor (a LoRA's copy, a merged delta) more than before the switches
    mgr.activate((), ())
    mgr.engine.apply([])


@pytest.mark.slow
def test_block_presets_change_the_output_and_all_is_the_plain_lora(zoo: dict, tiny_dir: Path,
                                                                   tmp_path: Path) -> None:
    sets = [[], [{"source": str(zoo["lora"]), "name": "k"}], [{"source": str(zoo["loha"]), "name": "h"}]]
    plain = run(cfg(tiny_dir, lora_sets=sets, grid={"enabled": False}), tmp_path / "plain", progress=False)
    out = tmp_path / "blocks"
    swept = run(cfg(tiny_dir, lora_sets=sets, lora_blocks=["ALL", "INS", "OUTS", "NONE"],
                    grid={"x": "lora_blocks", "y": "lora_set"}), out, progress=False)
    ref = {e["lora_set"]: pixels(tmp_path / "plain" / e["file"]) for e in plain.entries}
    img = by(swept, out, "lora_set", "lora_blocks")
    for s in (1, 2):
        assert np.array_equal(img[(s, "ALL")], ref[s])  # exactly the plain LoRA
        assert not np.array_equal(img[(s, "INS")], ref[s]) and not np.array_equal(img[(s, "OUTS")], ref[s])
        assert not np.array_equal(img[(s, "INS")], img[(s, "OUTS")])
    assert np.array_equal(img[(1, "NONE")], ref[0])  # every block at 0: the base model (attention-only LoRA)
    assert len([e for e in swept.entries if not e["loras"]]) == 1  # the no-LoRA set once, whatever the blocks
    info = read_grid_info(out / "grids" / "grid.png")
    assert info["x_labels"] == ["lora_blocks: -", "lora_blocks: ALL", "lora_blocks: INS", "lora_blocks: OUTS",
                                "lora_blocks: NONE"]  # "-": the no-LoRA row has no blocks
    rec, _ = read_png_record(str(out / next(e["file"] for e in swept.entries if e.get("lora_blocks") == "INS")))
    assert rec["lora_blocks"] == "INS" and rec["loras"][0]["blocks"] == "INS"


@pytest.mark.slow
def test_per_adapter_blocks_and_a1111_lists(zoo: dict, tiny_dir: Path, tmp_path: Path) -> None:
    """`blocks` on one adapter: a short list names the blocks with attention (tiny UNet: BASE, IN03, M00, OUT00,
    OUT01) and gives the others 0, as the extension does; a full list names all ten (BASE, IN00…IN03, M00,
    OUT00…OUT03)."""
    lora = {"source": str(zoo["lora"]), "name": "k"}
    sets = [[{**lora, "blocks": "INS"}], [{**lora, "blocks": "1,1,0,0,0"}], [{**lora, "blocks": [1] * 10}],
            [lora], [{**lora, "blocks": [1, 1, 1, 1, 1]}], [{**lora, "blocks": [1, 0, 0, 0, 1, 1, 1, 1, 0, 0]}]]
    result = run(cfg(tiny_dir, lora_sets=sets, grid={"enabled": False}), tmp_path / "r", progress=False)
    img = {e["lora_set"]: pixels(tmp_path / "r" / e["file"]) for e in result.entries}
    assert np.array_equal(img[0], img[1])  # INS on the tiny UNet = BASE + IN03 (its only attention input block)
    assert np.array_equal(img[2], img[3]) and not np.array_equal(img[0], img[3])  # every block at 1: the plain LoRA
    assert np.array_equal(img[4], img[5])  # the short list = the full list with 0 for the blocks it leaves out


def _write_epochs(zoo_dir: Path, tiny_dir: Path) -> Path:
    d = zoo_dir / "epochs"
    d.mkdir()
    pipe = pipe_of(tiny_dir)
    for i, epoch in enumerate((10, 2, 1)):
        write(lycoris_state(pipe, "loha", seed=20 + i), d / f"tiny-e{epoch}.safetensors")
    (d / "notes.txt").write_text("not a checkpoint")
    return d


@pytest.mark.slow
def test_checkpoint_glob_makes_one_grid_column_per_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    epochs = _write_epochs(tmp_path, tiny_dir)
    out = tmp_path / "r"
    result = run(cfg(tiny_dir, seeds=[1, 2], lora_sets=[[], [{"source": str(epochs / "*.safetensors")}]],
                     grid={"x": "lora_set", "y": "seed"}), out, progress=False)
    assert result.generated == 2 * 4
    info = read_grid_info(out / "grids" / "grid.png")
    assert info["x_values"] == ["nolora", "tiny-e1", "tiny-e2", "tiny-e10"]  # natural order, labelled by stem
    files = {e["loras"][0]["file"] for e in result.entries if e["loras"]}
    assert files == {str(epochs / f"tiny-e{n}.safetensors") for n in (1, 2, 10)}
    folder = run(cfg(tiny_dir, lora_sets=[[{"source": str(epochs)}]], grid={"enabled": False}), tmp_path / "f",
                 progress=False)  # a folder of checkpoints: the same sets
    assert [e["loras"][0]["name"] for e in folder.entries] == ["tiny-e1", "tiny-e2", "tiny-e10"]


def _autov3(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_infotext_lora_hashes_are_autov3_and_model_hash_autov2(zoo: dict, tiny_dir: Path, tmp_path: Path) -> None:
    res = run(cfg(tiny_dir, lora_sets=[[{"source": str(zoo["loha"]), "name": "h"}]], grid={"enabled": False}),
              tmp_path / "r", progress=False)
    rec, text = read_png_record(str(tmp_path / "r" / res.entries[0]["file"]))
    parsed = parse_infotext(text)
    assert parsed["Lora hashes"] == {"h": _autov3(zoo["loha"])}
    assert rec["loras"][0]["sha256"] == hashlib.sha256(zoo["loha"].read_bytes()).hexdigest()
    assert parsed["Model hash"] == rec["model"]["hash"][:10]


def test_from_image_finds_a1111_loras_in_lora_dirs_by_either_hash(zoo: dict, tiny_dir: Path, tmp_path: Path) -> None:
    """An A1111 image names its LoRAs only by name and hash: lora_dirs supplies the files."""
    from PIL.PngImagePlugin import PngInfo

    from runner.reproduce.from_image import foreign_loras

    lib = tmp_path / "library" / "sub"
    lib.mkdir(parents=True)
    shutil.copy(zoo["loha"], lib / "renamed.safetensors")
    shutil.copy(zoo["lora"], lib / "k.safetensors")
    sha_k = hashlib.sha256(zoo["lora"].read_bytes()).hexdigest()
    rec = {"loras": [{"name": "my_loha", "sha256": _autov3(zoo["loha"]), "scale": 0.8},
                     {"name": "k", "sha256": sha_k[:10], "scale": None}]}
    found = foreign_loras(rec, (str(tmp_path / "library"),))
    assert found == [{"source": str(lib / "renamed.safetensors"), "name": "my_loha", "scale": 0.8},
                     {"source": str(lib / "k.safetensors"), "name": "k", "scale": 1.0}]
    png = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", 'a red cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, '
                  f'Lora hashes: "my_loha: {_autov3(zoo["loha"])}", Version: v1.10.0')
    Image.new("RGB", (32, 32)).save(png, pnginfo=info)
    proc = run_cli(f"from_image={png}", f"model.id={tiny_dir}", "device=cpu", f"lora_dirs=[{tmp_path / 'library'}]",
                   "grid.enabled=false", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    new, _ = read_png_record(str(next((tmp_path / "again").glob("*.png"))))
    assert new["loras"][0]["file"] == str(lib / "renamed.safetensors") and new["loras"][0]["name"] == "my_loha"
    with pytest.raises(ConfigError, match=r"LoRA 'gone' \(hash 0123456789ab\) is not in lora_dirs \(.*library\)"):
        foreign_loras({"loras": [{"name": "gone", "sha256": "0123456789ab", "scale": 1.0}]},
                      (str(tmp_path / "library"),))


# Bad input: one line, exit 2, nothing written.
def _bad(tiny_dir: Path, tmp_path: Path, match: str, **kw) -> None:
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=match):
        run(cfg(tiny_dir, **kw), out, progress=False)
    assert not out.exists()


def _broken(zoo: dict, tmp_path: Path, kind: str, edit) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(zoo[kind]))
    edit(state)
    return write(state, tmp_path / f"broken_{kind}.safetensors")


def test_bad_lycoris_files_are_one_line(zoo: dict, tiny_dir: Path, tmp_path: Path) -> None:
    half = _broken(zoo, tmp_path, "loha", lambda s: s.pop(next(k for k in s if k.endswith("hada_w1_b"))))
    _bad(tiny_dir, tmp_path, r"broken_loha.safetensors cannot be applied: module lora_\w+ has hada_w1_a, hada_w2_a, "
         r"hada_w2_b but no hada_w1_b", lora_sets=[[{"source": str(half)}]])

    def ranks(s: dict) -> None:
        k = next(k for k in s if k.endswith("hada_w2_b"))
        s[k] = torch.cat([s[k], s[k]])
    bad_rank = _broken(zoo, tmp_path, "loha", ranks)
    _bad(tiny_dir, tmp_path, r"cannot be applied: module lora_\w+ has mismatched ranks: hada_w2_a \[\d+, 2\], "
         r"hada_w2_b \[4, \d+\]", lora_sets=[[{"source": str(bad_rank)}]])

    def nan(s: dict) -> None:
        k = next(k for k in s if k.endswith("lokr_w1"))
        s[k][0, 0] = float("nan")
    _bad(tiny_dir, tmp_path, r"broken_lokr.safetensors has NaN or infinite values in lora_\w+\.lokr_w1",
         lora_sets=[[{"source": str(_broken(zoo, tmp_path, "lokr", nan))}]])
    oft = write({"lora_unet_down_blocks_1_attentions_0_proj_in.oft_blocks": torch.zeros(4, 16, 16),
                 "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(1.0)}, tmp_path / "oft.safetensors")
    _bad(tiny_dir, tmp_path, r"oft.safetensors cannot be applied: module \S+ is OFT/BOFT \(oft_blocks\), a LyCORIS "
         "type this runner does not apply", lora_sets=[[{"source": str(oft)}]])
    pickle = tmp_path / "lyco.pt"
    torch.save(lycoris_state(pipe_of(tiny_dir), "loha"), pickle)
    _bad(tiny_dir, tmp_path, r"lyco.pt is a pickle file; convert it to .safetensors or set allow_pickle_lora=true",
         lora_sets=[[{"source": str(pickle)}]])
    res = run(cfg(tiny_dir, lora_sets=[[{"source": str(pickle)}]], allow_pickle_lora=True, grid={"enabled": False}),
              tmp_path / "ok", progress=False)
    assert res.generated == 1


def test_bad_blocks_and_globs_are_one_line(zoo: dict, tiny_dir: Path, tmp_path: Path) -> None:
    lora = {"source": str(zoo["lora"])}
    _bad(tiny_dir, tmp_path, r"lora_blocks\[1\]='OUTZ' is not a block-weight preset \(did you mean 'OUTS'\?\); "
         "valid: ALL, NONE", lora_sets=[[lora]], lora_blocks=["ALL", "OUTZ"])
    _bad(tiny_dir, tmp_path, r"lora_sets\[0\]\[0\].blocks has 17 block weights; this model takes 5 or 10 "
         r"\(BASE, IN03, M00, OUT00, OUT01 / 10: every block\)", lora_sets=[[{**lora, "blocks": [1] * 17}]])
    _bad(tiny_dir, tmp_path, r"LoRA source '.*/nothing/\*.safetensors' matches no weight file",
         lora_sets=[[{"source": str(tmp_path / "nothing" / "*.safetensors")}]])
    proc = run_cli(f"model.id={tiny_dir}", f"lora_sets=[[{{source: '{tmp_path}/nothing/e*.safetensors'}}]]",
                   f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("t2i: error:")] == [
        f"t2i: error: LoRA source '{tmp_path}/nothing/e*.safetensors' matches no weight file (.safetensors); "
        "check the pattern and the folder"]
    assert not (tmp_path / "cli").exists()


def test_a_lora_for_another_family_names_both(tiny_dir: Path, tmp_path: Path) -> None:
    flux = write({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(3, 1),
                  "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.ones(32, 32),
                  "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(4, 32),
                  "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(224, 4)},
                 tmp_path / "flux.safetensors")
    # the family check of models/ (before anything loads) names both families and what to use instead
    _bad(tiny_dir, tmp_path, r"flux.safetensors is a LoRA for Flux, but the model '.*' is Stable Diffusion "
         r"1.x/2.x; use a Stable Diffusion 1.x/2.x LoRA or another model",
         lora_sets=[[{"source": str(flux)}]])
    xl = write({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.ones(32, 2),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_b": torch.ones(2, 32),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_a": torch.ones(32, 2),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_b": torch.ones(2, 32),
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(2, 2048),
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.ones(640, 2)},
               tmp_path / "xl.safetensors")
    _bad(tiny_dir, tmp_path, r"xl.safetensors is a LoRA for Stable Diffusion XL, but the model '.*' is Stable "
         r"Diffusion 1.x/2.x; use a Stable Diffusion 1.x/2.x LoRA or another model",
         lora_sets=[[{"source": str(xl)}]])


def test_inspect_describes_each_file_kind(zoo: dict, tiny_dir: Path, tmp_path: Path, capsys) -> None:
    import json

    from runner.models.single_file import export_single_file
    from runner.reproduce.inspect import main

    labels = {"loha": "LyCORIS LoHa", "loha_tucker": "LyCORIS LoHa", "lokr": "LyCORIS LoKr",
              "lokr_full": "LyCORIS LoKr", "locon": "kohya LoCon", "locon_tucker": "kohya LoCon (Tucker)",
              "full": "LyCORIS full (diff)", "dora": "kohya LoRA + DoRA", "lora": "kohya LoRA"}
    for kind, label in labels.items():
        assert main([str(zoo[kind])]) == 0
        text = capsys.readouterr().out
        sha = hashlib.sha256(zoo[kind].read_bytes()).hexdigest()
        assert f"adapter: {label} (kohya key names)" in text, text
        assert f"AutoV2 {sha[:10]}  AutoV3 {_autov3(zoo[kind])}  sha256 {sha}" in text
        assert re.search(r"layers:\s+\d+ \(text_encoder 8, unet \d+\)", text)
    assert "ranks:           full (no low-rank factor)" in (main([str(zoo["lokr_full"])]), capsys.readouterr().out)[1]
    assert main(["--json", str(zoo["lora"])]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["kind"] == "adapter" and rec["ranks"] == [2] and rec["alphas"] == [1.0] and rec["dora"] is False
    assert rec["components"]["text_encoder"] == 8 and rec["layers"] == sum(rec["components"].values())
    assert rec["training"]["top tags"] == ["sks cat", "red"] and rec["training"]["epochs"] == "4"
    assert main([str(tiny_dir / "loras" / "tiny_style" / "tiny_style.safetensors")]) == 0
    assert "adapter: diffusers LoRA (diffusers key names)" in capsys.readouterr().out
    single = export_single_file(tiny_dir, tmp_path / "tiny.safetensors")
    assert main([str(single)]) == 0
    text = capsys.readouterr().out
    assert "model checkpoint (LDM single file)" in text and "family:          SD 1.x" in text
    torch.save({"x": torch.zeros(1)}, tmp_path / "old.pt")
    assert main([str(tmp_path / "old.pt")]) == 0 and "does not unpickle it" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A tiny SDXL pipeline (two CLIP text encoders, text_time embedding, depth-2 transformer) as a folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from runner.models.tiny import TINY_UNET

    sd = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**sd.text_encoder.config.to_dict(), "projection_dim": 32}))
    unet = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 64, "addition_embed_type": "text_time",
                                   "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 8 * 6 + 32,
                                   "transformer_layers_per_block": (1, 2)})
    pipe = StableDiffusionXLPipeline(vae=sd.vae, text_encoder=sd.text_encoder, text_encoder_2=te2,
                                     tokenizer=sd.tokenizer, tokenizer_2=sd.tokenizer, unet=unet,
                                     scheduler=sd.scheduler)
    d = tmp_path_factory.mktemp("tiny-xl") / "model"
    pipe.save_pretrained(d, safe_serialization=True)
    return d


# Real SDXL base UNet (diffusers' unet/config.json of stable-diffusion-xl-base-1.0, the keys the layout needs) and
# kohya sd-scripts' names for some of its modules as they appear in SDXL LoRA files, written out: the module
# names the zoo's SDXL files get from the runner's mapper (lora_zoo.targets) are pinned to these.
SDXL_UNET = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "mid_block_type": "UNetMidBlock2DCrossAttn"}
KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_5_1_proj_in": "down_blocks.1.attentions.1.proj_in",
    "lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_out_0":
        "down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_out.0",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2":
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    "lora_unet_middle_block_1_transformer_blocks_5_attn2_to_k":
        "mid_block.attentions.0.transformer_blocks.5.attn2.to_k",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v":
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "lora_unet_output_blocks_2_1_proj_out": "up_blocks.0.attentions.2.proj_out",
    "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj":
        "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj",
}


def test_kohya_sdxl_names_are_the_real_ones() -> None:
    """The runner's LDM mapper gives kohya's real SDXL names, and diffusers' own kohya converter (an independent
    reader) puts each name on the module written next to it."""
    from diffusers import StableDiffusionXLPipeline

    from runner.models.single_file import ldm_module_name, unet_rules

    rules = unet_rules(SDXL_UNET)
    for kohya, module in KOHYA_SDXL.items():
        assert "lora_unet_" + ldm_module_name(module, rules).replace(".", "_") == kohya, module
    state = {}
    for kohya in KOHYA_SDXL:
        state |= {f"{kohya}.lora_down.weight": torch.zeros(2, 8), f"{kohya}.lora_up.weight": torch.zeros(8, 2),
                  f"{kohya}.alpha": torch.tensor(2.0)}
    converted = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=OmegaConf.create(SDXL_UNET))
    converted = converted[0] if isinstance(converted, tuple) else converted
    names = set()
    for key in converted:  # "unet.<module>.lora_A.weight", or the attention-processor spelling
        if re.search(r"(lora\.down|lora_A)\.weight$", key):  # ("...attn1.processor.to_q_lora.down.weight")
            module = re.sub(r"[._]lora(_linear_layer)?\.down\.weight$|\.lora_A\.weight$", "", key.split(".", 1)[1])
            names.add(re.sub(r"\.processor\.to_(q|k|v|out)$", lambda m: f".to_{m[1]}" + ".0" * (m[1] == "out"),
                             module))
    assert names == set(KOHYA_SDXL.values()), sorted(names)


@pytest.mark.slow
def test_sdxl_lycoris_with_kohya_sdxl_names(tiny_xl: Path, zoo: dict, tmp_path: Path) -> None:
    """A LoHa + DoRA in kohya's SDXL layout (LDM UNet names, lora_te1_/lora_te2_) on an SDXL pipeline: loads,
    changes the output, scale 0 is the baseline, SDXL block presets apply; an SD LoRA names both models."""
    pipe = loading.load_model(ModelConfig(id=str(tiny_xl)), "cpu").pipe
    state = lycoris_state(pipe, "loha", sdxl=True, dora=True, std=0.5)
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_1_") for k in state)  # depth 2
    assert any(k.startswith("lora_te2_text_model_") for k in state)
    xl = write(state, tmp_path / "xl_loha.safetensors")
    out = tmp_path / "r"
    result = run(cfg(tiny_xl, lora_sets=[[], [{"source": str(xl), "name": "xl"}]], lora_scales=[0.0, 1.0],
                     lora_blocks=["ALL", "INS"], grid={"enabled": False}), out, progress=False)
    img = by(result, out, "lora_set", "lora_scale", "lora_blocks")
    base = img[(0, None, None)]
    assert np.array_equal(img[(1, 0.0, "ALL")], base) and np.array_equal(img[(1, 0.0, "INS")], base)
    assert np.abs(img[(1, 1.0, "ALL")] - base).max() > 10
    assert not np.array_equal(img[(1, 1.0, "INS")], img[(1, 1.0, "ALL")])
    mgr = loading.load_model(ModelConfig(id=str(tiny_xl)), "cpu").adapters
    touched = {p.split(".")[0] for deltas in mgr.engine.adapters.values() for p in deltas}
    assert touched == {"unet", "text_encoder", "text_encoder_2"}
    _bad(tiny_xl, tmp_path, r"loha.safetensors is not a LoRA for this model: it was made for an SD-style UNet "
         r"\(cross-attention width 32\), the loaded model is an SD-style UNet \(StableDiffusionXLPipeline\) with "
         "width 64", lora_sets=[[{"source": str(zoo["loha"])}]])


@pytest.mark.slow
def test_readme_lora_examples_run(tmp_path: Path) -> None:
    """docs/loras.md's LoRA-format, block-weight and epoch-axis commands, as written (files made for the tiny model)."""
    import shlex

    from runner.models.tiny import ensure_tiny

    page = (Path(__file__).resolve().parent.parent / "docs" / "loras.md").read_text()
    section = page[page.index("## LoRA file formats"):page.index("## Hashes")]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
                if line.startswith(("t2i ", "t2i-inspect "))]
    assert len(commands) == 4
    pipe = pipe_of(ensure_tiny())
    write(lycoris_state(pipe, "loha"), tmp_path / "my_loha.safetensors")
    write(lycoris_state(pipe, "lora", seed=5), tmp_path / "my_lora.safetensors")
    for epoch in (1, 2):
        write(lycoris_state(pipe, "lokr", seed=epoch), tmp_path / "runs" / "mylora" / f"e{epoch}.safetensors")
    for i, command in enumerate(commands):
        tool, *args = shlex.split(command)
        extra = [] if tool == "t2i-inspect" else ["device=cpu", "width=32", "height=32", f"hydra.run.dir=run{i}"]
        proc = run_program(tool, *args, *extra, cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        assert tool != "t2i-inspect" or "adapter: LyCORIS LoHa (kohya key names)" in proc.stdout
    assert len(list((tmp_path / "run1").glob("*.png"))) == 3
    assert read_grid_info(tmp_path / "run2" / "grids" / "grid.png")["x_values"] == ["ALL", "INS", "OUTS"]
    assert read_grid_info(tmp_path / "run3" / "grids" / "grid.png")["x_values"] == ["nolora", "e1", "e2"]
