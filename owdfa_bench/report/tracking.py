"""The seed-aggregated tables and figures of a sweep as one W&B run (job_type "aggregate").

The per-seed runs of a sweep each log to W&B (`conf/logger/wandb.yaml`, offline unless the user
sets `logger.mode=online`); this run puts the paper tables (`wandb.Table`) and the report's
figures (`wandb.Image`) beside them, in the same project. Mode `auto` follows the sweep: a W&B
run in the mode, project and entity of its runs' logger when they logged to W&B (offline by
default, like every run), none when they did not. `offline` or `online` force one. No API key is
ever read or written here: online mode uses the user's `wandb login` or WANDB_API_KEY.

The tables hold numbers (`numeric_frame`: mean, std and seed count in columns of their own),
so they sort in the W&B UI. The offline run lies in `$WANDB_DIR/wandb/offline-run-*` when
WANDB_DIR is set, else under the report's output folder; `wandb sync` uploads it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from owdfa_bench.report.render import Cell, Table

MODES = ("auto", "offline", "online", "disabled")
JOB_TYPE = "aggregate"
DEFAULT_PROJECT = "owdfa-bench"


@dataclass(frozen=True)
class WandbTarget:
    mode: str
    project: str
    entity: str | None = None


def resolve_target(
    configs: pd.Series | list[Any], mode: str | None = "auto", project: str | None = None
) -> WandbTarget | None:
    """Where the aggregate run goes, or None for no run (see the module docstring)."""
    mode = mode or "auto"
    if mode not in MODES:
        raise ValueError(f"wandb mode {mode!r}: use one of {', '.join(MODES)}")
    loggers = [
        c["logger"]
        for c in configs
        if isinstance(c, Mapping) and isinstance(c.get("logger"), Mapping)
    ]
    runs_wandb = [lg for lg in loggers if lg.get("name") == "wandb"]
    if mode == "auto":
        if not runs_wandb:
            return None
        mode = str(runs_wandb[0].get("mode") or "offline")
    if mode == "disabled":
        return None
    first = runs_wandb[0] if runs_wandb else {}
    return WandbTarget(
        mode=mode,
        project=str(project or first.get("project") or DEFAULT_PROJECT),
        entity=first.get("entity"),
    )


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if hasattr(value, "item"):
        return _cell(value.item())
    return value


def numeric_frame(table: Table) -> pd.DataFrame:
    """A paper table as numbers, so a W&B table sorts: per protocol and metric the mean, the
    std and the seed count as separate columns (a published number has a mean only)."""
    rows = []
    for row in table.rows:
        values: dict[str, Any] = {"method": row.label, "kind": row.kind}
        for j, cell in enumerate(row.cells):
            protocol, metric = table.column(j)
            prefix = f"{protocol}/{metric}"
            if isinstance(cell, Cell):
                mean, std, n = cell.mean, cell.std, cell.n
            else:
                mean, std, n = cell, None, None
            values.update({f"{prefix}/mean": mean, f"{prefix}/std": std, f"{prefix}/n": n})
        rows.append(values)
    return pd.DataFrame(rows)


def to_table(frame: pd.DataFrame) -> Any:
    """A `wandb.Table` of a frame: string column names, NaN as None (strict JSON)."""
    import wandb

    columns = [str(c) for c in frame.columns]
    data = [[_cell(v) for v in row] for row in frame.astype(object).itertuples(index=False)]
    return wandb.Table(columns=columns, data=data)


def log_report(
    target: WandbTarget,
    sweep_dir: str | Path,
    out_dir: str | Path,
    tables: Mapping[str, pd.DataFrame],
    figures: list[Path],
    config: Mapping[str, Any],
) -> Path:
    """One W&B run holding `tables` (as `tables/<name>`) and the PNG `figures` (as
    `figures/<stem>`); returns the run's local folder."""
    import wandb

    sweep_name = Path(sweep_dir).resolve().name
    run = wandb.init(
        project=target.project,
        entity=target.entity,
        mode=target.mode,
        job_type=JOB_TYPE,
        group=sweep_name,
        name=f"aggregate-{sweep_name}",
        tags=["aggregate"],
        config=dict(config),
        # explicit even when WANDB_DIR is set: W&B reads the variable once per process, so a
        # run earlier in the process (a basic-launcher sweep) would otherwise choose the folder
        dir=os.environ.get("WANDB_DIR") or str(out_dir),
        settings=wandb.Settings(console="off", silent=True),
    )
    try:
        payload: dict[str, Any] = {f"tables/{name}": to_table(t) for name, t in tables.items()}
        for path in figures:
            if path.suffix == ".png":
                payload[f"figures/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        local = Path(run.dir).parent
    finally:
        run.finish()
    if wandb.run is None:  # no run of the caller open: wait until the run's files are written
        wandb.teardown()
    return local
