"""Bad input on the CLI and the server: one clear line naming the bad value and what is valid, exit code 2 or
4xx, no traceback, and nothing written. Unicode, very long and path-like prompts must work."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import job_done, run_cli

FAST = ["model=tiny", "steps=1", "width=32", "height=32"]


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(r"error|traceback|exception", ln, re.IGNORECASE)]


@pytest.fixture(scope="module")
def files(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Broken and misleading input files, outside every run dir."""
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad-files")
    good = tiny_dir / "loras" / "tiny_kohya.safetensors"
    data = good.read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "garbage.safetensors").write_bytes(b"\x00not safetensors at all" * 10)
    save_file({"foo.weight": torch.zeros(4, 4)}, str(d / "not_a_lora.safetensors"))
    torch.save({"lora_up.weight": torch.zeros(2, 2)}, d / "pickled.bin")
    (d / "model.ckpt").write_bytes(b"PK\x03\x04 pretend pickle")
    (d / "empty_dir").mkdir()
    (d / "notes.txt").write_text("hello")
    return {p.name: str(p) for p in d.iterdir()}


def lora(source: str, extra: str = "") -> str:
    return f"lora_sets=[[{{source: '{source}'{extra}}}]]"


# (overrides, words the one error line must contain: the bad value and what is valid)
CLI_CASES = [
    # wrong types
    pytest.param(["steps=abc"], ["steps='abc'", "integer"], id="steps-str"),
    pytest.param(["steps=1.5"], ["steps=1.5", "integer"], id="steps-float"),
    pytest.param(["guidance_scale=high"], ["guidance_scale='high'", "number"], id="cfg-str"),
    pytest.param(["seeds=[one]"], ["seeds='one'", "integer"], id="seed-str"),
    pytest.param(["verbose=maybe"], ["verbose='maybe'", "true or false"], id="bool-str"),
    pytest.param(["max_loaded_loras=lots"], ["max_loaded_loras='lots'", "integer"], id="int-key-str"),
    pytest.param(["grid.max_size=[1,2]"], ["grid.max_size", "integer"], id="nested-int-list"),
    pytest.param(["prompts=[{promt: a cat}]"], ["prompts[0]", "prompt"], id="prompt-dict-typo"),
    pytest.param(["lora_sets=5"], ["lora_sets=5", "a list"], id="list-key-int"),
    pytest.param(["+colour=red"], ["'colour'", "t2i --cfg job"], id="added-unknown-key"),
    pytest.param(["-m", "stesp=1,2"], ["'stesp'", "did you mean 'steps'"], id="multirun-typo-key"),
    # negative / zero / huge
    pytest.param(["steps=-1"], ["steps=-1", "1 to 1000"], id="steps-negative"),
    pytest.param(["steps=0"], ["steps=0", "1 to 1000"], id="steps-zero"),
    pytest.param(["steps=1000000"], ["steps=1000000", "1 to 1000"], id="steps-huge"),
    pytest.param(["seeds=[-5]"], ["seeds=-5", "-1 to"], id="seed-negative"),
    pytest.param(["seeds=[1e30]"], ["seeds=", "range"], id="seed-huge"),
    pytest.param(["guidance_scale=-1"], ["guidance_scale=-1", "0 to 100"], id="cfg-negative"),
    pytest.param(["batch_size=0"], ["batch_size=0", "1 to 1024"], id="batch-zero"),
    pytest.param(["width=1048576"], ["width=1048576", "8 to 8192"], id="width-huge"),
    pytest.param(["shard.count=2", "shard.index=2"], ["shard.index=2", "0 to 1"], id="shard-index"),
    # sizes
    pytest.param(["width=65"], ["width=65", "multiple of 8", "64 or 72"], id="width-not-8"),
    pytest.param(["height=100"], ["height=100", "multiple of 8", "96 or 104"], id="height-not-8"),
    # unknown keys, options, choices
    pytest.param(["stesp=2"], ["'stesp'", "did you mean 'steps'"], id="typo-key"),
    pytest.param(["model.dtyp=fp16"], ["'model.dtyp'", "did you mean 'model.dtype'"], id="typo-nested-key"),
    pytest.param(["model=tny"], ["'tny'", "did you mean 'tiny'", "sd15"], id="typo-model-option"),
    pytest.param(["lora=tiny_exampels"], ["'tiny_exampels'", "did you mean 'tiny_examples'"],
                 id="typo-lora-option"),
    pytest.param(["scheduler=eulr"], ["'eulr'", "did you mean 'euler'", "dpmpp_2m"], id="typo-scheduler"),
    pytest.param(["model.dtype=fp64"], ["'fp64'", "fp32, fp16, bf16"], id="bad-dtype"),
    pytest.param(["device=gpu"], ["'gpu'", "cpu, cuda, mps"], id="bad-device"),
    # empty lists and values
    pytest.param(["seeds=[]"], ["seeds=[]", "at least one"], id="empty-seeds"),
    pytest.param(["prompts=[]"], ["prompts=[]", "at least one"], id="empty-prompts"),
    pytest.param(["steps=[]"], ["steps=[]", "at least one"], id="empty-steps"),
    pytest.param(["prompts=['  ']"], ["prompts[0]", "empty"], id="blank-prompt"),
    # models
    pytest.param(["model.id=/nonexistent/model"], ["/nonexistent/model", "does not exist"],
                 id="model-missing"),
    pytest.param(["model.id={model.ckpt}"], ["model.ckpt", "pickle", "model.allow_pickle=true"],
                 id="model-pickle-refused"),
    # LoRA specs
    pytest.param([lora("/nonexistent/x.safetensors")], ["/nonexistent/x.safetensors", "not found"],
                 id="lora-missing"),
    pytest.param(["lora_sets=[[{sorce: x}]]"], ["'sorce'", "did you mean 'source'"], id="lora-typo-key"),
    pytest.param([lora("{tiny}/loras/tiny_kohya.safetensors", ", scale: 1000")], ["scale=1000", "-10 to 10"],
                 id="lora-scale-huge"),
    pytest.param([lora("../../etc/passwd")], ["../../etc/passwd", "not found"], id="lora-traversal"),
    pytest.param([lora("/" + "../" * 12 + "etc/passwd")],
                 ["passwd", "not a LoRA weights file", ".safetensors"], id="lora-traversal-to-real-file"),
    pytest.param([lora("{tiny}/loras/tiny_style", ", weight_name: ../../../etc/passwd")],
                 ["weight_name='../../../etc/passwd'", "plain file name"], id="lora-weight-name-traversal"),
    pytest.param([lora("{pickled.bin}")], ["pickled.bin", "pickle", "allow_pickle_lora=true"],
                 id="lora-pickle-refused"),
    pytest.param([lora("{notes.txt}")], ["notes.txt", "not a LoRA weights file", ".safetensors"],
                 id="lora-text-file"),
    pytest.param([lora("{truncated.safetensors}")], ["truncated.safetensors", "safetensors file"],
                 id="lora-truncated"),
    pytest.param([lora("{garbage.safetensors}")], ["garbage.safetensors", "safetensors file"],
                 id="lora-corrupt"),
    pytest.param([lora("{not_a_lora.safetensors}")], ["not_a_lora.safetensors", "not a LoRA"],
                 id="lora-not-a-lora"),
    pytest.param([lora("{empty_dir}")], ["empty_dir", ".safetensors"], id="lora-empty-folder"),
]


def _fill(arg: str, files: dict[str, str], tiny_dir: Path) -> str:
    arg = arg.replace("{tiny}", str(tiny_dir))
    for name, path in files.items():
        arg = arg.replace("{" + name + "}", path)
    return arg


@pytest.mark.parametrize(("overrides", "words"), CLI_CASES)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, files, tiny_dir, overrides, words):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [*FAST, *(_fill(a, files, tiny_dir) for a in overrides), f"hydra.run.dir={tmp_path / 'out'}"]
    proc = run_cli(*args, cwd=cwd, timeout=300)
    lines = error_lines(proc.stderr + proc.stdout)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("t2i: error: "), proc.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert not (tmp_path / "out").exists()
    assert list(cwd.iterdir()) == []


def test_security_defaults() -> None:
    """No remote code, ever; the server listens on loopback unless told otherwise; pickle needs an opt-in."""
    from runner.config import ModelConfig, RunConfig, ServerConfig

    src = Path(__file__).resolve().parent.parent / "runner"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "trust_remote_code" not in text and "custom_pipeline" not in text, f
    assert ServerConfig().host == "127.0.0.1"
    assert ModelConfig().allow_pickle is False and RunConfig().allow_pickle_lora is False


def test_cli_verbose_gives_the_traceback_for_a_runtime_failure_only(tmp_path, files, monkeypatch):
    """A failure that is not the user's input (here the denoiser raising) is one line with a hint, and its
    traceback with verbose=true; a config error stays one line with verbose=true."""
    import runner.generate.batch as batch

    def broken(*args, **kwargs):
        raise RuntimeError("boom from inside the denoiser")

    monkeypatch.setattr(batch, "generate", broken)
    quiet = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'quiet'}", cwd=tmp_path)
    assert quiet.returncode == 1, quiet.stderr
    assert "Traceback" not in quiet.stderr
    assert error_lines(quiet.stderr) == ["t2i: error: RuntimeError: boom from inside the denoiser (run with "
                                         "verbose=true for the traceback)"], quiet.stderr
    loud = run_cli(*FAST, "verbose=true", f"hydra.run.dir={tmp_path / 'loud'}", cwd=tmp_path)
    assert loud.returncode == 1, loud.stderr
    assert "Traceback (most recent call last)" in loud.stderr, loud.stderr
    assert re.search(r'File ".*test_bad_input\.py", line \d+, in broken', loud.stderr), loud.stderr
    assert "RuntimeError: boom from inside the denoiser" in loud.stderr
    config = run_cli(*FAST, lora(files["not_a_lora.safetensors"]), "verbose=true",
                     f"hydra.run.dir={tmp_path / 'config'}", cwd=tmp_path)
    assert config.returncode == 2, config.stderr
    assert "Traceback" not in config.stderr
    assert len(error_lines(config.stderr)) == 1 and "not a LoRA" in config.stderr, config.stderr


def test_unreadable_lora_file_is_one_clear_error(tmp_path, tiny_dir, monkeypatch):
    """chmod 000 does not stop root (tests run as root), so unreadability is emulated through os.access."""
    from runner.config import ConfigError, validate
    from runner.run import run

    f = tmp_path / "locked.safetensors"
    shutil.copy(tiny_dir / "loras" / "tiny_kohya.safetensors", f)
    if os.geteuid() != 0:
        f.chmod(0)
    else:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(f) and real(p, mode, **kw))
    spec = validate({"model": {"id": "builtin:tiny"}, "steps": 1, "lora_sets": [[{"source": str(f)}]]})
    with pytest.raises(ConfigError, match=r"locked\.safetensors is not readable"):
        run(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unicode_long_and_path_like_prompts_work(tmp_path):
    from runner.outputs.metadata import read_png_record

    long_prompt = "a watercolor painting of a lighthouse at dusk, " * 43
    assert len(long_prompt) >= 2000
    prompts = ["一只猫 🐱 café Ünïcödé", "../../x", "/etc/passwd", long_prompt]
    quoted = ",".join("'" + p.replace("'", "\\'") + "'" for p in prompts)
    out = tmp_path / "out"
    # plain: the text as CLIP gets it, cut at 77 tokens, with a warning (a1111, the default, reads every token)
    proc = run_cli(*FAST, f"prompts=[{quoted}]", "seeds=[7]", f"hydra.run.dir={out}", "prompt_syntax=plain",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prompts[3] is" in proc.stdout + proc.stderr
    assert "CLIP reads only the first 77, the rest is ignored" in proc.stdout + proc.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    assert all(p.resolve().is_relative_to(out.resolve()) for p in tmp_path.rglob("*.png"))  # none escaped
    recorded = {read_png_record(p)[0]["prompt"] for p in pngs}
    assert recorded == set(prompts)
    assert all(len(p.name) < 120 for p in pngs)


# --- the server: forms and JSON ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An in-process app on the tiny model, LoRAs allowed only from the tiny model's loras/ folder."""
    import json

    from fastapi.testclient import TestClient

    from runner.server.app import compose_config, create_app

    out = tmp_path_factory.mktemp("server") / "out"
    dirs = json.dumps([str(tiny_dir / "loras")])
    cfg = compose_config(["model=tiny", f"server.output_dir={out}", "server.max_steps=50",
                          "server.max_images=4", "server.max_side=256", f"server.allowed_lora_dirs={dirs}"])
    with TestClient(create_app(cfg)) as client:
        yield client, out


def _snapshot(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*")} if out.exists() else set()


JSON_OK = {"text_prompt": "a red cube", "inference_steps": 1, "width": 32, "height": 32, "manual_seed": 1}
SERVER_CASES = [
    # (endpoint, body changes, status, words in the one-line detail)
    pytest.param("json", {"inference_steps": "many"}, 422, ["inference_steps"], id="json-steps-str"),
    pytest.param("json", {"inference_steps": -1}, 422, ["inference_steps"], id="json-steps-negative"),
    pytest.param("json", {"inference_steps": 10**6}, 422, ["inference_steps", "50"], id="json-steps-huge"),
    pytest.param("json", {"width": 65}, 422, ["width", "multiple of 8"], id="json-width-not-8"),
    pytest.param("json", {"width": 10**6}, 422, ["width"], id="json-width-huge"),
    pytest.param("json", {"total_nm_img_prompt": 0}, 422, ["total_nm_img_prompt"], id="json-zero-images"),
    pytest.param("json", {"total_nm_img_prompt": 10**4}, 422, ["total_nm_img_prompt"], id="json-many-images"),
    pytest.param("json", {"guidance_scale": "high"}, 422, ["guidance_scale"], id="json-cfg-str"),
    pytest.param("json", {"manual_seed": 2**80}, 422, ["seed"], id="json-seed-huge"),
    pytest.param("json", {"text_promt": "typo"}, 422, ["text_promt"], id="json-unknown-key"),
    pytest.param("json", {"text_prompt": ""}, 422, ["text_prompt"], id="json-empty-prompt"),
    pytest.param("json", {"loras": [{"sorce": "x"}]}, 422, ["sorce"], id="json-lora-typo"),
    pytest.param("json", {"loras": [{"source": "../../etc/passwd"}]}, 403, ["../../etc/passwd"],
                 id="json-lora-traversal"),
    pytest.param("json", {"loras": [{"source": "/etc/passwd"}]}, 403, ["/etc/passwd"],
                 id="json-lora-abs-path"),
    pytest.param("json", {"loras": [{"source": "{tiny}/loras/tiny_style", "weight_name": "../../../x"}]},
                 403, ["tiny_style", "outside"], id="json-lora-weight-name-traversal"),
    pytest.param("form", {"inference_steps": "abc"}, 422, ["inference_steps"], id="form-steps-str"),
    pytest.param("form", {"width": "100"}, 422, ["width", "multiple of 8"], id="form-width-not-8"),
    pytest.param("form", {"manual_seed": "-5"}, 422, ["seed"], id="form-seed-negative"),
    pytest.param("form", {"lora_hugging_face_1": "../../etc/passwd"}, 403, ["../../etc/passwd"],
                 id="form-lora-traversal"),
    pytest.param("form", {"lora_hugging_face_1": "{tiny}/loras/../model_index.json"}, 403,
                 ["model_index.json"], id="form-lora-escapes-allowed-dir"),
]


@pytest.mark.parametrize(("kind", "change", "status", "words"), SERVER_CASES)
def test_server_bad_input_is_one_line_4xx_and_writes_nothing(server, tiny_dir, kind, change, status, words):
    client, out = server
    change = {k: (json_fill(v, tiny_dir)) for k, v in change.items()}
    before = _snapshot(out)
    if kind == "json":
        resp = client.post("/api/jobs", json={**JSON_OK, **change})
    else:
        form = {k: str(v) for k, v in JSON_OK.items()} | change
        resp = client.post("/submit", data=form)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for w in words:
        assert w in detail, f"{w!r} not in {detail!r}"
    assert _snapshot(out) == before


def json_fill(value, tiny_dir: Path):
    if isinstance(value, str):
        return value.replace("{tiny}", str(tiny_dir))
    if isinstance(value, list):
        return [json_fill(v, tiny_dir) for v in value]
    if isinstance(value, dict):
        return {k: json_fill(v, tiny_dir) for k, v in value.items()}
    return value


def test_server_unicode_and_long_prompts_work(server):
    client, out = server
    for prompt in ("一只猫 🐱 café", "../../x " * 300):
        resp = client.post("/api/jobs", json={**JSON_OK, "text_prompt": prompt})
        assert resp.status_code == 202, resp.text
        job = resp.json()
        job = job_done(client, job["id"], timeout=60)
        assert job["status"] == "done", job
        png = client.get(job["images"][0])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*.png"))
