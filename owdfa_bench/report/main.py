"""The report of a sweep: the stages in order, the `owdfa-bench aggregate` command and the Hydra
end-of-multirun callback.

`write_tables` writes, into `<sweep>/tables` (or `--out`):

- `runs.csv`: every run, one row each, with the reason a run is left out of the means;
- `summary.csv`: mean, sample std (ddof=1) and n per cell (method, protocol, k) for each metric
  (and, with `--ci`, the half-width of the 95% t-interval, `<metric>_ci95`);
- `acc.md` / `acc.tex` and `nmi_ari.md` / `nmi_ari.tex`: the paper layout, with a caption that
  states the metric convention, the checkpoint rule and whether the data is synthetic;
- `diagnostics.md` / `.csv` / `.tex`: the mechanism diagnostics per cell (LaTeX: four
  diagnostic columns per table, `diagnostics_2.tex` ... for the others);
- `issues.txt`: everything that makes the numbers less than a clean sweep;
- with `--compare-paper`: `paper_comparison.md` / `.csv`, ours beside results/paper, with the
  precision each cell trained at;
- with `--ci`: `significance.csv`, the Welch p-values behind the marks.

`write_report` adds the figures (`plots/`) and the W&B run of `owdfa_bench/report/tracking.py`.
`rerender_tables` renders the tables of such a folder again from its CSV files (`--rerender`);
`merge_tables` adds another folder's cells to it (`--merge-into`), for a table completed across
sweeps.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from owdfa_bench.report.collect import OBJECT_FIELDS, load_records
from owdfa_bench.report.naming import CELL, PM
from owdfa_bench.report.paper import (
    PAPER_TABLES,
    paper_benchmark_for,
    paper_comparison,
    paper_table,
    precision_note,
)
from owdfa_bench.report.plots import plot_accuracy_bars, save_figure, write_plots
from owdfa_bench.report.render import (
    DEFAULT_LATEX_ENVIRONMENT,
    LATEX_ENVIRONMENTS,
    NMI_ARI_COLUMNS,
    NMI_ARI_CONVENTION_NOTE,
    REAL_COLUMN,
    REAL_NOTE,
    acc_columns,
    build_table,
    data_note,
    diagnostics_caption,
    diagnostics_frame,
    metric_convention_note,
    render_diagnostics_latex,
    render_diagnostics_markdown,
    render_latex,
    render_markdown,
    render_paper_comparison,
    significance_frame,
    spread_text,
    table_caption,
    table_footnotes,
)
from owdfa_bench.report.summarise import diagnostics_summary, order_cells, summarise
from owdfa_bench.report.tracking import MODES, log_report, numeric_frame, resolve_target
from owdfa_bench.report.validate import exclusion_reasons, issues_text, validate

log = logging.getLogger(__name__)


def _paper_notes(used: pd.DataFrame, benchmark: str, comparable: bool) -> tuple[str, str]:
    """(note for the acc and NMI/ARI captions, caveat for the comparison caption)."""
    file_name, description = PAPER_TABLES[benchmark]
    if comparable and not used["synthetic"].eq(True).any():
        note = (
            f"Rows marked (paper): published numbers from {description} "
            f"(results/paper/{file_name}; best epoch on test in the reference code)."
        )
        caveat = "Published numbers: best epoch on test in the reference code."
    else:
        note = (
            f"Rows marked (paper): published numbers from {description}, measured on the "
            f"real {benchmark} data; not comparable with these runs."
        )
        caveat = f"Published numbers are on the real {benchmark} data: not comparable with ours."
    return note, caveat


def check_latex_env(latex_env: str) -> None:
    if latex_env not in LATEX_ENVIRONMENTS:
        raise ValueError(f"latex_env={latex_env!r}: choose one of {', '.join(LATEX_ENVIRONMENTS)}")


def write_tables(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    compare_paper: bool = False,
    paper_dir: str | Path | None = None,
    ci: bool = False,
    records: pd.DataFrame | None = None,
    frames: dict[str, pd.DataFrame] | None = None,
    latex_env: str = DEFAULT_LATEX_ENVIRONMENT,
    paper_benchmark: str | None = None,
) -> dict[str, Path]:
    """Write the files listed in the module docstring into `out_dir` (default
    `<sweep_dir>/tables`); the tables only when some run completed. `frames`, when given,
    receives the display tables (for the W&B run). `latex_env`: what wraps each LaTeX tabular
    (`LATEX_ENVIRONMENTS`: a `table` or `table*` float, or the bare `tabular`).
    `paper_benchmark`: which published table `compare_paper` shows (`PAPER_TABLES`; default:
    the runs' benchmark, else CAL's Table 2)."""
    check_latex_env(latex_env)
    df = records if records is not None else load_records(sweep_dir)
    frames = frames if frames is not None else {}
    issues = validate(df)
    summary = summarise(df, ci=ci)
    reasons = exclusion_reasons(df)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    runs = df.drop(columns=OBJECT_FIELDS).assign(included=reasons == "", excluded_reason=reasons)
    paths["runs"] = out / "runs.csv"
    runs.to_csv(paths["runs"], index=False)
    paths["summary"] = out / "summary.csv"
    summary.to_csv(paths["summary"], index=False)
    paths["issues"] = out / "issues.txt"
    paths["issues"].write_text(issues_text(df, issues), encoding="utf-8")
    if summary.empty:
        return paths
    frames["summary"] = summary

    used = df[reasons == ""]
    paper = None
    paper_note = None
    if compare_paper:
        datasets = sorted(used["data"].dropna().astype(str).unique())
        benchmark, comparable = paper_benchmark_for(datasets, paper_benchmark)
        paper = paper_table(benchmark, paper_dir)
        paper_note, caveat = _paper_notes(used, benchmark, comparable)
        paper_note = f"{paper_note} {precision_note(summary)}"
        comparison = paper_comparison(summary, paper)
        paths["paper_comparison"] = out / "paper_comparison.csv"
        comparison.to_csv(paths["paper_comparison"], index=False)
        file_name, description = PAPER_TABLES[benchmark]
        sources = "; ".join(sorted(paper["source"].dropna().astype(str).unique()))
        caption = (
            f"Ours (%, mean {PM} sample std over seeds) beside the published numbers of "
            f"{description} (results/paper/{file_name}; source: {sources}), for the metrics "
            "both have. A blank paper column: the paper has no number for that method, "
            f"protocol or K setting. Precision: what each cell trained at (the reference "
            f"recipes: fp32, trainer=gpu_fp32). {caveat} {data_note(used)}"
        )
        paths["paper_comparison_md"] = out / "paper_comparison.md"
        paths["paper_comparison_md"].write_text(
            render_paper_comparison(comparison, caption), encoding="utf-8"
        )
        frames["paper_comparison"] = comparison

    excluded = int((reasons != "").sum())
    paths |= write_result_tables(
        out, summary, used, excluded, paper, paper_note, ci, latex_env, frames
    )
    diagnostics = diagnostics_summary(df)
    paths["diagnostics"] = out / "diagnostics.csv"
    diagnostics.to_csv(paths["diagnostics"], index=False)
    paths |= write_diagnostics(out, diagnostics, used, latex_env, frames)
    return paths


def write_result_tables(
    out: Path,
    summary: pd.DataFrame,
    used: pd.DataFrame,
    excluded: int,
    paper: pd.DataFrame | None,
    paper_note: str | None,
    ci: bool,
    latex_env: str,
    frames: dict[str, pd.DataFrame],
) -> dict[str, Path]:
    """acc and nmi_ari, .md and .tex (and significance.csv with `ci`) from the summary and the
    included runs `used`."""
    paths: dict[str, Path] = {}
    columns = acc_columns(summary)
    convention = metric_convention_note()
    if REAL_COLUMN in columns:
        convention = f"{convention.rstrip('.')}. {REAL_NOTE}"
    specs = [
        ("acc", columns, f"Accuracy (%), {spread_text(ci)}.", convention),
        (
            "nmi_ari",
            NMI_ARI_COLUMNS,
            f"NMI and ARI (%), {spread_text(ci)}.",
            NMI_ARI_CONVENTION_NOTE,
        ),
    ]
    significance = []
    for name, cols, what, note in specs:
        table = build_table(summary, cols, paper, runs=used if ci else None)
        caption = table_caption(used, what, note, paper_note)
        notes = table_footnotes(table, excluded)
        paths[f"{name}_md"] = out / f"{name}.md"
        paths[f"{name}_md"].write_text(render_markdown(table, caption, notes), encoding="utf-8")
        paths[f"{name}_tex"] = out / f"{name}.tex"
        label = f"tab:owdfa-{name.replace('_', '-')}"
        tex = render_latex(table, caption, notes, label=label, environment=latex_env)
        paths[f"{name}_tex"].write_text(tex, encoding="utf-8")
        frames[name] = numeric_frame(table)  # for W&B: columns that sort
        if ci:
            significance.append(significance_frame(table, name))
    if ci:
        paths["significance"] = out / "significance.csv"
        pd.concat(significance, ignore_index=True).to_csv(paths["significance"], index=False)
    return paths


def write_diagnostics(
    out: Path,
    diagnostics: pd.DataFrame,
    used: pd.DataFrame,
    latex_env: str,
    frames: dict[str, pd.DataFrame],
) -> dict[str, Path]:
    """diagnostics.md and .tex from `diagnostics_summary` (diagnostics.csv)."""
    paths: dict[str, Path] = {}
    shown = diagnostics_frame(diagnostics)
    caption = diagnostics_caption(diagnostics, used)
    paths["diagnostics_md"] = out / "diagnostics.md"
    paths["diagnostics_md"].write_text(
        render_diagnostics_markdown(shown, caption), encoding="utf-8"
    )
    for stale in out.glob("diagnostics_[0-9]*.tex"):  # parts of an earlier, wider render
        stale.unlink()
    for number, tex in enumerate(render_diagnostics_latex(shown, caption, latex_env), start=1):
        name = "diagnostics" if number == 1 else f"diagnostics_{number}"
        paths[f"{name}_tex"] = out / f"{name}.tex"
        paths[f"{name}_tex"].write_text(tex, encoding="utf-8")
    frames["diagnostics"] = diagnostics  # for W&B: the numbers
    return paths


def rerender_tables(
    tables_dir: str | Path, latex_env: str = DEFAULT_LATEX_ENVIRONMENT, plots: bool = True
) -> dict[str, Path]:
    """Render again, in place, the Markdown and LaTeX tables and the accuracy figure of a folder
    `write_tables` wrote, from its runs.csv, summary.csv and diagnostics.csv alone: for a new
    layout or LaTeX environment where the results.json files are gone. Only the layout can
    change: the numbers are those of the CSV files (tables of `--compare-paper` or `--ci` are
    not re-rendered: the paper rows and the per-seed tests are not in these files)."""
    check_latex_env(latex_env)
    out = Path(tables_dir)
    runs = pd.read_csv(out / "runs.csv")
    summary = pd.read_csv(out / "summary.csv")
    used = runs[runs["included"]]
    excluded = int((~runs["included"]).sum())
    frames: dict[str, pd.DataFrame] = {}
    paths = write_result_tables(out, summary, used, excluded, None, None, False, latex_env, frames)
    paths |= write_diagnostics(out, pd.read_csv(out / "diagnostics.csv"), used, latex_env, frames)
    if plots:
        paths["plots"] = out / "plots"
        save_figure(plot_accuracy_bars(summary), paths["plots"] / "acc_bars")
    return paths


def merge_tables(into_dir: str | Path, new_dir: str | Path) -> dict[str, int]:
    """Add the cells of the table folder `new_dir` to those of `into_dir` (both written by
    `write_tables`), in place: runs.csv, summary.csv and diagnostics.csv of `into_dir` keep
    their other cells and take `new_dir`'s rows for the cells (method, protocol, K) that
    `new_dir` has, replacing any earlier rows of those cells. For a table completed across
    sweeps whose results.json files are not all on one machine; `rerender_tables` then renders
    it. Returns how many cells were added and replaced."""
    into, new = Path(into_dir), Path(new_dir)
    merged: dict[str, pd.DataFrame] = {}
    counts = {"added": 0, "replaced": 0}
    for name in ("runs.csv", "summary.csv", "diagnostics.csv"):
        for folder in (into, new):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} is missing: both folders must be written by "
                    "`owdfa-bench aggregate`"
                )
        old, fresh = pd.read_csv(into / name), pd.read_csv(new / name)
        cells = set(map(tuple, fresh[CELL].astype(str).to_numpy()))
        old_cells = list(map(tuple, old[CELL].astype(str).to_numpy()))
        kept = [cell not in cells for cell in old_cells]
        if name == "summary.csv":
            counts = {"added": len(cells - set(old_cells)), "replaced": len(cells & set(old_cells))}
        frame = pd.concat([old[kept], fresh], ignore_index=True)
        merged[name] = order_cells(frame) if name != "runs.csv" else frame
    for name, frame in merged.items():
        frame.to_csv(into / name, index=False)
    return counts


def write_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    compare_paper: bool = False,
    paper_dir: str | Path | None = None,
    ci: bool = False,
    plots: bool = True,
    wandb_mode: str | None = "auto",
    wandb_project: str | None = None,
    latex_env: str = DEFAULT_LATEX_ENVIRONMENT,
    paper_benchmark: str | None = None,
) -> dict[str, Path]:
    """`write_tables`, then the figures (`<out>/plots`) and the W&B aggregate run.

    A failing W&B run is logged, not raised: the tables are on disk already.
    """
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "tables"
    df = load_records(sweep_dir)
    frames: dict[str, pd.DataFrame] = {}
    paths = write_tables(
        sweep_dir,
        out,
        compare_paper,
        paper_dir,
        ci,
        df,
        frames,
        latex_env=latex_env,
        paper_benchmark=paper_benchmark,
    )
    if "acc_md" not in paths:
        return paths
    figures = write_plots(sweep_dir, out / "plots", records=df) if plots else []
    if figures:
        paths["plots"] = out / "plots"
    used = df[exclusion_reasons(df) == ""]
    target = resolve_target(used["config"], wandb_mode, wandb_project)
    if target is not None:
        config = {
            "sweep": Path(sweep_dir).resolve().name,
            "runs": int(len(used)),
            "cells": int(len(frames["summary"])),
            "data": sorted(used["data"].dropna().astype(str).unique()),
            "ci": ci,
            "compare_paper": compare_paper,
        }
        tables = {name: f for name, f in frames.items() if name != "summary"}
        summary = frames["summary"]
        tables["summary"] = summary[[c for c in summary.columns if not c.endswith("_n")]]
        try:
            paths["wandb"] = log_report(target, sweep_dir, out, tables, figures, config)
        except Exception as err:  # noqa: BLE001 - W&B trouble must not lose the tables
            log.warning("W&B aggregate run failed (%s: %s)", type(err).__name__, err)
    return paths


# --------------------------------------------------------------------------- entry points
def print_report(paths: dict[str, Path]) -> None:
    """The ACC table (once), the paper comparison if asked, and the issues, on the terminal."""
    from rich.console import Console

    console = Console()

    def show(text: str, style: str | None = None) -> None:
        console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    if "acc_md" in paths:
        show(paths["acc_md"].read_text(encoding="utf-8"))
    else:
        console.print("No complete run record: no table written.", style="bold red")
    if "paper_comparison_md" in paths:
        show(paths["paper_comparison_md"].read_text(encoding="utf-8"))
    text = paths["issues"].read_text(encoding="utf-8")
    show(text, "green" if text.startswith("0 issue") else "yellow")
    show(f"Tables written to {paths['issues'].parent}")
    if "wandb" in paths:
        show(f"W&B aggregate run: {paths['wandb']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="owdfa-bench aggregate",
        description="Aggregate the results.json files of a sweep into CSV, Markdown and LaTeX "
        "tables (mean +- std over seeds), diagnostics, plots and a W&B aggregate run.",
    )
    parser.add_argument("sweep_dir", type=Path, help="folder of a multirun (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (SWEEP_DIR/tables)")
    parser.add_argument(
        "--compare-paper",
        action="store_true",
        help="add the published numbers of results/paper/ as rows marked (paper), and print "
        "every cell beside them (paper_comparison.md)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG/PDF figures")
    parser.add_argument(
        "--ci",
        action="store_true",
        help="cells show mean +- the 95%% Student-t half-width over seeds; cells Welch's t-test "
        "does not separate from the best of their column (p >= 0.05) are marked",
    )
    parser.add_argument(
        "--latex-env",
        choices=LATEX_ENVIRONMENTS,
        default=DEFAULT_LATEX_ENVIRONMENT,
        help="what wraps each LaTeX tabular: a table float (default), a table* float spanning "
        "both columns of a two-column paper, or the bare tabular, to \\input into a float of "
        "your own; every .tex needs \\usepackage{booktabs,graphicx}",
    )
    parser.add_argument(
        "--paper",
        choices=sorted(PAPER_TABLES),
        default=None,
        help="with --compare-paper: which published table (owdfa40: CAL Table 2; owdfa23: the "
        "CPL tables, the only ones with DNA-Det, Openworld-GAN, OpenLDN and NACH); default: "
        "the runs' benchmark, else owdfa40",
    )
    parser.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        metavar="TABLES_DIR",
        help="aggregate SWEEP_DIR into a new folder, then add its cells to TABLES_DIR (a folder "
        "this command wrote, e.g. results/synth_benchmark), replacing TABLES_DIR's rows of the "
        "same cells, and render TABLES_DIR again: for a table completed across sweeps",
    )
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="SWEEP_DIR is a folder this command wrote: render its Markdown and LaTeX tables "
        "and acc_bars again, in place, from its runs.csv, summary.csv and diagnostics.csv "
        "(for another --latex-env or layout; not with --ci or --compare-paper)",
    )
    parser.add_argument(
        "--wandb-mode",
        choices=MODES,
        default="auto",
        help="W&B aggregate run (job_type aggregate): auto = as the sweep's runs logged "
        "(offline by default; none if they did not use W&B)",
    )
    parser.add_argument(
        "--wandb-project",
        default=None,
        help="W&B project of the aggregate run (default: the runs' logger.project)",
    )
    return parser


def cli_aggregate(argv: list[str]) -> int:
    """`owdfa-bench aggregate SWEEP_DIR [--out DIR] [--compare-paper] [--no-plots] [--ci]
    [--latex-env ENV] [--rerender] [--wandb-mode MODE] [--wandb-project NAME]`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder; pass the sweep folder of a multirun")
    if args.paper is not None and not args.compare_paper:
        parser.error("--paper chooses the table of --compare-paper: add --compare-paper")
    if args.merge_into is not None:
        if args.ci or args.compare_paper or args.rerender:
            parser.error(
                "--merge-into adds plain tables: without --ci, --compare-paper or --rerender"
            )
        if not (args.merge_into / "summary.csv").is_file():
            parser.error(f"--merge-into: {args.merge_into} has no summary.csv of this command")
    if args.rerender:
        if args.ci or args.compare_paper or args.out is not None:
            parser.error("--rerender renders in place, without --ci, --compare-paper or --out")
        if not (args.sweep_dir / "summary.csv").is_file():
            parser.error(f"--rerender: {args.sweep_dir} has no summary.csv of this command")
        paths = rerender_tables(args.sweep_dir, args.latex_env, plots=not args.no_plots)
        print(f"Tables rendered again in {args.sweep_dir}: {len(paths)} files")
        return 0
    paths = write_report(
        args.sweep_dir,
        args.out,
        compare_paper=args.compare_paper,
        ci=args.ci,
        plots=not args.no_plots,
        wandb_mode=args.wandb_mode,
        wandb_project=args.wandb_project,
        latex_env=args.latex_env,
        paper_benchmark=args.paper,
    )
    print_report(paths)
    if args.merge_into is not None and "acc_md" in paths:
        counts = merge_tables(args.merge_into, paths["summary"].parent)
        rerender_tables(args.merge_into, args.latex_env, plots=not args.no_plots)
        print(
            f"Merged into {args.merge_into}: {counts['added']} cells added, "
            f"{counts['replaced']} replaced; its tables rendered again"
        )
    return 0 if "acc_md" in paths else 1


class AggregateCallback(Callback):
    """Hydra callback: write the report of the sweep when a multirun ends, print its table once.

    Enabled in `conf/config.yaml` (`hydra.callbacks.aggregate`); its arguments are those of
    `write_report`, e.g. `+hydra.callbacks.aggregate.ci=true` or
    `+hydra.callbacks.aggregate.latex_env=tabular`. A failure here is logged, never
    raised: the runs themselves are already on disk.
    """

    def __init__(
        self,
        compare_paper: bool = False,
        plots: bool = True,
        ci: bool = False,
        wandb_mode: str | None = "auto",
        wandb_project: str | None = None,
        latex_env: str = DEFAULT_LATEX_ENVIRONMENT,
        paper_benchmark: str | None = None,
    ) -> None:
        self.options: dict[str, Any] = {
            "latex_env": latex_env,
            "paper_benchmark": paper_benchmark,
            "compare_paper": compare_paper,
            "plots": plots,
            "ci": ci,
            "wandb_mode": wandb_mode,
            "wandb_project": wandb_project,
        }

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            print_report(write_report(sweep_dir, **self.options))
        except Exception as err:  # a broken summary must not turn a finished sweep into a failure
            log.warning(
                "aggregation of the sweep failed (%s: %s); run `owdfa-bench aggregate "
                "<sweep dir>` to retry",
                type(err).__name__,
                err,
            )
