"""`owdfa-bench status SWEEP_FOLDER`: where each run of a sweep stands, read from its run folders.

One row per run folder under the sweep folder (a folder holding `results.json`,
`results.attempt.json` or `run.lock`), with the status its latest record says:

    complete      the record is complete
    failed        the run failed (the note holds its error); a relaunch resumes it
    running       the record says running and the process `run.lock` names is alive here
    running (host X)  ... on another machine, which this one cannot check
    interrupted   the record says running but nobody holds the lock: a killed run
    unknown       the record says running and there is no `run.lock` (an older version's run)
    unreadable    a record that does not parse; "no record": a lock but no record yet

The lock is never taken to check it (`locks.read_holder`). A run whose latest record is an
attempt beside a complete `results.json` shows the attempt's status, and its note says the
complete record is kept. Cells the sweep expects but that have no folder yet are "missing" when
the sweep folder holds Hydra's `multirun.yaml` (`expected_cells`: the sweeper's parameters and
the command line's overrides, expanded as Hydra's basic sweeper expands them); without one (a
single run's folder) missing cells are not known, and the last line says so. A cell skipped
because another launch held it, or because its record is complete, is not recorded as skipped:
it shows the record that is there.
"""

from __future__ import annotations

import argparse
import re
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from owdfa_bench.locks import LOCK_FILE, describe_holder, process_alive, read_holder
from owdfa_bench.records import ATTEMPT_FILE, RESULTS_FILE, RunRecord, read_record

MULTIRUN_FILE = "multirun.yaml"  # Hydra writes it into the sweep folder of a multirun
# the run folders' layout under a sweep folder (conf/config.yaml hydra.sweep.subdir)
CELL_LAYOUT = "${method.name}/${protocol.name}/k-${k.name}/seed-${seed}"
CELL_PATH = re.compile(
    r"(?P<method>[^/]+)/(?P<protocol>[^/]+)/k-(?P<k>[^/]+)/seed-(?P<seed>[^/]+)$"
)
CELL_KEYS = ("method", "protocol", "k", "seed")
COLUMNS = ("method", "protocol", "k", "seed", "status", "note")
NOTE_WIDTH = 100  # a failure's error is cut to this many characters
# the order of the count line (any other status follows)
STATUS_ORDER = (
    "complete",
    "already complete",
    "running",
    "interrupted",
    "failed",
    "unknown",
    "no record",
)
STATUS_ORDER += ("unreadable", "missing")


@dataclass
class RunStatus:
    """One row: the cell, where the run stands, and why (an error, the lock's holder)."""

    path: str  # the run folder, relative to the sweep folder
    method: str
    protocol: str
    k: str
    seed: str
    status: str
    note: str = ""


def find_run_folders(sweep: Path) -> list[Path]:
    """The folders under `sweep` that hold a run's record or lock, in path order."""
    markers = (RESULTS_FILE, ATTEMPT_FILE, LOCK_FILE)
    return sorted({path.parent for name in markers for path in sweep.rglob(name)})


def cell_of(relative: str, record: RunRecord | None) -> dict[str, str]:
    """method, protocol, k and seed of a run folder: its record's, else its path's."""
    match = CELL_PATH.search(relative)
    cell = {key: "?" if match is None else match[key] for key in CELL_KEYS}
    if record is not None:
        cell |= {key: str(getattr(record, key)) for key in CELL_KEYS if getattr(record, key)}
    return cell


def running_status(run_dir: Path, host: str) -> tuple[str, str]:
    """(status, note) of a run whose record says running, from the process its lock names."""
    holder = read_holder(run_dir)
    if holder is None:
        if not (run_dir / LOCK_FILE).exists():
            return "unknown", "the record says running; no run.lock to check (an older version)"
        return "interrupted", "run.lock is released: no process trains it; relaunch to resume"
    who = describe_holder(holder)
    if holder["host"] != host:
        return f"running (host {holder['host']})", who
    if process_alive(holder["pid"]):
        return "running", who
    return "interrupted", f"{who} is gone; relaunch to resume"


def run_status(sweep: Path, run_dir: Path, host: str) -> RunStatus:
    """Where the run in `run_dir` stands (module docstring)."""
    results, attempt = read_record(run_dir), read_record(run_dir, ATTEMPT_FILE)
    latest = attempt or results
    relative = run_dir.relative_to(sweep).as_posix()
    cell = cell_of(relative, latest)
    if latest is None:
        unreadable = [n for n in (RESULTS_FILE, ATTEMPT_FILE) if (run_dir / n).exists()]
        if unreadable:
            return RunStatus(relative, **cell, status="unreadable", note=", ".join(unreadable))
        status, note = running_status(run_dir, host)
        status = status if status.startswith("running") else "no record"
        return RunStatus(relative, **cell, status=status, note=note)
    if latest.status == "running":
        status, note = running_status(run_dir, host)
    else:
        status, note = str(latest.status), ""
        if latest.status == "failed":
            note = (latest.error or "")[:NOTE_WIDTH]
    if attempt is not None and results is not None and results.status == "complete":
        note = "; ".join(filter(None, ["an attempt: the complete results.json is kept", note]))
    return RunStatus(relative, **cell, status=status, note=note)


def sweep_jobs(hydra: Mapping[str, Any]) -> list[dict[str, str]]:
    """The jobs of a multirun, each as key -> value of its overrides, expanded as Hydra's basic
    sweeper expands them: the sweeper's params first, the command line's after (the later of a
    key wins). `hydra` is the `hydra` node of the multirun's config."""
    # the basic sweeper's own expansion (hydra._internal: no public API gives it)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = hydra["sweeper"].get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(hydra["overrides"]["task"])
    overrides = OverridesParser.create().parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(overrides, None)
    return [
        {key.lstrip("+~"): value for key, _, value in (a.partition("=") for a in job)}
        for batch in batches
        for job in batch
    ]


def expected_cells(sweep: Path) -> list[str] | None:
    """The run folders (relative paths) the multirun into `sweep` expects, from its
    `multirun.yaml`; None when there is none, it uses another folder layout, it cannot be
    expanded here (a glob), or it sweeps a key that picks a cell's method or K without naming
    them (`+table2_row`): those cells are known only by composing each job's config."""
    path = sweep / MULTIRUN_FILE
    if not path.is_file():
        return None
    try:
        saved = OmegaConf.load(path)
        hydra = OmegaConf.to_container(saved.hydra, resolve=False)
        if hydra["sweep"]["subdir"] != CELL_LAYOUT:
            return None
        jobs = sweep_jobs(hydra)
        defaults = {
            "method": str(saved.method.name),
            "protocol": str(saved.protocol.name),
            "k": str(saved.k.name),
            "seed": str(saved.seed),
        }
    except Exception:  # noqa: BLE001 - a multirun.yaml this cannot read: missing cells unknown
        return None
    swept = {key for job in jobs for key in job if len({j.get(key) for j in jobs}) > 1}
    if swept - set(CELL_KEYS):
        return None
    cells = [{**defaults, **{k: v for k, v in job.items() if k in CELL_KEYS}} for job in jobs]
    return sorted({"{method}/{protocol}/k-{k}/seed-{seed}".format(**cell) for cell in cells})


def sweep_status(sweep: Path) -> tuple[list[RunStatus], bool]:
    """(a row per run folder and per missing cell, whether missing cells are known)."""
    host = socket.gethostname()
    rows = [run_status(sweep, run_dir, host) for run_dir in find_run_folders(sweep)]
    expected = expected_cells(sweep)
    if expected is not None:
        found = {row.path for row in rows}
        for relative in expected:
            if relative not in found:
                rows.append(RunStatus(relative, **cell_of(relative, None), status="missing"))
    return sorted(rows, key=table_order), expected is not None


def table_order(row: RunStatus) -> tuple:
    """By cell, seeds in numeric order (seed-10 after seed-9)."""
    seed = int(row.seed) if row.seed.isdigit() else -1
    return (row.method, row.protocol, row.k, seed, row.path)


def format_table(rows: list[RunStatus]) -> list[str]:
    """Aligned plain-text lines: a header, then a row per run."""
    table = [COLUMNS] + [tuple(str(getattr(row, c)) for c in COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + f"  {line[-1]}"
        for line in table
    ]


def count_line(rows: list[RunStatus], missing_known: bool) -> str:
    """ "N complete, M running, ..." ("running (host X)" counts as running), and whether the
    missing cells are known."""
    counts = Counter(row.status.split(" (")[0] for row in rows)
    order = [*STATUS_ORDER, *sorted(set(counts) - set(STATUS_ORDER))]
    text = ", ".join(f"{counts[s]} {s}" for s in order if counts[s]) or "no run folder"
    if not missing_known:
        text += f" (no {MULTIRUN_FILE}: the cells not started yet are not known)"
    return text


def cli_status(argv: list[str]) -> int:
    """`owdfa-bench status SWEEP_FOLDER`."""
    parser = argparse.ArgumentParser(
        prog="owdfa-bench status",
        description="Where each run of a sweep stands: complete, running, interrupted (killed), "
        "failed, or missing (a cell of the multirun with no folder yet), read from the run "
        "folders' records and locks.",
    )
    parser.add_argument("sweep_dir", type=Path, help="folder of a sweep (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder; pass the folder of a sweep")
    rows, missing_known = sweep_status(args.sweep_dir)
    for line in format_table(rows) if rows else []:
        print(line.rstrip())
    print(count_line(rows, missing_known))
    return 0
