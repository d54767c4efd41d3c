"""The plan: every image of a run as an ImageJob (its key, file name, group), sharded and batched."""

from .jobs import AXES, KEY_VERSION, RANDOM_SEED, ImageJob, batches, draw_seeds, expand, shard

__all__ = ["AXES", "KEY_VERSION", "RANDOM_SEED", "ImageJob", "batches", "draw_seeds", "expand", "shard"]
