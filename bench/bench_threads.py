"""torch CPU threads, side by side in ONE process: the same tiny-model sweep with `threads=` 1, auto, … while
background processes keep every core busy (a shared box), rounds interleaved so load changes hit every setting.

    python bench/bench_threads.py [--threads 1,auto,4] [--burners N] [--rounds 3] [--benchmarks docs/performance.md]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def burn() -> None:  # pragma: no cover - a background load, killed by the parent
    x = 0
    while True:
        x += 1


def sweep_cfg(threads: str | int, images: int) -> dict:
    return {"model": {"id": "builtin:tiny"}, "prompts": ["a red fox", "a lighthouse"],
            "seeds": list(range(images // 2)), "steps": 4, "width": 64, "height": 64, "device": "cpu",
            "threads": threads, "resume": False, "grid": {"enabled": False}}


def main(argv: list[str] | None = None) -> int:
    from runner.config import validate
    from runner.generate.threads import available_cores
    from runner.run import run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,auto,4", help="comma list of threads= values")
    p.add_argument("--burners", type=int, default=None, help="busy background processes (default: one per core)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--benchmarks", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    settings = [v if v == "auto" else int(v) for v in args.threads.split(",")]
    burners = available_cores() if args.burners is None else args.burners
    work = Path(tempfile.mkdtemp(prefix="t2i-threads-"))
    procs = [multiprocessing.Process(target=burn, daemon=True) for _ in range(burners)]
    try:
        run(validate(sweep_cfg(1, 2)), work / "warm", progress=False)  # load the model once
        for proc in procs:
            proc.start()
        time.sleep(1.0)
        wall = {s: 0.0 for s in settings}
        cpu = {s: 0.0 for s in settings}
        used = {}
        for r in range(args.rounds):
            for s in settings:
                c0, t0 = time.process_time(), time.perf_counter()
                res = run(validate(sweep_cfg(s, args.images)), work / f"{s}-{r}", progress=False)
                wall[s] += time.perf_counter() - t0
                cpu[s] += time.process_time() - c0
                used[s] = res.entries[0]["threads"]
    finally:
        for proc in procs:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    n = args.images * args.rounds
    base = n / wall[settings[0]]
    rows = ["| threads | torch threads | images | seconds | images/s | x (first row) | CPU s/image |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for s in settings:
        ips = n / wall[s]
        rows.append(f"| {s} | {used[s]} | {n} | {wall[s]:.2f} | {ips:.3f} | {ips / base:.2f} | {cpu[s] / n:.4f} |")
    head = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, available to this "
            f"process: {available_cores()}; load: {burners} busy background process(es); sweep: {args.images} "
            f"images x {args.rounds} interleaved rounds, tiny model, 64 px, 4 Euler steps; "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    table = "\n".join(rows)
    print(head + "\n\n" + table)
    if args.benchmarks:
        cmd = "python bench/bench_threads.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.benchmarks, "a", encoding="utf-8") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M')} — `{cmd}`\n\n- {head}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
