"""`t2i`: the Hydra app. A thin shell over `runner.run.run`; config errors are one line and exit code 2."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .common.errors import task_errors
from .config import register_configs
from .config.overrides import CONF_DIR
from .entry import run_app
from .outputs.rundir import STATE, remove_created, stored_seed
from .outputs.sweep import JobFailed

log = logging.getLogger("runner")
register_configs()
# conf/hydra/launcher/submitit_local.yaml has the name of the plugin's schema, which validates it (wanted)
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated against")
_state = {"task_started": False}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> Any:
    """The task function Hydra calls once per job."""
    from .run import run

    _state["task_started"] = True
    hc = HydraConfig.get()
    out = Path(cfg.output_dir or hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and cfg.get("run_seed") is None and -1 in (cfg.seeds if OmegaConf.is_list(cfg.seeds) else [cfg.seeds]):
        # every job of the sweep draws its -1 seeds from one stored seed, so shards agree and requeues resume
        cfg.run_seed = stored_seed(Path(hc.runtime.cwd, str(hc.sweep.dir)) / STATE / "run.json")
    with task_errors("t2i", verbose=bool(cfg.get("verbose")),
                     interrupted=f"aborted; the finished images are kept in {out}; re-run the same command to resume",
                     on_config_error=lambda: remove_created(out),
                     job_failed=JobFailed if multirun else None):  # a multirun records it; the other jobs still run
        if cfg.get("from_image"):  # the image's settings, then the user's overrides (reproduce/from_image.py)
            from .reproduce.from_image import prepare

            result = run(prepare(cfg, hc.overrides.task, CONF_DIR), out)
        else:
            result = run(cfg, out)
    if result.viewer is not None:
        print(f"t2i: viewer: {result.viewer.resolve().as_uri()} (or t2i-serve's /runs)")
    print(result.summary(), flush=True)  # the last line, as scripts expect
    if result.hand_over is not None:
        result.hand_over()  # submitit: checkpoint and requeue this job; the requeued job resumes
    if result.interrupted:
        sys.exit(result.exit_code)
    return {"output_dir": str(result.output_dir), "generated": result.generated, "skipped": result.skipped}


def main() -> None:
    """Console entry point of `t2i`."""
    run_app(hydra_main, _state)


if __name__ == "__main__":
    main()
