"""Test helper, on PYTHONPATH only for tests whose t2i jobs run in processes they do not start themselves
(submitit): with T2I_TEST_BATCH_DELAY set, every generated batch takes at least that many seconds."""

import os

if os.environ.get("T2I_TEST_BATCH_DELAY"):
    import time

    import runner.generate.batch as _batch

    _real = _batch.generate

    def _slow(*args, **kwargs):
        time.sleep(float(os.environ["T2I_TEST_BATCH_DELAY"]))
        return _real(*args, **kwargs)

    _batch.generate = _slow
