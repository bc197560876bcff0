"""Multirun cells, skip-on-relaunch, W&B offline records, unreadable images."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_OWDFA40
from helpers import wandb_log_holding

from owdfa_bench.errors import DataError
from owdfa_bench.runner import run


def _multirun(root: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "method=lower_bound,upper_bound",
        "seed=2025,2026",
        "data=owdfa40",
        f"data.root={root}",
        "trainer=smoke",
        "logger=none",
        f"output_root={out}",
        "sweep_name=cells",
        *TINY_OWDFA40,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_multirun_writes_four_cells_and_relaunch_skips_them(owdfa40_root, tmp_path):
    first = _multirun(owdfa40_root, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    records = sorted((tmp_path / "cells").glob("*/p1/k-known/seed-*/results.json"))
    assert [str(p.relative_to(tmp_path / "cells").parent) for p in records] == [
        "lower_bound/p1/k-known/seed-2025",
        "lower_bound/p1/k-known/seed-2026",
        "upper_bound/p1/k-known/seed-2025",
        "upper_bound/p1/k-known/seed-2026",
    ]
    assert all(json.loads(p.read_text())["status"] == "complete" for p in records)
    # the end-of-sweep callback aggregated the cells
    assert (tmp_path / "cells" / "tables" / "summary.csv").is_file()
    # what a person sees: each run's place in the sweep, its evaluations and result, a count
    shown = first.stdout + first.stderr
    for number in range(1, 5):
        assert f"run {number} of 4: " in shown
    assert shown.count("epoch 1/2: All ") == 4 and shown.count("done ") == 4
    assert "cells: 4 complete" in shown
    assert "checkpoint last.ckpt" not in shown and "v_num" not in shown  # in train.log only
    log = (tmp_path / "cells/lower_bound/p1/k-known/seed-2025/train.log").read_text()
    assert "checkpoint last.ckpt: epoch 1" in log and "epoch 2/2: All " in log
    stamps = [p.stat().st_mtime_ns for p in records]
    second = _multirun(owdfa40_root, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("skipping") == 4
    assert "cells: 4 already complete" in second.stdout + second.stderr
    assert [p.stat().st_mtime_ns for p in records] == stamps


def summary_item(key: str, value) -> bytes:
    """How W&B's offline log stores one summary/history item: key, then its JSON value."""
    k, v = key.encode(), json.dumps(value).encode()
    return b"\n" + bytes([len(k)]) + k + b"\x82\x01" + bytes([len(v)]) + v


def test_wandb_offline_run_holds_the_summary(make_owdfa40_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_owdfa40_cfg("method=lower_bound", "logger=wandb")
    record = run(cfg)
    logs = list(Path(cfg.run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1  # one W&B run per cell, finished
    # offline runs keep everything in this log (no network)
    wanted = [summary_item(k, record["metrics"][k]) for k in ("all_acc", "all_ari")]
    raw = wandb_log_holding(logs[0], *wanted)
    for key in ("all_acc", "known_acc", "novel_acc", "all_nmi", "all_ari"):
        assert summary_item(key, record["metrics"][key]) in raw, key
    assert b"test/all_acc" in raw  # per-epoch history
    assert b"lower_bound-p1-kknown" in raw and b"seed-2025" in raw  # group and seed tag
    assert b"api_key" not in raw.lower()


def offline_run_ids(run_dir: Path) -> list[str]:
    """The W&B run id of each offline run folder W&B wrote: `offline-run-<time>-<id>`, and
    `-<n>` after it when a folder of that second and id exists (a resumed segment that started
    in the same second as the killed one)."""
    return sorted(p.name.split("-")[3] for p in run_dir.glob("wandb/offline-run-*"))


def test_a_resumed_run_continues_its_wandb_run(make_cfg, monkeypatch):
    """Killed and relaunched: the second segment logs to the same W&B run (its id kept in the
    run folder, resume="allow"), so `wandb sync` makes one run of both; a forced rerun is a
    new W&B run."""
    from owdfa_bench.method import OWDFAMethod
    from owdfa_bench.runner import WANDB_ID_FILE

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = ("method=lower_bound", "logger=wandb", "trainer.max_epochs=2")
    original = OWDFAMethod.training_step

    def die_in_epoch_two(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("killed")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(OWDFAMethod, "training_step", die_in_epoch_two)
        with pytest.raises(RuntimeError, match="killed"):
            run(make_cfg(*overrides))
    cfg = make_cfg(*overrides)
    record = run(cfg)
    run_dir = Path(cfg.run_dir)
    assert record["status"] == "complete" and len(record["resumed"]) == 1
    ids = offline_run_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1  # two segments, one W&B run
    assert (run_dir / WANDB_ID_FILE).read_text() == ids[0]
    run(make_cfg(*overrides, "force=true"))
    assert len(set(offline_run_ids(run_dir))) == 2


def test_wandb_mode_from_the_environment_wins_over_the_config(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = make_cfg("method=lower_bound", "logger=wandb", "logger.mode=offline")
    assert run(cfg)["status"] == "complete"
    assert offline_run_ids(Path(cfg.run_dir)) == []  # disabled: W&B wrote nothing


def test_unreadable_images_are_listed_and_fail_the_run(make_owdfa40_cfg, owdfa40_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(owdfa40_root, root)
    broken = root / "1_Swap_Deepfakes" / "frames" / "000.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="000.png") as err:
        run(
            make_owdfa40_cfg(
                "method=lower_bound", f"data.root={root}", "data.max_unreadable_fraction=0.0"
            )
        )
    assert "max_unreadable_fraction" in str(err.value)
    record = run(
        make_owdfa40_cfg(
            "method=lower_bound", f"data.root={root}", "data.max_unreadable_fraction=0.05"
        )
    )
    assert record["unreadable"] == [str(broken)]


def test_demo_sweep_runs_tiny_and_aggregates(synth_root, tmp_path):
    """`make demo`'s sweep, shrunk: the bounds, CAL and CPL (one seed), then the table."""
    from conftest import TINY_SYNTH

    cmd = [
        sys.executable,
        "run.py",
        "+sweep=demo",
        "trainer=smoke",
        "logger=none",
        f"data.root={synth_root}",
        f"output_root={tmp_path}",
        "hydra.sweeper.params.seed=2025",
        *TINY_SYNTH,
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = list((tmp_path / "demo").glob("*/p1/k-known/seed-*/results.json"))
    assert sorted(p.parts[-5] for p in records) == ["cal", "cpl", "lower_bound", "upper_bound"]
    table = (tmp_path / "demo" / "tables" / "acc.md").read_text()
    assert all(name in table for name in ("CAL", "CPL", "Lower bound", "Upper bound"))
    assert "ynthetic" in table
    assert out.stdout.count(table.splitlines()[0]) == 1  # the callback prints the table once
    assert (tmp_path / "demo" / "tables" / "diagnostics.md").is_file()
