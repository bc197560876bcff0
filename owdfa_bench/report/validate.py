"""Validate: everything about a sweep a reader of its tables should know; nothing is fixed here.

Nothing is dropped silently: a run left out of the means (failed, unfinished, unreadable, or a
second record of the same seed) gets its reason from `exclusion_reasons`, and `validate` lists
it, with missing seeds, cells with fewer than three seeds, config differences beyond the seed,
seeds of one config trained on different bytes (their data digests differ), mixed data sets and
mixed checkpoint rules, as `Issue`s for `issues.txt` and the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from owdfa_bench.records import SCHEMA_VERSION
from owdfa_bench.report.collect import RECORD_NAME, config_without_seed, flatten
from owdfa_bench.report.naming import CELL, DAGGER, DDAGGER, MIN_SEEDS, TEST_SELECTED, cell_name


@dataclass(frozen=True)
class Issue:
    """One problem found in a sweep; `kind` is a short machine-readable tag."""

    kind: str
    detail: str
    path: str | None = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.detail}"


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
    flat = [flatten(config_without_seed(c, s)) for c, s in zip(configs, seeds) if c is not None]
    keys = sorted(set().union(*flat)) if flat else []
    diffs = []
    for key in keys:
        values = {json.dumps(f.get(key, "<absent>"), default=str) for f in flat}
        if len(values) > 1:
            diffs.append(f"{key} ({' vs '.join(sorted(values))})")
    return diffs


def _seeds_by_digest(runs: pd.DataFrame) -> str:
    """ "<digest>: seeds ..." for each data digest of `runs` (12 hex digits shown)."""
    parts = []
    for digest, same in runs.dropna(subset=["data_digest"]).groupby("data_digest", sort=True):
        seeds = ", ".join(str(s) for s in sorted(same["seed"].tolist()))
        parts.append(f"{str(digest)[:12]}: seed(s) {seeds}")
    return "; ".join(parts)


def data_content_issues(complete: pd.DataFrame) -> list[Issue]:
    """Cells whose seeds share a split seed (so the same rows) but not the data digest: the
    same config trained on different bytes (a cache rebuilt, a data folder edited). Records
    without a digest (older ones) are not compared."""
    issues: list[Issue] = []
    if "data_digest" not in complete:
        return issues
    for (*cell, split_seed), runs in complete.groupby([*CELL, "split_seed"], dropna=False):
        if runs["data_digest"].dropna().nunique() > 1:
            issues.append(
                Issue(
                    "mixed_data_content",
                    f"{cell_name(*cell)}: seeds with split_seed {split_seed} were trained on "
                    f"different data (data digest {_seeds_by_digest(runs)}); the mean mixes "
                    "them: rerun those seeds (force=true) on one copy of the data",
                )
            )
    return issues


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
        # RunRecord.from_dict reads every version up to SCHEMA_VERSION
        if status != "unreadable" and not pd.isna(version) and version > SCHEMA_VERSION:
            issues.append(
                Issue(
                    "schema",
                    f"{run['path']}: schema_version {run['schema_version']}, this aggregator "
                    f"reads versions up to {SCHEMA_VERSION}; check the columns of that run",
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

    issues += data_content_issues(complete)

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


def included(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that count in the means."""
    return df[exclusion_reasons(df) == ""]


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
