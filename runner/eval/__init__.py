"""Scores of a run's images: named scorers (scorers.py) over run dirs (on the one-way flow it reads what outputs/
wrote: manifest.jsonl and the PNGs), kept in RUN_DIR/metrics.jsonl (store.py), summarised per LoRA set x weight x
checkpoint step with the Pareto front (summary.py) and plotted (plots.py). `t2i-eval` (runner/eval_cli.py) and
`eval.metrics=[…]` inside a run (live.py) are the two ways in."""
