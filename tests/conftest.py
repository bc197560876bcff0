"""Shared fixtures: the real config composed with Hydra's compose API, tiny data made here.

Tests call the same `run(cfg)` the CLI calls, with trainer=smoke, logger=none and outputs
under pytest's tmp_path. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from owdfa_bench import config
from owdfa_bench.protocols import load_registry

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# A tiny synthetic set: 32 px, a handful of images per class (generated once per session).
TINY_SYNTH = [
    "data.image_size=32",
    "data.pretrain=null",  # from scratch: the pretrained start has its own tests
    "data.generator.real_per_folder=6",
    "data.generator.fakes_per_class=5",
    "data.budgets.real=8",
    "data.budgets.real_per_folder=4",
    "data.budgets.known=5",
    "data.budgets.novel=4",
    "method.batch_size=16",
]
# Budgets matching `write_owdfa40_tree` below.
TINY_OWDFA40 = [
    "data.image_size=32",
    "data.budgets.real=8",
    "data.budgets.real_per_folder=4",
    "data.budgets.known=5",
    "data.budgets.novel=4",
    "data.backbone.name=resnet18",
    "data.backbone.pretrained=false",
    "data.crop_face=false",  # whole frames: the crop cache has its own tests (test_faces.py)
    "method.batch_size=16",
]

# One thread: tiny tensors gain nothing from two, and tests may share the cores.
torch.set_num_threads(1)


def compose_config(overrides: list[str]) -> DictConfig:
    return config.compose_config(overrides)


def write_owdfa40_tree(
    root: Path, per_class: int = 5, real_per_folder: int = 5, size: int = 24, seed: int = 0
) -> Path:
    """Every OWDFA-40 class folder with a few PNGs whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for cls in load_registry("owdfa40")["classes"]:
        folders = cls["folders"]
        n = real_per_folder if cls["index"] == 0 else per_class
        base = np.array([(cls["index"] * 37) % 256, (cls["index"] * 91) % 256, 128])
        for folder in folders:
            d = root / folder / "frames"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """No test writes the user's cache (the synth set, the pretrained start, the digest index of
    data folders): OWDFA_BENCH_CACHE points at a folder of the session; a test may set its own."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OWDFA_BENCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def owdfa40_root(tmp_path_factory) -> Path:
    return write_owdfa40_tree(tmp_path_factory.mktemp("owdfa40"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture
def make_cfg(tmp_path, synth_root) -> Callable[..., DictConfig]:
    """make_cfg(*overrides): the real config on tiny synthetic data, smoke trainer, no logger."""

    def make(*overrides: str) -> DictConfig:
        base = [
            "trainer=smoke",
            "logger=none",
            "data=synth",
            f"data.root={synth_root}",
            f"output_root={tmp_path / 'outputs'}",
            *TINY_SYNTH,
        ]
        return compose_config(base + list(overrides))

    return make


@pytest.fixture
def make_owdfa40_cfg(tmp_path, owdfa40_root) -> Callable[..., DictConfig]:
    """make_owdfa40_cfg(*overrides): the real-data path on a tiny tree made by the test."""

    def make(*overrides: str) -> DictConfig:
        base = [
            "trainer=smoke",
            "logger=none",
            "data=owdfa40",
            f"data.root={owdfa40_root}",
            f"output_root={tmp_path / 'outputs'}",
            *TINY_OWDFA40,
        ]
        return compose_config(base + list(overrides))

    return make
