"""Run records (`results.json`) of a sweep -> the tables people publish.

A sweep is a folder of run folders `<method>/<protocol>/k-<k>/seed-<seed>/results.json`. This
module reads only those files and turns them into:

- `runs.csv`: every run, one row each, with the reason a run is left out of the means;
- `summary.csv`: mean, sample std (ddof=1) and n per cell (method, protocol, k) for each metric;
- `acc.md` / `acc.tex` and `nmi_ari.md` / `nmi_ari.tex`: the paper layout (rows = methods,
  column groups = protocols), with a caption that states the metric convention, the checkpoint
  rule and whether the data is synthetic;
- `issues.txt`: everything that makes the numbers less than a clean sweep (failed runs,
  unreadable files, missing or duplicate seeds, cells whose runs differ beyond the seed).

Nothing is dropped silently: a run left out of the means is listed, with its reason, in
`runs.csv`, in `issues.txt` and in the printed report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from owdfa_bench.metrics import OWDFA_KEYS
from owdfa_bench.records import HASH_EXCLUDED_KEYS, HASH_EXCLUDED_TRAINER_KEYS

log = logging.getLogger(__name__)

RECORD_NAME = "results.json"
SCHEMA_VERSION = 1
CELL = ["method", "protocol", "k"]
MIN_SEEDS = 3  # cells with fewer complete seeds get a dagger in the tables

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
    "data_warnings",
    "unreadable_images",
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
]
ACC_COLUMNS = [("all_acc", "All"), ("known_acc", "Known"), ("novel_acc", "Novel")]
NMI_ARI_COLUMNS = [
    ("all_nmi", "All NMI"),
    ("all_ari", "All ARI"),
    ("novel_nmi", "Novel NMI"),
    ("novel_ari", "Novel ARI"),
]

# Row order of the tables: bounds first (never bold: the upper bound sees novel labels),
# then baselines, then the OW-DFA methods.
BOUND_METHODS = ("lower_bound", "upper_bound")
METHOD_ORDER = [*BOUND_METHODS, "rankstats", "orca", "gcd", "simgcd", "cpl", "cdal", "cal"]
DISPLAY_NAMES = {
    "lower_bound": "Lower bound",
    "upper_bound": "Upper bound (oracle)",
    "rankstats": "RankStats",
    "orca": "ORCA",
    "gcd": "GCD",
    "simgcd": "SimGCD",
    "cpl": "CPL",
    "cdal": "CDAL",
    "cal": "CAL",
}
K_ORDER = {"known": 0, "unknown": 1}

# Selection rules a record may carry; only best_on_test numbers are marked.
TEST_SELECTED = "best_on_test"
DAGGER = "\u2020"  # fewer than MIN_SEEDS seeds
DDAGGER = "\u2021"  # checkpoint selected on the test set
PM = "\u00b1"

PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"
# Which published table goes beside which benchmark under --compare-paper.
PAPER_TABLES = {
    "owdfa40": ("owdfa40_cal_table2.csv", "CAL Table 2 on OWDFA-40"),
    "owdfa23": ("owdfa23_cpl_readme.csv", "the CPL README tables on OW-DFA"),
}
DEFAULT_PAPER_BENCHMARK = "owdfa40"

FALLBACK_CONVENTION_NOTE = (
    "All = Hungarian accuracy over all test samples; Known = direct accuracy on known classes; "
    "Novel = Hungarian accuracy on novel classes alone (OW-DFA convention)"
)


def metric_convention_note() -> str:
    """The one sentence that says which accuracy convention the tables show."""
    try:
        from owdfa_bench.metrics import METRIC_CONVENTION_NOTE
    except ImportError:
        return FALLBACK_CONVENTION_NOTE
    return str(METRIC_CONVENTION_NOTE).strip()


@dataclass(frozen=True)
class Issue:
    """One problem found in a sweep; `kind` is a short machine-readable tag."""

    kind: str
    detail: str
    path: str | None = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.detail}"


# --------------------------------------------------------------------------- reading records
def cell_name(method: Any, protocol: Any, k: Any) -> str:
    return f"{method}/{protocol}/k={k}"


def config_without_seed(config: Any, seed: Any) -> Any:
    """The config with everything that legitimately changes from seed to seed removed.

    Drops `seed` and `split_seed` keys (`validate` checks the split seed on its own: fixed, or
    equal to the seed, within a cell), the keys the runner's config hash ignores (run folder,
    logger, progress bar, loader workers, ...), and masks the seed in strings such as run-folder
    names.
    """
    volatile = {"seed", "split_seed", "paths", "output_dir", *HASH_EXCLUDED_KEYS}
    volatile |= set(HASH_EXCLUDED_TRAINER_KEYS)
    # Only "seed-2025", "seed_2025", "seed=2025", "seed2025": a bare "1" must not mask "p1".
    seed_in_text = (
        None if seed is None else re.compile(rf"(seed[-_=]?){re.escape(str(seed))}(?!\d)")
    )

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: clean(value) for key, value in node.items() if key not in volatile}
        if isinstance(node, list):
            return [clean(value) for value in node]
        if isinstance(node, str) and seed_in_text is not None:
            return seed_in_text.sub(r"\1<seed>", node)
        return node

    return clean(config)


def _stable_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): json.dumps(node, default=str) if isinstance(node, list) else node}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_record(path: Path, root: Path) -> dict[str, Any]:
    """One row of `load_records`: the scalar fields, the metrics flattened, the config."""
    rel = path.relative_to(root).as_posix()  # relative: no machine paths in tables or logs
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {"path": rel, "status": "unreadable", "error": f"{type(err).__name__}: {err}"}
    if not isinstance(record, dict):
        return {"path": rel, "status": "unreadable", "error": "top level is not a JSON object"}

    row: dict[str, Any] = {name: record.get(name) for name in RUN_FIELDS}
    row["path"] = rel
    metrics = record.get("metrics") or {}
    if isinstance(metrics, dict):
        for name, value in metrics.items():
            if name not in row and _is_number(value):
                row[name] = float(value)
    for name, column in (("data_warnings", "data_warnings"), ("unreadable", "unreadable_images")):
        value = record.get(name)
        row[column] = len(value) if isinstance(value, list) else None
    config = record.get("config")
    row["config"] = config if isinstance(config, dict) else None
    if row["cell_config_hash"] is None and row["config"] is not None:
        row["cell_config_hash"] = _stable_hash(config_without_seed(config, record.get("seed")))
    return row


def load_records(sweep_dir: str | Path) -> pd.DataFrame:
    """Every `results.json` under `sweep_dir` (recursive), one row per run.

    Unparseable files are kept as rows with status "unreadable" and the parser's message in
    `error`, so `validate` reports them instead of losing them.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"sweep folder {root} does not exist: pass the folder of a multirun "
            "(its hydra.sweep.dir), which holds <method>/<protocol>/k-<k>/seed-<seed>/results.json"
        )
    rows = [read_record(path, root) for path in sorted(root.rglob(RECORD_NAME))]
    df = pd.DataFrame(rows)
    for name in [*RUN_FIELDS, "config"]:
        if name not in df.columns:
            df[name] = None
    for name in INTEGER_FIELDS:  # nullable ints: a missing seed must not turn 2025 into 2025.0
        numbers = pd.to_numeric(df[name], errors="coerce")
        whole = numbers.dropna()
        if (whole == whole.round()).all():
            df[name] = numbers.astype("Int64")
    metrics = metric_columns(df)
    return df[[*RUN_FIELDS, *metrics, "config"]].reset_index(drop=True)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns of a runs frame, in table order."""
    known = set(RUN_FIELDS) | {"config", "included", "excluded_reason"}
    extra = sorted(c for c in df.columns if c not in known and c not in METRIC_ORDER)
    return [c for c in METRIC_ORDER if c in df.columns] + extra


# --------------------------------------------------------------------------- validation
def exclusion_reasons(df: pd.DataFrame) -> pd.Series:
    """Why each run is left out of the means ("" for runs that count).

    A run counts if it is complete, names its cell and seed, and is the first record (in path
    order) of its (cell, seed); later duplicates are excluded so no seed counts twice.
    """
    reasons = pd.Series("", index=df.index, dtype=object)
    if df.empty:
        return reasons
    status = df["status"].fillna("missing status")
    not_complete = status != "complete"
    reasons[not_complete] = "status " + status[not_complete].astype(str)
    keys = [*CELL, "seed"]
    no_key = ~not_complete & df[keys].isna().any(axis=1)
    reasons[no_key] = "record lacks method, protocol, k or seed"
    ok = reasons == ""
    first_path = df[ok].groupby(keys, dropna=False)["path"].transform("first")
    duplicate = ok & df["path"].ne(first_path.reindex(df.index))
    reasons[duplicate] = "duplicate seed of " + first_path.reindex(df.index)[duplicate].astype(str)
    return reasons


def _config_differences(configs: Iterable[dict | None], seeds: Iterable[Any]) -> list[str]:
    flat = [_flatten(config_without_seed(c, s)) for c, s in zip(configs, seeds) if c is not None]
    keys = sorted(set().union(*flat)) if flat else []
    diffs = []
    for key in keys:
        values = {json.dumps(f.get(key, "<absent>"), default=str) for f in flat}
        if len(values) > 1:
            diffs.append(f"{key} ({' vs '.join(sorted(values))})")
    return diffs


def validate(df: pd.DataFrame) -> list[Issue]:
    """Everything about a sweep a reader of its tables should know; nothing is fixed here."""
    issues: list[Issue] = []
    if df.empty:
        return [Issue("empty", f"no {RECORD_NAME} found in the sweep folder")]

    for _, run in df.iterrows():
        where = cell_name(run["method"], run["protocol"], run["k"])
        status = run["status"]
        if status == "unreadable":
            issues.append(
                Issue(
                    "unreadable", f"{run['path']}: {run['error']}; not in the tables", run["path"]
                )
            )
        elif status == "failed":
            issues.append(
                Issue(
                    "failed",
                    f"{where} seed {run['seed']} ({run['path']}): {run['error'] or 'no message'};"
                    " excluded from the means",
                    run["path"],
                )
            )
        elif status != "complete":
            issues.append(
                Issue(
                    "incomplete",
                    f"{where} seed {run['seed']} ({run['path']}): status {status!r};"
                    " excluded from the means (still running, or killed)",
                    run["path"],
                )
            )
        elif any(pd.isna(run[key]) for key in [*CELL, "seed"]):
            issues.append(
                Issue(
                    "malformed",
                    f"{run['path']}: lacks method, protocol, k or seed; excluded",
                    run["path"],
                )
            )
        problems = [
            f"{int(run[name])} {text}"
            for name, text in (
                ("data_warnings", "data warning(s)"),
                ("unreadable_images", "unreadable image(s)"),
            )
            if status == "complete" and not pd.isna(run[name]) and run[name] > 0
        ]
        if problems:
            issues.append(
                Issue(
                    "data_warning",
                    f"{where} seed {run['seed']}: {' and '.join(problems)}; the run counts, "
                    f"read them in {run['path']}",
                    run["path"],
                )
            )
        version = run["schema_version"]
        if status != "unreadable" and not pd.isna(version) and version != SCHEMA_VERSION:
            issues.append(
                Issue(
                    "schema",
                    f"{run['path']}: schema_version {run['schema_version']}, this aggregator "
                    f"reads version {SCHEMA_VERSION}; check the columns of that run",
                    run["path"],
                )
            )

    reasons = exclusion_reasons(df)
    complete = df[(df["status"] == "complete") & df[[*CELL, "seed"]].notna().all(axis=1)]
    for cell, runs in complete.groupby(CELL, sort=True):
        where = cell_name(*cell)
        hashes = runs["cell_config_hash"].dropna().unique()
        if len(hashes) > 1:
            diffs = _config_differences(runs["config"], runs["seed"])
            shown = "; ".join(diffs[:5]) + (
                f"; and {len(diffs) - 5} more" if len(diffs) > 5 else ""
            )
            issues.append(
                Issue(
                    "config_mismatch",
                    f"{where}: {len(hashes)} different configs beyond the seed"
                    + (f": {shown}" if shown else " (cell_config_hash differs)")
                    + "; the mean mixes them",
                )
            )
        split = runs["split_seed"]
        if split.notna().all() and split.nunique() > 1 and not (split == runs["seed"]).all():
            issues.append(
                Issue(
                    "config_mismatch",
                    f"{where}: split_seed is neither fixed nor equal to the seed "
                    f"({', '.join(f'seed {a} -> split {b}' for a, b in zip(runs['seed'], split))})",
                )
            )
        for seed, same in runs.groupby("seed"):
            if len(same) > 1:
                used = same.loc[reasons[same.index] == "", "path"].tolist()
                others = same.loc[reasons[same.index] != "", "path"].tolist()
                issues.append(
                    Issue(
                        "duplicate_seed",
                        f"{where}: seed {seed} has {len(same)} complete records; the mean uses "
                        f"{', '.join(used)} and excludes {', '.join(others)}",
                    )
                )

    named = df[df[[*CELL, "seed"]].notna().all(axis=1)]
    sweep_seeds = sorted(named["seed"].unique().tolist())
    for cell, runs in named.groupby(CELL, sort=True):
        missing = sorted(set(sweep_seeds) - set(runs["seed"].tolist()))
        if missing:
            issues.append(
                Issue(
                    "missing_seed",
                    f"{cell_name(*cell)}: no run for seed(s) {', '.join(map(str, missing))} "
                    f"(seeds in the sweep: {', '.join(map(str, sweep_seeds))})",
                )
            )

    used = df[reasons == ""]
    for cell, runs in used.groupby(CELL, sort=True):
        if len(runs) < MIN_SEEDS:
            issues.append(
                Issue(
                    "few_seeds",
                    f"{cell_name(*cell)}: {len(runs)} complete seed(s), fewer than {MIN_SEEDS}; "
                    f"marked {DAGGER} in the tables",
                )
            )
    datasets = sorted(used["data"].dropna().astype(str).unique())
    if len(datasets) > 1:
        issues.append(
            Issue("mixed_data", f"the sweep mixes data sets {', '.join(datasets)} in one table")
        )
    selections = sorted(used["selection"].dropna().astype(str).unique())
    if len(selections) > 1:
        issues.append(
            Issue(
                "mixed_selection",
                f"checkpoint rules differ ({', '.join(selections)}); "
                f"{TEST_SELECTED} cells are marked {DDAGGER}",
            )
        )
    return issues


# --------------------------------------------------------------------------- summary
def natural_key(text: Any) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def protocol_key(protocol: Any) -> str:
    """`owdfa23_p1` -> `p1`: the protocol within its benchmark, as published tables name it."""
    return re.sub(r"^[a-z0-9]+_(?=p\d+$)", "", str(protocol))


def protocol_headers(protocols: Sequence[str]) -> list[str]:
    """Column-group titles: P1, P2, ... unless stripping the benchmark prefix would collide."""
    short = [protocol_key(p).upper() for p in protocols]
    return short if len(set(short)) == len(short) else [str(p).upper() for p in protocols]


def method_rank(method: Any) -> tuple[int, str]:
    name = str(method)
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


def row_rank(method: Any, k: Any) -> tuple[Any, ...]:
    return (*method_rank(method), K_ORDER.get(str(k), len(K_ORDER)), str(k))


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1, NaN for one run) and n per (method, protocol, k) and metric.

    Only runs with an empty `exclusion_reasons` count. Also: the seeds used, the data sets,
    whether any run is synthetic, the checkpoint rules, and the means of wall time, estimated
    K and number of predicted clusters.
    """
    used = df[exclusion_reasons(df) == ""]
    metrics = metric_columns(df)
    rows = []
    for cell, runs in used.groupby(CELL, sort=False):
        row: dict[str, Any] = dict(zip(CELL, cell))
        row["n"] = len(runs)
        row["seeds"] = " ".join(str(s) for s in sorted(runs["seed"].tolist()))
        row["data"] = "+".join(sorted(runs["data"].dropna().astype(str).unique()))
        row["synthetic"] = bool(runs["synthetic"].fillna(False).astype(bool).any())
        row["selection"] = "+".join(sorted(runs["selection"].dropna().astype(str).unique()))
        for name in metrics:
            values = pd.to_numeric(runs[name], errors="coerce").dropna()
            row[f"{name}_mean"] = values.mean() if len(values) else math.nan
            row[f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{name}_n"] = len(values)
        for name in ("wall_s", "k_estimated", "num_clusters"):
            values = pd.to_numeric(runs[name], errors="coerce").dropna()
            row[f"{name}_mean"] = values.mean() if len(values) else math.nan
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return pd.DataFrame(columns=[*CELL, "n", "seeds", "data", "synthetic", "selection"])
    order = sorted(
        summary.index,
        key=lambda i: (
            row_rank(summary.at[i, "method"], summary.at[i, "k"]),
            natural_key(summary.at[i, "protocol"]),
        ),
    )
    return summary.loc[order].reset_index(drop=True)


# --------------------------------------------------------------------------- paper numbers
def load_paper_numbers(paper_dir: str | Path | None = None) -> pd.DataFrame:
    """All published numbers in `results/paper/*.csv`, with a `file` column."""
    folder = Path(paper_dir) if paper_dir is not None else PAPER_DIR
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(
            f"no published numbers in {folder}: --compare-paper needs results/paper/*.csv from "
            "the owdfa-bench repository (install it with `pip install -e .`)"
        )
    frames = [pd.read_csv(f).assign(file=f.name) for f in files]
    return pd.concat(frames, ignore_index=True)


def paper_benchmark_for(data_sets: Sequence[str]) -> tuple[str, bool]:
    """Which published table to show, and whether our runs are on that same benchmark."""
    if len(data_sets) == 1 and data_sets[0] in PAPER_TABLES:
        return data_sets[0], True
    return DEFAULT_PAPER_BENCHMARK, False


# --------------------------------------------------------------------------- table model
@dataclass
class Cell:
    mean: float  # in %
    std: float  # in %, NaN for one run
    n: int
    test_selected: bool
    bold: bool = False


@dataclass
class Row:
    label: str
    kind: str  # "ours", "bound" or "paper"
    cells: list[Cell | float | None]  # Cell for ours, a float for paper, None if absent


@dataclass
class Table:
    protocols: list[str]
    headers: list[str]  # per protocol
    rows: list[Row] = field(default_factory=list)


def row_label(method: Any, k: Any) -> str:
    name = DISPLAY_NAMES.get(str(method), str(method))
    if str(k) == "known":
        return name
    if str(k) == "unknown":
        return f"{name} (K unknown)"
    return f"{name} (k={k})"


def build_table(
    summary: pd.DataFrame,
    columns: Sequence[tuple[str, str]],
    paper: pd.DataFrame | None = None,
) -> Table:
    """Rows = (method, k), column groups = protocols; bold = best mean of our non-bound rows."""
    protocols = sorted(summary["protocol"].astype(str).unique(), key=natural_key)
    table = Table(protocols=protocols, headers=[header for _, header in columns])
    pairs = sorted(
        {(m, k) for m, k in zip(summary["method"], summary["k"])}, key=lambda p: row_rank(*p)
    )
    indexed = summary.set_index(["method", "k", "protocol"])
    for method, k in pairs:
        cells: list[Cell | float | None] = []
        for protocol in protocols:
            for metric, _ in columns:
                key = (method, k, protocol)
                if key not in indexed.index or f"{metric}_mean" not in indexed.columns:
                    cells.append(None)
                    continue
                entry = indexed.loc[key]
                mean = entry[f"{metric}_mean"]
                if pd.isna(mean):
                    cells.append(None)
                    continue
                cells.append(
                    Cell(
                        mean=100 * float(mean),
                        std=100 * float(entry[f"{metric}_std"]),
                        n=int(entry["n"]),
                        test_selected=TEST_SELECTED in str(entry["selection"]),
                    )
                )
        kind = "bound" if method in BOUND_METHODS else "ours"
        table.rows.append(Row(row_label(method, k), kind, cells))
        if paper is not None:
            published = paper[(paper["method"] == method) & (paper["k_setting"] == k)]
            if not published.empty:
                values: list[Cell | float | None] = []
                for protocol in protocols:
                    for metric, _ in columns:
                        hit = published[
                            (published["protocol"] == protocol_key(protocol))
                            & (published["metric"] == metric)
                        ]
                        values.append(float(hit["value_percent"].iloc[0]) if len(hit) else None)
                table.rows.append(Row(f"{row_label(method, k)} (paper)", "paper", values))
    _mark_best(table)
    return table


def _mark_best(table: Table) -> None:
    ncols = len(table.protocols) * len(table.headers)
    for j in range(ncols):
        cells = [r.cells[j] for r in table.rows if r.kind == "ours" and r.cells[j] is not None]
        if len(cells) < 2:  # one row: "best" says nothing
            continue
        best = max(round(c.mean, 1) for c in cells)
        for c in cells:
            c.bold = round(c.mean, 1) == best


# --------------------------------------------------------------------------- rendering
LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    PM: r"$\pm$",
    DAGGER: r"$^\dagger$",
    DDAGGER: r"$^\ddagger$",
    "\u2265": r"$\geq$",
    "\u2264": r"$\leq$",
    "\u00d7": r"$\times$",
    "\u2013": "--",
    "\u2014": "---",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _marks(cell: Cell) -> str:
    return (DAGGER if cell.n < MIN_SEEDS else "") + (DDAGGER if cell.test_selected else "")


def format_markdown_cell(value: Cell | float | None) -> str:
    if value is None:
        return "\u2013"
    if not isinstance(value, Cell):
        return f"{value:.1f}"
    mean = f"**{value.mean:.1f}**" if value.bold else f"{value.mean:.1f}"
    std = "" if math.isnan(value.std) else f" {PM} {value.std:.1f}"
    return f"{mean}{std}{_marks(value)}"


def format_latex_cell(value: Cell | float | None) -> str:
    if value is None:
        return "--"
    if not isinstance(value, Cell):
        return f"{value:.1f}"
    mean = rf"\mathbf{{{value.mean:.1f}}}" if value.bold else f"{value.mean:.1f}"
    std = "" if math.isnan(value.std) else rf" \pm {value.std:.1f}"
    marks = _marks(value).replace(DAGGER, r"\dagger").replace(DDAGGER, r"\ddagger")
    return f"${mean}{std}" + (f"^{{{marks}}}" if marks else "") + "$"


def render_markdown(table: Table, caption: str, footnotes: Sequence[str]) -> str:
    header = ["Method"] + [
        f"{title} {h}" for title in protocol_headers(table.protocols) for h in table.headers
    ]
    body = [[row.label] + [format_markdown_cell(c) for c in row.cells] for row in table.rows]
    frame = pd.DataFrame(body, columns=header)
    colalign = ["left"] + ["center"] * (len(header) - 1)
    text = frame.to_markdown(index=False, disable_numparse=True, colalign=colalign)
    parts = [caption, "", text]
    if footnotes:
        parts += ["", *footnotes]
    return "\n".join(parts) + "\n"


def render_latex(table: Table, caption: str, footnotes: Sequence[str], label: str) -> str:
    width = len(table.headers)
    colspec = "l " + " ".join("c" * width for _ in table.protocols)
    group = " & ".join(
        rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(title)}}}"
        for title in protocol_headers(table.protocols)
    )
    rules = " ".join(
        rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}"
        for i in range(len(table.protocols))
    )
    headers = " & ".join(latex_escape(h) for _ in table.protocols for h in table.headers)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{colspec}}}",
        r"\toprule",
        rf" & {group} \\",
        rules,
        rf"Method & {headers} \\",
        r"\midrule",
    ]
    previous_kind = None
    for row in table.rows:
        if previous_kind == "bound" and row.kind == "ours":
            lines.append(r"\midrule")
        label_tex = latex_escape(row.label)
        if row.kind == "paper":
            label_tex = rf"\textit{{{label_tex}}}"
        cells = " & ".join(format_latex_cell(c) for c in row.cells)
        lines.append(rf"{label_tex} & {cells} \\")
        if row.kind != "paper":
            previous_kind = row.kind
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in footnotes:
        lines.append(rf"\par\smallskip{{\footnotesize {latex_escape(note)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def table_caption(
    used: pd.DataFrame,
    what: str,
    convention: str,
    paper_note: str | None = None,
) -> str:
    """One caption line: what is shown, the metric convention, the checkpoint rule, the data."""
    parts = [what, convention.rstrip(".") + "."]
    selections = set(used["selection"].dropna().astype(str))
    if selections <= {"last"}:
        parts.append("Checkpoint: model after the last epoch (no selection on the test set).")
    elif selections == {TEST_SELECTED}:
        parts.append(
            f"{DDAGGER} Checkpoint: epoch with the best test score (best_on_test, as the "
            "reference code does), so these numbers are optimistic."
        )
    else:
        parts.append(
            f"{DDAGGER} = checkpoint chosen as the epoch with the best test score (best_on_test, "
            "optimistic); unmarked numbers use the model after the last epoch."
        )
    datasets = ", ".join(sorted(used["data"].dropna().astype(str).unique())) or "unknown"
    if used["synthetic"].fillna(False).astype(bool).any():
        parts.append(f"Synthetic benchmark (data={datasets}), not real deepfakes.")
    else:
        parts.append(f"Data: {datasets}.")
    if paper_note:
        parts.append(paper_note)
    return " ".join(parts)


def table_footnotes(table: Table, excluded: int) -> list[str]:
    notes = []
    ours = [c for r in table.rows if r.kind != "paper" for c in r.cells if isinstance(c, Cell)]
    if any(c.n < MIN_SEEDS for c in ours):
        notes.append(f"{DAGGER} fewer than {MIN_SEEDS} seeds in this cell (n in summary.csv).")
    if excluded:
        notes.append(
            f"{excluded} run record(s) excluded from the means (failed, unfinished, unreadable "
            "or duplicate); see issues.txt."
        )
    return notes


# --------------------------------------------------------------------------- LaTeX checker
def _count_columns(colspec: str) -> int:
    spec = re.sub(r"[pmb]\{[^}]*\}", "c", colspec)  # p{3cm} is one column
    spec = re.sub(r"[@!>]\{[^}]*\}|\|", "", spec)
    return sum(ch in "lcrX" for ch in spec)


def check_latex(text: str) -> list[str]:
    """Problems that would stop a LaTeX table from compiling; empty when well formed.

    Checks balanced braces, matched \\begin/\\end pairs, balanced `$` per tabular row, and that
    every tabular row spans as many columns as its column spec (counting \\multicolumn).
    """
    problems = []
    depth = 0
    unescaped = re.sub(r"\\[{}$&%#_]", "", text.replace(r"\\", ""))
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            problems.append("a '}' closes a brace that was never opened")
            depth = 0
    if depth:
        problems.append(f"{depth} brace(s) left open")

    stack: list[str] = []
    for kind, env in re.findall(r"\\(begin|end)\{([^}]*)\}", text):
        if kind == "begin":
            stack.append(env)
        elif not stack or stack.pop() != env:
            problems.append(f"\\end{{{env}}} does not close the innermost open environment")
    problems += [f"\\begin{{{env}}} is never closed" for env in stack]

    for colspec, body in re.findall(
        r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", text, flags=re.S
    ):
        ncols = _count_columns(colspec)
        for number, row in enumerate(re.split(r"\\\\", body), start=1):
            content = re.sub(r"\\(top|mid|bottom)rule|\\cmidrule(\([a-z]*\))?\{[^}]*\}", "", row)
            if not content.strip():
                continue
            if len(re.findall(r"(?<!\\)\$", content)) % 2:
                problems.append(f"tabular row {number}: unbalanced $")
            cells = re.split(r"(?<!\\)&", content)
            span = 0
            for cell in cells:
                multi = re.search(r"\\multicolumn\{(\d+)\}", cell)
                span += int(multi.group(1)) if multi else 1
            if span != ncols:
                problems.append(
                    f"tabular row {number} spans {span} columns, the spec has {ncols}: "
                    f"{content.strip()[:60]}"
                )
    return problems


# --------------------------------------------------------------------------- writing
def _excluded_lines(df: pd.DataFrame, reasons: pd.Series) -> list[str]:
    out = []
    for i in df.index[reasons != ""]:
        out.append(f"  {df.at[i, 'path']}: {reasons[i]}")
    return out


def issues_text(df: pd.DataFrame, issues: Sequence[Issue]) -> str:
    reasons = exclusion_reasons(df)
    lines = [f"{len(issues)} issue(s); paths are relative to the sweep folder."]
    lines += [str(issue) for issue in issues]
    excluded = _excluded_lines(df, reasons)
    lines += ["", f"Runs excluded from the means: {len(excluded)}", *excluded]
    return "\n".join(lines) + "\n"


def paper_comparison(summary: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Our mean beside the published value, per cell and metric present in both (in %)."""
    rows = []
    for _, cell in summary.iterrows():
        hits = paper[
            (paper["method"] == cell["method"])
            & (paper["k_setting"] == cell["k"])
            & (paper["protocol"] == protocol_key(cell["protocol"]))
        ]
        for _, hit in hits.iterrows():
            metric = hit["metric"]
            if f"{metric}_mean" not in summary.columns:
                continue
            ours = 100 * cell[f"{metric}_mean"]
            rows.append(
                {
                    "method": cell["method"],
                    "protocol": cell["protocol"],
                    "k": cell["k"],
                    "metric": metric,
                    "ours_mean_percent": ours,
                    "ours_std_percent": 100 * cell[f"{metric}_std"],
                    "n": cell["n"],
                    "data": cell["data"],
                    "paper_percent": hit["value_percent"],
                    "difference": ours - hit["value_percent"],
                    "paper_benchmark": hit["benchmark"],
                    "paper_source": hit["source"],
                }
            )
    return pd.DataFrame(rows)


def write_tables(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    compare_paper: bool = False,
    paper_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write runs.csv, summary.csv, issues.txt and, if any run completed, the ACC and NMI/ARI
    tables (Markdown + LaTeX) into `out_dir` (default `<sweep_dir>/tables`)."""
    df = load_records(sweep_dir)
    issues = validate(df)
    summary = summarise(df)
    reasons = exclusion_reasons(df)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    runs = df.drop(columns=["config"]).assign(included=reasons == "", excluded_reason=reasons)
    paths["runs"] = out / "runs.csv"
    runs.to_csv(paths["runs"], index=False)
    paths["summary"] = out / "summary.csv"
    summary.to_csv(paths["summary"], index=False)
    paths["issues"] = out / "issues.txt"
    paths["issues"].write_text(issues_text(df, issues), encoding="utf-8")
    if summary.empty:
        return paths

    used = df[reasons == ""]
    paper = None
    paper_note = None
    if compare_paper:
        datasets = sorted(used["data"].dropna().astype(str).unique())
        benchmark, comparable = paper_benchmark_for(datasets)
        file_name, description = PAPER_TABLES[benchmark]
        numbers = load_paper_numbers(paper_dir)
        paper = numbers[(numbers["file"] == file_name) & (numbers["benchmark"] == benchmark)]
        if comparable and not used["synthetic"].fillna(False).astype(bool).any():
            paper_note = (
                f"Rows marked (paper): published numbers from {description} "
                f"(results/paper/{file_name}; best epoch on test in the reference code)."
            )
        else:
            paper_note = (
                f"Rows marked (paper): published numbers from {description}, measured on the "
                f"real {benchmark} data; not comparable with these runs."
            )
        paths["paper_comparison"] = out / "paper_comparison.csv"
        paper_comparison(summary, paper).to_csv(paths["paper_comparison"], index=False)

    excluded = int((reasons != "").sum())
    specs = [
        (
            "acc",
            ACC_COLUMNS,
            f"Accuracy (%), mean {PM} sample std over seeds.",
            metric_convention_note(),
        ),
        (
            "nmi_ari",
            NMI_ARI_COLUMNS,
            f"NMI and ARI (%), mean {PM} sample std over seeds.",
            "All = all test samples; Novel = test samples of novel classes; scikit-learn NMI "
            "(arithmetic normalisation) and ARI of predicted clusters against labels",
        ),
    ]
    for name, columns, what, convention in specs:
        table = build_table(summary, columns, paper)
        caption = table_caption(used, what, convention, paper_note)
        notes = table_footnotes(table, excluded)
        paths[f"{name}_md"] = out / f"{name}.md"
        paths[f"{name}_md"].write_text(render_markdown(table, caption, notes), encoding="utf-8")
        paths[f"{name}_tex"] = out / f"{name}.tex"
        tex = render_latex(table, caption, notes, label=f"tab:owdfa-{name.replace('_', '-')}")
        paths[f"{name}_tex"].write_text(tex, encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- entry points
def print_report(paths: dict[str, Path]) -> None:
    """The ACC table and the issues, on the terminal."""
    from rich.console import Console

    console = Console()
    if "acc_md" in paths:
        console.print(
            paths["acc_md"].read_text(encoding="utf-8"),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print("No complete run record: no table written.", style="bold red")
    text = paths["issues"].read_text(encoding="utf-8")
    style = "green" if text.startswith("0 issue") else "yellow"
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
    console.print(f"Tables written to {paths['issues'].parent}", markup=False, highlight=False)


def cli_aggregate(argv: list[str]) -> int:
    """`owdfa-bench aggregate SWEEP_DIR [--out DIR] [--compare-paper] [--no-plots]`."""
    parser = argparse.ArgumentParser(
        prog="owdfa-bench aggregate",
        description="Aggregate the results.json files of a sweep into CSV, Markdown and LaTeX "
        "tables (mean +- std over seeds) and plots.",
    )
    parser.add_argument("sweep_dir", type=Path, help="folder of a multirun (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (SWEEP_DIR/tables)")
    parser.add_argument(
        "--compare-paper",
        action="store_true",
        help="add the published numbers of results/paper/ as rows marked (paper)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG/PDF figures")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder; pass the sweep folder of a multirun")

    out = args.out if args.out is not None else args.sweep_dir / "tables"
    paths = write_tables(args.sweep_dir, out, compare_paper=args.compare_paper)
    if not args.no_plots and "acc_md" in paths:
        from owdfa_bench.plots import write_plots

        write_plots(args.sweep_dir, out / "plots")
    print_report(paths)
    return 0 if "acc_md" in paths else 1


class AggregateCallback(Callback):
    """Hydra callback: aggregate the sweep when a multirun ends.

    Enable with `hydra.callbacks.aggregate._target_=owdfa_bench.aggregate.AggregateCallback`.
    A failure here is logged, never raised: the runs themselves are already on disk.
    """

    def __init__(self, compare_paper: bool = False, plots: bool = True) -> None:
        self.compare_paper = compare_paper
        self.plots = plots

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            paths = write_tables(sweep_dir, compare_paper=self.compare_paper)
            if self.plots and "acc_md" in paths:
                from owdfa_bench.plots import write_plots

                write_plots(sweep_dir)
            print_report(paths)
        except Exception as err:  # a broken summary must not turn a finished sweep into a failure
            log.warning(
                "aggregation of the sweep failed (%s: %s); run `owdfa-bench aggregate "
                "<sweep dir>` to retry",
                type(err).__name__,
                err,
            )
