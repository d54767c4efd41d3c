"""Models: where a model comes from (source.py), loading and caching pipelines (loading.py), content hashes,
the built-in tiny model (tiny.py) and single-file export (single_file.py)."""
