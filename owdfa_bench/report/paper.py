"""Published numbers (`results/paper/*.csv`, described in `results/paper/README.md`) beside ours.

`--compare-paper` puts, for every cell of the sweep, our mean beside the published value of the
same method, protocol and K setting, for every metric both have. A cell whose method, protocol
or K setting the paper lacks keeps its row, with the paper's columns blank. Each row says the
precision the cell trained at (`precision`: "fp32", "bf16-mixed", ..., "mixed: ..." when its
seeds differ, "unknown" for records that do not say): the reference recipes are all fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from owdfa_bench import resources
from owdfa_bench.report.collect import METRIC_ORDER
from owdfa_bench.report.naming import CELL, protocol_key

PAPER_DIR = resources.paper_dir()
# Which published table goes beside which benchmark under --compare-paper.
PAPER_TABLES = {
    "owdfa40": ("owdfa40_cal_table2.csv", "CAL Table 2 on OWDFA-40"),
    "owdfa23": ("owdfa23_cpl_readme.csv", "the CPL README tables on OW-DFA"),
}
DEFAULT_PAPER_BENCHMARK = "owdfa40"


def load_paper_numbers(paper_dir: str | Path | None = None) -> pd.DataFrame:
    """All published numbers in `results/paper/*.csv`, with a `file` column."""
    folder = Path(paper_dir) if paper_dir is not None else PAPER_DIR
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(
            f"no published numbers in {folder}: --compare-paper needs the *.csv files of "
            "results/paper/ (shipped with the package; reinstall owdfa-bench)"
        )
    frames = [pd.read_csv(f).assign(file=f.name) for f in files]
    return pd.concat(frames, ignore_index=True)


def paper_benchmark_for(data_sets: Sequence[str], chosen: str | None = None) -> tuple[str, bool]:
    """Which published table to show, and whether our runs are on that same benchmark.

    `chosen` (a `PAPER_TABLES` key) picks the table, e.g. CPL's for synthetic runs of the
    methods only CPL's table has; by default the runs' own benchmark, else CAL's Table 2.
    """
    same = len(data_sets) == 1 and data_sets[0] in PAPER_TABLES
    if chosen is not None:
        if chosen not in PAPER_TABLES:
            raise ValueError(
                f"paper table {chosen!r}: choose one of {', '.join(sorted(PAPER_TABLES))}"
            )
        return chosen, same and data_sets[0] == chosen
    if same:
        return data_sets[0], True
    return DEFAULT_PAPER_BENCHMARK, False


def paper_table(benchmark: str, paper_dir: str | Path | None = None) -> pd.DataFrame:
    """The published rows of the table that goes beside `benchmark`."""
    file_name, _ = PAPER_TABLES[benchmark]
    numbers = load_paper_numbers(paper_dir)
    return numbers[(numbers["file"] == file_name) & (numbers["benchmark"] == benchmark)]


def shared_metrics(summary: pd.DataFrame, paper: pd.DataFrame) -> list[str]:
    """Metrics the paper reports and some cell of ours has, in table order."""
    published = set(paper["metric"].astype(str))
    ours = {
        c[: -len("_mean")]
        for c in summary.columns
        if c.endswith("_mean") and summary[c].notna().any()
    }
    both = published & ours
    return [m for m in METRIC_ORDER if m in both] + sorted(both - set(METRIC_ORDER))


def paper_comparison(summary: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Our mean beside the published value (in %), one row per cell and shared metric.

    Every cell of `summary` keeps its rows: where the paper has no number for its method,
    protocol or K setting, `paper_percent` and `difference` are NaN (blank in the CSV).
    """
    metrics = shared_metrics(summary, paper)
    published = {
        (str(r.method), str(r.k_setting), str(r.protocol), str(r.metric)): r
        for r in paper.itertuples(index=False)
    }
    columns = [
        *CELL,
        "display_name",
        "metric",
        "ours_mean_percent",
        "ours_std_percent",
        "n",
        "data",
        "precision",
        "paper_percent",
        "difference",
        "paper_benchmark",
        "paper_source",
    ]
    rows = []
    for _, cell in summary.iterrows():
        for metric in metrics:
            hit = published.get(
                (str(cell["method"]), str(cell["k"]), protocol_key(cell["protocol"]), metric)
            )
            ours = 100 * cell[f"{metric}_mean"]
            value = float(hit.value_percent) if hit is not None else float("nan")
            rows.append(
                {
                    "method": cell["method"],
                    "protocol": cell["protocol"],
                    "k": cell["k"],
                    "display_name": cell["display_name"],
                    "metric": metric,
                    "ours_mean_percent": ours,
                    "ours_std_percent": 100 * cell[f"{metric}_std"],
                    "n": cell["n"],
                    "data": cell["data"],
                    "precision": cell["precision"],
                    "paper_percent": value,
                    "difference": ours - value,
                    "paper_benchmark": hit.benchmark if hit is not None else None,
                    "paper_source": hit.source if hit is not None else None,
                }
            )
    return pd.DataFrame(rows, columns=columns)


def precision_note(summary: pd.DataFrame) -> str:
    """The sentence captions beside the paper add: the precision our cells trained at."""
    labels = sorted(summary["precision"].astype(str).unique())
    if len(labels) == 1:
        return f"Our runs trained at {labels[0]}; the reference recipes at fp32."
    return (
        f"Our cells trained at different precisions ({'; '.join(labels)}; per cell in "
        "paper_comparison.md); the reference recipes at fp32."
    )
