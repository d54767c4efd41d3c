"""LoRA sets as a sweep axis: pixels, load-once, activation, formats, metadata, file rules, bad input."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import live_tensors, run_cli
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from runner.config import ConfigError, LoraSpec, ModelConfig, RunConfig, validate
from runner.lora.adapters import AdapterManager
from runner.lora.files import resolve_lora
from runner.models import loading as pipeline
from runner.outputs.metadata import parse_infotext, read_png_record
from runner.run import run


def make_cfg(tiny_dir: Path, **kw):
    base = {
        "model": {"id": str(tiny_dir)},
        "prompts": ["a red cat"],
        "seeds": [1],
        "steps": 2,
        "width": 32,
        "height": 32,
        "device": "cpu",
        "batch_size": 2,
    }
    return OmegaConf.merge(OmegaConf.structured(RunConfig), base, kw)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def images(result, out: Path) -> dict[tuple, np.ndarray]:
    """(lora_set, lora_scale, seed) -> uint8 pixels of every image the run wrote."""
    return {(e["lora_set"], e["lora_scale"], e["seed"]): pixels(out / e["file"]) for e in result.entries}


def loaded_model(tiny_dir: Path) -> pipeline.LoadedModel:
    return pipeline.load_model(ModelConfig(id=str(tiny_dir)), "cpu")


def manager(tiny_dir: Path) -> AdapterManager:
    loaded = loaded_model(tiny_dir)
    if loaded.adapters is None:
        loaded.adapters = AdapterManager(loaded.pipe)
    return loaded.adapters


def resolved(spec: dict):
    return resolve_lora(LoraSpec(**spec))


@pytest.fixture(scope="module")
def bad_loras(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Path]:
    """LoRA files that do not fit the tiny model, plus a pickle copy of the example A."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from runner.lora.kohya import to_kohya
    from runner.models.tiny import TINY_UNET

    d = tmp_path_factory.mktemp("bad-loras")
    torch.manual_seed(0)  # the tiny UNet, but with cross_attention_dim 64 (like an SDXL LoRA on SD 1.5)
    unet = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 64})
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(
        d / "other_peft", unet_lora_layers=state, weight_name="o.safetensors"
    )
    save_file(to_kohya(state, None, 4), str(d / "other_kohya.safetensors"))
    a = load_file(str(tiny_dir / "loras" / "tiny_style" / "tiny_style.safetensors"))
    extra = {
        **a,
        "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
        "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4),
    }
    save_file(extra, str(d / "extra_layer.safetensors"))
    k = load_file(str(tiny_dir / "loras" / "tiny_kohya.safetensors"))
    te2 = {
        **k,
        **{key.replace("lora_te_", "lora_te2_"): v.clone() for key, v in k.items() if "lora_te_" in key},
    }
    save_file(te2, str(d / "with_te2.safetensors"))
    (d / "pickle").mkdir()
    torch.save(a, d / "pickle" / "pytorch_lora_weights.bin")
    return {
        "peft": d / "other_peft" / "o.safetensors",
        "kohya": d / "other_kohya.safetensors",
        "extra": d / "extra_layer.safetensors",
        "te2": d / "with_te2.safetensors",
        "bin_dir": d / "pickle",
    }


@pytest.mark.slow
def test_three_sets_two_seeds_load_once(tiny_dir: Path, lora_a: dict, lora_b: dict, tmp_path: Path) -> None:
    mgr = manager(tiny_dir)
    new = {resolved(lora_a).adapter, resolved(lora_b).adapter} - set(mgr.loaded)
    base_loads, adapter_loads = pipeline.LOADS[str(tiny_dir.resolve())], mgr.loads
    out = tmp_path / "run"
    result = run(
        make_cfg(tiny_dir, seeds=[1, 2], lora_sets=[[], [lora_a], [lora_a, lora_b]]), out, progress=False
    )
    assert result.generated == 6 and len(list(out.glob("*.png"))) == 6
    img = images(result, out)
    for seed in (1, 2):
        base, a, ab = img[(0, None, seed)], img[(1, 1.0, seed)], img[(2, 1.0, seed)]
        assert not np.array_equal(base, a) and not np.array_equal(base, ab) and not np.array_equal(a, ab)
    assert img[(0, None, 1)].shape == (32, 32, 3)
    assert mgr.loads - adapter_loads == len(new)  # each adapter file read once, though A is used by two sets
    again = run(
        make_cfg(tiny_dir, seeds=[3], lora_sets=[[lora_b], [lora_a]]), tmp_path / "again", progress=False
    )
    assert again.generated == 2
    assert mgr.loads - adapter_loads == len(new)  # a second run reuses the loaded adapters
    assert pipeline.LOADS[str(tiny_dir.resolve())] - base_loads <= 1  # the base model: at most the first load
    assert loaded_model(tiny_dir).adapters is mgr


def test_scale_zero_is_the_base_model_exactly(
    tiny_dir: Path, lora_a: dict, lora_b: dict, tmp_path: Path
) -> None:
    # Groups run in order (set, scale): [A,B]@0, [A,B]@1, [A]@0, [A]@1, [] -- so [A]@0 and [] each follow a
    # group with adapters at full weight, where a stale adapter state would show.
    out = tmp_path / "r"
    res = run(
        make_cfg(tiny_dir, lora_sets=[[lora_a, lora_b], [lora_a], []], lora_scales=[0.0, 1.0]),
        out,
        progress=False,
    )
    assert res.generated == 5  # [] once, whatever the multipliers
    img = images(res, out)
    base = img[(2, None, 1)]
    assert np.array_equal(img[(0, 0.0, 1)], base) and np.array_equal(img[(1, 0.0, 1)], base)
    assert not np.array_equal(img[(1, 1.0, 1)], base) and not np.array_equal(img[(0, 1.0, 1)], base)
    rec, _ = read_png_record(
        str(out / next(e["file"] for e in res.entries if e["lora_set"] == 1 and e["lora_scale"] == 0.0))
    )
    assert rec["lora_scale"] == 0.0 and rec["loras"][0]["scale"] == 0.0


def test_kohya_and_custom_weight_name_load_into_unet_and_text_encoder(
    tiny_dir: Path, lora_a: dict, lora_b: dict, tmp_path: Path
) -> None:
    result = run(make_cfg(tiny_dir, lora_sets=[[], [lora_a], [lora_b]]), tmp_path / "r", progress=False)
    img = images(result, tmp_path / "r")
    assert not np.array_equal(img[(1, 1.0, 1)], img[(0, None, 1)])  # diffusers format, weight_name=tiny_style
    assert not np.array_equal(img[(2, 1.0, 1)], img[(0, None, 1)])  # kohya format
    mgr = manager(tiny_dir)
    for spec in (lora_a, lora_b):  # every layer of the file landed: 32 UNet + 8 text-encoder projections
        assert mgr.layers(resolved(spec).adapter) == {"unet": 32, "text_encoder": 8}


@pytest.mark.slow
def test_inactive_adapters_are_not_computed(
    tiny_dir: Path, lora_a: dict, lora_b: dict, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from runner.generate.batch import generate

    res = run(make_cfg(tiny_dir, lora_sets=[[lora_a], [lora_b]]), tmp_path / "r", progress=False)
    b_img = images(res, tmp_path / "r")[(1, 1.0, 1)]
    mgr = manager(tiny_dir)
    a, b = resolved(lora_a), resolved(lora_b)
    assert a.adapter in mgr.loaded and b.adapter in mgr.loaded and mgr.active == (b.adapter,)
    pipe = loaded_model(tiny_dir).pipe
    tuner = _tuner_layers(pipe)
    assert tuner and all(m.active_adapters == [b.adapter] and not m.disable_adapters for m in tuner)
    mgr.activate((), ())
    assert all(m.disable_adapters for m in tuner)
    # A fresh pipeline that only ever saw B gives the same pixels: A, loaded but inactive, changes nothing.
    fresh = StableDiffusionPipeline.from_pretrained(
        str(tiny_dir), safety_checker=None, requires_safety_checker=False
    )
    fresh.set_progress_bar_config(disable=True)
    AdapterManager(fresh).activate((b,), (1.0,))
    job = planned(make_cfg(tiny_dir, lora_sets=[[lora_b]]))[0]
    assert np.array_equal(np.asarray(generate(fresh, [job], True)[0].convert("RGB")), b_img)


def test_weight_zero_member_of_a_set_adds_nothing(tiny_dir: Path, lora_a: dict, lora_b: dict) -> None:
    from runner.generate.batch import generate

    mgr = manager(tiny_dir)
    pipe = loaded_model(tiny_dir).pipe
    a, b = resolved(lora_a), resolved(lora_b)
    job = planned(make_cfg(tiny_dir))[0]
    mgr.activate((b,), (1.0,))  # B last ran at full weight
    mgr.activate((a,), (1.0,))
    alone = np.asarray(generate(pipe, [job], True)[0])
    mgr.activate((a, b), (1.0, 0.0))
    assert np.array_equal(np.asarray(generate(pipe, [job], True)[0]), alone)


def planned(cfg) -> list:
    """The images of `cfg` as run() plans them: with the model's resolved settings (guidance, steps ...)."""
    from runner.lora.files import resolve_loras
    from runner.plan import expand
    from runner.run import plan_models

    spec = validate(cfg)
    (plan,) = plan_models(spec, resolve_loras(spec))
    return expand(plan.spec, plan.key)


def _tuner_layers(pipe) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        m for comp in (pipe.unet, pipe.text_encoder) for m in comp.modules() if isinstance(m, BaseTunerLayer)
    ]


def test_fifty_switches_keep_memory_flat(tiny_dir: Path, lora_a: dict, lora_b: dict) -> None:
    mgr = manager(tiny_dir)
    mgr.max_loaded = 8
    pipe = loaded_model(tiny_dir).pipe
    a, b = resolved(lora_a), resolved(lora_b)
    sets = [((a,), (1.0,)), ((b,), (0.5,)), ((a, b), (1.0, 0.3)), ((), ()), ((a,), (0.0,))]
    for loras, weights in sets:
        mgr.activate(loras, weights)

    def params() -> int:
        return sum(p.numel() for comp in (pipe.unet, pipe.text_encoder) for p in comp.parameters())

    before, live, loads = params(), live_tensors(), mgr.loads
    for i in range(50):
        mgr.activate(*sets[i % len(sets)])
    assert params() == before and mgr.loads == loads
    assert live_tensors() == live  # switching keeps no tensor it made (a leak of one LoRA copy would show)


@pytest.mark.slow
def test_lru_eviction_gives_the_same_pixels(
    tiny_dir: Path, lora_a: dict, lora_b: dict, tmp_path: Path
) -> None:
    sets = [[lora_a], [lora_b], [lora_a, lora_b]]
    ref = images(run(make_cfg(tiny_dir, lora_sets=sets), tmp_path / "ref", progress=False), tmp_path / "ref")
    res = run(make_cfg(tiny_dir, lora_sets=sets, max_loaded_loras=1), tmp_path / "lru", progress=False)
    mgr = manager(tiny_dir)
    assert len(mgr.loaded) == 2  # the cap gives way only to the set in use ([A, B] last)
    for key, value in images(res, tmp_path / "lru").items():
        assert np.array_equal(value, ref[key])
    mgr.activate((resolved(lora_a),), (1.0,))
    assert list(mgr.loaded) == [resolved(lora_a).adapter]
    assert mgr.layers(resolved(lora_b).adapter) == {"unet": 0, "text_encoder": 0}  # evicted layers are gone
    mgr.max_loaded = 8


def test_metadata_records_every_adapter(tiny_dir: Path, lora_a: dict, lora_b: dict, tmp_path: Path) -> None:
    prompt = "a red cat, studio light: soft"
    a, b = {**lora_a, "scale": 0.5}, {**lora_b, "scale": 2.0}
    res = run(
        make_cfg(tiny_dir, prompts=[prompt], lora_sets=[[a, b]], lora_scales=[0.5, 1.0]),
        tmp_path / "r",
        progress=False,
    )
    sha = {s["name"]: hashlib.sha256(Path(resolved(s).file).read_bytes()).hexdigest() for s in (a, b)}
    auto3 = {s["name"]: _autov3(resolved(s).file) for s in (a, b)}
    assert resolved(a).file.endswith("tiny_style/tiny_style.safetensors")
    scales = set()
    for entry in res.entries:
        rec, text = read_png_record(str(tmp_path / "r" / entry["file"]))
        mult = rec["lora_scale"]
        assert [lo["name"] for lo in rec["loras"]] == ["A", "B"]
        for lo, spec in zip(rec["loras"], (a, b), strict=True):
            assert lo["source"] == spec["source"] and lo["sha256"] == sha[lo["name"]]
            assert lo["scale"] == pytest.approx(spec["scale"] * mult)  # own scale x swept multiplier
        assert (
            rec["loras"][0]["weight_name"] == "tiny_style.safetensors"
            and rec["loras"][1]["weight_name"] is None
        )
        parsed = parse_infotext(text)
        assert parsed["Prompt"] == prompt and text.splitlines()[0] == prompt
        assert parsed["Lora hashes"] == {"A": auto3["A"], "B": auto3["B"]}  # A1111/Civitai AutoV3
        assert f'Lora hashes: "A: {auto3["A"]}, B: {auto3["B"]}"' in text
        assert rec["loras"][0]["autov3"] == auto3["A"] and rec["loras"][0]["autov2"] == sha["A"][:10]
        scales.add((mult, rec["loras"][0]["scale"], rec["loras"][1]["scale"]))
    assert scales == {(0.5, 0.25, 1.0), (1.0, 0.5, 2.0)}


def _autov3(path: str) -> str:
    """kohya's/A1111's addnet hash, computed here from the bytes: sha256 of what follows the safetensors header."""
    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_own_scale_times_multiplier_sets_the_pixels(tiny_dir: Path, lora_a: dict, tmp_path: Path) -> None:
    half = run(
        make_cfg(tiny_dir, lora_sets=[[{**lora_a, "scale": 0.5}]], lora_scales=[2.0]),
        tmp_path / "h",
        progress=False,
    )
    one = run(
        make_cfg(tiny_dir, lora_sets=[[lora_a]], lora_scales=[1.0, 0.5]), tmp_path / "o", progress=False
    )
    h, o = images(half, tmp_path / "h"), images(one, tmp_path / "o")
    assert np.array_equal(h[(0, 2.0, 1)], o[(0, 1.0, 1)]) and not np.array_equal(
        h[(0, 2.0, 1)], o[(0, 0.5, 1)]
    )


def test_seed_file_rules(tiny_dir: Path, lora_a: dict, bad_loras: dict, tmp_path: Path) -> None:
    src = Path(resolved(lora_a).file)
    folder = tmp_path / "default"
    folder.mkdir()
    shutil.copy(src, folder / "pytorch_lora_weights.safetensors")
    shutil.copy(src, folder / "other.safetensors")
    for weight_name in (None, "null"):  # null / "null" -> the default name
        spec = validate(make_cfg(tiny_dir, lora_sets=[[{"source": str(folder), "weight_name": weight_name}]]))
        assert Path(resolve_lora(spec.lora_sets[0][0]).file).name == "pytorch_lora_weights.safetensors"
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(src, single / "my_style.safetensors")
    r = resolve_lora(LoraSpec(str(single)))
    assert Path(r.file).name == "my_style.safetensors" and r.weight_name == "my_style.safetensors"
    assert r.name == "single"
    (single / "second.safetensors").write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"no default LoRA file .* one of: my_style.safetensors, second.safetensors"
    ):
        resolve_lora(LoraSpec(str(single)))
    # no .safetensors default -> pytorch_lora_weights.bin, which is pickle: opt-in only
    with pytest.raises(
        ConfigError, match=r"pytorch_lora_weights.bin is a pickle file.*allow_pickle_lora=true"
    ):
        resolve_lora(LoraSpec(str(bad_loras["bin_dir"])))
    assert Path(resolve_lora(LoraSpec(str(bad_loras["bin_dir"])), allow_pickle=True).file).suffix == ".bin"
    res = run(
        make_cfg(
            tiny_dir,
            lora_sets=[[{"source": str(bad_loras["bin_dir"]), "name": "P"}], [lora_a]],
            allow_pickle_lora=True,
        ),
        tmp_path / "r",
        progress=False,
    )
    img = images(res, tmp_path / "r")
    assert np.array_equal(img[(0, 1.0, 1)], img[(1, 1.0, 1)])  # the .bin holds A's weights


def _fake_hub_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)


def test_hub_repo_from_the_offline_cache(
    tiny_dir: Path, lora_a: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _fake_hub_repo(cache, "someone/style-lora", {"style.safetensors": Path(resolved(lora_a).file)})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    r = resolve_lora(LoraSpec("someone/style-lora"))  # the only .safetensors file of the repo
    assert r.weight_name == "style.safetensors" and r.sha256 == resolved(lora_a).sha256
    with pytest.raises(
        ConfigError,
        match=r"weight_name='nope.safetensors' is not in hub repo 'someone/style-lora'"
        r".*HF_HUB_OFFLINE=1.*files there: style.safetensors",
    ):
        resolve_lora(LoraSpec("someone/style-lora", "nope.safetensors"))


def _bad(tiny_dir: Path, tmp_path: Path, lora_sets: list, match: str, **kw) -> None:
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=match) as info:
        run(make_cfg(tiny_dir, lora_sets=lora_sets, **kw), out, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_bad_sources(tiny_dir: Path, lora_a: dict, lora_b: dict, bad_loras: dict, tmp_path: Path) -> None:
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": str(tmp_path / "missing.safetensors")}]],
        r"LoRA source '.*missing.safetensors' not found \(no such file or folder",
    )
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": "nobody/no-such-lora"}]],
        r"'nobody/no-such-lora' is not a local file or folder and not a repo in the local hub cache "
        r"\(HF_HUB_OFFLINE=1\)",
    )
    _bad(
        tiny_dir,
        tmp_path,
        [[{**lora_a, "weight_name": "nope.safetensors"}]],
        r"weight_name='nope.safetensors' is not in .*tiny_style; "
        r".safetensors files there: tiny_style.safetensors$",
    )
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": str(bad_loras["bin_dir"] / "pytorch_lora_weights.bin")}]],
        r"pytorch_lora_weights.bin is a pickle file; "
        r"convert it to .safetensors or set allow_pickle_lora=true",
    )
    (tmp_path / "notes.txt").write_text("hello")
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": str(tmp_path / "notes.txt")}]],
        r"notes.txt is not a LoRA weights file; valid: .safetensors",
    )
    _bad(tiny_dir, tmp_path, [[lora_a, {**lora_b, "name": "A"}]], r"lora_sets\[0\] names adapter 'A' twice")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(bad_loras["te2"], copy / "tiny_kohya.safetensors")  # same derived name, another file
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": lora_b["source"]}, {"source": str(copy / "tiny_kohya.safetensors")}]],
        r"lora_sets\[0\] names adapter 'tiny_kohya' twice",
    )


def test_files_that_do_not_fit_the_model(
    tiny_dir: Path, lora_a: dict, bad_loras: dict, tmp_path: Path
) -> None:
    base = images(run(make_cfg(tiny_dir), tmp_path / "base", progress=False), tmp_path / "base")
    shape = (  # the base-model check names both: the file's cross-attention width and the model's
        r"it was made for an SD-style UNet \(cross-attention width 64\), the loaded model is an SD-style UNet "
        r"\(StableDiffusionPipeline\) with width 32; use a LoRA made for this model"
    )
    for kind in ("peft", "kohya"):
        _bad(
            tiny_dir,
            tmp_path,
            [[], [{"source": str(bad_loras[kind])}]],
            rf"{re.escape(str(bad_loras[kind]))} is not a LoRA for this model: {shape}",
        )
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": str(bad_loras["extra"])}]],
        r"extra_layer.safetensors is not a LoRA for this model: 1 of its 41 LoRA layers match no layer "
        r"of the model \(e.g. unet.down_blocks.7.attentions.0.proj_in\)",
    )
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": str(bad_loras["te2"])}]],
        r"with_te2.safetensors is a LoRA for Stable Diffusion XL, but the model .* is Stable Diffusion 1.x/2.x",
    )
    _bad(
        tiny_dir,
        tmp_path,
        [[{"source": str(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")}]],
        r"diffusion_pytorch_model.safetensors is not a LoRA file \(no LoRA weights in it\)",
    )
    mgr = manager(tiny_dir)
    for kind in (
        "peft",
        "kohya",
        "extra",
        "te2",
    ):  # a failed load leaves nothing behind in the cached pipeline
        adapter = resolve_lora(LoraSpec(str(bad_loras[kind]))).adapter
        assert adapter not in mgr.loaded and not any(mgr.layers(adapter).values())
    assert mgr.active == () and all(m.disable_adapters for m in _tuner_layers(loaded_model(tiny_dir).pipe))
    again = images(run(make_cfg(tiny_dir), tmp_path / "again", progress=False), tmp_path / "again")
    assert np.array_equal(again[(0, None, 1)], base[(0, None, 1)])


def test_lora_config_group_composes(tiny_dir: Path) -> None:
    from hydra import compose, initialize_config_dir

    from runner.config.overrides import CONF_DIR
    from runner.lora.files import resolve_loras

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "lora=tiny_examples", "lora_scales=[0.5,1.0]"])
    spec = validate(cfg)
    assert [[s.name for s in group] for group in spec.lora_sets] == [
        [],
        ["style"],
        ["kohya"],
        ["style", "kohya"],
    ]
    sets = resolve_loras(spec)
    assert sets[3][0].sha256 == sets[1][0].sha256 and sets[3][1].sha256 == sets[2][0].sha256
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        assert validate(compose("config", overrides=["lora=none"])).lora_sets == ((),)


@pytest.mark.parametrize("case", ["mismatch", "missing"])
def test_cli_bad_lora_exit_2_nothing_written(
    tiny_dir: Path, bad_loras: dict, tmp_path: Path, case: str
) -> None:
    source = str(bad_loras["kohya"]) if case == "mismatch" else str(tmp_path / "nope" / "x.safetensors")
    run_dir = tmp_path / "outputs" / "run"
    proc = run_cli(
        f"model.id={tiny_dir}",
        f"lora_sets=[[],[{{source: '{source}'}}]]",
        "steps=2",
        "width=32",
        "height=32",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("t2i: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert source in errors[0]
    assert ("is not a LoRA for this model" if case == "mismatch" else "not found") in errors[0]
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()
