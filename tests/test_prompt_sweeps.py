"""Prompt sweeps as text (issue 15): variants and wildcards (dynamicprompts), random draws, prompts files, max_prompts,
and the Prompt S/R axis with A1111's X/Y/Z semantics and its grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner.common.errors import ConfigError
from runner.config import validate
from runner.plan import expand
from runner.run import run


def _spec(**cfg):
    return validate({"model": {"id": "tiny"}, **cfg})


def _prompts(**cfg) -> list[str]:
    return [p.prompt for p in _spec(**cfg).prompts]


def test_variants_are_every_expansion_in_order() -> None:
    assert _prompts(prompts=["{red|blue} fox"]) == ["red fox", "blue fox"]
    assert _prompts(prompts=["a {red|blue} {fox|cat}", "plain"]) == [
        "a red fox", "a red cat", "a blue fox", "a blue cat", "plain"]
    # {2$$a|b|c}: two of three, joined by dynamicprompts' ", " -- its combinatorial order (ordered pairs)
    two = _prompts(prompts=["{2$$a|b|c}"])
    assert len(two) == 6 and set(two) == {"a,b", "a,c", "b,a", "b,c", "c,a", "c,b"}
    spec = _spec(prompts=["{red|blue} fox"])
    assert [p.template for p in spec.prompts] == ["{red|blue} fox"] * 2
    assert _spec(prompts=["red fox"]).prompts[0].template is None
    # A1111 syntax passes through untouched
    assert _prompts(prompts=[r"{a|b} (red:1.2) \(x\) <lora:s:0.5> BREAK [y]"]) == [
        r"a (red:1.2) \(x\) <lora:s:0.5> BREAK [y]", r"b (red:1.2) \(x\) <lora:s:0.5> BREAK [y]"]


def test_wildcards_from_wildcard_dirs(tmp_path: Path) -> None:
    (tmp_path / "colors.txt").write_text("red\n# a comment\nblue\n", encoding="utf-8")
    (tmp_path / "animals").mkdir()
    (tmp_path / "animals" / "pets.txt").write_text("cat\ndog\n", encoding="utf-8")
    got = _prompts(prompts=["__colors__ __animals/pets__"], wildcard_dirs=[str(tmp_path)])
    assert sorted(got) == ["blue cat", "blue dog", "red cat", "red dog"]
    with pytest.raises(ConfigError, match=r"wildcard file __colours__ .*did you mean 'colors'"):
        _spec(prompts=["__colours__ fox"], wildcard_dirs=[str(tmp_path)])
    with pytest.raises(ConfigError, match="no wildcard_dirs are set"):
        _spec(prompts=["__colors__ fox"])
    with pytest.raises(ConfigError, match=r"wildcard_dirs\[0\]=.* is not an existing folder"):
        _spec(prompts=["x"], wildcard_dirs=[str(tmp_path / "nope")])


def test_random_mode_draws_reproducibly_from_a_recorded_seed(tmp_path: Path) -> None:
    cfg = {"prompts": ["{a|b|c|d|e|f|g|h} {1|2|3|4|5|6|7|8}"], "prompt_mode": "random", "prompt_count": 5}
    one, two = _prompts(**cfg, prompt_seed=7), _prompts(**cfg, prompt_seed=7)
    assert one == two and len(one) == 5
    assert _prompts(**cfg, prompt_seed=8) != one
    assert _spec(**cfg, prompt_seed=7).prompt_seed == 7
    assert _spec(prompts=["x"], prompt_mode="random").prompt_seed is None  # nothing drawn, nothing recorded


def test_max_prompts_limits_expansion() -> None:
    with pytest.raises(ConfigError, match="more than max_prompts=1000"):
        _spec(prompts=["{a|b} " * 20])
    with pytest.raises(ConfigError, match="more than max_prompts=3"):
        _spec(prompts=["{a|b} {c|d}"], max_prompts=3)
    with pytest.raises(ConfigError, match="more than max_prompts=3"):
        _spec(prompts=["{a|b}", "{c|d}"], max_prompts=3)
    assert len(_prompts(prompts=["{a|b} {c|d}"], max_prompts=4)) == 4
    with pytest.raises(ConfigError, match="not a valid variant"):
        _spec(prompts=["{a|b fox"])
    with pytest.raises(ConfigError, match="prompt_mode='every' is not valid"):
        _spec(prompts=["x"], prompt_mode="every")


def test_prompts_file(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text("# my prompts\n\na red fox\n  a (blue:1.2) cat  \n# done\n{x|y}\n", encoding="utf-8")
    assert _prompts(prompts_file=str(f)) == ["a red fox", "a (blue:1.2) cat", "x", "y"]
    with pytest.raises(ConfigError, match="does not exist"):
        _spec(prompts_file=str(tmp_path / "none.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8"):
        _spec(prompts_file=str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompt"):
        _spec(prompts_file=str(empty))


def test_prompt_sr_replaces_the_first_value_in_prompt_and_negative() -> None:
    spec = _spec(prompts=["a red fox, red sky", "a cat"], negative_prompt="red blur", seeds=[1],
                 prompt_sr=[["red", "blue", "green"]])
    jobs = expand(spec)
    got = [(j.prompt, j.negative_prompt, j.prompt_sr) for j in jobs]
    assert got == [("a red fox, red sky", "red blur", "red"), ("a blue fox, blue sky", "blue blur", "blue"),
                   ("a green fox, green sky", "green blur", "green"),
                   ("a cat", "red blur", "red"), ("a cat", "blue blur", "blue"), ("a cat", "green blur", "green")]
    assert len({j.key for j in jobs}) == len(jobs)
    assert all(j.axis_value("prompt") in ("a red fox, red sky", "a cat") for j in jobs)
    # A1111's text form (CSV), and a term that is nowhere
    assert _spec(prompts=["a red fox"], prompt_sr="red, blue").prompt_sr == ("red", "blue")
    with pytest.raises(ConfigError, match="search term 'purple' is in no prompt"):
        _spec(prompts=["a red fox"], prompt_sr=["purple", "blue"])
    with pytest.raises(ConfigError, match="needs a search term and at least one replacement"):
        _spec(prompts=["a red fox"], prompt_sr=["red"])


def test_prompt_sr_run_and_grid(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = {"model": {"id": str(tiny_dir)}, "prompts": ["a red fox", "a red cat"], "seeds": [1], "steps": 2,
           "width": 32, "height": 32, "device": "cpu", "prompt_sr": [["red", "blue"]],
           "grid": {"x": "prompt_sr", "y": "prompt"}}
    result = run(validate(cfg), tmp_path, progress=False)
    assert result.generated == 4
    recs = {(e["prompt_sr_base"], e["prompt_sr"]): e for e in result.entries}
    assert recs[("a red fox", "blue")]["prompt"] == "a blue fox"
    (grid,) = result.grids
    from runner.outputs.grid import read_grid_info

    info = read_grid_info(grid)
    assert (info["x"], info["y"]) == ("prompt_sr", "prompt")
    assert info["x_values"] == ["red", "blue"] and info["y_values"] == ["a red fox", "a red cat"]
    assert info["cells"][0][1] == recs[("a red fox", "blue")]["file"]
    with Image.open(tmp_path / recs[("a red fox", "blue")]["file"]) as im:
        px = np.asarray(im)
    assert px.shape[0] == 32
    again = run(validate(cfg), tmp_path, progress=False)  # resume: nothing new
    assert again.generated == 0 and again.skipped == 4
    assert json.loads(json.dumps(info)) == info  # a plain JSON description (no tuples, paths or numpy)


@pytest.mark.slow
def test_readme_prompt_language_commands_run(tmp_path: Path) -> None:
    """The README's prompt-language examples, as written (with its placeholders filled in)."""
    from conftest import run_program
    from test_readme import readme_commands

    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "colors.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("# foxes\na red fox\n\na (blue:1.2) lighthouse\n", encoding="utf-8")
    keys = ("prompt_sr=", "wildcard_dirs=", "prompts_file=", "(red:1.3)")
    commands = [a for a in readme_commands() if any(k in " ".join(a) for k in keys)]
    assert len(commands) == 4
    for argv in commands:
        args = [a.replace("/path/to/wildcards", str(tmp_path / "wildcards")) for a in argv]
        out = tmp_path / f"run{commands.index(argv)}"
        r = run_program("t2i", *args[1:], f"output_dir={out}", "width=32", "height=32", cwd=tmp_path)
        assert r.returncode == 0, f"{argv}\n{r.stderr[-2000:]}"
        lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if x.strip()]
        prompts = sorted({e["prompt"] for e in lines if "prompt" in e})
        if "prompt_sr=" in " ".join(argv):
            assert prompts == ["a blue fox", "a green fox", "a red fox"] and len(lines) >= 6
        elif "wildcard_dirs=" in " ".join(argv):
            assert len(prompts) <= 2 and all(p.split()[1] in ("red", "green", "blue") for p in prompts)
        elif "prompts_file=" in " ".join(argv):
            assert prompts == ["a (blue:1.2) lighthouse", "a red fox"]
        else:
            assert prompts == ["a (red:1.3) fox [in snow]", "a blue lighthouse", "a red lighthouse"]
