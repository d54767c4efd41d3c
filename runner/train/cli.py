"""`t2i-train`: the Hydra app over `runner.train.loop.train`; config errors are one line and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..common.errors import task_errors
from ..config.overrides import CONF_DIR
from ..entry import run_app
from ..outputs.rundir import remove_created
from .config import TrainRunConfig, register_configs

register_configs()
_state = {"task_started": False}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> Any:
    """The task function Hydra calls once per training run."""
    from .loop import train

    _state["task_started"] = True
    out = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
    with task_errors("t2i-train", verbose=bool(cfg.get("verbose")),
                     interrupted=f"interrupted; rerun with output_dir={out} (or resume={out}) to continue from the "
                                 "last checkpoint",
                     on_config_error=lambda: remove_created(out)):
        result = train(cfg, out)
    if result.run_dir.resolve() != out.resolve():
        remove_created(out)  # resume=PATH wrote into that run's folder
    print(result.summary())
    return {"run_dir": str(result.run_dir), "lora": str(result.lora_file)}


def main() -> None:
    """Console entry point of `t2i-train`: pre-checks overrides, then runs the Hydra app."""
    run_app(hydra_main, _state, TrainRunConfig, prog="t2i-train", groups=("model", "recipe"))


if __name__ == "__main__":
    main()
