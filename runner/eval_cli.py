"""`t2i-eval RUN_DIR…`: score existing run dirs, merged dirs and multirun sweep dirs into RUN_DIR/metrics.jsonl,
and with `--summary` print the per LoRA set x weight x step table and the Pareto front, writing RUN_DIR/eval.md
and the plots. A thin shell over runner/eval (the baselines lora_effect lacks are made with runner.run)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .common.errors import ConfigError, task_wrapper
from .config.schema import EvalConfig

PROG = "t2i-eval"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run dirs, merged dirs or multirun sweep dirs")
    ap.add_argument("--metrics", help="comma-separated scorers (default: clip_t, plus clip_i,dino with "
                                      "--reference-dir, plus lora_effect when the run has LoRA images; none with "
                                      "only --summary)")
    ap.add_argument("--clip-model", help="CLIP model: hub id or local folder (eval.models.clip)")
    ap.add_argument("--dino-model", help="DINO model: hub id or local folder (eval.models.dino)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=ID_OR_DIR",
                    help="any scorer's model (eval.models.NAME), e.g. --model pickscore=DIR")
    ap.add_argument("--reference-dir", help="reference images for clip_i and dino (eval.reference_dir)")
    ap.add_argument("--lora-effect-space", choices=("clip", "dino"), help="lora_effect's embedding (default clip)")
    ap.add_argument("--no-make-baseline", action="store_true",
                    help="fail instead of generating missing no-LoRA baselines (eval.make_baseline=false)")
    ap.add_argument("--batch-size", type=int, help=f"images per scorer call (default {EvalConfig.batch_size})")
    ap.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, mps")
    ap.add_argument("--summary", action="store_true", help="print the table and the Pareto front; write "
                                                           "eval.md and the plots (PNG and SVG)")
    ap.add_argument("--verbose", action="store_true", help="show the traceback of an unexpected error")
    return ap


def eval_config(args: argparse.Namespace) -> EvalConfig:
    from .eval.scorers import models_of

    cfg = EvalConfig()
    models = models_of(cfg)
    if args.clip_model:
        models["clip"] = args.clip_model
    if args.dino_model:
        models["dino"] = args.dino_model
    for item in args.model:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"--model {item!r} is not NAME=ID_OR_DIR (e.g. --model dino=facebook/dino-vits16)")
        if name not in models:
            raise ConfigError(f"--model {item!r}: unknown scorer model {name!r}; valid: {', '.join(models)}")
        models[name] = value
    changes = {"models": models, "make_baseline": not args.no_make_baseline}
    if args.reference_dir:
        changes["reference_dir"] = args.reference_dir
    if args.lora_effect_space:
        changes["lora_effect_space"] = args.lora_effect_space
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    return dataclasses.replace(cfg, **changes)


def _default_metrics(args: argparse.Namespace, folders: list[Path]) -> list[str]:
    from .eval.baseline import has_loras
    from .eval.score import read_entries

    if args.metrics is not None:
        return [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.summary:
        return []
    names = ["clip_t"] + (["clip_i", "dino"] if args.reference_dir else [])
    if any(has_loras(e) for f in folders for e in read_entries(f)):
        names.append("lora_effect")
    return names


def _generate(cfg, out: Path):
    from .run import run

    return run(cfg, out, progress=False)


@task_wrapper(PROG)
def main(argv: list[str] | None = None) -> int:
    from .eval.scorers import check_eval
    from .models.source import resolve_device

    # 1. Check inputs: the folders, the metrics, the config (nothing loads, nothing is written)
    args = _parser().parse_args(argv)
    folders = []
    for d in args.dirs:
        if not d.is_dir():
            raise ConfigError(f"{d} is not a folder; give a run dir (with manifest.jsonl) or a sweep dir")
        from .eval.score import read_entries

        if not read_entries(d):
            raise ConfigError(f"{d} holds no images (no manifest.jsonl lines with their files); give a run dir, "
                              "a merged dir or a multirun sweep dir")
        folders.append(d.resolve())
    cfg = eval_config(args)
    metrics = _default_metrics(args, folders)
    check_eval(cfg, metrics)

    # 2. Score (models loaded once for every folder; missing baselines made first)
    if metrics:
        from .eval.score import evaluate

        device = resolve_device(args.device)  # (a summary alone never imports torch)

        written = evaluate(folders, cfg, device, metrics, None if args.no_make_baseline else _generate)
        for folder, n in written.items():
            print(f"{PROG}: {n} score line(s) written to {folder / 'metrics.jsonl'}"
                  + ("" if n else " (every image was scored already)"))

    # 3. Summaries: the table, the front, eval.md and the plots
    if args.summary:
        from .eval.summary import write_summary

        for folder in folders:
            print(write_summary(folder, cfg))
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
