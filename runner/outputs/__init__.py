"""Run-dir outputs: per-image records (record.py, metadata.py), PNG writing (writer.py), the manifest
(manifest.py), comparison grids (grid.py) and multirun/shard merging (sweep.py)."""
