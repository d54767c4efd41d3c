"""Issue 31: defects a new user hit in one afternoon (a foreign folder overwritten, one tag bricking a run dir,
tracebacks for user mistakes, model comparisons). Each test failed on the main of that day."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from runner.outputs.sweep import merge_main

TINY = ["model=tiny", "prompts=[a red fox]", "seeds=[1]", "steps=1", "width=32", "height=32"]


def _user_folder(folder: Path) -> dict[str, bytes]:
    (folder / "grids").mkdir(parents=True)
    (folder / "index.html").write_text("<h1>mine</h1>")
    (folder / "manifest.jsonl").write_text('{"my": "data"}\n')
    (folder / "grids" / "grid.png").write_text("x")
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- 1. a folder that is not a run dir is never written into ---------------------------------------------------------

def test_t2i_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    before = _user_folder(tmp_path / "U")
    r = run_cli(*TINY, f"output_dir={tmp_path / 'U'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "not a t2i run dir" in r.stderr and "index.html" in r.stderr
    assert _files(tmp_path / "U") == before
    # a run dir t2i made is still extended (resume), and an empty folder is fine
    (tmp_path / "E").mkdir()
    assert run_cli(*TINY, f"output_dir={tmp_path / 'E'}", cwd=tmp_path).returncode == 0
    r = run_cli(*TINY, "seeds=[1,2]", f"output_dir={tmp_path / 'E'}", cwd=tmp_path)
    assert r.returncode == 0 and "1 already done" in r.stdout, r.stdout + r.stderr


def test_merge_refuses_a_foreign_output_and_names_a_bad_one(tmp_path: Path, capsys) -> None:
    assert run_cli(*TINY, f"output_dir={tmp_path / 'R'}", cwd=tmp_path).returncode == 0
    before = _user_folder(tmp_path / "M")
    capsys.readouterr()
    assert merge_main([str(tmp_path / "R"), "-o", str(tmp_path / "M")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a t2i run dir" in err
    assert _files(tmp_path / "M") == before
    # 12. onto an existing file or into a read-only place: one line, exit 2 (not a raw FileExistsError/OSError)
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile", tmp_path / "afile" / "out"):  # (a read-only folder does not stop root)
        assert merge_main([str(tmp_path / "R"), "-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("t2i-merge: error: cannot write to --output"), err
    assert merge_main([str(tmp_path / "R"), "-o", str(tmp_path / "M2")]) == 0  # a new folder: fine, re-merge too
    assert merge_main([str(tmp_path / "R"), "-o", str(tmp_path / "M2")]) == 0


def test_train_refuses_a_foreign_non_empty_folder(tmp_path: Path) -> None:
    from conftest import run_program

    t = tmp_path / "T"
    t.mkdir()
    (t / "train_config.yaml").write_text("mine: true\n")
    (t / "loss.csv").write_text("when,what\n1,2\n")
    before = _files(t)
    r = run_program("t2i-train", "model=tiny", f"data.dir={tmp_path}", f"output_dir={t}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a t2i run dir" in r.stderr, r.stderr
    assert _files(t) == before


# -- 2. a <lora:NAME:W> weight is range-checked; no manifest holds a non-finite number; one request never fails another

@pytest.mark.parametrize(("weight", "words"), [("1e400", "out of range; valid: -10 to 10"),
                                               ("100", "out of range; valid: -10 to 10"),
                                               ("nan", "'nan' is not a number")])
def test_tag_weights_are_checked_like_lora_set_scales(weight: str, words: str) -> None:
    from runner.config import ConfigError
    from runner.prompt.syntax import split_tags

    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        split_tags(f"a fox <lora:x:{weight}>")
    assert split_tags("a fox <lora:x:-10>")[1][0].unet == -10.0


def test_a_non_finite_manifest_line_is_never_written_and_never_bricks_a_run_dir(tmp_path: Path) -> None:
    from runner.outputs.manifest import Manifest, dumps, parse_lines

    line = dumps({"key": "k", "file": "a.png", "scale": float("inf"), "x": [float("nan")]})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {"key": "k", "file": "a.png", "scale": None,
                                                                         "x": [None]}
    # a line written by an older build (`Infinity`) is skipped; every other line is kept, and runs go on
    assert run_cli(*TINY, f"output_dir={tmp_path / 'r'}", cwd=tmp_path).returncode == 0
    good = (tmp_path / "r" / "manifest.jsonl").read_text()
    bad = good.replace('"seed": 1', '"seed": 2').replace('"index": 0', '"scale": Infinity, "index": 0')
    (tmp_path / "r" / "manifest.jsonl").write_text(bad + good)
    assert len(parse_lines((tmp_path / "r" / "manifest.jsonl").read_bytes())) == 1
    r = run_cli(*TINY, "seeds=[1,3]", f"output_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 0 and "1 images generated, 1 already done" in r.stdout, r.stderr
    assert merge_main([str(tmp_path / "r"), "-o", str(tmp_path / "m")]) == 0
    assert len(Manifest(tmp_path / "m").entries()) == 2


def test_one_bad_request_never_fails_another_merged_into_its_run(tmp_path: Path, tiny_dir: Path) -> None:
    import shutil
    import time

    from runner.config import validate
    from runner.lora.tags import resolve_tags
    from runner.server.jobs import JobQueue

    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(tiny_dir / "loras" / "tiny_kohya.safetensors", loras / "gone.safetensors")
    base = {"model": {"id": "builtin:tiny"}, "steps": 1, "width": 32, "height": 32, "seeds": [1], "device": "cpu",
            "lora_dirs": [str(loras)], "grid": {"enabled": False}, "resume": False}
    good = validate({**base, "prompts": ["a red cube"]})
    bad = resolve_tags(validate({**base, "prompts": ["a cube <lora:gone:0.5>"]}))
    (loras / "gone.safetensors").unlink()  # valid when asked; gone by the time the merged run starts
    q = JobQueue(tmp_path / "out", 4)
    with q._cond:  # both wait together, so the worker merges them into one run
        jobs = [q.submit(bad), q.submit(good)]
    end = time.monotonic() + 120
    while not all(j.finished for j in jobs) and time.monotonic() < end:
        time.sleep(0.05)
    q.stop()
    assert [j.status for j in jobs] == ["error", "done"], [j.error for j in jobs]
    assert jobs[0].error_status == 422 and "gone" in jobs[0].error
    assert jobs[1].files[0] is not None and jobs[1].files[0].is_file()


# -- 3. a UTF-8 BOM is no part of the first prompt (prompts_file, training captions) ---------------------------------

def test_a_bom_in_prompts_file_is_not_part_of_the_first_prompt(tmp_path: Path) -> None:
    from runner.config import validate

    (tmp_path / "bom.txt").write_bytes("\ufeffa red fox\na blue car\n".encode())
    (tmp_path / "plain.txt").write_text("a red fox\na blue car\n")
    specs = [validate({"model": {"id": "builtin:tiny"}, "prompts_file": str(tmp_path / n)}) for n in ("bom.txt",
                                                                                                       "plain.txt")]
    assert [p.prompt for p in specs[0].prompts] == ["a red fox", "a blue car"]
    assert specs[0].prompts == specs[1].prompts


def test_a_bom_in_a_training_caption_is_not_part_of_it(tmp_path: Path) -> None:
    from PIL import Image

    from runner.train.config import DataConfig
    from runner.train.data import scan

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "red.txt").write_bytes("\ufeffa red square".encode())
    assert [item.caption for item in scan(DataConfig(dir=str(tmp_path)))] == ["a red square"]


# -- 5. brace escapes: `\{` is a literal brace, never a variant ------------------------------------------------------

@pytest.mark.parametrize(("written", "encoder_text"), [(r"a \{red\} fox", "a {red} fox"),
                                                       (r"a \{x|y\} fox", "a {x|y} fox"),
                                                       (r"a \{x\|y\} fox", "a {x|y} fox")])
def test_escaped_braces_are_literal_text(written: str, encoder_text: str) -> None:
    from runner.prompt.expand import expand_template, is_template
    from runner.prompt.syntax import parse_attention

    (prompt,) = expand_template("prompts[0]", written, "combinatorial", 1, 0, [], 10)
    assert prompt == written and not is_template(prompt)  # the record's prompt re-runs as itself
    assert parse_attention(prompt) == [(encoder_text, 1.0)]
    both = expand_template("prompts[0]", r"\{a\} {b|c}", "combinatorial", 1, 0, [], 10)
    assert both == [r"\{a\} b", r"\{a\} c"]


# -- 10. a wildcard name that leaves wildcard_dirs: one line, no dynamicprompts traceback ---------------------------

def test_a_wildcard_leaving_its_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "wc").mkdir()
    (tmp_path / "wc" / "color.txt").write_text("red\nblue\n")
    r = run_cli(*TINY[:1], "prompts=['__../../etc/passwd__ fox']", f"wildcard_dirs=[{tmp_path / 'wc'}]",
                f"output_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "leaves wildcard_dirs" in r.stderr


# -- 6. /runs never serves a hidden file, by its path or through a link ---------------------------------------------

def test_a_link_to_a_hidden_file_in_a_served_run_dir_is_not_served(tmp_path: Path) -> None:
    from runner.server.runs import Root, resolve

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("secret: 1\n")
    (run / "00000_a.png").write_bytes(b"png")
    (run / "config.yaml").symlink_to(run / ".hydra" / "config.yaml")
    (run / "hydra").symlink_to(run / ".hydra")
    (run / "pic.png").symlink_to(run / "00000_a.png")
    roots = [Root(0, tmp_path.resolve(), str(tmp_path))]
    assert resolve(roots, "0", "run/.hydra/config.yaml") is None
    assert resolve(roots, "0", "run/config.yaml") is None
    assert resolve(roots, "0", "run/hydra/config.yaml") is None
    assert resolve(roots, "0", "run/pic.png") == (run / "00000_a.png").resolve()  # a link to a visible file is fine


# -- 7. model.pipeline of another family than the model's: one line, exit 2, nothing left behind ----------------------

@pytest.mark.parametrize(("model", "pipeline", "valid"), [("tiny", "sdxl", "valid: auto or sd"),
                                                          ("tiny-sdxl", "sd", "valid: auto or sdxl")])
def test_a_pipeline_of_another_family_is_one_line(tmp_path: Path, model: str, pipeline: str, valid: str) -> None:
    r = run_cli(f"model={model}", f"model.pipeline={pipeline}", *TINY[1:], f"output_dir={tmp_path / 'r'}",
                cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and valid in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


# -- 8. from_image of an image made with a <lora:…> tag takes the file its record names ------------------------------

def test_from_image_of_a_tagged_image_needs_no_lora_dirs(tmp_path: Path, tiny_dir: Path) -> None:
    r = run_cli(*TINY[:1], "prompts=['a fox <lora:tiny_kohya:0.7>']", *TINY[2:], f"lora_dirs=[{tiny_dir / 'loras'}]",
                f"output_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (png,) = (tmp_path / "r").glob("*.png")
    r = run_cli(f"from_image={png}", f"output_dir={tmp_path / 'again'}", cwd=tmp_path)
    assert r.returncode == 0 and f"compared with {png}: identical" in r.stdout, r.stderr


# -- 9. t2i-inspect on a safetensors file with an unusual header: one line, exit 2 -----------------------------------

@pytest.mark.parametrize("header", [
    [1, 2],
    {"__metadata__": ["a"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}},
    {"w": [1, 2]},
    "text",
])
def test_inspect_of_an_odd_safetensors_header_is_one_line(tmp_path: Path, capsys, header: object) -> None:
    import struct

    from runner.reproduce.inspect import main as inspect_main

    blob = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    assert inspect_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a readable safetensors file" in err, err


# -- 11, 18. t2i-serve: a bad port, a port in use, a limit of 0: one line at start, exit 2 ------------------------

def test_serve_start_errors_are_one_line(tmp_path: Path) -> None:
    import socket

    from conftest import run_program

    cases = [(["--port", "99999"], "--port=99999 is out of range; valid: 1 to 65535"),
             (["server.port=0"], "server.port=0 is out of range"),
             (["server.max_images=0"], "server.max_images=0 is out of range; valid: 1 or more"),
             (["server.max_steps=-1"], "server.max_steps=-1 is out of range")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases.append((["--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1:"))
        for args, words in cases:
            r = run_program("t2i-serve", "model=tiny", f"server.output_dir={tmp_path / 'out'}", *args, cwd=tmp_path)
            assert r.returncode == 2, (args, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("t2i-serve: error: ") and words in lines[0], r.stderr


# -- 13. t2i-train with a target module the model lacks: one line, exit 2, nothing left -------------------------------

def test_train_with_a_target_module_the_model_lacks_is_one_line(tmp_path: Path) -> None:
    from conftest import run_program
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(data / "red.png")
    (data / "red.txt").write_text("a red square")
    r = run_program("t2i-train", "model=tiny", f"data.dir={data}", "data.resolution=32", "train.steps=1",
                    "lora.target_modules=[to_q,nonexistent]", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nonexistent' names no layer of the model" in lines[0] and "to_k" in lines[0], lines
    assert not (tmp_path / "run").exists()


# -- 21. a resume removes the temp files writers killed mid-write left, thumbnails' too -------------------------------

def test_a_resume_removes_stale_thumbnail_temp_files(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert run_cli(*TINY, f"output_dir={run}", cwd=tmp_path).returncode == 0
    stale = [run / ".00001_b.png.4242.tmp", run / "thumbs" / ".00004_x.jpg.4242.tmp",
             run / "thumbs" / "small" / ".00004_x.jpg.4242.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    r = run_cli(*TINY, "seeds=[1,2]", f"output_dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p for p in stale if p.exists()] == []
    assert [p for p in run.rglob("*.tmp")] == []


# -- 17. t2i-train on SIGTERM: finishes the step, checkpoints it, exits 143; the re-run resumes, one loss row a step -

@pytest.mark.slow
def test_train_on_sigterm_checkpoints_and_the_same_command_resumes(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from PIL import Image

    from runner.train.losslog import LossLog

    data = tmp_path / "data"
    data.mkdir()
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        Image.new("RGB", (32, 32), rgb).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a {name} square")
    out = tmp_path / "run"
    common = [f"data.dir={data}", "model=tiny", "data.resolution=32", "lora.rank=4", "train.checkpoint_every=1000",
              "validation.prompts=[]", "progress=false", f"output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "runner.train", *common, "train.steps=100000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while len(LossLog(out / "loss.csv").rows()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "t2i-train: error: interrupted" in err
    (ckpt,) = (out / "checkpoints").glob("step-*")
    last = int(ckpt.name.split("-")[1])
    assert last >= 3 and [int(r["step"]) for r in LossLog(out / "loss.csv").rows()] == list(range(1, last + 1))
    r = subprocess.run([sys.executable, "-m", "runner.train", *common, f"train.steps={last + 2}"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and f"steps {last}->{last + 2}" in r.stdout, r.stderr
    assert [int(r["step"]) for r in LossLog(out / "loss.csv").rows()] == list(range(1, last + 3))


def test_a_fresh_training_start_does_not_append_to_an_earlier_loss_log(tmp_path: Path) -> None:
    from runner.train.losslog import LossLog

    log = LossLog(tmp_path / "loss.csv")
    for step in range(1, 21):  # an attempt killed before its first checkpoint
        log.append(step, 0.5, 1e-4, 0.1)
    from PIL import Image

    from runner.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(data / "red.png")
    (data / "red.txt").write_text("a red square")
    train({"model": {"id": "builtin:tiny"}, "data": {"dir": str(data), "resolution": 32}, "lora": {"rank": 4},
           "train": {"steps": 3, "checkpoint_every": 100}, "validation": {"prompts": []}, "progress": False},
          tmp_path)
    assert [int(r["step"]) for r in log.rows()] == [1, 2, 3]


# -- 15. flow-model schedules: karras / exponential / beta with flow_euler and flow_lcm, as the README lists ----------

@pytest.mark.parametrize("scheduler", ["flow_euler", "flow_lcm"])
def test_flow_schedulers_take_the_sigma_schedules(scheduler: str) -> None:
    import diffusers
    import numpy as np

    from runner.config.schedulers import check_pair
    from runner.models.schedulers import build_scheduler

    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = build_scheduler(base, scheduler, None)
    plain.set_timesteps(8)
    for schedule, option in (("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"),
                             ("beta", "use_beta_sigmas")):
        assert check_pair(scheduler, schedule) is None
        sched = build_scheduler(base, scheduler, schedule)
        assert sched.config[option] is True
        sched.set_timesteps(8)
        assert not np.allclose(sched.sigmas.numpy(), plain.sigmas.numpy()), schedule  # the transform is applied
    assert "valid: karras, exponential, beta" in check_pair(scheduler, "uniform")
    # the model's own scheduler class with a schedule works too; a refusal on a flow model hints flow_euler
    assert build_scheduler(base, None, "karras").config.use_karras_sigmas is True


# -- 20. messages: a LoRA as model.id, a tag's set on the server, webuiapi's default sampler on a flow server -------

def test_a_lora_given_as_model_id_is_called_a_lora(tmp_path: Path, tiny_dir: Path) -> None:
    lora = tiny_dir / "loras" / "tiny_kohya.safetensors"
    r = run_cli(f"model.id={lora}", *TINY[1:], f"output_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "is a LoRA, not a model" in r.stderr and "single-file checkpoint" not in r.stderr


def test_a_server_tag_error_names_the_prompt_not_an_internal_lora_set(tmp_path: Path) -> None:
    import glob
    import shutil

    from fastapi.testclient import TestClient
    from test_server import make_app, seed_form

    from runner.models.tiny import builtin_path

    loras = tmp_path / "loras"
    loras.mkdir()
    (xl,) = glob.glob(str(builtin_path("builtin:tiny-sdxl") / "loras" / "*.safetensors"))
    shutil.copy(xl, loras / "xl.safetensors")
    with TestClient(make_app(tmp_path, f"server.allowed_lora_dirs=[{loras}]")) as c:
        r = c.post("/submit", data=seed_form(text_prompt="a cube <lora:xl:0.5>"))
    assert r.status_code == 422 and "lora_sets[" not in r.json()["detail"], r.text
    assert "<lora:" in r.json()["detail"] and "Stable Diffusion XL" in r.json()["detail"]


def test_webuiapi_default_sampler_runs_on_a_flow_model_server(tiny_flux_dir: Path, tmp_path: Path) -> None:
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from runner.outputs.metadata import parse_infotext
    from runner.server.app import compose_config, create_app

    app = create_app(compose_config([f"model.id={tiny_flux_dir}", "device=cpu", f"server.output_dir={tmp_path}"]))
    with TestClient(app) as client:  # what webuiapi.WebUIApi().txt2img(prompt=...) sends by default
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "seed": 3, "steps": 2, "width": 32,
                                                   "height": 32, "sampler_name": "Euler a", "sampler_index": "Euler a",
                                                   "scheduler": "automatic"})
        assert r.status_code == 200, r.text
        karras = client.post("/sdapi/v1/txt2img", json={"prompt": "a red fox", "steps": 2, "width": 32, "height": 32,
                                                        "sampler_name": "Euler a", "scheduler": "Karras"})
        assert karras.status_code == 422  # an ancestral sampler asked for with a schedule is not silently changed
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) as im:
        assert parse_infotext(im.info["parameters"])["Sampler"] == "Euler"


# -- 16. the epoch axis reads t2i-train's own checkpoints -----------------------------------------------------------

def _train_like_checkpoints(root: Path, tiny_dir: Path) -> Path:
    """checkpoints/step-N/{sq,sq_kohya,training_state}.safetensors as t2i-train writes them (two steps)."""
    import torch
    from safetensors.torch import load_file, save_file

    lora = load_file(str(tiny_dir / "loras" / "tiny_kohya.safetensors"))
    for n, step in enumerate((3, 6)):
        d = root / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        weights = {k: v * (1 + n) if k.endswith("lora_up.weight") else v for k, v in lora.items()}
        save_file(weights, str(d / "sq.safetensors"))
        save_file(weights, str(d / "sq_kohya.safetensors"))
        save_file({"generator": torch.zeros(4, dtype=torch.uint8), "optimizer.0.exp_avg": torch.zeros(2)},
                  str(d / "training_state.safetensors"))
    return root / "checkpoints"


def test_the_epoch_axis_reads_t2i_train_checkpoints(tmp_path: Path, tiny_dir: Path, caplog) -> None:
    from runner.config import validate
    from runner.lora.files import expand_checkpoints, resolve_loras

    ckpts = _train_like_checkpoints(tmp_path, tiny_dir)
    base = {"model": {"id": "builtin:tiny"}}
    spec = expand_checkpoints(validate({**base, "lora_sets": [[{"source": f"{ckpts}/*/*.safetensors",
                                                                 "name": "sq"}]]}))
    assert [[lo.name for lo in s] for s in spec.lora_sets] == [["sq-step-000003-sq"], ["sq-step-000006-sq"]]
    assert len({r.sha256 for (r,) in resolve_loras(spec)}) == 2  # no name clash, both files
    one = expand_checkpoints(validate({**base, "lora_sets": [[{"source": str(ckpts / "step-000003")}]]}))
    assert [[Path(lo.source).name for lo in s] for s in one.lora_sets] == [["sq.safetensors"]]
    # byte-identical files in a glob make the same images: said, not silently one column fewer
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("e1", "e2"):
        (flat / f"{name}.safetensors").write_bytes((ckpts / "step-000003" / "sq.safetensors").read_bytes())
    with caplog.at_level("WARNING"):
        expand_checkpoints(validate({**base, "lora_sets": [[{"source": f"{flat}/*.safetensors"}]]}))
    assert "byte-identical" in caplog.text


# -- 14. model-axis comparison: the documented command gives one page, models across, seeds down, cells full ------

def test_the_readme_model_axis_command_gives_one_full_page(tmp_path: Path) -> None:
    import shlex

    from conftest import REPO

    from runner.outputs.grid import read_grid_info
    from runner.outputs.manifest import Manifest
    from runner.outputs.viewer import viewer_axes

    (line,) = [ln for ln in (REPO / "docs" / "families.md").read_text().splitlines() if "grid.x=model" in ln and
               ln.startswith("t2i ")]
    args = shlex.split(line.split("  #")[0])
    assert args[:2] == ["t2i", "models=[tiny,tiny-flux1]"]
    r = run_cli(*args[1:], f"output_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (page,) = (tmp_path / "r" / "grids").glob("*.png")
    info = read_grid_info(page)
    assert (info["x"], info["y"]) == ("model", "seed")
    assert len(info["cells"]) == 2 and all(len(row) == 2 and all(row) for row in info["cells"])
    axes, _ = viewer_axes(Manifest(tmp_path / "r").entries())
    assert [a["name"] for a in axes] == ["model", "seed"]  # no spurious per-model-default axis


# -- 19. the summary adds up with other writers; a short manifest write is an error, never a counted image ----------

def test_the_summary_counts_images_other_writers_are_still_making(tmp_path: Path, monkeypatch) -> None:
    from runner.config import validate
    from runner.outputs.rundir import RunDir
    from runner.run import run

    real = RunDir.claim
    held: list[str] = []

    def claim(self, jobs, replace=()):  # a live peer holds the plan's last image (claimed, not yet made)
        jobs = list(jobs)
        if not held and len(jobs) > 0:
            held.append(jobs[-1].key)
            jobs = jobs[:-1]
        return real(self, [j for j in jobs if j.key not in held], replace)

    monkeypatch.setattr(RunDir, "claim", claim)
    spec = validate({"model": {"id": "builtin:tiny"}, "prompts": ["a"], "seeds": [1, 2, 3], "steps": 1,
                     "width": 32, "height": 32, "device": "cpu", "grid": {"enabled": False}})
    result = run(spec, tmp_path / "r", progress=False)
    assert result.generated + result.skipped + result.by_others + result.with_others == result.planned == 3
    assert result.with_others == 1 and "1 still being made by other writers" in result.summary()


def test_a_short_manifest_write_is_an_error(tmp_path: Path, monkeypatch) -> None:
    import os

    from runner.outputs import manifest

    real = os.write
    monkeypatch.setattr(manifest.os, "write", lambda fd, data: real(fd, data[: len(data) // 2]))
    with pytest.raises(OSError):
        manifest.append_line(tmp_path / "m.jsonl", manifest.dumps({"key": "k", "file": "a.png"}))
    monkeypatch.setattr(manifest.os, "write", real)
    manifest.append_line(tmp_path / "m.jsonl", manifest.dumps({"key": "k2", "file": "b.png"}))
    assert [e["key"] for e in manifest.parse_lines((tmp_path / "m.jsonl").read_bytes())] == ["k2"]


def test_two_model_folders_of_one_name_are_two_columns(tmp_path: Path) -> None:
    import shutil

    from runner.models.tiny import builtin_path
    from runner.outputs.grid import read_grid_info
    from runner.outputs.manifest import Manifest

    for parent, builtin in (("a", "builtin:tiny"), ("b", "builtin:tiny-sdxl")):
        shutil.copytree(builtin_path(builtin), tmp_path / parent / "model")
    r = run_cli(f"models=[{tmp_path / 'a' / 'model'},{tmp_path / 'b' / 'model'}]", "prompts=[a red fox]",
                "seeds=[1,2]", "steps=1", "width=32", "height=32", "grid.x=model", f"output_dir={tmp_path / 'r'}",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {e["model"]["name"] for e in Manifest(tmp_path / "r").entries()} == {"a/model", "b/model"}
    (page,) = (tmp_path / "r" / "grids").glob("*.png")
    info = read_grid_info(page)
    assert info["x"] == "model" and all(len(row) == 2 and all(row) for row in info["cells"])
