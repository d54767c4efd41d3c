"""The plan: every image of a run as an ImageJob (its key, file name, group), sharded and batched."""

from .jobs import AXES, ImageJob, batches, expand, shard

__all__ = ["AXES", "ImageJob", "batches", "expand", "shard"]
