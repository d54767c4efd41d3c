"""t2i-runner: config-driven batch text-to-image generation with LoRA sweeps."""

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it; CHANGELOG.md lists it)

import logging as _logging
import os as _os

_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep library chatter (e.g. torchvision notices) out of runs
# OpenMP threads that wait for work sleep instead of spinning. GNU OpenMP (torch's CPU runtime) spins by default
# when it has no more threads than cores: on a busy box the spinning thread takes the core the working thread
# needs (measured 27x more CPU time per image with 2 threads on a loaded 2-core box; docs/performance.md). Read when
# torch loads OpenMP, so it is set here, before any torch import; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torchao (the train-quant extra) is imported by peft and diffusers whenever it is installed: on a CPU torch build
# its CUDA kernel libraries fail to load and torch notes its enums, several WARNING lines on every run that loads a
# LoRA, none of which concern this run
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
