"""Figures of a sweep, as PNG and PDF: accuracy bars per protocol and per-run confusion matrices.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so nothing depends on (or changes) the user's interactive backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from owdfa_bench.aggregate import (
    ACC_COLUMNS,
    CELL,
    MIN_SEEDS,
    exclusion_reasons,
    load_records,
    natural_key,
    protocol_headers,
    row_label,
    row_rank,
    summarise,
)

SYNTHETIC_NOTE = "synthetic data, not real deepfakes"
NOVEL_TICK_COLOUR = "tab:red"


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """`stem`.png (150 dpi) and `stem`.pdf."""
    FigureCanvasAgg(fig)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def plot_accuracy_bars(summary: pd.DataFrame) -> Figure:
    """One panel per protocol; per method, bars for All / Known / Novel ACC with std error bars."""
    protocols = sorted(summary["protocol"].astype(str).unique(), key=natural_key)
    pairs = sorted(
        {(m, k) for m, k in zip(summary["method"], summary["k"])}, key=lambda p: row_rank(*p)
    )
    indexed = summary.set_index(["method", "k", "protocol"])
    fig = Figure(figsize=(max(4.0, 1.2 * len(pairs)) * len(protocols), 3.6), layout="constrained")
    axes = fig.subplots(1, len(protocols), sharey=True, squeeze=False)[0]
    width = 0.8 / len(ACC_COLUMNS)
    x = np.arange(len(pairs))
    for ax, protocol, title in zip(axes, protocols, protocol_headers(protocols)):
        labels = []
        for method, k in pairs:
            key = (method, k, protocol)
            n = int(indexed.loc[key, "n"]) if key in indexed.index else 0
            few = f"\n(n={n})" if 0 < n < MIN_SEEDS else ""
            labels.append(row_label(method, k).replace(" (K unknown)", "\n(K unknown)") + few)
            if n == 0:
                ax.text(len(labels) - 1, 2, "no run", ha="center", fontsize=8, color="grey")
        for j, (metric, name) in enumerate(ACC_COLUMNS):
            means, stds = [], []
            for method, k in pairs:
                key = (method, k, protocol)
                found = key in indexed.index and f"{metric}_mean" in indexed.columns
                mean = indexed.loc[key, f"{metric}_mean"] if found else math.nan
                std = indexed.loc[key, f"{metric}_std"] if found else math.nan
                means.append(100 * mean)
                stds.append(0.0 if pd.isna(std) else 100 * std)  # one seed: no error bar
            ax.bar(x + (j - 1) * width, means, width, yerr=stds, capsize=2, label=name)
        ax.set_title(title)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("ACC (%)")
    axes[-1].legend(loc="lower right", fontsize=8)
    title = "ACC (%), mean \u00b1 std over seeds"
    if summary["synthetic"].astype(bool).any():
        title += f" ({SYNTHETIC_NOTE})"
    fig.suptitle(title, fontsize=10)
    return fig


def family_order(classes: Sequence[dict[str, Any]]) -> tuple[list[int], list[int], list[str]]:
    """Labels ordered family by family, the positions where a new family starts, the families.

    Families come in the order of their first registry index (REAL, S, R, E, G for OWDFA-40);
    within a family, labels ascend, which puts known classes before novel ones.
    """
    first_index: dict[str, int] = {}
    for c in classes:
        family = str(c.get("family", ""))
        first_index[family] = min(
            first_index.get(family, c.get("index", c["label"])), c.get("index", c["label"])
        )
    families = sorted(first_index, key=first_index.get)
    ordered = sorted(classes, key=lambda c: (families.index(str(c.get("family", ""))), c["label"]))
    labels = [int(c["label"]) for c in ordered]
    starts = [
        i
        for i in range(1, len(ordered))
        if ordered[i].get("family") != ordered[i - 1].get("family")
    ]
    return labels, starts, families


def plot_confusion(record: dict[str, Any]) -> Figure:
    """Row-normalised confusion matrix of one run, classes grouped by family.

    Rows are true labels, columns the class each cluster was mapped to by the joint Hungarian
    matching; a last column (if the record has it) collects samples in unmatched clusters.
    """
    confusion = np.asarray(record.get("confusion") or [], dtype=float)
    if confusion.ndim != 2 or confusion.shape[0] == 0:
        raise ValueError(
            f"run {record.get('method')}/{record.get('protocol')} seed {record.get('seed')} has "
            "no confusion matrix in its results.json; re-run it with the current runner"
        )
    num = confusion.shape[0]
    classes = record.get("classes") or [
        {
            "label": i,
            "index": i,
            "code": str(i),
            "family": "",
            "known": i < record.get("num_known", 0),
        }
        for i in range(num)
    ]
    if len(classes) != num:
        raise ValueError(
            f"results.json lists {len(classes)} classes but its confusion matrix has {num} rows"
        )
    labels, starts, _ = family_order(classes)
    by_label = {int(c["label"]): c for c in classes}
    has_unmatched = confusion.shape[1] == num + 1
    columns = labels + ([num] if has_unmatched else [])
    totals = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)
    matrix = normalised[np.ix_(labels, columns)]

    size = max(4.0, 0.2 * len(columns) + 2.0)
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    for start in starts:
        ax.axhline(start - 0.5, color="black", linewidth=0.8)
        ax.axvline(start - 0.5, color="black", linewidth=0.8)
    if has_unmatched:
        ax.axvline(num - 0.5, color="grey", linewidth=0.8, linestyle="--")
    codes = [str(by_label[label].get("code", label)) for label in labels]
    fontsize = 8 if num <= 20 else 6
    ax.set_yticks(range(len(labels)), codes, fontsize=fontsize)
    ax.set_xticks(
        range(len(columns)),
        codes + (["unmatched"] if has_unmatched else []),
        fontsize=fontsize,
        rotation=90,
    )
    for ticks in (ax.get_yticklabels(), ax.get_xticklabels()[: len(labels)]):
        for tick, label in zip(ticks, labels):
            if not by_label[label].get("known", True):
                tick.set_color(NOVEL_TICK_COLOUR)
    ax.set_ylabel("true class")
    ax.set_xlabel("predicted class (after the joint Hungarian mapping)")
    title = (
        f"{row_label(record.get('method'), record.get('k'))}, "
        f"{str(record.get('protocol')).upper()}, seed {record.get('seed')}; "
        "row-normalised, novel classes in red"
    )
    if record.get("synthetic"):
        title += f"\n{SYNTHETIC_NOTE}"
    ax.set_title(title, fontsize=9)
    return fig


def write_plots(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """`acc_bars.{png,pdf}` and, per (method, protocol, k), the confusion matrix of its lowest
    included seed, into `out_dir` (default `<sweep_dir>/tables/plots`)."""
    root = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else root / "tables" / "plots"
    df = load_records(root)
    used = df[exclusion_reasons(df) == ""]
    if used.empty:
        return []
    written = save_figure(plot_accuracy_bars(summarise(df)), out / "acc_bars")
    for (method, protocol, k), runs in used.groupby(CELL, sort=True):
        run = runs.sort_values("seed").iloc[0]
        record = json.loads((root / run["path"]).read_text(encoding="utf-8"))
        stem = out / f"confusion_{method}_{protocol}_k-{k}_seed-{run['seed']}"
        written += save_figure(plot_confusion(record), stem)
    return written
