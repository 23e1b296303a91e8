"""Everything is in pyproject.toml; this only ships the lm-eval hook (a .pth file) into site-packages
and, in wheels, the recipes (configs/*.yaml) as linearize/configs/."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = Path("linearize/eval/linearize-lm-eval.pth")


class BuildPyWithHook(build_py):
    """Also place the .pth hook at the top of site-packages (wheels and editable installs alike)."""

    def run(self) -> None:
        super().run()
        dest = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        shutil.copy(HOOK, Path(dest) / HOOK.name)
        if not self.editable_mode:  # an editable install reads configs/ in the checkout
            (Path(self.build_lib) / "linearize" / "configs").mkdir(exist_ok=True)
            for recipe in Path("configs").glob("*.yaml"):
                shutil.copy(recipe, Path(self.build_lib) / "linearize" / "configs" / recipe.name)


setup(cmdclass={"build_py": BuildPyWithHook})
