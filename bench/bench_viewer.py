"""The run viewer at scale: a synthetic run dir of N images (default 10,000) opened in Chromium (Playwright).

Measures, in one process on one machine, side by side:
  - writing the viewer's data for N records (what a live run pays per refresh, in its viewer thread);
  - opening RUN_DIR/index.html from file:// until the first screen's thumbnails are drawn, in three views
    (the default view; all N images in 200 cells, 50 per cell; all N as one flat gallery);
  - scrolling the flat gallery at a fixed speed (px per animation frame; frame times);
  - the same for a naive page that puts all N thumbnails in the document (<img loading=lazy>), for the ratio.
The records are synthetic (the shape of runner/outputs/record.py's, 10 prompts x 20 seeds x 50 LoRA settings);
the thumbnails are real 256 px JPEGs, the PNGs small placeholders (the grid never loads them).

    python bench/bench_viewer.py                      # 10,000 images, 3 trials, scroll 600 frames at 160 px
    python bench/bench_viewer.py --images 500 --trials 1 --benchmarks docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner.outputs import viewer  # noqa: E402
from runner.outputs.thumbs import THUMB_DIR, thumb_rel  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PROMPTS = [f"a photograph of subject {i}, detailed, soft light" for i in range(10)]
LORAS = [f"style_{k}" for k in range(7)]
SCALES = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def records(n: int) -> list[dict]:
    """n records shaped like the runner's: prompts x seeds x (no LoRA + 7 LoRAs x 7 scales), cut to n."""
    model = {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "name": "stable-diffusion-v1-5", "kind": "hub",
             "location": "stable-diffusion-v1-5/stable-diffusion-v1-5", "revision": "main", "hash": "f" * 64,
             "pipeline": "StableDiffusionPipeline", "dtype": "float16", "variant": None, "config": None}
    versions = {"python": "3.11.7", "t2i-runner": "0.1.0", "torch": "2.13.0", "diffusers": "0.42.1",
                "transformers": "5.23.0", "peft": "0.21.2", "safetensors": "0.8.0"}
    sets = [(None, None)] + [(lo, s) for lo in LORAS for s in SCALES]
    out = []
    seeds = range(max(1, -(-n // (len(PROMPTS) * len(sets)))))
    for prompt in PROMPTS:
        for seed in seeds:
            for lora, scale in sets:
                i = len(out)
                if i >= n:
                    return out
                loras = [] if lora is None else [{"name": lora, "source": f"/loras/{lora}.safetensors",
                                                  "weight_name": None, "scale": scale,
                                                  "sha256": f"{LORAS.index(lora):064x}",
                                                  "file": f"/loras/{lora}.safetensors"}]
                out.append({
                    "record_version": 1, "file": f"{i:05d}_subject-{PROMPTS.index(prompt)}_s{seed}.png",
                    "key": f"{i:016x}", "index": i, "prompt": prompt, "negative_prompt": "blurry", "seed": seed,
                    "steps": 30, "guidance_scale": 7.5, "width": 512, "height": 512, "scheduler": None,
                    "clip_skip": None, "sampler": "Euler", "scheduler_class": "EulerDiscreteScheduler",
                    "lora_set": 0 if lora is None else 1 + LORAS.index(lora), "lora_scale": scale, "loras": loras,
                    "model": model, "perf": {"channels_last": False, "fuse_qkv": False, "fuse_lora": False,
                                             "compile": False},
                    "device": "cuda", "generator": "cpu", "batch_size": 8, "batch_invariant": False,
                    "versions": versions,
                })
    return out


def make_run_dir(folder: Path, n: int) -> list[dict]:
    """A run dir with n manifest lines, placeholder PNGs, real thumbnails (both sizes) and the viewer. Files
    already there (from an earlier `--dir` run) are kept."""
    import numpy as np
    from PIL import Image

    from runner.outputs.thumbs import SMALL_SIZE, encode_thumb

    (folder / THUMB_DIR / "small").mkdir(parents=True, exist_ok=True)
    entries = records(n)
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 256, dtype=np.float32)
    placeholder = Image.new("RGB", (64, 64), (128, 128, 128))
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for e in entries:
            big, small = folder / thumb_rel(e["file"]), folder / thumb_rel(e["file"], small=True)
            if not big.is_file():
                tint = rng.integers(0, 255, 3)
                arr = np.stack([np.add.outer(base, base * (c / 255.0)) / 2 % 256 for c in tint], -1)
                arr += rng.normal(0, 12, arr.shape)
                Image.fromarray(np.clip(arr, 0, 255).astype("uint8")).save(big, quality=82)
            if not small.is_file():
                with Image.open(big) as im:
                    small.write_bytes(encode_thumb(im, SMALL_SIZE))
            if not (folder / e["file"]).is_file():
                placeholder.save(folder / e["file"])
            manifest.write(json.dumps(e, sort_keys=True) + "\n")
    return entries


def time_write(folder: Path, entries: list[dict], trials: int) -> tuple[float, float]:
    """Seconds to build and write the viewer's data for all entries (best of trials), and its size in MB."""
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        viewer.write_viewer(folder, entries, viewer.progress("done", len(entries), len(entries), time.time()))
        best = min(best, time.perf_counter() - start)
    return best, (folder / viewer.DATA_JS).stat().st_size / 1e6


NAIVE = """<!doctype html><meta charset="utf-8"><style>body{margin:0}#g{display:flex;flex-wrap:wrap}
#g img{width:154px;height:154px;margin:3px;object-fit:contain}</style><div id="g">%s</div>"""

VISIBLE_LOADED = """() => {
  const imgs = [...document.querySelectorAll('img')].filter(i => { const r = i.getBoundingClientRect();
    return r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth && r.width > 0; });
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""

SCROLL = """async ([id, px, n]) => {
  const sc = id ? document.getElementById(id) : document.scrollingElement;
  const max = sc.scrollHeight - sc.clientHeight;
  const frames = [];
  let blank = 0, last = performance.now();
  for (let i = 1; i <= n && sc.scrollTop < max; i++) {
    sc.scrollTop = Math.min(max, i * px);
    await new Promise(r => requestAnimationFrame(r));
    const now = performance.now(); frames.push(now - last); last = now;
    if (id && !document.querySelector('.cell')) blank++;
  }
  return {frames, blank, height: max, reached: sc.scrollTop};
}"""


def open_page(browser, url: str, scroller: str | None) -> dict:
    """Open `url` in a fresh context; times until the first screen's thumbnails are drawn."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    page = ctx.new_page()
    start = time.perf_counter()
    page.goto(url, wait_until="load", timeout=120_000)
    page.wait_for_function(VISIBLE_LOADED, timeout=120_000, polling=10)
    wall = time.perf_counter() - start
    nav = page.evaluate("performance.getEntriesByType('navigation')[0].toJSON()")
    ready = page.evaluate("window.t2iViewer ? window.t2iViewer.ready : null")
    nodes = page.evaluate("document.getElementsByTagName('*').length")
    return {"page": page, "ctx": ctx, "wall": wall, "load": nav["loadEventEnd"], "ready": ready, "nodes": nodes,
            "scroller": scroller}


def scroll(result: dict, px: int, frames: int) -> dict:
    """Scroll down `px` pixels per animation frame for up to `frames` frames; frame-time statistics."""
    out = result["page"].evaluate(SCROLL, [result["scroller"], px, frames])
    times = sorted(out["frames"])
    return {"median": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))], "max": times[-1],
            "long": sum(t > 50 for t in times), "frames": len(times), "blank": out["blank"],
            "px": out["reached"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--trials", type=int, default=3, help="fresh browser contexts per view (best is reported)")
    ap.add_argument("--px", type=int, default=160, help="scroll speed: pixels per animation frame (160 = one row)")
    ap.add_argument("--frames", type=int, default=600, help="animation frames to scroll for")
    ap.add_argument("--dir", type=Path, help="where to build the run dir (default: a temp dir)")
    ap.add_argument("--benchmarks", type=Path, help="append the results to this markdown file")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    tmp = args.dir or Path(tempfile.mkdtemp(prefix="t2i-viewer-bench-"))
    run_dir = tmp / "run"
    start = time.perf_counter()
    entries = make_run_dir(run_dir, args.images)
    made = time.perf_counter() - start
    write_s, size_mb = time_write(run_dir, entries, args.trials)
    (run_dir / "naive.html").write_text(NAIVE % "".join(
        f'<img loading="lazy" src="{thumb_rel(e["file"])}">' for e in entries), encoding="utf-8")
    base = (run_dir / "index.html").resolve().as_uri()
    views = [
        ("viewer, default view (lora_scale x lora_set)", base, "scroller"),
        (f"viewer, all {len(entries)} in 200 cells (seed x prompt, LoRA filters: all)",
         base + "#x=seed&y=prompt&f.lora_set=*&f.lora_scale=*", "scroller"),
        (f"viewer, all {len(entries)} as one flat gallery", base + "#x=&y=&f.prompt=*&f.seed=*&f.lora_set=*"
         "&f.lora_scale=*", "scroller"),
        (f"naive page: {len(entries)} <img loading=lazy>", (run_dir / "naive.html").resolve().as_uri(), None),
    ]
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for name, url, scroller in views:
            best, scrolled = None, None
            for _ in range(args.trials):
                r = open_page(browser, url, scroller)
                if best is None or r["wall"] < best["wall"]:
                    best = r
                if "gallery" in name or "naive" in name:
                    s = scroll(r, args.px, args.frames)
                    scrolled = s if scrolled is None or s["p95"] < scrolled["p95"] else scrolled
                r["ctx"].close()
            rows.append((name, best, scrolled))
        version = browser.version
        browser.close()
    load = os.getloadavg()[0]
    lines = [
        f"### Viewer: {len(entries)} images (`python bench/bench_viewer.py --images {args.images} "
        f"--trials {args.trials} --px {args.px} --frames {args.frames}`)",
        "",
        f"Chromium {version} headless, 1280x800, file://; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}. Synthetic run dir built in {made:.0f} s; "
        f"viewer data for {len(entries)} records: {size_mb:.1f} MB, built and written in {write_s * 1000:.0f} ms "
        f"(a live run rewrites it at most every max(1 s, {viewer.STRETCH}x that)).",
        "",
        "| view | first screen drawn (ms) | load event (ms) | viewer script done (ms) | DOM nodes | "
        f"scroll at {args.px} px/frame: median / p95 / max frame (ms) | frames > 50 ms | blank frames |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r, s in rows:
        ready = f"{r['ready']:.0f}" if r["ready"] is not None else "—"
        sc = f"{s['median']:.1f} / {s['p95']:.1f} / {s['max']:.1f} ({s['frames']} frames, {s['px']} px)" if s else "—"
        lines.append(f"| {name} | {r['wall'] * 1000:.0f} | {r['load']:.0f} | {ready} | {r['nodes']} | {sc} | "
                     f"{s['long'] if s else '—'} | {s['blank'] if s else '—'} |")
    naive, flat = rows[-1], rows[-2]
    lines += ["", f"Ratio, first screen: naive page / viewer flat gallery = "
                  f"{naive[1]['wall'] / flat[1]['wall']:.1f}x; DOM nodes {naive[1]['nodes']} vs {flat[1]['nodes']}.",
              ""]
    text = "\n".join(lines)
    print(text)
    if args.benchmarks:
        with open(args.benchmarks, "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")
    if args.dir is None:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
