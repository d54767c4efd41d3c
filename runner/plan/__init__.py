"""The plan: every image of a run as an ImageJob (its key, file name, group), sharded and batched."""

from .jobs import (
    AXES,
    KEY_VERSION,
    RANDOM_SEED,
    ImageJob,
    batches,
    combine_sets,
    draw_seeds,
    expand,
    set_label,
    shard,
    with_prompt_loras,
)

__all__ = ["AXES", "KEY_VERSION", "RANDOM_SEED", "ImageJob", "batches", "combine_sets", "draw_seeds", "expand",
           "set_label", "shard", "with_prompt_loras"]
