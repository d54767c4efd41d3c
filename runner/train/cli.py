"""`t2i-train`: the Hydra app over `runner.train.loop.train`; config errors are one line and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..common.errors import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, ConfigError
from ..config.overrides import CONF_DIR
from ..entry import run_app
from ..outputs.rundir import remove_created
from .config import TrainRunConfig, register_configs

register_configs()
_state = {"task_started": False}


def _error(msg: str) -> None:
    print(f"t2i-train: error: {msg}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> Any:
    """The task function Hydra calls once per training run."""
    from .loop import train

    _state["task_started"] = True
    out = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        result = train(cfg, out)
    except ConfigError as exc:
        remove_created(out)
        _error(str(exc))
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        _error(
            f"interrupted; rerun with output_dir={out} (or resume={out}) to continue from the last checkpoint"
        )
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if cfg.get("verbose"):
            raise
        _error(f"{type(exc).__name__}: {exc} (run with verbose=true for the traceback)")
        sys.exit(EXIT_FAILED)
    if result.run_dir.resolve() != out.resolve():
        remove_created(out)  # resume=PATH wrote into that run's folder
    print(result.summary())
    return {"run_dir": str(result.run_dir), "lora": str(result.lora_file)}


def main() -> None:
    """Console entry point of `t2i-train`: pre-checks overrides, then runs the Hydra app."""
    run_app(hydra_main, _state, TrainRunConfig, prog="t2i-train", groups=("model", "train"))

if __name__ == "__main__":
    main()
