"""runner/eval and t2i-eval: scorers against independent computations and known image differences, metrics.jsonl
(resumable, one signature per line), the summary table / Pareto front / plots, bad input (one line, exit 2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import job_done, run_cli
from PIL import Image

from runner.config.schema import EvalConfig
from runner.eval import store
from runner.eval.scorers import SCORERS, Session, prompt_text
from runner.eval_cli import main as eval_main

CLIP, DINO = "builtin:tiny-clip", "builtin:tiny-dino"


def _cfg(**kw) -> EvalConfig:
    cfg = EvalConfig()
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, clip=CLIP, dino=DINO), **kw)


def _pattern(seed: int, size: int = 64) -> Image.Image:
    """A smooth random image (low frequencies: what a scorer's 32-px resize keeps)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def _noisy(image: Image.Image, sigma: float, seed: int = 7) -> Image.Image:
    a = np.asarray(image, dtype=np.float64)
    a = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# 1. Scorers against references


def test_clip_t_is_torchmetrics_formula_by_clipmodel_forward() -> None:
    """clip_t = 100 * max(cos, 0) of the prompt without A1111 weights and tags, checked against CLIPModel's own
    forward (logits_per_image / logit_scale), in a batch and alone."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from runner.eval.models import resolve

    images = [_pattern(i) for i in range(4)]
    entries = [{"prompt": p, "prompt_syntax": s, "key": str(i), "file": f"{i}.png"} for i, (p, s) in enumerate([
        ("a (red:1.3) fox <lora:style:0.8>", "a1111"), ("the [house] BREAK at night", "a1111"),
        ("a cat (literal)", "plain"), ("zz qq", "plain")])]
    texts = [prompt_text(e) for e in entries]
    assert texts[:3] == ["a red fox", "the house at night", "a cat (literal)"]
    session = Session(_cfg(), ["clip_t"], "cpu").load()
    got = [v["clip_t"] for v in session.score(SCORERS["clip_t"], entries, images)]
    alone = [session.score(SCORERS["clip_t"], [e], [im])[0]["clip_t"] for e, im in zip(entries, images, strict=True)]
    local = resolve(CLIP)[0]
    model, proc = CLIPModel.from_pretrained(local).eval(), CLIPProcessor.from_pretrained(local)
    with torch.no_grad():
        out = model(**proc(text=texts, images=images, return_tensors="pt", padding=True))
        cos = (out.logits_per_image / model.logit_scale.exp()).diagonal()
    want = [100 * max(float(c), 0.0) for c in cos]
    assert np.allclose(got, want, atol=1e-3), (got, want)
    assert np.allclose(alone, want, atol=1e-3)
    assert all(v > 0 for v in want)  # the tiny CLIP has a shared direction: the scores are not all clamped


def test_clip_t_clamps_negative_cosines_to_zero() -> None:
    session = Session(_cfg(), ["clip_t"], "cpu").load()
    emb = session.embedders["clip"]
    texts = emb.texts
    emb.texts = lambda t: -texts(t)  # every cosine negated: the formula's max(cos, 0) gives 0
    try:
        got = session.score(SCORERS["clip_t"], [{"prompt": "a fox", "key": "k", "file": "f"}], [_pattern(0)])
    finally:
        emb.texts = texts
    assert got == [{"clip_t": 0.0}]


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    from runner.eval.pixels import luma, ssim

    a, b = _pattern(1), _noisy(_pattern(1), 25)
    want = structural_similarity(luma(a), luma(b), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255)
    assert ssim(luma(a), luma(b)) == pytest.approx(want, abs=1e-12)
    assert ssim(luma(a), luma(a)) == pytest.approx(1.0)


def test_every_metric_orders_known_differences(tmp_path: Path) -> None:
    """The same image, a little noise, more noise, another image: each similarity falls and each distance
    grows in that order."""
    base = _pattern(3)
    ref = tmp_path / "ref"
    ref.mkdir()
    base.save(ref / "subject.png")
    images = [base, _noisy(base, 12), _noisy(base, 60), _pattern(99)]
    entries = [{"prompt": "x", "key": str(i), "file": f"{i}.png", "loras": [{"name": "a"}]} for i in range(4)]
    for space in ("clip", "dino"):
        session = Session(_cfg(reference_dir=str(ref), lora_effect_space=space),
                          ["clip_i", "dino", "lora_effect"], "cpu").load()
        sims = {n: [v[n] for v in session.score(SCORERS[n], entries, images)] for n in ("clip_i", "dino")}
        effect = session.score(SCORERS["lora_effect"], entries, images, [base] * 4)
        for name, vals in sims.items():
            assert vals[0] == pytest.approx(1.0, abs=1e-5) and vals[0] > vals[1] > vals[2] > vals[3], (name, vals)
        for col in SCORERS["lora_effect"].columns:
            vals = [v[col] for v in effect]
            assert vals[0] == pytest.approx(0.0, abs=1e-5) and vals[0] < vals[1] < vals[2] < vals[3], (space, col,
                                                                                                        vals)


# 2. A tiny LoRA sweep: 2 sets x 3 weights x 2 checkpoints, scored and summarised


def _checkpoints(tiny_dir: Path, root: Path) -> dict[str, Path]:
    """Two LoRAs with two training checkpoints each (the example kohya LoRA's up-weights scaled)."""
    from safetensors.torch import load_file, save_file

    src = load_file(str(tiny_dir / "loras" / "tiny_kohya.safetensors"))
    out = {}
    for name, sign in (("a", 1.0), ("b", -1.0)):
        d = root / name
        d.mkdir(parents=True)
        for step, k in ((100, 0.5), (200, 1.0)):
            t = {key: (v * sign * k if "lora_up" in key else v) for key, v in src.items()}
            save_file(t, str(d / f"step-{step:06d}.safetensors"), metadata={"ss_network_dim": "4"})
        out[name] = d
    return out


def sweep_args(tiny_dir: Path, root: Path, out: Path, *extra: str) -> list[str]:
    ck = _checkpoints(tiny_dir, root)
    sets = f"[[],[{{source:'{ck['a']}/*.safetensors',name:a}}],[{{source:'{ck['b']}/*.safetensors',name:b}}]]"
    return [f"model.id={tiny_dir}", "steps=2", "width=32", "height=32", "prompts=[a red fox,a blue house]",
            "seeds=[0]", f"lora_sets={sets}", "lora_scales=[0.5,1.0,1.5]", f"output_dir={out}", "grid.enabled=false",
            *extra]


@pytest.fixture(scope="module")
def sweep(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-sweep")
    out = root / "run"
    r = run_cli(*sweep_args(tiny_dir, root / "ckpt", out))
    assert r.returncode == 0, r.stderr
    return out


def _lines(folder: Path) -> list[dict]:
    return store.read_lines(folder)


@pytest.mark.slow
def test_t2i_eval_scores_resumes_and_keeps_models_apart(sweep: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sweep, run)
    entries = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 2 * (1 + 2 * 2 * 3)
    assert eval_main([str(run), "--clip-model", CLIP, "--metrics", "clip_t,lora_effect"]) == 0
    lines = _lines(run)
    lora_images = [e for e in entries if e["loras"]]
    assert len([ln for ln in lines if ln["scorer"] == "clip_t"]) == len(entries)
    effect = [ln for ln in lines if ln["scorer"] == "lora_effect"]
    assert len(effect) == len(lora_images)
    assert all(not ln["baseline"]["made"] and ln["baseline"]["file"].endswith("nolora.png") for ln in effect)
    # resumable: nothing new the second time
    before = (run / "metrics.jsonl").read_bytes()
    assert eval_main([str(run), "--clip-model", CLIP, "--metrics", "clip_t,lora_effect"]) == 0
    assert (run / "metrics.jsonl").read_bytes() == before
    assert "every image was scored already" in capsys.readouterr().out
    # another CLIP: new lines beside the old, and the summary names the one it uses
    other = tmp_path / "clip2"
    from runner.models.tiny import main as tiny_main

    assert tiny_main([str(other), "--family", "clip"]) == 0
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    w["visual_projection.weight"] = w["visual_projection.weight"] * -1  # another model: other identity
    save_file(w, str(other / "model.safetensors"))
    assert eval_main([str(run), "--clip-model", str(other), "--metrics", "clip_t"]) == 0
    lines = _lines(run)
    models = {ln["model"] for ln in lines if ln["scorer"] == "clip_t"}
    assert len(models) == 2 and len([ln for ln in lines if ln["scorer"] == "clip_t"]) == 2 * len(entries)
    capsys.readouterr()
    assert eval_main([str(run), "--summary", "--clip-model", str(other)]) == 0
    out = capsys.readouterr().out
    assert "holds scores of 2 models" in out and "clip2@" in out


def test_summary_table_front_plots_and_viewer_data(sweep: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from runner.eval.summary import METRICS_GLOBAL, summarize

    run = tmp_path / "run"
    shutil.copytree(sweep, run)
    assert eval_main([str(run), "--clip-model", CLIP, "--metrics", "clip_t,lora_effect", "--summary"]) == 0
    out = capsys.readouterr().out
    s = summarize(run)
    labels = [(r.set, r.weight, r.step) for r in s.rows]
    assert labels[0] == ("nolora", 0.0, None)
    assert sorted(labels[1:]) == sorted((n, w, st) for n in "ab" for w in (0.5, 1.0, 1.5) for st in (100, 200))
    row = next(r for r in s.rows if (r.set, r.weight, r.step) == ("a", 1.0, 200))
    vals = row.values["clip_t"]
    assert len(vals) == 2 and row.mean("clip_t") == pytest.approx(sum(vals) / 2)
    assert row.std("clip_t") == pytest.approx(float(np.std(vals, ddof=1)))
    # the front: no row beats a front row on both means; every other row is beaten by some row
    front = s.fronts["lora_effect"]
    pts = [r for r in s.rows if r.mean("lora_effect") is not None]
    for r in pts:
        beaten = any(o.mean("clip_t") >= r.mean("clip_t") and o.mean("lora_effect") >= r.mean("lora_effect")
                     and o is not r and (o.mean("clip_t"), o.mean("lora_effect")) != (r.mean("clip_t"),
                                                                                    r.mean("lora_effect"))
                     for o in pts)
        assert beaten == (r not in front), r.label
    assert "| LoRA set | weight | step | n | clip_t |" in out and "clip_t vs lora_effect:" in out
    assert front[0].label in out
    md = (run / "eval.md").read_text()
    assert "## Pareto front" in md
    assert "![tradeoff_clip_t_vs_lora_effect](eval/tradeoff_clip_t_vs_lora_effect.png)" in md
    for name in ("clip_t_vs_weight", "lora_effect_vs_step", "tradeoff_clip_t_vs_lora_effect"):
        png, svg = run / "eval" / f"{name}.png", run / "eval" / f"{name}.svg"
        assert Image.open(png).size[0] > 100 and svg.read_text().lstrip().startswith("<?xml")
    data = (run / "viewer-metrics.js").read_text()
    assert data.startswith(f"window.{METRICS_GLOBAL} = ")
    obj = json.loads(data.split(" = ", 1)[1].rstrip().rstrip(";"))
    assert set(obj["columns"]) >= {"clip_t", "lora_effect"} and len(obj["scores"]) == 26
    # same scores, same plot bytes
    before = (run / "eval" / "clip_t_vs_weight.svg").read_bytes()
    assert eval_main([str(run), "--summary", "--clip-model", CLIP]) == 0
    assert (run / "eval" / "clip_t_vs_weight.svg").read_bytes() == before


def test_missing_baselines_made_on_demand_and_recorded(sweep: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sweep, run)
    lines = (run / "manifest.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x)["loras"] and json.loads(x)["lora_set_name"].startswith("a")][:2]
    (run / "manifest.jsonl").write_text("\n".join(kept) + "\n")  # a run without its no-LoRA images
    assert eval_main([str(run), "--clip-model", CLIP, "--metrics", "lora_effect", "--no-make-baseline"]) == 2
    assert not (run / "metrics.jsonl").exists()
    assert eval_main([str(run), "--clip-model", CLIP, "--metrics", "lora_effect"]) == 0
    effect = _lines(run)
    assert len(effect) == 2 and all(ln["baseline"]["made"] for ln in effect)
    made = run / effect[0]["baseline"]["file"]
    assert made.parent.name == "baselines" and made.is_file()
    # the made baseline is the run's own no-LoRA image of that prompt and seed, bit for bit
    original = {json.loads(x)["key"]: json.loads(x)["file"] for x in lines if not json.loads(x)["loras"]}
    made_entry = json.loads((run / "baselines" / "manifest.jsonl").read_text().splitlines()[0])
    assert made_entry["key"] in original
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(run / original[made_entry["key"]])))


# 3. Bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("args, expect", [
    (["--metrics", "clip_x"], "unknown metric 'clip_x' in eval.metrics (did you mean 'clip_t'?)"),
    (["--metrics", "clip_i", "--reference-dir", "EMPTY"], "has no images"),
    (["--metrics", "dino"], "set eval.reference_dir=DIR"),
    (["--metrics", "clip_t", "--clip-model", "/no/such/clip"], "does not load as a CLIP model"),
    (["--metrics", "clip_t", "--clip-model", "openai/clip-vit-large-patch14"], "does not load as a CLIP model"),
    (["--metrics", "clip_t", "--batch-size", "0"], "eval.batch_size=0"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(sweep: Path, tmp_path: Path, capsys, args, expect) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.replace("EMPTY", str(empty)) for a in args]
    before = sorted(p.name for p in sweep.iterdir())
    code = eval_main([str(sweep), *(["--clip-model", CLIP] if "--clip-model" not in args else []), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("t2i-eval: error: ") and expect in err[0], err
    assert sorted(p.name for p in sweep.iterdir()) == before


def test_absent_extra_is_skipped_with_one_line(sweep: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sweep, run)
    assert eval_main([str(run), "--clip-model", CLIP, "--metrics", "clip_t,image_reward"]) == 0
    out = capsys.readouterr().out
    assert "image_reward skipped: its package is not installed (pip install image-reward" in out
    assert {ln["scorer"] for ln in _lines(run)} == {"clip_t"}


# 4. eval.metrics inside a run: the tiny sweep, scored by the writer side


@pytest.mark.slow
def test_tiny_sweep_with_eval_metrics_scores_summarises_and_plots(tiny_dir: Path, tmp_path: Path,
                                                                  capsys) -> None:
    """2 LoRA sets x 3 weights x 2 checkpoints with eval.metrics=[clip_t,lora_effect]: metrics.jsonl, eval.md with
    the table and the Pareto front, the plots and the viewer's metric data, the same scores t2i-eval gives."""
    import shutil

    out = tmp_path / "run"
    r = run_cli(*sweep_args(tiny_dir, tmp_path / "ckpt", out, "eval.metrics=[clip_t,lora_effect]",
                            f"eval.models.clip={CLIP}"))
    assert r.returncode == 0, r.stderr
    lines = _lines(out)
    assert len([ln for ln in lines if ln["scorer"] == "clip_t"]) == 26
    assert len([ln for ln in lines if ln["scorer"] == "lora_effect"]) == 24
    md = (out / "eval.md").read_text()
    assert "| LoRA set | weight | step |" in md and "- clip_t vs lora_effect: " in md
    assert (out / "eval" / "tradeoff_clip_t_vs_lora_effect.png").is_file()
    assert (out / "eval" / "clip_t_vs_step.svg").is_file()
    assert "clip_t" in (out / "viewer-metrics.js").read_text()
    # the writer side scores as t2i-eval does afterwards
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "metrics.jsonl").unlink()
    assert eval_main([str(again), "--clip-model", CLIP, "--metrics", "clip_t,lora_effect"]) == 0
    key = lambda ln: (ln["key"], ln["scorer"])  # noqa: E731
    live = {key(ln): ln["values"] for ln in lines}
    after = {key(ln): ln["values"] for ln in _lines(again)}
    assert live.keys() == after.keys()
    for k, v in live.items():
        assert v == pytest.approx(after[k], rel=1e-5, abs=1e-5), k  # float32 batches of other sizes


def test_run_with_lora_effect_and_no_baseline_is_refused_before_loading(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    kohya = tiny_dir / "loras" / "tiny_kohya.safetensors"
    r = run_cli(f"model.id={tiny_dir}", "steps=2", f"lora_sets=[[{{source:'{kohya}'}}]]", "eval.metrics=[lora_effect]",
                "eval.make_baseline=false", f"output_dir={out}")
    assert r.returncode == 2 and "no [] (no-LoRA baseline)" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()
    r = run_cli(f"model.id={tiny_dir}", "steps=2", "eval.metrics=[clip_q]", f"output_dir={out}")
    assert r.returncode == 2 and "unknown metric 'clip_q'" in r.stderr and not out.exists()
    r = run_cli(f"model.id={tiny_dir}", "steps=2", "eval.metrics=[clip_t]", "eval.models.clip=/no/such/clip",
                f"output_dir={out}")
    assert r.returncode == 2 and "eval.models.clip='/no/such/clip' does not load as a CLIP model" in r.stderr
    assert not out.exists()


# 5. The server: a job's JSON and /runs show the scores


def test_server_job_json_and_runs_show_scores(sweep: Path, tmp_path: Path) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from runner.server.app import compose_config, create_app

    extra = tmp_path / "extra"
    shutil.copytree(sweep, extra / "run")
    assert eval_main([str(extra / "run"), "--clip-model", CLIP, "--metrics", "clip_t,lora_effect", "--summary"]) == 0
    app = create_app(compose_config(["model=tiny", f"server.output_dir={tmp_path / 'out'}",
                                     f"server.run_dirs=[{extra}]", "eval.metrics=[clip_t]",
                                     f"eval.models.clip={CLIP}"]))
    with TestClient(app) as client:
        job = client.post("/api/jobs", json={"text_prompt": "a red fox", "inference_steps": 1, "width": 32,
                                             "height": 32, "total_nm_img_prompt": 2}).json()
        job = job_done(client, job["id"], timeout=60)
        assert job["status"] == "done", job
        assert len(job["scores"]) == 2 and all(0 < s["clip_t"] <= 100 for s in job["scores"])
        runs = {r["path"]: r for r in client.get("/api/runs").json()["runs"]}
        scored = runs["run"]["metrics"]
        assert scored["columns"][:2] == ["clip_t", "lora_effect"] and scored["fronts"]["lora_effect"]
        assert {r["n"] for r in scored["rows"]} == {2}
        page = client.get("/runs").text
        assert "front clip_t vs lora_effect: " + scored["fronts"]["lora_effect"][0] in page
        assert client.get(runs["run"]["url"] + "viewer-metrics.js").text.startswith("window.T2I_VIEWER_METRICS = {")


def test_pareto_front_keeps_exactly_the_undominated_rows() -> None:
    from runner.eval.summary import Row, pareto

    def row(name: str, a: float, b: float) -> Row:
        r = Row(name, 1.0, None)
        r.values["clip_t"].append(a)
        r.values["dino"].append(b)
        return r

    rows = [row("p", 1, 5), row("q", 2, 4), row("r", 3, 3), row("s", 2, 2), row("t", 3, 1), row("u", 1, 4)]
    assert [r.set for r in pareto(rows, "clip_t", "dino")] == ["r", "q", "p"]  # by clip_t, best first
    assert [r.set for r in pareto(rows + [row("v", 3, 3)], "clip_t", "dino")] == ["r", "v", "q", "p"]  # ties stay


@pytest.mark.parametrize("lora, want", [
    ({"name": "style-step-000400", "file": "/l/style/step-000400.safetensors"}, ("style", 400)),
    ({"name": "mylora-000012", "file": "/l/mylora-000012.safetensors"}, ("mylora", 12)),
    ({"name": "mylora", "file": "/out/checkpoints/step-000300/mylora.safetensors"}, ("mylora", 300)),
    ({"name": "style2", "file": "/l/style2.safetensors"}, ("style2", None)),
    ({"name": "tiny_kohya", "file": "/l/tiny_kohya.safetensors"}, ("tiny_kohya", None)),
])
def test_checkpoint_step_from_file_name_or_folder(lora: dict, want: tuple) -> None:
    from runner.eval.summary import lora_step

    assert lora_step(lora) == want


def test_t2i_eval_scores_a_merged_dir(sweep: Path, tmp_path: Path, capsys) -> None:
    """A merged dir's images live in the run dirs it references: its scores and summary are its own."""
    from runner.eval.summary import summarize
    from runner.outputs.sweep import merge_main

    merged = tmp_path / "merged"
    assert merge_main([str(sweep), "-o", str(merged), "--no-grid"]) == 0
    assert eval_main([str(merged), "--clip-model", CLIP, "--summary", "--metrics", "clip_t,lora_effect"]) == 0
    lines = _lines(merged)
    assert len(lines) == 26 + 24 and all(ln["file"].startswith("../") for ln in lines)
    assert not (sweep / "metrics.jsonl").exists()  # the source run dir is left as it was
    s = summarize(merged)
    assert len(s.rows) == 13 and s.fronts["lora_effect"]
    assert (merged / "eval.md").is_file()


@pytest.mark.slow
def test_t2i_eval_scores_a_multirun_sweep_dir(tiny_dir: Path, tmp_path: Path) -> None:
    """A multirun sweep dir (one run dir per job): one metrics.jsonl for the sweep, each LoRA image against the
    baseline of its own job."""
    from runner.eval.summary import summarize

    sweep = tmp_path / "sweep"
    kohya = tiny_dir / "loras" / "tiny_kohya.safetensors"
    r = run_cli("-m", f"model.id={tiny_dir}", "steps=1", "width=32", "height=32", "prompts=[a fox]",
                f"lora_sets=[[],[{{source:'{kohya}'}}]]", "lora_scales=[0.5,1.0]", "seeds=[1],[2]",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    assert eval_main([str(sweep), "--clip-model", CLIP, "--metrics", "clip_t,lora_effect"]) == 0
    lines = _lines(sweep)
    assert len([ln for ln in lines if ln["scorer"] == "clip_t"]) == 6
    effect = [ln for ln in lines if ln["scorer"] == "lora_effect"]
    assert len(effect) == 4 and all(ln["file"].split("/")[0] == ln["baseline"]["file"].split("/")[0] for ln in effect)
    assert [r.set for r in summarize(sweep).rows][0] == "nolora"


def test_summary_uses_one_model_per_metric_the_configured_else_the_latest() -> None:
    from runner.eval.summary import pick_lines

    def line(key: str, model: str, v: float) -> dict:
        return store.make_line({"key": key, "file": f"{key}.png"}, "clip_t", {"version": 1, "model": model},
                               {"clip_t": v})

    lines = [line("a", "m1", 1.0), line("a", "m2", 2.0), line("b", "m1", 3.0)]
    notes: list[str] = []
    assert [ln["values"]["clip_t"] for ln in pick_lines(lines, None, notes)] == [1.0, 3.0]  # m1 wrote last
    assert notes == ["clip_t: metrics.jsonl holds scores of 2 models/versions; this summary uses m1 (version 1) "
                     "only (the latest)"]
    cfg = dataclasses.replace(EvalConfig(), models=dataclasses.replace(EvalConfig().models, clip="m2"))
    assert [ln["values"]["clip_t"] for ln in pick_lines(lines, cfg, [])] == [2.0]  # the configured model
