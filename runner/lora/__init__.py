"""LoRA adapters: resolving files (files.py), loading once and switching sets (adapters.py), merging a set into
the weights (fusing.py)."""
