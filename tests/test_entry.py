"""The one error policy of every command (common/errors.task_errors / task_wrapper): exit 2 for a config error,
130 for Ctrl-C, 143 for SIGTERM, 1 for anything else, one line, a traceback only when asked."""

from __future__ import annotations

import signal

import pytest

from runner.common.errors import ConfigError, task_errors, task_wrapper


def _interrupt(signum: int | None = None) -> KeyboardInterrupt:
    exc = KeyboardInterrupt()
    if signum is not None:
        exc.signum = signum
    return exc


@pytest.mark.parametrize(("exc", "code", "line"), [
    (ConfigError("steps=0 must be >= 1"), 2, "t2i: error: steps=0 must be >= 1\n"),
    (_interrupt(), 130, "t2i: error: stopped; re-run to resume\n"),
    (_interrupt(signal.SIGTERM), 143, "t2i: error: stopped; re-run to resume\n"),
    (RuntimeError("boom"), 1, "t2i: error: RuntimeError: boom (run with verbose=true for the traceback)\n"),
])
def test_task_errors_exit_codes_and_one_line(exc, code, line, capsys):
    cleaned = []
    with pytest.raises(SystemExit) as info, task_errors("t2i", interrupted="stopped; re-run to resume",
                                                        on_config_error=lambda: cleaned.append(1)):
        raise exc
    assert info.value.code == code
    assert capsys.readouterr().err == line
    assert cleaned == ([1] if code == 2 else [])  # only a failed config removes what the start created


def test_task_errors_verbose_shows_the_traceback_but_not_for_config_errors(capsys):
    with pytest.raises(RuntimeError, match="boom"), task_errors("t2i-train", verbose=True):
        raise RuntimeError("boom")
    with pytest.raises(SystemExit) as info, task_errors("t2i-train", verbose=True):
        raise ConfigError("bad")
    assert info.value.code == 2 and capsys.readouterr().err == "t2i-train: error: bad\n"


def test_task_errors_in_a_multirun_raises_the_job_failure():
    class JobFailed(Exception):
        pass

    with pytest.raises(JobFailed, match="^ValueError: nope$"), task_errors("t2i", job_failed=JobFailed):
        raise ValueError("nope")
    with pytest.raises(JobFailed, match="^bad key$"), task_errors("t2i", job_failed=JobFailed):
        raise ConfigError("bad key")
    with pytest.raises(SystemExit) as info, task_errors("t2i", job_failed=JobFailed):
        raise KeyboardInterrupt  # Ctrl-C stops the whole sweep
    assert info.value.code == 130


def test_task_wrapper_returns_the_code_and_verbose_reraises(capsys):
    @task_wrapper("t2i-x")
    def main(argv: list[str] | None = None) -> int:
        if "config" in argv:
            raise ConfigError("bad --thing")
        if "ctrl-c" in argv:
            raise KeyboardInterrupt
        if argv and argv[0] == "boom":
            raise OSError("disk full")
        return 0

    assert main([]) == 0
    assert main(["config"]) == 2 and capsys.readouterr().err == "t2i-x: error: bad --thing\n"
    assert main(["ctrl-c"]) == 130 and capsys.readouterr().err == "t2i-x: error: interrupted\n"
    assert main(["boom"]) == 1
    assert capsys.readouterr().err == "t2i-x: error: OSError: disk full (run with --verbose for the traceback)\n"
    with pytest.raises(OSError, match="disk full"):
        main(["boom", "--verbose"])


def test_task_wrapper_can_exit_instead(capsys):
    @task_wrapper("t2i-serve", exits=True)
    def main(argv: list[str] | None = None) -> int:
        raise ConfigError("--host 0.0.0.0 needs server.api_keys")

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert capsys.readouterr().err == "t2i-serve: error: --host 0.0.0.0 needs server.api_keys\n"


def test_every_command_takes_verbose(capsys):
    from runner.models.tiny import main as tiny
    from runner.outputs.sweep import merge_main
    from runner.reproduce.inspect import main as inspect

    for main in (tiny, merge_main, inspect):
        with pytest.raises(SystemExit) as info:
            main(["--help"])
        assert info.value.code == 0 and "--verbose" in capsys.readouterr().out
