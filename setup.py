"""Installs src/crystal_lm_eval.pth next to the packages (the metadata is in pyproject.toml).

The .pth file registers crystal's model with lm-evaluation-harness at interpreter start
(src/crystal_lm_eval_hook.py explains why a hook). setuptools has no setting for a file at
the root of site-packages, so: `build_py` copies it into a built wheel, and
`editable_wheel` adds it to the wheel of `pip install -e`.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from wheel.wheelfile import WheelFile

PTH = Path("src", "crystal_lm_eval.pth")


class BuildPy(build_py):
    def run(self):
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib, PTH.name)), preserve_mode=0)


class EditableWheel(editable_wheel):
    def _create_wheel_file(self, bdist_wheel):
        path = super()._create_wheel_file(bdist_wheel)
        with WheelFile(path, "a") as wheel:
            wheel.write(str(PTH), PTH.name)
        return path


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
