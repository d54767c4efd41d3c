"""LoRA adapters: resolving files (files.py), loading once and switching sets (adapters.py), merging a set's
weight changes into the base weights (merge.py), the kohya key layout (kohya.py)."""
