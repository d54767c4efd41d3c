"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, given a job watcher that works without Slurm
accounting (the `slurm_watcher` callback of conf/hydra/default.yaml installs it when a multirun starts).

submitit learns that a job ended from its result file or from `sacct`. Where accounting is off
(`AccountingStorageType=accounting_storage/none`, as on small or one-node clusters) `sacct` fails, every job stays
`UNKNOWN`, and a job that ends without writing its result (its batch shell killed: `scancel --batch`, a node
failure, an out-of-memory kill) is waited for forever. This watcher asks `squeue --states=all` when `sacct` fails:
it knows every job slurmctld still holds (finished ones for `MinJobAge`, 300 s by default), and a job it no longer
knows has ended. The sweep then ends with submitit's error naming the job and its log, never a hang.
"""

from __future__ import annotations

import functools
import subprocess
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

GONE = "NOT_IN_SQUEUE"  # a state submitit counts as finished: slurmctld no longer knows the job


@functools.cache
def watcher_class() -> type:
    """`SlurmWatcher`, defined on first use (submitit is the optional `slurm` extra)."""
    from submitit.core import logger
    from submitit.slurm import slurm

    class SlurmWatcher(slurm.SlurmInfoWatcher):
        """submitit's watcher (`sacct`), falling back to `squeue` when `sacct` fails."""

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            try:
                self._output = subprocess.run(command, capture_output=True, timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError):
                self._update_from_squeue()
            else:
                self._num_calls += 1
                self._info_dict.update(self.read_info(self._output))
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

        def _update_from_squeue(self) -> None:
            pending = self._registered - self._finished
            masters = sorted({j.split("_")[0] for j in pending})
            cmd = ["squeue", "--noheader", "--states=all", "--format=%i|%T", "--jobs", ",".join(masters)]
            self._num_calls += 1
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as exc:
                logger.get_logger().warning(f"sacct and squeue failed ({exc}); job states unknown")
                return
            if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
                logger.get_logger().warning(f"sacct and squeue failed ({proc.stderr.strip()}); job states unknown")
                return
            seen: dict[str, dict[str, str]] = {}
            for line in proc.stdout.splitlines():
                listed, _, state = line.strip().partition("|")
                info = {"JobID": listed, "State": state.split()[0] if state else "UNKNOWN"}
                for ids in slurm.read_job_id(listed):  # pending array tasks are listed together: 12_[2-3]
                    last = int(ids[2]) if len(ids) > 2 else int(ids[1]) if len(ids) > 1 else None
                    if last is None:
                        seen[ids[0]] = info
                    for task in range(int(ids[1]), last + 1) if last is not None else ():
                        seen[f"{ids[0]}_{task}"] = info
            for job_id in pending:
                self._info_dict[job_id] = seen.get(job_id) or {"JobID": job_id, "State": GONE}

    return SlurmWatcher


@functools.cache
def job_class() -> type:
    """submitit's SlurmJob, watched by `SlurmWatcher`; a job that ended without its result is one line
    (`JobFailed`: the sweep exits 1 naming the job, its state and its log) instead of a traceback."""
    from submitit.core.utils import UncompletedJobError
    from submitit.slurm import slurm

    from .outputs.sweep import JobFailed

    class SlurmJob(slurm.SlurmJob):
        watcher = watcher_class()(delay_s=60)

        def results(self) -> list[Any]:
            try:
                return super().results()
            except UncompletedJobError:
                state = self.watcher.get_state(self.job_id, mode="cache")
                raise JobFailed(f"slurm job {self.job_id} ended without a result (state {state}: its batch shell "
                                f"was killed or its node failed); its log: {self.paths.stderr}") from None

    return SlurmJob


class SlurmWatch(Callback):
    """Hydra callback: a multirun through `hydra/launcher=slurm` watches its jobs with `SlurmWatcher`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.launcher.get("_target_", "")).endswith(".SlurmLauncher"):
            return
        from submitit.slurm import slurm

        slurm.SlurmExecutor.job_class = job_class()  # submitit's own hook for the class of the jobs it submits
