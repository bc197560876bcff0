"""What a person sees while runs train: a header line per run (which cell, run i of n in a
sweep), a line per evaluation with the test accuracies, a result line at the end, and at the
end of a sweep a count of its cells. Checkpoint messages go to the run's log only, and
Lightning's progress bar shows no `v_num` (a logger's version, meaningless here).

All lines are log records of the `owdfa_bench.progress` logger on global rank 0, so they also
land in the run's `train.log`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.experimental.callback import Callback
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SWEEP_SIZE_ENV = "OWDFA_SWEEP_SIZE"  # set by SweepProgress for the runs it launches
# `extra` of a log call whose line belongs in the run's log, not on the terminal
FILE_ONLY = {"file_only": True}
# metrics of the per-evaluation line: (record key, shown as)
EPOCH_METRICS = (
    ("all_acc", "All"),
    ("known_acc", "Known"),
    ("novel_acc", "Novel"),
    ("all_nmi", "NMI"),
    ("all_ari", "ARI"),
)
# a method's own diagnostics on its unlabelled rows, when it has them
DIAGNOSTIC_METRICS = (("pseudo_acc", "pseudo-label acc"), ("transductive_acc", "transductive acc"))


# libraries whose info lines belong in the run's log only (timm: "Loading pretrained weights from
# file <cache path>", twice per run); their warnings still reach the terminal
FILE_ONLY_LIBRARIES = ("timm",)


def from_library(name: str, libraries: tuple[str, ...] = FILE_ONLY_LIBRARIES) -> bool:
    return any(name == lib or name.startswith(f"{lib}.") for lib in libraries)


class ConsoleFilter(logging.Filter):
    """Keeps records logged with `extra=FILE_ONLY`, and the info lines of `FILE_ONLY_LIBRARIES`,
    off the handler it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and from_library(record.name):
            return False
        return not getattr(record, "file_only", False)


def keep_file_only_lines_off_the_console(logger: logging.Logger | None = None) -> None:
    """Attach `ConsoleFilter` to every handler of `logger` (the root) that is not a file."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not isinstance(handler, logging.FileHandler) and not any(
            isinstance(f, ConsoleFilter) for f in handler.filters
        ):
            handler.addFilter(ConsoleFilter())


def percent(value: Any) -> str:
    return "-" if value is None else f"{100.0 * float(value):.1f}"


def run_position() -> str:
    """ "run 3 of 12" in a multirun (Hydra's job number; the count when SweepProgress set it),
    "" for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    number = int(HydraConfig.get().job.num) + 1
    size = os.environ.get(SWEEP_SIZE_ENV)
    return f"run {number} of {size}" if size else f"run {number}"


def header_line(cfg: DictConfig, run_dir: Path) -> str:
    """The line a run starts with: its cell, its place in a sweep, its folder."""
    position = run_position()
    cell = f"{cfg.method.name} {cfg.protocol.name} K {cfg.k.name} seed {cfg.seed}"
    return f"{position + ': ' if position else ''}{cell} on {cfg.data.name} -> {run_dir}"


def metrics_text(metrics: dict[str, Any], names: tuple[tuple[str, str], ...]) -> str:
    return "  ".join(f"{shown} {percent(metrics[key])}" for key, shown in names if key in metrics)


def evaluation_line(evaluation: dict[str, Any], epochs: int) -> str:
    """One evaluation of the test split: the epoch, the accuracies, NMI, ARI (in %), and the
    method's diagnostics of its unlabelled rows when it has them."""
    metrics = evaluation["metrics"]
    text = f"epoch {evaluation['epoch'] + 1}/{epochs}: {metrics_text(metrics, EPOCH_METRICS)}"
    diagnostics = metrics_text(metrics, DIAGNOSTIC_METRICS)
    return f"{text}  ({diagnostics})" if diagnostics else text


def result_line(record: dict[str, Any]) -> str:
    """The line a complete run ends with."""
    metrics = record.get("metrics") or {}
    selected = record.get("selected_epoch")
    epoch = "" if selected is None else f"epoch {selected + 1}/{record.get('epochs')}, "
    return (
        f"done {record['method']} {record['protocol']} K {record['k']} seed {record['seed']}: "
        f"{metrics_text(metrics, EPOCH_METRICS)} ({epoch}{record.get('wall_s')} s)"
    )


class EvaluationLines(pl.Callback):
    """Logs `evaluation_line` after each evaluation of the test split (global rank 0). The
    training epoch ends after the evaluation at its end, so the method's history holds it."""

    def __init__(self) -> None:
        self.shown = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = getattr(pl_module, "eval_history", [])
        if trainer.is_global_zero:
            for evaluation in history[self.shown :]:
                log.info(evaluation_line(evaluation, trainer.max_epochs))
        self.shown = len(history)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without `v_num`."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def sweep_size(config: DictConfig) -> int | None:
    """How many runs a multirun launches (`status.sweep_jobs`); None when that fails."""
    from owdfa_bench.status import sweep_jobs

    try:
        return len(sweep_jobs(config.hydra))
    except Exception:  # noqa: BLE001 - a count is a nicety; a sweep it cannot read still runs
        return None


def sweep_count_line(sweep_dir: Path, since: float) -> str:
    """How the sweep's cells stand (`status.sweep_status`), a cell complete before `since`
    (skipped by this launch) counted as "already complete"."""
    from owdfa_bench.records import RESULTS_FILE
    from owdfa_bench.status import count_line, sweep_status

    rows, _ = sweep_status(sweep_dir)
    for row in rows:
        results = Path(sweep_dir) / row.path / RESULTS_FILE
        if row.status == "complete" and results.stat().st_mtime < since:
            row.status = "already complete"
    return f"{len(rows)} cells: {count_line(rows, missing_known=True)}"


class SweepProgress(Callback):
    """Hydra callback: tells the runs of a multirun how many they are (`SWEEP_SIZE_ENV`, read
    by `run_position`), and counts the sweep's cells when it ends."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        size = sweep_size(config)
        if size is not None:
            os.environ[SWEEP_SIZE_ENV] = str(size)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        log.info("sweep %s: %s", sweep_dir, sweep_count_line(sweep_dir, self.started))
