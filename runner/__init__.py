"""t2i-runner: config-driven batch text-to-image generation with LoRA sweeps."""

__version__ = "0.1.0"

import os as _os

_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep library chatter (e.g. torchvision notices) out of runs
