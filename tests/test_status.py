"""`owdfa-bench status SWEEP_FOLDER` (owdfa_bench/status.py) on run folders made here, and the
command line's `--version` and usage (issue 20, item 7)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from owdfa_bench import __version__, cli, status
from owdfa_bench.locks import LOCK_FILE, hold_run_folder
from owdfa_bench.records import ATTEMPT_FILE, RunRecord, write_record

CELL = "cal/p1/k-known/seed-{}"


def record(run_dir, state: str, name: str = "results.json", **fields) -> None:
    cell = {"method": "cal", "protocol": "p1", "k": "known", "seed": int(run_dir.name[5:])}
    write_record(run_dir / name, RunRecord(status=state, **cell, **fields))


def killed_holder(run_dir) -> None:
    """A process that takes the run folder's lock, as a run does, and is killed holding it."""
    code = (
        "import os, sys, signal; from pathlib import Path; from owdfa_bench.locks import "
        "hold_run_folder\nwith hold_run_folder(Path(sys.argv[1])): "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO)
    assert done.returncode == -9
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] > 0  # the holder is named


def rows_by_seed(sweep) -> dict[int, status.RunStatus]:
    rows, _ = status.sweep_status(sweep)
    return {int(row.seed): row for row in rows}


def test_each_run_folder_gets_the_status_its_record_and_lock_say(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    folders = {seed: sweep / CELL.format(seed) for seed in range(1, 9)}
    for run_dir in folders.values():
        run_dir.mkdir(parents=True)
    record(folders[1], "complete", metrics={"all_acc": 0.5})
    record(folders[2], "failed", error="RuntimeError: out of memory")
    record(folders[3], "running")
    killed_holder(folders[3])  # a killed run: its lock names a dead process
    record(folders[4], "running")
    (folders[4] / LOCK_FILE).write_text("")  # released: a holder empties it as it ends
    record(folders[5], "running")
    holder = {"pid": 1, "host": "node-elsewhere", "slurm_job_id": "77", "since": "?"}
    (folders[5] / LOCK_FILE).write_text(json.dumps(holder))
    record(folders[6], "running")  # no run.lock: an older version's run
    record(folders[7], "complete", metrics={"all_acc": 0.5})
    record(folders[7], "failed", name=ATTEMPT_FILE, error="KeyboardInterrupt: ")
    record(folders[8], "running")
    with hold_run_folder(folders[8]) as held:  # this process trains it
        assert held is None
        rows = rows_by_seed(sweep)
        assert rows[8].status == "running"
        assert rows[8].note.startswith(f"pid {os.getpid()} on ")
    assert rows[1].status == "complete" and rows[1].note == ""
    assert rows[2].status == "failed" and rows[2].note == "RuntimeError: out of memory"
    assert rows[3].status == "interrupted" and rows[3].note.endswith("is gone; relaunch to resume")
    assert rows[4].status == "interrupted" and "released" in rows[4].note
    assert rows[5].status == "running (host node-elsewhere)"
    assert rows[5].note == "pid 1 on node-elsewhere, SLURM job 77, since ?"  # describe_holder
    assert rows[6].status == "unknown"
    assert rows[7].status == "failed" and "complete results.json is kept" in rows[7].note
    assert {(r.method, r.protocol, r.k) for r in rows.values()} == {("cal", "p1", "known")}

    assert cli.main(["status", str(sweep)]) == 0  # seed 8 released its lock since
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "protocol", "k", "seed", "status", "note"]
    assert re.match(r"cal +p1 +known +2 +failed +RuntimeError: out of memory$", lines[2])
    assert lines[-1] == (
        "1 complete, 1 running, 3 interrupted, 2 failed, 1 unknown "
        "(no multirun.yaml: the cells not started yet are not known)"
    )


def write_multirun_yaml(sweep, *overrides: str) -> None:
    """The multirun.yaml Hydra writes into a sweep folder (the config with its hydra node)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import owdfa_bench.config  # noqa: F401 - registers the schemas

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))


def test_cells_a_multirun_expects_without_a_folder_are_missing(tmp_path, capsys):
    sweep = tmp_path / "demo"
    write_multirun_yaml(sweep, "+sweep=demo", "protocol=p2")  # 4 methods x 3 seeds
    assert len(status.expected_cells(sweep)) == 12
    assert "cal/p2/k-known/seed-2026" in status.expected_cells(sweep)
    done = sweep / "cal" / "p2" / "k-known" / "seed-2026"
    done.mkdir(parents=True)
    write_record(done / "results.json", RunRecord(status="complete", method="cal", seed=2026))
    assert cli.main(["status", str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "1 complete, 11 missing"
    assert sum(" missing" in line for line in lines[1:-1]) == 11
    # the command line's value of a key wins over the sweep file's
    write_multirun_yaml(sweep, "+sweep=demo", "seed=7", "k=unknown")
    assert status.expected_cells(sweep) == [
        f"{m}/p1/k-unknown/seed-7" for m in sorted(("lower_bound", "upper_bound", "cal", "cpl"))
    ]


def test_a_sweep_whose_rows_pick_the_method_leaves_missing_unknown(tmp_path):
    """+sweep=cal_table2 sweeps +table2_row, which sets method and K: which folders its 90
    jobs write is not known without composing each, so no cell is called missing."""
    write_multirun_yaml(tmp_path, "+sweep=cal_table2")
    assert len(status.sweep_jobs(OmegaConf.load(tmp_path / "multirun.yaml").hydra)) == 90
    assert status.expected_cells(tmp_path) is None


def test_an_unreadable_multirun_yaml_leaves_missing_unknown(tmp_path):
    (tmp_path / "multirun.yaml").write_text("hydra: [not, a, mapping\n")
    assert status.expected_cells(tmp_path) is None
    assert status.count_line([], missing_known=False).startswith("no run folder (no multirun")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_is_the_distributions(flag, capsys, monkeypatch):
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == "owdfa-bench 0.1.0\n"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == f"owdfa-bench {__version__}\n"


def test_the_package_version_is_pyprojects():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'\nversion = "{__version__}"\n' in pyproject


def test_usage_lists_status_evaluate_and_version(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  status +where each run of a sweep folder stands", out, re.M)
    assert re.search(r"^  evaluate +evaluate a run folder", out, re.M)
    assert "--version" in out
