"""The Hydra configs live in conf/ at the top of the checkout (where `t2i` reads them in a source or editable
install); a wheel carries them as runner/conf/ (runner/config/overrides.py looks there first). Everything else is in
pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            shutil.copytree(Path(__file__).resolve().parent / "conf", Path(self.build_lib) / "runner" / "conf",
                            dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})
