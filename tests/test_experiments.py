"""Every named preset in conf/experiment/ composes to exactly the config of the README command it names (which
test_readme runs end to end), so presets and README cannot drift apart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runner.config import register_configs, validate
from runner.config.overrides import CONF_DIR

REPO = Path(__file__).resolve().parent.parent
PRESETS = {  # preset -> the start of its README command line, and what its user still gives on the command line
    "tiny_grid": ("t2i model=tiny steps=4 prompts='[a red fox,a lighthouse]'", ()),
    "tiny_lora_scales": ("t2i model=tiny steps=4 \"lora_sets=[[],[{source: builtin:tiny/loras/tiny_kohya", ()),
    "tiny_models": ("t2i \"models=[tiny,tiny-flux1]\"", ()),
    "slurm_shards": ("t2i -m model=sd15 lora=my_set", ("model=", "lora=", "hydra.launcher.partition=")),
}


def readme_overrides(prefix: str) -> list[str]:
    text = "".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    lines = [ln for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
             for ln in b.replace("\\\n", " ").splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, f"the docs have {len(lines)} lines starting {prefix!r}"
    return [a for a in shlex.split(lines[0], comments=True)[1:] if a != "-m"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def test_every_preset_is_tested():
    assert sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes_to_its_readme_command(name: str):
    prefix, given = PRESETS[name]
    argv = readme_overrides(prefix)
    swept = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if re.match(r"^[\w.]+=[^\[{]*,", a)}
    fixed = [a for a in argv if a.split("=", 1)[0] not in swept]
    if name == "slurm_shards":  # my_set is the reader's own LoRA set
        fixed = [a.replace("lora=my_set", "lora=none") for a in fixed]
    preset = compose([f"experiment={name}", *(a for a in fixed if given and a.startswith(given))])
    readme = compose(fixed)
    preset_job, readme_job = (OmegaConf.to_container(c, resolve=False) for c in (preset, readme))
    preset_hydra, readme_hydra = preset_job.pop("hydra"), readme_job.pop("hydra")
    assert preset_job == readme_job
    for key in ("launcher", "sweep"):
        assert preset_hydra[key] == readme_hydra[key], key
    assert (preset_hydra["sweeper"]["params"] or {}) == swept  # a multirun's swept keys: the preset's sweeper params
    validate(compose([f"experiment={name}"]))  # and it is a valid run on its own
