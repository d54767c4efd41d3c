"""Test helper, on PYTHONPATH only for tests whose t2i jobs run in processes they do not drive themselves
(submitit, a t2i-serve process): with T2I_TEST_BATCH_DELAY set, every generated batch takes at least that many
seconds; with T2I_TEST_BATCH_GATE=FILE, every batch waits until FILE exists (the test opens the gate)."""

import os

if os.environ.get("T2I_TEST_BATCH_DELAY"):
    import time

    import runner.generate.batch as _batch

    _real = _batch.generate

    def _slow(*args, **kwargs):
        time.sleep(float(os.environ["T2I_TEST_BATCH_DELAY"]))
        return _real(*args, **kwargs)

    _batch.generate = _slow

if os.environ.get("T2I_TEST_BATCH_GATE"):
    import time
    from pathlib import Path

    import runner.generate.batch as _gated_batch

    _ungated = _gated_batch.generate

    def _gated(*args, **kwargs):
        gate, end = Path(os.environ["T2I_TEST_BATCH_GATE"]), time.monotonic() + 1800  # a hang guard only
        while not gate.exists() and time.monotonic() < end:
            time.sleep(0.05)
        return _ungated(*args, **kwargs)

    _gated_batch.generate = _gated
