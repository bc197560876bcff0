"""Summarise: the runs that count -> mean, sample std and n per cell, and the diagnostics.

- `summarise`: one row per (method, protocol, k) with `<metric>_mean`, `<metric>_std` (ddof=1,
  NaN for one run) and `<metric>_n` for every metric of the records, by one pandas groupby; with
  `ci=True` also `<metric>_ci95`, the half-width of the 95% Student-t interval over seeds
  (t quantile with n - 1 degrees of freedom times std / sqrt(n)).
- `welch_p`: Welch's t-test (scipy.stats.ttest_ind, equal_var=False) between two cells' seeds.
- `diagnostics_summary` and `epoch_curves`: the mechanism diagnostics of the CAL paper's
  Sec. 3 observations (confidence skew, pseudo-label noise) the runner stores in `metrics` and in
  every `history[i]["metrics"]` (keys named in `owdfa_bench/diagnostics.py`), per cell and per
  epoch. A diagnostic absent from every record is left out, so old records still summarise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from owdfa_bench.report.collect import is_number, metric_columns
from owdfa_bench.report.naming import CELL, display_for, natural_key, precision_label, row_rank
from owdfa_bench.report.validate import included

# Scalar fields of a run (not metrics) that are also averaged per cell.
RUN_MEASURES = ["wall_s", "k_estimated", "num_clusters"]
META = [
    "n",
    "seeds",
    "data",
    "synthetic",
    "selection",
    "precision",
    "display_name",
    "display_order",
]
CONFIDENCE = 0.95


def _joined(values: pd.Series) -> str:
    return "+".join(sorted(values.dropna().astype(str).unique()))


def _any_true(values: pd.Series) -> bool:
    return bool(values.eq(True).any())


def _seeds(values: pd.Series) -> str:
    return " ".join(str(v) for v in sorted(values.tolist()))


def order_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in table order: display order, method, K known first, then protocols naturally."""
    keys = [
        (row_rank(m, k, o), natural_key(p))
        for m, k, o, p in zip(
            frame["method"], frame["k"], frame["display_order"], frame["protocol"]
        )
    ]
    order = sorted(range(len(frame)), key=keys.__getitem__)
    return frame.iloc[order].reset_index(drop=True)


def _cell_meta(used: pd.DataFrame) -> pd.DataFrame:
    """n, seeds, data sets, synthetic, checkpoint rules, precision and the display of each
    cell."""
    meta = used.groupby(CELL, sort=False).agg(
        n=("path", "size"),
        seeds=("seed", _seeds),
        data=("data", _joined),
        synthetic=("synthetic", _any_true),
        selection=("selection", _joined),
        precision=("precision", precision_label),  # "mixed: ..." when the seeds differ
        display_name=("display_name", "first"),  # first non-null: the run's method.display
        display_order=("display_order", "first"),
    )
    meta = meta.reset_index()
    fallback = [display_for(m) for m in meta["method"]]  # conf/method/<name>.yaml, then the id
    meta["display_name"] = meta["display_name"].where(
        meta["display_name"].notna(), [d.name for d in fallback]
    )
    meta["display_order"] = (
        pd.to_numeric(meta["display_order"], errors="coerce")
        .fillna(pd.Series([d.order for d in fallback], index=meta.index))
        .astype(float)
    )
    return meta


def _stats(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """`<column>_mean`, `_std` (ddof=1) and `_n` per cell, one groupby/agg."""
    values = frame[CELL].copy()
    for name in columns:
        values[name] = pd.to_numeric(frame[name], errors="coerce").astype(float)
    table = values.groupby(CELL, sort=False)[list(columns)].agg(["mean", "std", "count"])
    table.columns = [f"{name}_{'n' if how == 'count' else how}" for name, how in table.columns]
    return table.reset_index()


def t_half_width(std: Any, n: Any, confidence: float = CONFIDENCE) -> Any:
    """Half-width of the two-sided Student-t interval of a mean: t(n-1) * std / sqrt(n)."""
    n = np.asarray(n, dtype=float)
    std = np.asarray(std, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = np.where(n > 1, n - 1, np.nan)
        return stats.t.ppf(0.5 + confidence / 2, dof) * std / np.sqrt(n)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value of Welch's t-test between two samples (NaN when either has fewer than 2)."""
    a = np.asarray([v for v in a if not pd.isna(v)], dtype=float)
    b = np.asarray([v for v in b if not pd.isna(v)], dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def summarise(df: pd.DataFrame, ci: bool = False) -> pd.DataFrame:
    """Mean, sample std (ddof=1, NaN for one run) and n per (method, protocol, k) and metric.

    Only runs with an empty `exclusion_reasons` count. Also: the seeds used, the data sets,
    whether any run is synthetic, the checkpoint rules, the precision (`precision_label`: one
    name, or "mixed: ..." when the seeds differ), the display name and order of the
    method, and the same statistics of wall time, estimated K and number of predicted clusters.
    """
    used = included(df)
    if used.empty:
        return pd.DataFrame(columns=[*CELL, *META])
    metrics = metric_columns(df)
    summary = _cell_meta(used).merge(_stats(used, [*metrics, *RUN_MEASURES]), on=CELL)
    if ci:
        for name in metrics:
            summary[f"{name}_ci95"] = t_half_width(summary[f"{name}_std"], summary[f"{name}_n"])
    return order_cells(summary)


def cell_values(used: pd.DataFrame, metric: str) -> dict[tuple[Any, Any, Any], list[float]]:
    """Per-seed values of one metric, keyed by (method, k, protocol)."""
    if metric not in used.columns:
        return {}
    values = pd.to_numeric(used[metric], errors="coerce")
    grouped = values.groupby([used["method"], used["k"], used["protocol"]], sort=False)
    return {key: group.dropna().tolist() for key, group in grouped}


# --------------------------------------------------------------------------- diagnostics
@dataclass(frozen=True)
class Diagnostic:
    """One column of the diagnostics table.

    `sources`: the metric keys it is read from (the first one present wins); `last_epoch`: read
    from the last `history` entry rather than from the reported checkpoint's `metrics`;
    `spread`: shown as mean +- std (else the mean alone); `percent`: a fraction shown in %;
    `note`: what the column means, for the caption.
    """

    name: str
    header: str
    sources: tuple[str, ...]
    last_epoch: bool = False
    spread: bool = True
    percent: bool = True
    note: str = ""


CONF_GAP = "conf_gap"  # conf_known - conf_novel
DIAGNOSTICS = [
    Diagnostic("all_nmi", "All NMI", ("all_nmi",)),
    Diagnostic("novel_nmi", "Novel NMI", ("novel_nmi",)),
    Diagnostic("gcd_v2_new_acc", "GCD-v2 New ACC", ("gcd_v2_new_acc",)),
    Diagnostic(
        "real_acc",
        "REAL acc",
        ("real_acc",),
        note="REAL acc: direct accuracy on the real class's test samples",
    ),
    Diagnostic(
        "num_clusters",
        "clusters used",
        ("num_clusters",),
        percent=False,
        note="clusters used: distinct predicted ids on the test split",
    ),
    Diagnostic("k_estimated", "K estimated", ("k_estimated",), percent=False),
    Diagnostic(
        CONF_GAP,
        "conf known - novel",
        ("conf_known", "conf_novel"),
        last_epoch=True,
        note="conf known - novel: mean max-softmax confidence on known-class minus on "
        "novel-class test samples, last epoch",
    ),
    Diagnostic(
        "pseudo_noise",
        "pseudo noise",
        ("pseudo_noise",),
        last_epoch=True,
        note="pseudo noise: fraction of the unlabelled training rows wrong after Hungarian "
        "matching, last epoch",
    ),
    Diagnostic(
        "pseudo_noise_confident",
        "pseudo noise (confident)",
        ("pseudo_noise_confident",),
        last_epoch=True,
        note="(confident): the same among the rows above the method's own confidence threshold",
    ),
    Diagnostic(
        "pseudo_confident_fraction",
        "confident share",
        ("pseudo_confident_fraction",),
        last_epoch=True,
        note="confident share: fraction of the unlabelled training rows above that threshold",
    ),
    Diagnostic(
        "transductive_all",
        "transd. All (GCD v2)",
        ("transductive_gcd_v2_all_acc", "transductive_all_acc"),
        note="transd.: GCD-v2 accuracy on the unlabelled training rows (transductive)",
    ),
    Diagnostic("transductive_old", "transd. Old (GCD v2)", ("transductive_gcd_v2_old_acc",)),
    Diagnostic("transductive_new", "transd. New (GCD v2)", ("transductive_gcd_v2_new_acc",)),
    Diagnostic("wall_s", "wall s / run", ("wall_s",), spread=False, percent=False),
]


def _number(value: Any) -> float:
    return float(value) if is_number(value) else math.nan


def _last_metrics(history: Any) -> dict[str, Any]:
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        metrics = history[-1].get("metrics")
        return metrics if isinstance(metrics, dict) else {}
    return {}


def _gap(metrics: dict[str, Any]) -> float:
    return _number(metrics.get("conf_known")) - _number(metrics.get("conf_novel"))


def run_diagnostics(df: pd.DataFrame) -> pd.DataFrame:
    """One value per run and diagnostic (NaN where a record lacks it), index aligned with `df`."""
    out = pd.DataFrame(index=df.index)
    last = [_last_metrics(h) for h in df["history"]]
    for diag in DIAGNOSTICS:
        if diag.name == CONF_GAP:
            reported = pd.Series(math.nan, index=df.index)
            if {"conf_known", "conf_novel"} <= set(df.columns):
                reported = df["conf_known"] - df["conf_novel"]
            at_end = pd.Series([_gap(m) for m in last], index=df.index)
        else:
            reported = pd.Series(math.nan, index=df.index)
            for source in diag.sources:
                if source in df.columns:
                    reported = reported.combine_first(
                        pd.to_numeric(df[source], errors="coerce").astype(float)
                    )
            at_end = pd.Series(
                [_number(next((m[s] for s in diag.sources if s in m), None)) for m in last],
                index=df.index,
            )
        out[diag.name] = at_end.combine_first(reported) if diag.last_epoch else reported
    return out


def present_diagnostics(values: pd.DataFrame) -> list[Diagnostic]:
    """The diagnostics some run has a value for, in table order."""
    return [d for d in DIAGNOSTICS if d.name in values and values[d.name].notna().any()]


def diagnostics_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell: n, display, and `<diagnostic>_mean/_std/_n` of every diagnostic present."""
    used = included(df)
    if used.empty:
        return pd.DataFrame(columns=[*CELL, *META])
    values = run_diagnostics(used)
    present = [d.name for d in present_diagnostics(values)]
    frame = pd.concat([used[CELL], values[present]], axis=1)
    summary = _cell_meta(used).merge(_stats(frame, present), on=CELL)
    return order_cells(summary)


CURVES = [
    (CONF_GAP, "conf known - novel (mean max-softmax, test)"),
    ("pseudo_noise", "pseudo-label noise (unlabelled train rows)"),
    ("num_clusters", "clusters used (test)"),
    ("k_estimated", "K estimated"),
]


def _run_curves(history: Any, k_curve: Any) -> list[tuple[Any, str, float]]:
    points: list[tuple[Any, str, float]] = []
    entries = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    epochs = [h.get("epoch", i) for i, h in enumerate(entries)]
    for epoch, entry in zip(epochs, entries):
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
        points.append((epoch, CONF_GAP, _gap(metrics)))
        for name in ("pseudo_noise", "num_clusters", "k_estimated"):
            points.append((epoch, name, _number(metrics.get(name))))
    has_k = any(name == "k_estimated" and not math.isnan(v) for _, name, v in points)
    if isinstance(k_curve, list) and k_curve and not has_k:  # CAL: prototypes after each epoch
        steps = epochs if len(epochs) == len(k_curve) else list(range(len(k_curve)))
        points += [(e, "k_estimated", _number(v)) for e, v in zip(steps, k_curve)]
    return [p for p in points if not math.isnan(p[2])]


def epoch_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell, epoch and curve: the mean over seeds (long format; empty without history).

    Columns: method, protocol, k, display_name, display_order, epoch, curve, value, n.
    """
    used = included(df)
    rows = [
        (*(run[c] for c in CELL), run["seed"], epoch, name, value)
        for _, run in used.iterrows()
        for epoch, name, value in _run_curves(run["history"], run["k_curve"])
    ]
    columns = [*CELL, "seed", "epoch", "curve", "value"]
    points = pd.DataFrame(rows, columns=columns)
    if points.empty:
        return pd.DataFrame(columns=[*CELL, "display_name", "display_order", "epoch", "curve"])
    curves = (
        points.groupby([*CELL, "epoch", "curve"], sort=False)["value"]
        .agg(value="mean", n="count")
        .reset_index()
    )
    meta = _cell_meta(used)[[*CELL, "display_name", "display_order"]]
    return curves.merge(meta, on=CELL)
