"""LoRA zoo switching: LyCORIS (LoHa, LoKr, Tucker LoCon), DoRA, a plain LoRA and mixed sets on one cached
pipeline, in ONE process: load time per file, time per switch per set, and memory over N switches.

`--quick`: the tiny model on CPU (process RSS). `--full`: SD1.5 architecture with random weights on a GPU
(allocated GPU memory and process RSS), files at rank 16. The files are written the way kohya/LyCORIS name
them (tests/lora_zoo.py builds them; this script borrows it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))  # lora_zoo: the LyCORIS file writer the tests use


def _rss() -> float:
    return float(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gpu(device: str) -> float:
    import torch

    if device != "cuda":
        return 0.0
    torch.cuda.synchronize()
    return float(torch.cuda.memory_allocated())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny model on CPU (default)")
    mode.add_argument("--full", action="store_true", help="SD1.5 architecture, random weights, on cuda")
    p.add_argument("--switches", type=int, default=100)
    p.add_argument("--rank", type=int, default=None, help="rank of the files (quick: 2, full: 16)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "t2i-bench"))
    p.add_argument("--benchmarks", help="append the result to this markdown file (e.g. docs/performance.md)")
    args = p.parse_args(argv)

    import torch
    from lora_zoo import lycoris_state, write

    from runner.config import LoraSpec, ModelConfig
    from runner.lora.adapters import AdapterManager
    from runner.lora.blocks import model_blocks
    from runner.lora.files import resolve_lora
    from runner.models.loading import load_model

    # 1. The model and the files
    device = "cuda" if args.full else "cpu"
    if args.full:
        from models import ensure_sd15

        model_dir, _ = ensure_sd15(Path(args.cache), device)
        model = ModelConfig(id=str(model_dir))
    else:
        torch.set_num_threads(1)
        model = ModelConfig(id="builtin:tiny")
    rank = args.rank or (16 if args.full else 2)
    loaded = load_model(model, device)
    pipe = loaded.pipe
    loaded.adapters = loaded.adapters or AdapterManager(pipe)
    mgr = loaded.adapters
    out = Path(tempfile.mkdtemp(prefix="lora-zoo-", dir=args.cache if Path(args.cache).is_dir() else None))
    std = 0.01 if args.full else 0.3
    kinds = {"lora": ("lora", False), "loha": ("loha", False), "lokr": ("lokr", False),
             "locon_tucker": ("locon_tucker", False), "dora": ("lora", True)}
    files, loads = {}, {}
    for name, (kind, dora) in kinds.items():
        state = lycoris_state(pipe, kind, rank=rank, dora=dora, std=std, seed=len(files))
        state = {k: v.to(torch.float16) if args.full else v for k, v in state.items()}
        files[name] = resolve_lora(LoraSpec(str(write(state, out / f"{name}.safetensors"))))
        t = time.perf_counter()
        mgr.ensure((files[name],))
        loads[name] = time.perf_counter() - t
    ins = model_blocks(pipe).function("INS", "blocks")
    f = files
    sets = {"lora (peft)": ((f["lora"],), (1.0,), None), "loha": ((f["loha"],), (1.0,), None),
            "lora + loha": ((f["lora"], f["loha"]), (1.0, 0.8), None), "lokr": ((f["lokr"],), (0.7,), None),
            "dora": ((f["dora"],), (1.0,), None), "locon tucker": ((f["locon_tucker"],), (1.0,), None),
            "loha, blocks INS": ((f["loha"],), (1.0,), (ins,)), "none": ((), (), None)}
    # 2. One warm cycle (every pristine copy taken), then N switches
    for loras, weights, blocks in sets.values():
        mgr.activate(loras, weights, blocks)
    rss0, gpu0 = _rss(), _gpu(device)
    per: dict[str, list[float]] = {k: [] for k in sets}
    names = list(sets)
    for i in range(args.switches):
        name = names[i % len(names)]
        loras, weights, blocks = sets[name]
        t = time.perf_counter()
        mgr.activate(loras, weights, blocks)
        if device == "cuda":
            torch.cuda.synchronize()
        per[name].append(time.perf_counter() - t)
    rss1, gpu1 = _rss(), _gpu(device)
    mgr.activate((), ())
    # 3. Report
    lines = [f"### LoRA zoo switching ({'--full, ' + torch.cuda.get_device_name() if args.full else '--quick, tiny'}"
             f", {device}, rank {rank}; {platform.machine()}, torch {torch.__version__})", "",
             f"Command: `python bench/bench_lora_zoo.py {'--full' if args.full else '--quick'} "
             f"--switches {args.switches}`", "",
             "| set | load s (file) | switch ms (mean) |", "|---|---:|---:|"]
    single = {"lora (peft)": "lora", "loha": "loha", "lokr": "lokr", "dora": "dora", "locon tucker": "locon_tucker"}
    for name in names:
        load = f"{loads[single[name]]:.2f}" if name in single else "-"
        ms = 1000 * sum(per[name]) / max(1, len(per[name]))
        lines.append(f"| {name} | {load} | {ms:.1f} |")
    lines += ["", f"Memory over {args.switches} switches: process RSS {rss0 / 2**20:.1f} MiB -> {rss1 / 2**20:.1f} MiB "
              f"({100 * (rss1 - rss0) / rss0:+.2f}%)"
              + (f"; GPU allocated {gpu0 / 2**20:.1f} MiB -> {gpu1 / 2**20:.1f} MiB "
                 f"({100 * (gpu1 - gpu0) / max(gpu0, 1):+.2f}%)" if device == "cuda" else ""), ""]
    text = "\n".join(lines)
    print(text)
    if args.benchmarks:
        with open(args.benchmarks, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
