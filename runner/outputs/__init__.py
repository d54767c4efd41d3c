"""Run-dir outputs: per-image records (record.py, metadata.py), PNG writing (writer.py), the manifest
(manifest.py), the run dir's life and its writers (rundir.py), comparison grids (grid.py) and multirun/shard merging
(sweep.py)."""
