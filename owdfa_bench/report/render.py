"""Render: the summary -> the tables people publish, as Markdown and LaTeX.

The paper layout has rows = methods (bounds first, in the display order of
`conf/method/*.yaml`) and column groups = protocols. A caption states what is shown, the metric
convention, the checkpoint rule and whether the data is synthetic; marks say what a reader must
not over-read: a dagger for fewer than three seeds, a double dagger for a checkpoint chosen on
the test set, and, with `--ci`, an approx sign for a mean that Welch's t-test does not separate
from the best one of its column. The best mean of each column among the methods (never a
bound) is bold.

Markdown comes from `DataFrame.to_markdown`; LaTeX from pandas' `Styler.to_latex` with booktabs
rules (`hrules`), the bold cells set through `Styler.apply`, and what the Styler has no option
for: a `\\cmidrule` under each protocol title, a `\\midrule` between the bounds and the methods,
the footnotes under the tabulars. So that a table fits the text width, LaTeX has one tabular per
protocol group (stacked in one float) and the diagnostics four columns per table, each tabular
shrunk to the line width by `\\resizebox` only where still wider. The wrapping is a choice
(`LATEX_ENVIRONMENTS`): a `table` float, a `table*` one, or the bare tabulars to `\\input` into a
float of the user's; each .tex names the packages it needs in its leading comment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from owdfa_bench.report.naming import (
    BOUND_METHODS,
    DAGGER,
    DDAGGER,
    MIN_SEEDS,
    NOT_SIGNIFICANT,
    PM,
    TEST_SELECTED,
    natural_key,
    protocol_headers,
    protocol_key,
    row_label,
    row_rank,
)
from owdfa_bench.report.summarise import (
    CONFIDENCE,
    DIAGNOSTICS,
    Diagnostic,
    cell_values,
    welch_p,
)

ACC_COLUMNS = [("all_acc", "All"), ("known_acc", "Known"), ("novel_acc", "Novel")]
REAL_COLUMN = ("real_acc", "REAL")
NMI_ARI_COLUMNS = [
    ("all_nmi", "All NMI"),
    ("all_ari", "All ARI"),
    ("novel_nmi", "Novel NMI"),
    ("novel_ari", "Novel ARI"),
]
SHORT_NAMES = dict([*ACC_COLUMNS, REAL_COLUMN, *NMI_ARI_COLUMNS])
SIGNIFICANCE_LEVEL = 0.05

FALLBACK_CONVENTION_NOTE = (
    "All = Hungarian accuracy over all test samples; Known = direct accuracy on known classes; "
    "Novel = Hungarian accuracy on novel classes alone (OW-DFA convention)"
)
NMI_ARI_CONVENTION_NOTE = (
    "All = all test samples; Novel = test samples of novel classes; scikit-learn NMI "
    "(arithmetic normalisation) and ARI of predicted clusters against labels"
)
REAL_NOTE = "REAL = direct accuracy on the test samples of the real class."


def metric_convention_note() -> str:
    """The one sentence that says which accuracy convention the tables show."""
    try:
        from owdfa_bench.metrics import METRIC_CONVENTION_NOTE
    except ImportError:
        return FALLBACK_CONVENTION_NOTE
    return str(METRIC_CONVENTION_NOTE).strip()


def acc_columns(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """All / Known / Novel, and REAL when some cell has `real_acc`."""
    real = f"{REAL_COLUMN[0]}_mean"
    has_real = real in summary.columns and summary[real].notna().any()
    return [*ACC_COLUMNS, REAL_COLUMN] if has_real else list(ACC_COLUMNS)


# --------------------------------------------------------------------------- table model
@dataclass
class Cell:
    mean: float  # in %
    std: float  # in %, NaN for one run
    n: int
    test_selected: bool
    ci: float = math.nan  # half-width of the 95% t-interval in %, with --ci
    bold: bool = False
    not_significant: bool = False  # --ci: Welch's test does not separate it from the best
    p_value: float = math.nan


@dataclass
class Row:
    label: str
    kind: str  # "ours", "bound" or "paper"
    cells: list[Cell | float | None]  # Cell for ours, a float for paper, None if absent
    method: str = ""
    k: str = ""


@dataclass
class Table:
    protocols: list[str]
    headers: list[str]  # per protocol
    metrics: list[str]  # per protocol, aligned with headers
    rows: list[Row] = field(default_factory=list)
    ci: bool = False

    def column(self, j: int) -> tuple[str, str]:
        """(protocol, metric) of cell column j."""
        width = len(self.metrics)
        return self.protocols[j // width], self.metrics[j % width]


def build_table(
    summary: pd.DataFrame,
    columns: Sequence[tuple[str, str]],
    paper: pd.DataFrame | None = None,
    runs: pd.DataFrame | None = None,
) -> Table:
    """Rows = (method, k), column groups = protocols; bold = best mean of our non-bound rows.

    With `runs` (the included runs; `--ci`), cells carry the t-interval of `summary`'s
    `<metric>_ci95` columns and the Welch marks computed from the runs' per-seed values.
    """
    protocols = sorted(summary["protocol"].astype(str).unique(), key=natural_key)
    table = Table(
        protocols=protocols,
        headers=[header for _, header in columns],
        metrics=[metric for metric, _ in columns],
        ci=runs is not None,
    )
    orders = summary.groupby(["method", "k"], sort=False)["display_order"].first()
    names = summary.groupby(["method", "k"], sort=False)["display_name"].first()
    pairs = sorted(orders.index, key=lambda p: row_rank(p[0], p[1], orders[p]))
    indexed = summary.set_index(["method", "k", "protocol"])
    labels: list[str] = []
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
                ci = entry.get(f"{metric}_ci95", math.nan)
                cells.append(
                    Cell(
                        mean=100 * float(mean),
                        std=100 * float(entry[f"{metric}_std"]),
                        n=int(entry[f"{metric}_n"]),
                        test_selected=TEST_SELECTED in str(entry["selection"]),
                        ci=100 * float(ci),
                    )
                )
        label = row_label(names[(method, k)], k)
        if label in labels:  # two methods printed alike: keep the rows apart
            label = f"{label} [{method}]"
        labels.append(label)
        kind = "bound" if method in BOUND_METHODS else "ours"
        table.rows.append(Row(label, kind, cells, str(method), str(k)))
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
                table.rows.append(Row(f"{label} (paper)", "paper", values, str(method), str(k)))
    _mark_best(table)
    if runs is not None:
        _mark_significance(table, runs)
    return table


def _our_cells(table: Table, j: int) -> list[tuple[Row, Cell]]:
    return [
        (r, r.cells[j])
        for r in table.rows
        if r.kind == "ours" and isinstance(r.cells[j], Cell)  # bounds are never the best
    ]


def _mark_best(table: Table) -> None:
    for j in range(len(table.protocols) * len(table.headers)):
        cells = [c for _, c in _our_cells(table, j)]
        if len(cells) < 2:  # one row: "best" says nothing
            continue
        best = max(round(c.mean, 1) for c in cells)
        for c in cells:
            c.bold = round(c.mean, 1) == best


def _mark_significance(table: Table, runs: pd.DataFrame) -> None:
    """Mark the cells Welch's test does not separate from the column's best (p >= 0.05).

    A cell with fewer than two seeds (or a best cell with fewer than two) cannot be tested and
    is marked too: nothing shows it differs.
    """
    values = {metric: cell_values(runs, metric) for metric in set(table.metrics)}
    for j in range(len(table.protocols) * len(table.headers)):
        protocol, metric = table.column(j)
        cells = _our_cells(table, j)
        if len(cells) < 2:
            continue
        best_row, best = max(cells, key=lambda rc: rc[1].mean)  # first maximum on ties
        seeds = values[metric]
        for row, cell in cells:
            if cell is best:
                continue
            cell.p_value = welch_p(
                seeds.get((best_row.method, best_row.k, protocol), []),
                seeds.get((row.method, row.k, protocol), []),
            )
            cell.not_significant = not cell.p_value < SIGNIFICANCE_LEVEL


def significance_frame(table: Table, name: str) -> pd.DataFrame:
    """The Welch p-values of a `--ci` table, one row per tested cell (significance.csv)."""
    rows = []
    for j in range(len(table.protocols) * len(table.headers)):
        protocol, metric = table.column(j)
        cells = _our_cells(table, j)
        if len(cells) < 2:
            continue
        best_row, _ = max(cells, key=lambda rc: rc[1].mean)
        for row, cell in cells:
            if row is best_row:
                continue
            rows.append(
                {
                    "table": name,
                    "protocol": protocol,
                    "metric": metric,
                    "method": row.method,
                    "k": row.k,
                    "best_method": best_row.method,
                    "best_k": best_row.k,
                    "p_value": cell.p_value,
                    "significant": bool(cell.p_value < SIGNIFICANCE_LEVEL),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- cells
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
    NOT_SIGNIFICANT: r"$\approx$",
    "\u2265": r"$\geq$",
    "\u2264": r"$\leq$",
    "\u00d7": r"$\times$",
    "\u2212": "--",
    "\u2013": "--",
    "\u2014": "---",
}
LATEX_MARKS = {DAGGER: r"\dagger", DDAGGER: r"\ddagger", NOT_SIGNIFICANT: r"\approx"}


def latex_escape(text: Any) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _marks(cell: Cell) -> str:
    return (
        (DAGGER if cell.n < MIN_SEEDS else "")
        + (DDAGGER if cell.test_selected else "")
        + (NOT_SIGNIFICANT if cell.not_significant else "")
    )


def _spread(cell: Cell, ci: bool) -> float:
    return cell.ci if ci else cell.std


def format_markdown_cell(value: Cell | float | None, ci: bool = False) -> str:
    if value is None:
        return "\u2013"
    if not isinstance(value, Cell):
        return f"{value:.1f}"
    mean = f"**{value.mean:.1f}**" if value.bold else f"{value.mean:.1f}"
    spread = _spread(value, ci)
    pm = "" if math.isnan(spread) else f" {PM} {spread:.1f}"
    return f"{mean}{pm}{_marks(value)}"


def format_latex_cell(value: Cell | float | None, ci: bool = False) -> str:
    """Text-mode LaTeX of one cell; bold is added by the Styler (`render_latex`)."""
    if value is None:
        return "--"
    if not isinstance(value, Cell):
        return f"{value:.1f}"
    spread = _spread(value, ci)
    pm = "" if math.isnan(spread) else rf" $\pm$ {spread:.1f}"
    marks = "".join(LATEX_MARKS[m] for m in _marks(value))
    return f"{value.mean:.1f}{pm}" + (f"$^{{{marks}}}$" if marks else "")


# --------------------------------------------------------------------------- renderers
def table_frame(table: Table) -> pd.DataFrame:
    """The table as display strings (the Markdown cells), one column per protocol and metric."""
    header = ["Method"] + [
        f"{title} {h}" for title in protocol_headers(table.protocols) for h in table.headers
    ]
    body = [
        [row.label] + [format_markdown_cell(c, table.ci) for c in row.cells] for row in table.rows
    ]
    return pd.DataFrame(body, columns=header)


def render_markdown(table: Table, caption: str, footnotes: Sequence[str]) -> str:
    frame = table_frame(table)
    colalign = ["left"] + ["center"] * (len(frame.columns) - 1)
    text = frame.to_markdown(index=False, disable_numparse=True, colalign=colalign)
    parts = [caption, "", text]
    if footnotes:
        parts += ["", *footnotes]
    return "\n".join(parts) + "\n"


def _styler_tabular(
    frame: pd.DataFrame,
    column_format: str,
    style: Callable[[Any], Any] | None = None,
    index_style: Callable[[Any], Any] | None = None,
) -> list[str]:
    """`Styler.to_latex` of an already escaped frame: the bare tabular, as lines."""
    styler = frame.style
    if style is not None:
        styler = styler.apply(style, axis=None)
    if index_style is not None:
        styler = styler.apply_index(index_style, axis=0)
    if (
        not isinstance(frame.index, pd.MultiIndex)
        and frame.index.name is None
        and (frame.index.equals(pd.RangeIndex(len(frame))))
    ):
        styler = styler.hide(axis="index")
    text = styler.to_latex(column_format=column_format, hrules=True, multicol_align="c")
    return text.splitlines()


# How a .tex file is wrapped: a float of its own (`table`; `table*` spans both columns of a
# two-column document), or the bare tabulars, to `\input` into a float of the user's.
LATEX_ENVIRONMENTS = ("table", "table*", "tabular")
DEFAULT_LATEX_ENVIRONMENT = "table"
LATEX_PACKAGES = ("booktabs", "graphicx")
FIT_BOX = r"\owdfafitbox"


def latex_preamble_comment(environment: str) -> list[str]:
    """The leading comment of every .tex file: what it is and the packages it needs."""
    return [
        f"% owdfa-bench aggregate, LaTeX environment: {environment}.",
        rf"% Needs \usepackage{{{','.join(LATEX_PACKAGES)}}}: booktabs for the rules, graphicx "
        r"for \resizebox,",
        "% which shrinks a tabular wider than the line (never enlarges one).",
    ]


def fit_to_line(tabular: Sequence[str]) -> list[str]:
    """The tabular, measured in a box and shrunk to `\\linewidth` only when wider."""
    return [
        rf"\ifdefined{FIT_BOX}\else\newsavebox{{{FIT_BOX}}}\fi",
        rf"\sbox{{{FIT_BOX}}}{{%",
        *tabular[:-1],
        f"{tabular[-1]}}}%",  # no space after \end{tabular} inside the box
        rf"\ifdim\wd{FIT_BOX}>\linewidth\resizebox{{\linewidth}}{{!}}{{\usebox{{{FIT_BOX}}}}}"
        rf"\else\usebox{{{FIT_BOX}}}\fi",
    ]


def latex_float(
    tabulars: Sequence[Sequence[str]],
    caption_tex: str,
    label: str,
    environment: str,
    footnotes: Sequence[str] = (),
) -> list[str]:
    """Tabulars stacked in one float with its caption (LaTeX already), label and footnotes; for
    `tabular`, the stacked tabulars and footnotes alone, the caption left as a comment for the
    user's own float."""
    if environment not in LATEX_ENVIRONMENTS:
        raise ValueError(
            f"LaTeX environment {environment!r}: choose one of {', '.join(LATEX_ENVIRONMENTS)}"
        )
    notes = [rf"\par\smallskip{{\footnotesize {latex_escape(note)}}}" for note in footnotes]
    if environment == "tabular":
        return [f"% Caption: {caption_tex}", f"% Label: {label}", *stacked(tabulars), *notes]
    groups = float_groups(tabulars)
    lines: list[str] = []
    for i, group in enumerate(groups):
        head = [rf"\caption{{{caption_tex}}}", rf"\label{{{label}}}"]
        if i:  # a float of its own, pointing back to the captioned one
            head = [rf"{{\small Table~\ref{{{label}}} (continued).}}\par\smallskip"]
        lines += [rf"\begin{{{environment}}}[t]", r"\centering", *head, *stacked(group)]
        lines += (
            [*notes, rf"\end{{{environment}}}"]
            if i == len(groups) - 1
            else [rf"\end{{{environment}}}"]
        )
    return lines


# Table lines (those ending in \\: the protocol title, the heads and the rows) one float holds
# with its caption: a P1 table of 22 method rows and two of 4 rows stacked (36 lines) overflow a
# page by 42 pt (pdflatex, article, 10 pt: tests/latex_compile.py), 32 lines fit; past that the
# tabulars take several floats.
MAX_FLOAT_LINES = 32


def float_groups(tabulars: Sequence[Sequence[str]]) -> list[list[Sequence[str]]]:
    """The tabulars in order, cut into consecutive groups of at most `MAX_FLOAT_LINES` table
    lines each (a longer tabular alone in its group), one float per group."""
    groups: list[list[Sequence[str]]] = []
    used = 0
    for tabular in tabulars:
        size = sum(line.rstrip().endswith("\\\\") for line in tabular)
        if groups and used + size <= MAX_FLOAT_LINES:
            groups[-1].append(tabular)
            used += size
        else:
            groups.append([tabular])
            used = size
    return groups


def stacked(tabulars: Sequence[Sequence[str]]) -> list[str]:
    """Tabulars one above the other, each shrunk to the line only where wider."""
    body: list[str] = []
    for i, tabular in enumerate(tabulars):
        if i:
            body.append(r"\par\bigskip")
        body += fit_to_line(tabular)
    return body


def protocol_tables(table: Table) -> list[Table]:
    """One table per protocol group, holding the rows with some value in it; the marks (bold,
    significance) stay those set over the whole table."""
    width = len(table.headers)
    parts = []
    for i, protocol in enumerate(table.protocols):
        rows = [replace(r, cells=r.cells[i * width : (i + 1) * width]) for r in table.rows]
        rows = [r for r in rows if any(c is not None for c in r.cells)]
        parts.append(Table([protocol], table.headers, table.metrics, rows, table.ci))
    return parts


def render_tabular(table: Table, titles: Sequence[str]) -> list[str]:
    """The booktabs tabular of a table: a protocol title over each group of short column heads,
    a `\\cmidrule` under each title, a `\\midrule` between the bounds and the methods."""
    width = len(table.headers)
    columns = pd.MultiIndex.from_tuples(
        [(latex_escape(t), latex_escape(h)) for t in titles for h in table.headers],
        names=[None, "Method"],
    )
    index = pd.Index([latex_escape(r.label) for r in table.rows])
    frame = pd.DataFrame(
        [[format_latex_cell(c, table.ci) for c in r.cells] for r in table.rows],
        index=index,
        columns=columns,
    )
    bold = pd.DataFrame(
        [
            ["textbf:--rwrap;" if isinstance(c, Cell) and c.bold else "" for c in r.cells]
            for r in table.rows
        ],
        index=index,
        columns=columns,
    )
    italic = ["textit:--rwrap;" if r.kind == "paper" else "" for r in table.rows]
    lines = _styler_tabular(
        frame,
        column_format="l " + " ".join("c" * width for _ in titles),
        style=lambda _: bold,
        index_style=lambda _: italic,
    )
    top = lines.index(r"\toprule")
    rules = " ".join(
        rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}" for i in range(len(titles))
    )
    lines.insert(top + 2, rules)  # under the protocol titles
    body = lines.index(r"\midrule") + 1
    previous_kind = None
    inserted = 0
    for i, row in enumerate(table.rows):
        if previous_kind == "bound" and row.kind == "ours":
            lines.insert(body + i + inserted, r"\midrule")
            inserted += 1
        if row.kind != "paper":
            previous_kind = row.kind
    return lines


def render_latex(
    table: Table,
    caption: str,
    footnotes: Sequence[str],
    label: str,
    environment: str = DEFAULT_LATEX_ENVIRONMENT,
) -> str:
    """booktabs LaTeX through `Styler.to_latex`, one tabular per protocol group (three groups
    side by side are three times the text width), each shrunk to the line only where wider."""
    titles = protocol_headers(table.protocols)
    tabulars = [
        render_tabular(part, [title]) for part, title in zip(protocol_tables(table), titles)
    ]
    lines = latex_float(tabulars, latex_escape(caption), label, environment, footnotes)
    return "\n".join(latex_preamble_comment(environment) + lines) + "\n"


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
    parts.append(data_note(used))
    if paper_note:
        parts.append(paper_note)
    return " ".join(parts)


def data_note(used: pd.DataFrame) -> str:
    datasets = ", ".join(sorted(used["data"].dropna().astype(str).unique())) or "unknown"
    if used["synthetic"].eq(True).any():
        return f"Synthetic benchmark (data={datasets}), not real deepfakes."
    return f"Data: {datasets}."


def spread_text(ci: bool) -> str:
    """What the number after the mean is."""
    if ci:
        return (
            f"mean {PM} half-width of the {CONFIDENCE:.0%} Student-t interval over seeds "
            "(n - 1 degrees of freedom)"
        )
    return f"mean {PM} sample std over seeds"


def table_footnotes(table: Table, excluded: int) -> list[str]:
    notes = []
    ours = [c for r in table.rows if r.kind != "paper" for c in r.cells if isinstance(c, Cell)]
    if any(c.n < MIN_SEEDS for c in ours):
        notes.append(f"{DAGGER} fewer than {MIN_SEEDS} seeds in this cell (n in summary.csv).")
    if any(c.not_significant for c in ours):
        notes.append(
            f"{NOT_SIGNIFICANT} not significantly different from the best (bold) mean of its "
            f"column: Welch's t-test over seeds, p \u2265 {SIGNIFICANCE_LEVEL} (or fewer than 2 "
            "seeds to test); p-values in significance.csv."
        )
    if excluded:
        notes.append(
            f"{excluded} run record(s) excluded from the means (failed, unfinished, unreadable "
            "or duplicate); see issues.txt."
        )
    return notes


# --------------------------------------------------------------------------- diagnostics
def diagnostics_caption(diagnostics: pd.DataFrame, used: pd.DataFrame) -> str:
    """What the diagnostics table shows: the spread, the units, each present column, the data."""
    present = [d for d in DIAGNOSTICS if f"{d.name}_mean" in diagnostics.columns]
    notes = [d.note for d in present if d.note]
    text = (
        f"Mechanism diagnostics per cell, mean {PM} sample std over seeds, in % except "
        "clusters, K and wall time."
    )
    if notes:
        text += " " + "; ".join(notes) + "."
    text += " Columns without any value in the records are left out. "
    return text + data_note(used)


def _diag_cell(diag: Diagnostic, mean: Any, std: Any) -> str:
    if pd.isna(mean):
        return "\u2013"
    scale = 100.0 if diag.percent else 1.0
    if diag.name == "wall_s":
        return f"{mean:.0f}"
    text = f"{scale * mean:.1f}"
    if diag.spread and not pd.isna(std):
        text += f" {PM} {scale * std:.1f}"
    return text


def diagnostics_frame(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """The diagnostics table as display strings (Markdown cells)."""
    present = [d for d in DIAGNOSTICS if f"{d.name}_mean" in diagnostics.columns]
    rows = []
    for _, cell in diagnostics.iterrows():
        row = {
            "Method": row_label(cell["display_name"], "known"),
            "Protocol": str(cell["protocol"]).upper(),
            "K": str(cell["k"]),
            "seeds": str(int(cell["n"])),
        }
        for diag in present:
            row[diag.header] = _diag_cell(diag, cell[f"{diag.name}_mean"], cell[f"{diag.name}_std"])
        rows.append(row)
    return pd.DataFrame(
        rows, columns=["Method", "Protocol", "K", "seeds"] + [d.header for d in present]
    )


def render_diagnostics_markdown(frame: pd.DataFrame, caption: str) -> str:
    colalign = ["left"] * 3 + ["right"] * (len(frame.columns) - 3)
    text = frame.to_markdown(index=False, disable_numparse=True, colalign=colalign)
    return f"{caption}\n\n{text}\n"


# Diagnostic columns per LaTeX table: with the method, protocol and seed columns, four fit the
# text width of a one-column article at 0.9 scale or more; 18 side by side are 4x too wide.
DIAGNOSTICS_PER_TABLE = 4
DIAGNOSTICS_LABEL = "tab:owdfa-diagnostics"
SEEDS_NOTE = "n = seeds per cell; P = protocol."


def two_line_head(text: str, longest: int = 10) -> str:
    """A column head as LaTeX on two lines, split at the space nearest its middle, when it is
    longer than `longest` characters: the heads, not the numbers, made the columns wide."""
    spaces = [i for i, ch in enumerate(text) if ch == " "]
    if len(text) <= longest or not spaces:
        return latex_escape(text)
    cut = min(spaces, key=lambda i: abs(i - len(text) / 2))
    return rf"\shortstack{{{latex_escape(text[:cut])}\\{latex_escape(text[cut + 1 :])}}}"


def column_chunks(count: int, most: int) -> list[range]:
    """`count` columns cut into the fewest ranges of at most `most`, as even as can be."""
    parts = max(1, math.ceil(count / most))
    sizes = [count // parts + (1 if i < count % parts else 0) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def render_diagnostics_latex(
    frame: pd.DataFrame, caption: str, environment: str = DEFAULT_LATEX_ENVIRONMENT
) -> list[str]:
    """The diagnostics of `diagnostics_frame` as LaTeX tables of at most DIAGNOSTICS_PER_TABLE
    diagnostic columns each, one file text per table (one float each, or one `\\input` into a
    float of the user's), every one led by the method (K folded into its name as in the
    accuracy tables), the protocol and the seeds. The first carries the caption and the label
    `tab:owdfa-diagnostics`; the others refer to it."""
    lead = pd.DataFrame(
        {
            "Method": [row_label(m, k) for m, k in zip(frame["Method"], frame["K"])],
            "P": frame["Protocol"],
            "n": frame["seeds"],
        }
    )
    values = frame.drop(columns=["Method", "Protocol", "K", "seeds"])
    chunks = column_chunks(values.shape[1], DIAGNOSTICS_PER_TABLE)
    texts = []
    for number, chunk in enumerate(chunks, start=1):
        part = pd.concat([lead, values.iloc[:, list(chunk)]], axis=1)
        escaped = part.apply(lambda column: column.map(latex_escape))
        escaped.columns = [two_line_head(str(c)) for c in part.columns]
        tabular = _styler_tabular(
            escaped.reset_index(drop=True),
            column_format="lll" + "r" * len(chunk),
        )
        if number == 1:
            label = DIAGNOSTICS_LABEL
            text = latex_escape(f"{caption.rstrip()} {SEEDS_NOTE}")
        else:
            label = f"{DIAGNOSTICS_LABEL}-{number}"
            text = (
                latex_escape(f"Mechanism diagnostics per cell, continued ({number} of ")
                + f"{len(chunks)}): as in Table~\\ref{{{DIAGNOSTICS_LABEL}}}."
            )
        lines = latex_preamble_comment(environment)
        lines += latex_float([tabular], text, label, environment)
        texts.append("\n".join(lines) + "\n")
    return texts


# --------------------------------------------------------------------------- paper
def paper_comparison_frame(comparison: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of ours: its precision, and our mean +- std beside the paper's number
    per shared metric.

    Cells the paper lacks keep their row, with blank paper columns.
    """
    metrics = list(dict.fromkeys(comparison["metric"]))
    cells = comparison.drop_duplicates(["method", "protocol", "k"])
    rows = []
    for _, cell in cells.iterrows():
        same = comparison[
            (comparison["method"] == cell["method"])
            & (comparison["protocol"] == cell["protocol"])
            & (comparison["k"] == cell["k"])
        ].set_index("metric")
        row = {
            "Method": row_label(cell["display_name"], cell["k"]),
            "Protocol": str(cell["protocol"]).upper(),
            "Precision": str(cell["precision"]),  # the references train in fp32
        }
        for metric in metrics:
            name = SHORT_NAMES.get(metric, metric)
            entry = same.loc[metric]
            ours, std = entry["ours_mean_percent"], entry["ours_std_percent"]
            text = "" if pd.isna(ours) else f"{ours:.1f}"
            if text and not pd.isna(std):
                text += f" {PM} {std:.1f}"
            row[f"{name} ours"] = text
            paper = entry["paper_percent"]
            row[f"{name} paper"] = "" if pd.isna(paper) else f"{paper:.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def render_paper_comparison(comparison: pd.DataFrame, caption: str) -> str:
    frame = paper_comparison_frame(comparison)
    if frame.empty:
        return f"{caption}\n\n(no metric in common with the paper)\n"
    colalign = ["left", "left", "left"] + ["center"] * (len(frame.columns) - 3)
    text = frame.to_markdown(index=False, disable_numparse=True, colalign=colalign)
    return f"{caption}\n\n{text}\n"
