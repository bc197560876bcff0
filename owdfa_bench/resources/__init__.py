"""The data files the package ships: the config tree, the protocol registries, the published
numbers, found with importlib.resources wherever the package is installed.

In a checkout `conf`, `protocols` and `paper` here are symbolic links to the top-level `conf/`
(whose `sweep` links to `sweeps/`), `protocols/` and `results/paper/`; a wheel holds copies of
their files (`[tool.setuptools.package-data]` in pyproject.toml, checked by
tests/test_packaging.py). Code reads them only through the functions below, never through
paths relative to a source file, so an installed package runs from any folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_dir(name: str) -> Path:
    """The shipped folder `name` (`conf`, `protocols` or `paper`) as a real directory path."""
    folder = files(__name__) / name
    if not isinstance(folder, Path):  # e.g. a zip import: Hydra needs a directory on disk
        raise RuntimeError(
            f"owdfa_bench/resources/{name} is not a folder on disk ({folder!r}); install "
            "owdfa-bench unpacked (pip install), not as a zip"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is missing: the checkout lacks the owdfa_bench/resources/{name} link or "
            "the wheel its package data; reinstall owdfa-bench"
        )
    return folder.resolve()  # in a checkout: the top-level folder itself


def conf_dir() -> Path:
    """The Hydra config tree (`config.yaml` and its groups)."""
    return resource_dir("conf")


def protocols_dir() -> Path:
    """The class registries and known/novel splits (`owdfa40.yaml`, `owdfa23.yaml`)."""
    return resource_dir("protocols")


def paper_dir() -> Path:
    """The published numbers (`*.csv`, described in its `README.md`)."""
    return resource_dir("paper")
