"""Generation: one pipeline call per batch (batch.py), the faults it survives (faults.py), and the fast-path
options applied to a loaded pipeline (fastpath.py)."""
