"""`owdfa-bench train [overrides]`: training, one cell or a sweep, as a Hydra application.

The config tree is the one shipped with the package (`owdfa_bench.resources.conf_dir()`), so
an installed owdfa-bench trains from any folder; in a checkout that tree is the top-level
`conf/`, and `python run.py` calls the same `main`:

    owdfa-bench train method=cpl protocol=p2 seed=2026
    owdfa-bench train -m method=cal,cpl seed=2025,2026,2027
    owdfa-bench train +sweep=demo
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from owdfa_bench.config import register_configs
from owdfa_bench.resources import conf_dir

register_configs()  # the structured configs the YAML defaults lists name (no torch import)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one cell; the All ACC it returns is what a Hydra sweeper would optimise."""
    from owdfa_bench.runner import run  # here: `train --help` and `--cfg` need no torch

    record = run(cfg)
    return record.get("metrics", {}).get("all_acc")


def cli_train(argv: list[str]) -> int:
    """`owdfa-bench train ARGS`: Hydra reads its arguments from sys.argv."""
    saved = sys.argv
    sys.argv = ["owdfa-bench train", *argv]
    try:
        main()
    finally:
        sys.argv = saved
    return 0
