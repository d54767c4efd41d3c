"""`t2i`: the Hydra app. A thin shell over `runner.run.run`; config errors are one line and exit code 2."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import ConfigError, RunConfig, register_configs
from .sweep import JobFailed

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # Ctrl-C: the run stopped after its current batch
log = logging.getLogger("runner")
register_configs()
# conf/hydra/launcher/submitit_local.yaml has the name of the plugin's schema, which validates it (wanted)
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated against")
_state = {"task_started": False}


def _error(msg: str, prog: str = "t2i") -> None:
    print(f"{prog}: error: {msg}", file=sys.stderr)


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}


def check_override(text: str, schema: Any = RunConfig) -> None:
    """Reject an unknown key (of `schema`) or config-group option before Hydra runs (with a 'did you mean')."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (ov,) = OverridesParser.create().parse_overrides([text])
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot parse"
        raise ConfigError(f"cannot parse override {text!r}: {first}") from exc
    key = ov.key_or_group
    if key.startswith("hydra") or ov.is_delete():
        return
    group_dir = CONF_DIR / key
    if group_dir.is_dir() and "." not in key:
        if ov.is_sweep_override():
            return
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        value = str(ov.value())
        if value not in options:
            hint = difflib.get_close_matches(value, options, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown {key} {value!r}{extra}; valid: {', '.join(options) or 'none'}")
        return
    node: Any = schema
    for part in key.split("."):
        fields = _fields(node)
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown key {key!r}{extra}; see `t2i --cfg job` for every key")
        factory = fields[part].default_factory
        owner, node = node, (factory() if factory is not dataclasses.MISSING else None)
    if not (ov.is_sweep_override() or ov.is_add() or ov.is_force_add()):
        _check_type(owner, part, ov.value(), key, str(fields[part].type))


_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _check_type(owner: Any, name: str, value: Any, key: str, type_name: str) -> None:
    """Reject a value of the wrong type for a typed key in one line (Hydra's own message spans several)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = type_name.replace(" | None", "").replace("Optional[", "").rstrip("]")
    kind = "a list, e.g. [a, b]" if base.startswith("list[") else _KINDS.get(base, f"its keys, e.g. {key}.NAME=VALUE")
    try:
        OmegaConf.structured(owner)[name] = value
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{key}={value!r} is not valid; valid: {kind}") from exc


def _remove_fresh_dir(out: Path) -> None:
    """Remove a run dir that holds only what Hydra put there (the run failed before writing anything)."""
    if not out.is_dir() or (out / "manifest.jsonl").exists():
        return
    if all(p.name in (".hydra",) or p.suffix == ".log" for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
        parent = out.parent
        cwd = Path.cwd().resolve()
        while parent.resolve() != cwd and cwd in parent.resolve().parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> Any:
    """The task function Hydra calls once per job."""
    from .run import run

    _state["task_started"] = True
    hc = HydraConfig.get()
    out = Path(cfg.output_dir or hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        if cfg.get("from_image"):  # the image's settings, then the user's overrides (reproduce.py)
            from .reproduce import prepare

            result = run(prepare(cfg, hc.overrides.task, CONF_DIR), out)
        else:
            result = run(cfg, out)
    except KeyboardInterrupt:
        _error(f"aborted; the finished images are kept in {out}; re-run the same command to resume")
        sys.exit(EXIT_INTERRUPTED)
    except ConfigError as exc:
        _remove_fresh_dir(out)
        _error(str(exc))
        if multirun:  # runner.sweep records it; the other jobs still run; the sweep exits 1 at the end
            raise JobFailed(str(exc)) from exc
        sys.exit(EXIT_CONFIG)
    except Exception as exc:
        if cfg.get("verbose"):
            raise
        _error(f"{type(exc).__name__}: {exc} (run with verbose=true for the traceback)")
        if multirun:
            raise JobFailed(f"{type(exc).__name__}: {exc}") from exc
        sys.exit(1)
    print(result.summary())
    if result.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    return {"output_dir": str(result.output_dir), "generated": result.generated, "skipped": result.skipped}


def run_app(app: Callable[[], Any], state: dict, schema: Any = RunConfig, prog: str = "t2i") -> None:
    """Pre-check the overrides against `schema` (one line, exit 2), then run the Hydra `app`."""
    args = sys.argv[1:]
    flags = [a for a in args if a.startswith("-")]
    if all(f in ("-m", "--multirun") for f in flags):  # other flags take values that are not overrides
        try:
            for a in args:
                if a not in flags:
                    check_override(a, schema)
        except ConfigError as exc:
            _error(str(exc), prog)
            sys.exit(EXIT_CONFIG)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 1 and not state["task_started"]:
            sys.exit(EXIT_CONFIG)  # Hydra rejected the config before the run began
        raise


def main() -> None:
    """Console entry point of `t2i`."""
    run_app(hydra_main, _state)

if __name__ == "__main__":
    main()
