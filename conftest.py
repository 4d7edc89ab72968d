"""Doctests of the library, collected under the names the package is installed as.

``inference/`` is installed as ``ppl_lm.inference`` (setuptools ``package-dir``), so importing
its files by path (pytest's default) would make a second copy of every module under the wrong
name (``inference.smc``). Each library file is imported here by its installed name instead, and
pytest's own ``DoctestModule`` collects its ``>>>`` examples with the ``doctest_optionflags`` of
``pyproject.toml``. ``models/`` holds CLI scripts and is not collected.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from _pytest.doctest import DoctestModule

ROOT = Path(__file__).resolve().parent
# Source folder -> installed package name (pyproject.toml [tool.setuptools] package-dir).
PACKAGES = {ROOT / "ppl_lm": "ppl_lm", ROOT / "inference": "ppl_lm.inference"}


def installed_name(path: Path) -> str | None:
    """The module name ``path`` is installed as, or ``None`` outside the library."""
    for folder, package in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__main__":
                return None
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join((package, *parts))
    return None


class InstalledDoctestModule(DoctestModule):
    """A ``DoctestModule`` that imports its file by the installed module name."""

    def _getobj(self):
        name = installed_name(self.path.resolve())
        module = importlib.import_module(name)
        if Path(module.__file__).resolve() != self.path.resolve():
            raise ImportError(
                f"{name} is imported from {module.__file__}, not from {self.path}: "
                "install this checkout (make install, i.e. pip install -e .)")
        return module


def pytest_configure(config):
    # --doctest-modules would import inference/ by path (as ``inference.smc``); the hook below
    # collects the library's doctests whether it is given or not.
    config.option.doctestmodules = False


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix != ".py":
        return None
    if installed_name(file_path.resolve()) is None:
        return None
    return InstalledDoctestModule.from_parent(parent, path=file_path)
