"""Build hook: a wheel carries the local stack's files (deploy/local) as package data.

`maas-extproc demo` then works from an installed wheel, not only from a checkout. Everything
else about the build is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

LOCAL = Path(__file__).resolve().parent / "deploy" / "local"


class BuildWithLocalStack(build_py):
    def run(self) -> None:
        super().run()
        if not LOCAL.is_dir():  # e.g. the image build, whose context leaves deploy/ out
            return
        target = Path(self.build_lib) / "extproc" / "local"
        shutil.copytree(LOCAL, target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithLocalStack})
