"""Evaluation (runner/eval) costs, measured side by side in one process:

  - `eval.metrics=[clip_t,lora_effect]` inside a tiny CPU sweep vs the same sweep without it (alternating rounds,
    fresh run dirs): the generation time (the denoiser and writer, which the scorer thread must not slow by more
    than 5%) and the whole run (with the scores left for the end and the summary);
  - scoring throughput of the tiny scorers on CPU (images/s, clip_t and lora_effect);
  - `t2i-eval --summary` over cached scores of a synthetic N-image run dir (default 10,000): table, front, eval.md,
    plots and the viewer's data;
  - `--full`: throughput with real-size scorer configs (CLIP ViT-L/14, DINO ViT-S/16) and random weights, on the
    best device (a GPU when there is one).

    python bench/bench_eval.py                         # all but --full
    python bench/bench_eval.py --full --images 0 --rounds 0
    python bench/bench_eval.py --benchmarks docs/performance.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner.config.schema import EvalConfig  # noqa: E402
from runner.eval import store  # noqa: E402
from runner.eval.scorers import SCORERS, Session  # noqa: E402


def _cfg(clip: str = "builtin:tiny-clip", dino: str = "builtin:tiny-dino", **kw) -> EvalConfig:
    cfg = EvalConfig()
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, clip=clip, dino=dino), **kw)


def _images(n: int, size: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def sweep_overhead(rounds: int, images: int) -> dict:
    """Seconds of the same tiny sweep with and without eval.metrics (alternating, fresh dirs each time)."""
    from omegaconf import OmegaConf

    from runner.config.schema import RunConfig
    from runner.run import run

    seeds = list(range(max(1, images // 4)))
    base = {"model": {"id": "builtin:tiny"}, "steps": 4, "prompts": ["a red fox"], "seeds": seeds,
            "lora_sets": [[], [{"source": "builtin:tiny/loras/tiny_kohya.safetensors"}]], "lora_scales": [0.5, 1.0],
            "grid": {"enabled": False}, "viewer": {"enabled": False}}
    with_eval = {**base, "eval": {"metrics": ["clip_t", "lora_effect"], "models": {"clip": "builtin:tiny-clip"}}}
    times: dict[str, list] = {"off": [], "on": [], "off_total": [], "on_total": []}
    with tempfile.TemporaryDirectory() as tmp:
        run(OmegaConf.merge(OmegaConf.structured(RunConfig), base), Path(tmp) / "warm", progress=False)
        run(OmegaConf.merge(OmegaConf.structured(RunConfig), with_eval), Path(tmp) / "warm2", progress=False)
        for r in range(rounds):
            for name, conf in (("off", base), ("on", with_eval)):
                t0 = time.perf_counter()
                res = run(OmegaConf.merge(OmegaConf.structured(RunConfig), conf), Path(tmp) / f"{name}{r}",
                          progress=False)
                times[name].append(res.seconds)
                times[f"{name}_total"].append(time.perf_counter() - t0)
        n = res.generated
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"images": n, **med, "gen_ratio": med["on"] / med["off"], "total_ratio": med["on_total"] / med["off_total"]}


def throughput(cfg: EvalConfig, n: int, size: int, device: str) -> dict:
    """Images/s of clip_t and lora_effect (one warm-up batch first)."""
    session = Session(cfg, ["clip_t", "lora_effect"], device, say=lambda m: None).load()
    ims = _images(n, size)
    entries = [{"prompt": "a red fox in the snow", "key": str(i), "file": f"{i}.png"} for i in range(n)]
    out = {}
    for name in ("clip_t", "lora_effect"):
        s = SCORERS[name]
        args = (entries, ims, ims[::-1]) if s.baseline else (entries, ims)
        session.score(s, *(a[:cfg.batch_size] for a in args))
        t0 = time.perf_counter()
        session.score(s, *args)
        out[name] = n / (time.perf_counter() - t0)
    return out


def synthetic_run(folder: Path, n: int) -> None:
    """An n-image run dir: records shaped like the runner's (5 LoRAs x 6 weights x 10 checkpoints + baselines),
    empty image files, and clip_t + lora_effect scores for each."""
    import random

    rnd = random.Random(0)
    man, met = [], []
    sig = {"version": 1, "model": "clip-vit-large-patch14"}
    for i in range(n):
        lora = i % 61 != 0
        rec = {"key": f"{i:016x}", "file": f"{i:06d}.png", "index": i, "prompt": f"prompt {i % 20}", "seed": i % 4,
               "steps": 30, "guidance_scale": 7.5, "width": 512, "height": 512, "prompt_syntax": "a1111",
               "model": {"id": "sd15", "hash": "f" * 64}, "lora_scale": None if not lora else [0.25, 0.5, 0.75, 1.0,
                                                                                                 1.25, 1.5][i % 6],
               "loras": [] if not lora else [{"name": f"style{i % 5}-step-{(i // 30) % 10 * 100:06d}",
                                              "file": f"/l/style{i % 5}/step-{(i // 30) % 10 * 100:06d}.safetensors",
                                              "scale": 1.0}]}
        man.append(rec)
        (folder / rec["file"]).touch()
        met.append(store.make_line(rec, "clip_t", sig, {"clip_t": rnd.uniform(20, 35)}))
        if lora:
            met.append(store.make_line(rec, "lora_effect", sig, {"lora_effect": rnd.random(),
                                                                  "lora_effect_ssim": rnd.random(),
                                                                  "lora_effect_mad": rnd.random()}))
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in man))
    store.append(folder, met)


def summary_seconds(n: int) -> tuple[float, float]:
    """(wall, CPU) seconds of write_summary (matplotlib imported before: a process pays that once)."""
    import matplotlib.pyplot  # noqa: F401

    from runner.eval.summary import write_summary

    with tempfile.TemporaryDirectory() as tmp:
        synthetic_run(Path(tmp), n)
        t0, c0 = time.perf_counter(), time.process_time()
        write_summary(Path(tmp), None)
        return time.perf_counter() - t0, time.process_time() - c0


def full_models(root: Path) -> tuple[str, str]:
    """Real-size CLIP ViT-L/14 and DINO ViT-S/16 with random weights (configs only; no hub)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from runner.models.tiny import _write_tokenizer

    clip, dino = root / "clip-l14", root / "dino-s16"
    vocab = _write_tokenizer(clip / "tok")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(clip / "tok" / "vocab.json"), str(clip / "tok" / "merges.txt"))
    text = {"vocab_size": vocab, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
              "image_size": 224, "patch_size": 14}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(clip)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(clip)
    ViTModel(ViTConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=12,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(dino)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(dino)
    return str(clip), str(dino)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the sweep with/without eval")
    ap.add_argument("--sweep-images", type=int, default=24, help="images per sweep round")
    ap.add_argument("--images", type=int, default=10_000, help="images of the synthetic run dir (0: skip)")
    ap.add_argument("--score-images", type=int, default=64, help="images for the throughput measurement")
    ap.add_argument("--full", action="store_true", help="also real-size scorer configs, random weights")
    ap.add_argument("--full-images", type=int, default=256, help="images per --full throughput measurement")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--benchmarks", type=Path, help="append the results to this markdown file")
    args = ap.parse_args(argv)
    from runner.models.source import resolve_device

    device = resolve_device(args.device)
    out = [f"### Evaluation: `python bench/bench_eval.py {' '.join(argv or sys.argv[1:])}`", "",
           f"{platform.machine()}, {platform.processor() or platform.system()}, device {device}", ""]
    if args.rounds:
        r = sweep_overhead(args.rounds, args.sweep_images)
        out += [f"- tiny CPU sweep, {r['images']} images, median of {args.rounds}: generation {r['off']:.2f} s "
                f"without eval, {r['on']:.2f} s with eval.metrics=[clip_t,lora_effect] (ratio {r['gen_ratio']:.3f});"
                f" whole run {r['off_total']:.2f} s vs {r['on_total']:.2f} s (ratio {r['total_ratio']:.3f})"]
    if args.score_images:
        t = throughput(_cfg(batch_size=16), args.score_images, 64, "cpu")
        out += [f"- tiny scorers on cpu, 64 px: clip_t {t['clip_t']:.0f} images/s, lora_effect "
                f"{t['lora_effect']:.0f} images/s"]
    if args.images:
        wall, cpu = summary_seconds(args.images)
        out += [f"- t2i-eval --summary over cached scores of {args.images} images: {wall:.2f} s wall, {cpu:.2f} s "
                "CPU (table, Pareto fronts, eval.md, 18 PNG/SVG plots, viewer-metrics.js)"]
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            clip, dino = full_models(Path(tmp))
            for space, n in (("clip", args.full_images), ("dino", args.full_images)):
                t = throughput(_cfg(clip, dino, batch_size=32, lora_effect_space=space), n, 512, device)
                out += [f"- real-size configs (CLIP ViT-L/14, DINO ViT-S/16; random weights) on {device}, 512 px, "
                        f"batch 32, lora_effect in {space}: clip_t {t['clip_t']:.1f} images/s, lora_effect "
                        f"{t['lora_effect']:.1f} images/s"]
    text = "\n".join(out) + "\n"
    print(text)
    if args.benchmarks:
        with open(args.benchmarks, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
