"""Figures of a sweep, as PNG and PDF: accuracy bars per protocol, per-run confusion matrices,
and the per-epoch mechanism diagnostics of every method.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so nothing depends on (or changes) the user's interactive backend. The figures read
only `results.json` files: methods write no figure (CAL's K curve, `record["k_curve"]`, is
drawn here).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from owdfa_bench.report.collect import load_records
from owdfa_bench.report.naming import (
    CELL,
    MIN_SEEDS,
    SYNTHETIC_NOTE,
    display_for,
    natural_key,
    protocol_headers,
    row_label,
    row_rank,
)
from owdfa_bench.report.render import ACC_COLUMNS
from owdfa_bench.report.summarise import CURVES, epoch_curves, summarise
from owdfa_bench.report.validate import included

NOVEL_TICK_COLOUR = "tab:red"
log = logging.getLogger(__name__)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """`stem`.png (150 dpi) and `stem`.pdf, cropped to what is drawn (`bbox_inches="tight"`:
    nothing that sticks out of the canvas is cut off)."""
    FigureCanvasAgg(fig)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _pairs(frame: pd.DataFrame) -> list[tuple[Any, Any, str]]:
    """(method, k, display name) of each table row, in table order."""
    first = frame.groupby(["method", "k"], sort=False)[["display_order", "display_name"]].first()
    keys = sorted(first.index, key=lambda p: row_rank(p[0], p[1], first.loc[p, "display_order"]))
    return [(m, k, str(first.loc[(m, k), "display_name"])) for m, k in keys]


# A paper's text width (a one-column article's is 4.8 in, a two-column paper's figure* 7 in).
ACC_FIGURE_WIDTH_IN = 7.0
ACC_PANEL_HEIGHT_IN = 2.4


def plot_accuracy_bars(summary: pd.DataFrame) -> Figure:
    """One panel per protocol, stacked, each with the cells that ran in it: per method, bars for
    All / Known / Novel ACC with std error bars. The legend sits under the panels, outside them,
    so no bar is hidden; the width is a paper's text width whatever the number of methods."""
    protocols = sorted(summary["protocol"].astype(str).unique(), key=natural_key)
    pairs = _pairs(summary)
    indexed = summary.set_index(["method", "k", "protocol"])
    height = 0.8 + ACC_PANEL_HEIGHT_IN * len(protocols)
    fig = Figure(figsize=(ACC_FIGURE_WIDTH_IN, height), layout="constrained")
    axes = fig.subplots(len(protocols), 1, sharey=True, squeeze=False)[:, 0]
    width = 0.8 / len(ACC_COLUMNS)
    ran = {
        p: [(m, k, name) for m, k, name in pairs if (m, k, p) in indexed.index] for p in protocols
    }
    slots = max(4, *(len(cells) for cells in ran.values()))  # one bar width in every panel
    for ax, protocol, title in zip(axes, protocols, protocol_headers(protocols)):
        present = ran[protocol]
        x = np.arange(len(present))
        labels = []
        for method, k, name in present:
            n = int(indexed.loc[(method, k, protocol), "n"])
            few = f" (n={n})" if n < MIN_SEEDS else ""
            labels.append(row_label(name, k) + few)
        for j, (metric, label) in enumerate(ACC_COLUMNS):
            means, stds = [], []
            for method, k, _ in present:
                entry = indexed.loc[(method, k, protocol)]
                found = f"{metric}_mean" in indexed.columns
                means.append(100 * entry[f"{metric}_mean"] if found else math.nan)
                std = entry[f"{metric}_std"] if found else math.nan
                stds.append(0.0 if pd.isna(std) else 100 * std)  # one seed: no error bar
            ax.bar(x + (j - 1) * width, means, width, yerr=stds, capsize=1.5, label=label)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xticks(x, labels, fontsize=7, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, slots - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("ACC (%)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    title = "ACC (%), mean \u00b1 std over seeds"
    if summary["synthetic"].eq(True).any():
        title += f" ({SYNTHETIC_NOTE})"
    fig.suptitle(title, fontsize=10)
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8
    )
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
    name = display_for(record.get("method"), record.get("config")).name
    title = (
        f"{row_label(name, record.get('k'))}, "
        f"{str(record.get('protocol')).upper()}, seed {record.get('seed')}; "
        "row-normalised, novel classes in red"
    )
    if record.get("synthetic"):
        title += f"\n{SYNTHETIC_NOTE}"
    ax.set_title(title, fontsize=9)
    return fig


def line_style(i: int) -> dict[str, Any]:
    """Colour, marker and dash of the i-th line: 10 colours x 3 styles keep 30 cells apart (the
    default cycle repeats after 10, and a sweep holds 15 methods)."""
    styles = [("o", "-"), ("s", "--"), ("^", ":")]
    marker, dash = styles[(i // 10) % len(styles)]
    return {"color": f"C{i % 10}", "marker": marker, "linestyle": dash}


def plot_diagnostics(curves: pd.DataFrame, synthetic: bool) -> Figure:
    """Per-epoch mechanism diagnostics, one line per cell (mean over its seeds).

    Panels, where some record has the values: confidence gap (conf_known - conf_novel on test),
    pseudo-label noise on the unlabelled training rows, clusters used, and the estimated K
    (per-epoch `k_estimated`, or CAL's `k_curve`).
    """
    panels = [(name, title) for name, title in CURVES if (curves["curve"] == name).any()]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cells = curves.drop_duplicates(CELL)
    protocols = sorted(cells["protocol"].astype(str).unique(), key=natural_key)
    titles = dict(zip(protocols, protocol_headers(protocols)))
    order = sorted(
        range(len(cells)),
        key=lambda i: (
            row_rank(cells["method"].iloc[i], cells["k"].iloc[i], cells["display_order"].iloc[i]),
            natural_key(cells["protocol"].iloc[i]),
        ),
    )
    for ax, (name, title) in zip(axes, panels):
        for i in order:
            cell = cells.iloc[i]
            line = curves[
                (curves["method"] == cell["method"])
                & (curves["protocol"] == cell["protocol"])
                & (curves["k"] == cell["k"])
                & (curves["curve"] == name)
            ].sort_values("epoch")
            if line.empty:
                continue
            label = row_label(cell["display_name"], cell["k"])
            if len(protocols) > 1:
                label += f", {titles[str(cell['protocol'])]}"
            scale = 100.0 if name in ("conf_gap", "pseudo_noise") else 1.0
            ax.plot(
                line["epoch"], scale * line["value"], label=label, markersize=3, **line_style(i)
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if name in ("conf_gap", "pseudo_noise"):
            ax.set_ylabel("%")
    # One legend for the figure: the last panel (K estimated) holds only the K-unknown cells.
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="outside right center",
        fontsize=7,
        ncols=1 + (len(handles) - 1) // 16,
    )
    suptitle = "Mechanism diagnostics per epoch, mean over seeds"
    if synthetic:
        suptitle += f" ({SYNTHETIC_NOTE})"
    fig.suptitle(suptitle, fontsize=10)
    return fig


def write_plots(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    records: pd.DataFrame | None = None,
) -> list[Path]:
    """`acc_bars`, `diagnostics` (when the records carry per-epoch diagnostics) and, per
    (method, protocol, k), the confusion matrix of its lowest included seed, each as PNG and
    PDF, into `out_dir` (default `<sweep_dir>/tables/plots`). `records`: the frame of
    `load_records(sweep_dir)` when the caller has it already."""
    root = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else root / "tables" / "plots"
    df = records if records is not None else load_records(root)
    used = included(df)
    if used.empty:
        return []
    written = save_figure(plot_accuracy_bars(summarise(df)), out / "acc_bars")
    curves = epoch_curves(df)
    if not curves.empty:
        synthetic = bool(used["synthetic"].eq(True).any())
        written += save_figure(plot_diagnostics(curves, synthetic), out / "diagnostics")
    for (method, protocol, k), runs in used.groupby(CELL, sort=True):
        run = runs.sort_values("seed").iloc[0]
        record = json.loads((root / run["path"]).read_text(encoding="utf-8"))
        stem = out / f"confusion_{method}_{protocol}_k-{k}_seed-{run['seed']}"
        try:
            figure = plot_confusion(record)
        except ValueError as err:  # one malformed record must not cost the other figures
            log.warning("no confusion figure for %s: %s", run["path"], err)
            continue
        written += save_figure(figure, stem)
    return written
