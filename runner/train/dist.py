"""Data-parallel training over processes started by `accelerate launch` (or torchrun): one process per device.

Every process holds the whole model and the same LoRA weights (same seed, same updates). The sample stream is
global: a micro-batch is `train.batch_size x processes` samples and each process trains its own contiguous share
of it; every random draw of the step (VAE sample, noise, timesteps) is made for the global batch by every process
from the same generator and sliced, so the processes together compute what one process with the global batch
computes. After the micro-batches of a step the adapter gradients are summed across processes (each share's loss
weighted by its share of the batch), which is DDP's all-reduce once per optimizer step; the generator state of
process 0 is broadcast after each micro-batch (a process whose share of a short bucket batch is empty made no
draws). Process 0 alone writes files (config, checkpoints, loss log, samples, the LoRA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """This process's [start, stop) of a global micro-batch of `n` samples: contiguous, the first `n % world`
        processes one more (process 0 always has one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def sum_(self, tensors: list[Any]) -> None:
        """Sum `tensors` across processes, in place (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on one (a stop request, so all stop at the same step)."""
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sync_generator(self, gen: Any) -> None:
        """Process 0's generator state on every process."""
        if self.world == 1:
            return
        import torch.distributed as dist

        state = [gen.get_state()]
        dist.broadcast_object_list(state, src=0)
        gen.set_state(state[0])

    def from_main(self, value: Any) -> Any:
        """Process 0's `value` (a picklable object) on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _comm_device() -> str:
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def setup(device: str) -> Dist:
    """The process group of a multi-process launch (WORLD_SIZE > 1), through accelerate's PartialState (the
    backend, device and rendezvous `accelerate launch` configured: gloo on CPU, nccl on CUDA); one process
    otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return Dist(state.process_index, state.num_processes)
