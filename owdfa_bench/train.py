"""`owdfa-bench train [overrides]`: training, one cell or a sweep, as a Hydra application.

The config tree is the one shipped with the package (`owdfa_bench.resources.conf_dir()`), so
an installed owdfa-bench trains from any folder; in a checkout that tree is the top-level
`conf/`, and `python run.py` calls the same `main`:

    owdfa-bench train method=cpl protocol=p2 seed=2026
    owdfa-bench train -m method=cal,cpl seed=2025,2026,2027
    owdfa-bench train +sweep=demo

A user error (`owdfa_bench.errors.USER_ERRORS`: a bad value, a config that does not compose,
missing data or weights, a bad checkpoint) ends in one line and exit status 1; its traceback is
in the run folder's `train.log` (the Hydra job is named after this file), and
`HYDRA_FULL_ERROR=1` prints it on the console too.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from owdfa_bench.config import register_configs
from owdfa_bench.errors import (
    drop_unwritable_log_files,
    exit_on_user_error,
    is_user_error,
    log_traceback_to_files,
)
from owdfa_bench.resources import conf_dir

register_configs()  # the structured configs the YAML defaults lists name (no torch import)


class PassedThrough(BaseException):
    """A user error of a single run, carried past Hydra's job runner (which would print an
    "Error executing job" line first) to `main`. In a multirun the error goes through Hydra,
    which names the failed job and runs the others."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def shown_path(path: str) -> str:
    """`path` relative to the working folder when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def train_cell(cfg: DictConfig) -> float | None:
    """Run one cell; the All ACC it returns is what a Hydra sweeper would optimise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from owdfa_bench.progress import keep_file_only_lines_off_the_console
    from owdfa_bench.runner import run  # here: `train --help` and `--cfg` need no torch

    drop_unwritable_log_files()  # a full disk: one line, not a traceback per log message
    keep_file_only_lines_off_the_console()  # checkpoint lines: train.log only
    try:
        record = run(cfg)
    except BaseException as err:
        files = log_traceback_to_files(err)
        if files:  # named by the one-line message of a user error
            err.log_file = shown_path(files[0])
        if is_user_error(err) and HydraConfig.get().mode == RunMode.RUN:
            raise PassedThrough(err) from None
        raise
    return record.get("metrics", {}).get("all_acc")


hydra_app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(
    train_cell
)


def run_hydra_app() -> float | None:
    """Hydra's app with its own error report off: every exception reaches `main`."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return hydra_app()
    except PassedThrough as passed:
        raise passed.error from None
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def main(prog: str = "run.py") -> float | None:
    """`python run.py ARGS`: the Hydra app; a user error ends in one line and exit status 1."""
    return exit_on_user_error(run_hydra_app, prog)


def cli_train(argv: list[str]) -> int:
    """`owdfa-bench train ARGS`: Hydra reads its arguments from sys.argv."""
    saved = sys.argv
    sys.argv = ["owdfa-bench train", *argv]
    try:
        main("owdfa-bench train")
    finally:
        sys.argv = saved
    return 0
