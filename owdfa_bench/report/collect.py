"""Collect: every `results.json` of a sweep folder -> one pandas row per run.

A sweep is a folder of run folders `<method>/<protocol>/k-<k>/seed-<seed>/results.json` (the
runner writes them). Each is read through the typed run record (`owdfa_bench.records.RunRecord`,
which reads every schema version up to the current one). This stage only reads: a file that
does not parse is kept as a row with status "unreadable", so the validation stage reports it
instead of losing it. Paths are relative to the sweep folder, so no machine path reaches a table
or a log.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from owdfa_bench.metrics import OWDFA_KEYS
from owdfa_bench.records import (
    HASH_EXCLUDED_KEYS,
    HASH_EXCLUDED_PATHS,
    HASH_EXCLUDED_TRAINER_KEYS,
    RESULTS_FILE,
    RunRecord,
    run_precision,
)
from owdfa_bench.report.naming import display_from_config

RECORD_NAME = RESULTS_FILE

# Scalar fields of a record copied into one row per run; metrics are added after them.
RUN_FIELDS = [
    "path",
    "status",
    "error",
    "schema_version",
    "method",
    "protocol",
    "k",
    "seed",
    "split_seed",
    "data",
    "synthetic",
    "data_digest",  # None in records written before it was recorded
    "selection",
    "selected_epoch",
    "epochs",
    "num_clusters",
    "k_estimated",
    "num_known",
    "num_classes",
    "wall_s",
    "train_images_per_s",
    "eval_images_per_s",
    "config_hash",
    "cell_config_hash",
    "git_commit",
    "device",
    "precision",  # Lightning's name (run_precision: the record's, else its config's; None unknown)
    "data_warnings",
    "unreadable_images",
    "display_name",  # from the run's config, `method.display` (None when it has none)
    "display_order",
]
INTEGER_FIELDS = [
    "schema_version",
    "seed",
    "split_seed",
    "selected_epoch",
    "epochs",
    "num_clusters",
    "k_estimated",
    "num_known",
    "num_classes",
    "data_warnings",
    "unreadable_images",
]
# Whole-record fields kept as Python objects for the later stages (never written to runs.csv).
OBJECT_FIELDS = ["config", "history", "k_curve"]
# Preferred column order of metrics; any other numeric metric follows, sorted by name.
METRIC_ORDER = [
    *OWDFA_KEYS,
    "gcd_v2_all_acc",
    "gcd_v2_old_acc",
    "gcd_v2_new_acc",
    "gcd_v1_all_acc",
    "gcd_v1_old_acc",
    "gcd_v1_new_acc",
    "gcd_v2b_all_acc",
    "real_acc",
]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def stable_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_without_seed(config: Any, seed: Any) -> Any:
    """The config with everything that legitimately changes from seed to seed removed.

    Drops `seed` and `split_seed` keys (validation checks the split seed on its own: fixed, or
    equal to the seed, within a cell), the keys the runner's config hash ignores (run folder,
    logger, progress bar, loader workers, display metadata, ...), and masks the seed in strings
    such as run-folder names.
    """
    volatile = {"seed", "split_seed", "paths", "output_dir", *HASH_EXCLUDED_KEYS}
    # Only "seed-2025", "seed_2025", "seed=2025", "seed2025": a bare "1" must not mask "p1".
    seed_in_text = (
        None if seed is None else re.compile(rf"(seed[-_=]?){re.escape(str(seed))}(?!\d)")
    )
    if isinstance(config, dict):
        config = copy.deepcopy(config)
        trainer_paths = [("trainer", key) for key in HASH_EXCLUDED_TRAINER_KEYS]
        for path in [*HASH_EXCLUDED_PATHS, *trainer_paths]:
            node: Any = config
            for key in path[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(path[-1], None)

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: clean(value) for key, value in node.items() if key not in volatile}
        if isinstance(node, list):
            return [clean(value) for value in node]
        if isinstance(node, str) and seed_in_text is not None:
            return seed_in_text.sub(r"\1<seed>", node)
        return node

    return clean(config)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists become their JSON text."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): json.dumps(node, default=str) if isinstance(node, list) else node}


def read_record(path: Path, root: Path) -> dict[str, Any]:
    """One row of `load_records`: the scalar fields, the metrics flattened, the objects."""
    rel = path.relative_to(root).as_posix()  # relative: no machine paths in tables or logs
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {"path": rel, "status": "unreadable", "error": f"{type(err).__name__}: {err}"}
    if not isinstance(record, dict):
        return {"path": rel, "status": "unreadable", "error": "top level is not a JSON object"}

    run = RunRecord.from_dict(record)
    row: dict[str, Any] = {name: getattr(run, name, None) for name in RUN_FIELDS}
    row["path"] = rel
    row["precision"] = run_precision(run)
    row["cell_config_hash"] = run.extras.get("cell_config_hash")
    metrics = run.metrics or {}
    if isinstance(metrics, dict):
        for name, value in metrics.items():
            if name not in row and is_number(value):
                row[name] = float(value)
    for name, column in (("data_warnings", "data_warnings"), ("unreadable", "unreadable_images")):
        value = getattr(run, name)
        row[column] = len(value) if isinstance(value, list) else None
    config = run.config
    row["config"] = config if isinstance(config, dict) else None
    display = display_from_config(row["config"])
    row["display_name"] = display.name if display else None
    row["display_order"] = display.order if display else None
    history = run.history
    row["history"] = history if isinstance(history, list) else []
    k_curve = run.extras.get("k_curve")  # CAL's active prototypes per epoch
    row["k_curve"] = k_curve if isinstance(k_curve, list) else []
    if row["cell_config_hash"] is None and row["config"] is not None:
        row["cell_config_hash"] = stable_hash(config_without_seed(config, run.seed))
    return row


def load_records(sweep_dir: str | Path) -> pd.DataFrame:
    """Every `results.json` under `sweep_dir` (recursive, in path order), one row per run.

    Unparseable files are kept as rows with status "unreadable" and the parser's message in
    `error`, so the validation stage reports them instead of losing them.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"sweep folder {root} does not exist: pass the folder of a multirun "
            "(its hydra.sweep.dir), which holds <method>/<protocol>/k-<k>/seed-<seed>/results.json"
        )
    rows = [read_record(path, root) for path in sorted(root.rglob(RECORD_NAME))]
    df = pd.DataFrame(rows)
    for name in [*RUN_FIELDS, *OBJECT_FIELDS]:
        if name not in df.columns:
            df[name] = None
    for name in INTEGER_FIELDS:  # nullable ints: a missing seed must not turn 2025 into 2025.0
        numbers = pd.to_numeric(df[name], errors="coerce")
        whole = numbers.dropna()
        if (whole == whole.round()).all():
            df[name] = numbers.astype("Int64")
    df["display_order"] = pd.to_numeric(df["display_order"], errors="coerce")
    metrics = metric_columns(df)
    return df[[*RUN_FIELDS, *metrics, *OBJECT_FIELDS]].reset_index(drop=True)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns of a runs frame, in table order."""
    known = set(RUN_FIELDS) | set(OBJECT_FIELDS) | {"included", "excluded_reason"}
    extra = sorted(c for c in df.columns if c not in known and c not in METRIC_ORDER)
    return [c for c in METRIC_ORDER if c in df.columns] + extra
