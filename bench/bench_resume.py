"""Resume and grid cost on a synthetic run dir of N images, in one process (issue 12).

The run dir holds N image files — hard links to one real 512² PNG made by the tiny model, so every file has the
bytes, size and metadata of a real image while the disk holds one — and a manifest of N lines shaped like real
ones (a real line with its prompt, seed, key and file changed). Then it times:

- `resume`: what `t2i` does before its first image when it re-runs into the dir: the writer session's recovery
  (`RunDir.open`: manifest read and checked against one listing of the dir, claims, file numbers) plus the
  done/to-do split of an N-image plan, per entry;
- `decode`: the check resume did before (decode every PNG, `png_complete`), per entry, on a sample;
- `grids`: `write_grids` over the whole dir (every page drawn), then again with nothing changed.

    python bench/bench_resume.py --entries 100000 --no-grid
    python bench/bench_resume.py --entries 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
LINKS_PER_COPY = 50_000


def template(size: int) -> tuple[Path, dict]:
    """One real image of the tiny model at `size`², with its manifest line (made once, then cached)."""
    from runner.common.paths import cache_root
    from runner.config import validate
    from runner.run import run

    cached = cache_root() / "bench" / f"resume-template-{size}"
    if (cached / "line.json").is_file():
        line = json.loads((cached / "line.json").read_text())
        return cached / line["file"], line
    spec = validate({"model": {"id": "builtin:tiny"}, "device": "cpu", "steps": 2, "width": size, "height": size,
                     "prompts": ["a lighthouse on a cliff at dusk, oil painting, dramatic light"], "seeds": [1],
                     "grid": {"enabled": False}})
    result = run(spec, cached, progress=False)
    (entry,) = result.entries
    (cached / "line.json").write_text(json.dumps(entry))
    return cached / entry["file"], entry


def build(run_dir: Path, n: int, size: int, prompts: int) -> list[dict]:
    """The synthetic run dir: n hard links to one real PNG and n manifest lines."""
    from runner.outputs.manifest import MANIFEST, dumps

    first, line = template(size)
    run_dir.mkdir(parents=True)
    src = first
    seeds = max(1, n // prompts)
    entries, chunks = [], []
    for i in range(n):
        p, s = i // seeds, i % seeds
        name = f"{i:05d}_prompt-{p}_s{s}_nolora.png"
        if i % LINKS_PER_COPY == 0:  # a file system allows only so many links to one file (ext4: 65000)
            src = run_dir.parent / f"template-{i // LINKS_PER_COPY}.png"
            shutil.copy(first, src)
        os.link(src, run_dir / name)
        entry = {**line, "prompt": f"{line['prompt']} #{p}", "seed": s, "key": f"{i:016x}", "file": name,
                 "index": i}
        entries.append(entry)
        chunks.append(dumps(entry))
    (run_dir / MANIFEST).write_text("".join(chunks), encoding="utf-8")
    return entries


def time_resume(run_dir: Path, keys: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds for a writer session to open the dir and split an N-image plan into done and to do."""
    from runner.outputs.rundir import RunDir

    start, cpu = time.perf_counter(), time.process_time()
    session = RunDir(run_dir).open()
    todo = [k for k in keys if k not in session.done]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    session.close()
    assert not todo, f"{len(todo)} entries not recognised as done"
    return seconds, cpu


def time_decode(run_dir: Path, entries: list[dict], sample: int) -> float:
    """Seconds per entry of the old resume check (decode every PNG), on `sample` entries."""
    from runner.outputs.manifest import png_complete

    picked = entries[:: max(1, len(entries) // sample)][:sample]
    start = time.perf_counter()
    assert all(png_complete(run_dir / e["file"]) for e in picked)
    return (time.perf_counter() - start) / len(picked)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=10000, help="images in the synthetic run dir")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--prompts", type=int, default=0, help="distinct prompts (default: entries / 100)")
    ap.add_argument("--decode-sample", type=int, default=200, help="images decoded for the old check")
    ap.add_argument("--no-grid", action="store_true", help="skip the grid timing")
    ap.add_argument("--dir", type=Path, help="work folder (default: a temp folder, removed afterwards)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-resume-"))
    run_dir = work / "run"
    try:
        t0 = time.perf_counter()
        entries = build(run_dir, args.entries, args.size, args.prompts or max(1, args.entries // 100))
        mb = (run_dir / "manifest.jsonl").stat().st_size / 1e6
        print(f"built {args.entries} entries ({args.size}², manifest {mb:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s -> {run_dir}")
        keys = [e["key"] for e in entries]
        resume, cpu = time_resume(run_dir, keys)
        print(f"resume: {resume * 1000 / args.entries:.4f} ms/entry ({resume:.2f} s for {args.entries} entries; "
              f"CPU {cpu * 1000 / args.entries:.4f} ms/entry; load average {os.getloadavg()[0]:.1f})")
        decode = time_decode(run_dir, entries, args.decode_sample)
        print(f"decode (the check resume did before): {decode * 1000:.2f} ms/entry "
              f"(= {decode * args.entries:.0f} s for {args.entries} entries; x{decode / (resume / args.entries):.0f})")
        if not args.no_grid:
            from runner.config import GridConfig
            from runner.outputs.grid import read_grid_info, write_grids

            start, cpu = time.perf_counter(), time.process_time()
            pages = write_grids(run_dir, GridConfig())
            first, cpu = time.perf_counter() - start, time.process_time() - cpu
            biggest = max((read_grid_info(p)["size"] for p in pages), key=lambda s: s[0] * s[1])
            cells = sum(1 for p in pages for row in read_grid_info(p)["cells"] for f in row if f)
            start = time.perf_counter()
            write_grids(run_dir, GridConfig())
            again = time.perf_counter() - start
            print(f"grids: {len(pages)} pages for {cells} images (largest {biggest[0]}x{biggest[1]}) in {first:.1f} s "
                  f"({first * 1000 / args.entries:.2f} ms/image, CPU {cpu * 1000 / args.entries:.2f} ms/image in all "
                  f"threads); nothing changed, again: {again:.1f} s")
        print(json.dumps({"entries": args.entries, "size": args.size, "resume_ms_per_entry":
                          round(resume * 1000 / args.entries, 4), "decode_ms_per_entry": round(decode * 1000, 3)}))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
