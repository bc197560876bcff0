"""What a person sees while runs train (owdfa_bench/progress.py); the lines of a real multirun
are checked in tests/test_sweep_and_logging.py."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from unittest import mock

from omegaconf import OmegaConf

from owdfa_bench.progress import (
    FILE_ONLY,
    ProgressBar,
    evaluation_line,
    keep_file_only_lines_off_the_console,
    result_line,
    sweep_count_line,
    sweep_size,
)


def test_the_evaluation_line_shows_the_accuracies_in_percent_and_the_diagnostics():
    evaluation = {
        "epoch": 2,
        "metrics": {
            "all_acc": 0.6123,
            "known_acc": 0.8,
            "novel_acc": 0.4049,
            "all_nmi": 0.5,
            "all_ari": 0.25,
            "pseudo_acc": 0.7,
        },
    }
    assert evaluation_line(evaluation, 6) == (
        "epoch 3/6: All 61.2  Known 80.0  Novel 40.5  NMI 50.0  ARI 25.0  (pseudo-label acc 70.0)"
    )


def test_the_result_line_names_the_cell_and_its_selected_epoch():
    record = {
        "method": "cal",
        "protocol": "p1",
        "k": "known",
        "seed": 2025,
        "metrics": {"all_acc": 0.5, "known_acc": 0.75, "novel_acc": 0.25},
        "selected_epoch": 5,
        "epochs": 6,
        "wall_s": 12.5,
    }
    assert result_line(record) == (
        "done cal p1 K known seed 2025: All 50.0  Known 75.0  Novel 25.0 (epoch 6/6, 12.5 s)"
    )


def test_the_sweep_size_counts_the_sweeper_params_and_the_command_line():
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"+table2_row": "cal,cpl", "protocol": "p1,p2,p3"}},
                "overrides": {"task": ["seed=1,2", "trainer=smoke"]},
            }
        }
    )
    assert sweep_size(config) == 2 * 3 * 2
    assert sweep_size(OmegaConf.create({"hydra": {}})) is None  # unreadable: no count


def test_file_only_lines_reach_the_log_file_and_not_the_console(tmp_path):
    logger = logging.getLogger("test_progress.console")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    console = io.StringIO()
    handlers = [logging.StreamHandler(console), logging.FileHandler(tmp_path / "train.log")]
    for handler in handlers:
        logger.addHandler(handler)
    keep_file_only_lines_off_the_console(logger)
    logger.info("checkpoint last.ckpt: epoch 1", extra=FILE_ONLY)
    logger.info("epoch 1/2: All 50.0")
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()
    assert console.getvalue() == "epoch 1/2: All 50.0\n"
    assert (tmp_path / "train.log").read_text().splitlines() == [
        "checkpoint last.ckpt: epoch 1",
        "epoch 1/2: All 50.0",
    ]


def test_timm_info_lines_reach_the_log_file_and_its_warnings_the_console(tmp_path):
    root = logging.getLogger("test_progress.root")
    root.propagate = False
    root.setLevel(logging.INFO)
    console = io.StringIO()
    handlers = [logging.StreamHandler(console), logging.FileHandler(tmp_path / "train.log")]
    for handler in handlers:
        root.addHandler(handler)
    keep_file_only_lines_off_the_console(root)
    # records of the library's loggers, handled by these handlers as the root's would be
    for name, level, message in [
        ("timm.models._builder", logging.INFO, "Loading pretrained weights from file"),
        ("timm.models._helpers", logging.WARNING, "missing keys"),
        ("timmy", logging.INFO, "not timm"),
    ]:
        root.handle(logging.LogRecord(name, level, __file__, 0, message, None, None))
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
    assert console.getvalue().splitlines() == ["missing keys", "not timm"]
    assert len((tmp_path / "train.log").read_text().splitlines()) == 3


def test_the_progress_bar_shows_no_v_num():
    shown = {"train/loss": 0.5, "v_num": "dyki"}
    with mock.patch("lightning.pytorch.callbacks.RichProgressBar.get_metrics", return_value=shown):
        assert ProgressBar().get_metrics(None, None) == {"train/loss": 0.5}


def test_the_cell_count_tells_this_launch_from_what_was_there(tmp_path):
    def record(cell: str, status: str, age_s: float = 0.0) -> None:
        path = tmp_path / cell / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"status": status}))
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))

    record("cal/p1/k-known/seed-1", "complete", age_s=3600)  # before this launch: skipped
    record("cal/p1/k-known/seed-2", "complete")
    record("cal/p1/k-known/seed-3", "failed")
    assert sweep_count_line(tmp_path, since=time.time() - 60) == (
        "3 cells: 1 complete, 1 already complete, 1 failed"
    )
