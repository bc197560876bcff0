"""The report package on fabricated run records: tables, issues, marks, diagnostics, plots,
paper comparison, confidence intervals, the W&B aggregate run, the CLI and the Hydra callback."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import wandb_log_holding
from latex_check import check_latex
from latex_compile import compile_table, environment_of, find_pdflatex, needed_packages
from matplotlib.backends.backend_agg import FigureCanvasAgg
from omegaconf import OmegaConf
from PIL import Image
from scipy import stats

from owdfa_bench.records import config_hash
from owdfa_bench.report.collect import load_records
from owdfa_bench.report.main import AggregateCallback, cli_aggregate, write_report, write_tables
from owdfa_bench.report.naming import METHOD_CONF_DIR, display_for
from owdfa_bench.report.paper import PAPER_DIR
from owdfa_bench.report.plots import (
    family_order,
    line_style,
    plot_accuracy_bars,
    plot_diagnostics,
    write_plots,
)
from owdfa_bench.report.render import (
    LATEX_ENVIRONMENTS,
    MAX_FLOAT_LINES,
    column_chunks,
    latex_float,
    two_line_head,
)
from owdfa_bench.report.summarise import epoch_curves, summarise
from owdfa_bench.report.validate import validate

SEEDS = (2025, 2026, 2027)
# Five classes whose families interleave, so ordering by family is visible: REAL, S, R, S, R.
CLASSES = [
    {"label": 0, "index": 0, "code": "REAL", "family": "REAL", "known": True},
    {"label": 1, "index": 1, "code": "S1", "family": "S", "known": True},
    {"label": 2, "index": 6, "code": "R1", "family": "R", "known": True},
    {"label": 3, "index": 2, "code": "S2", "family": "S", "known": False},
    {"label": 4, "index": 7, "code": "R2", "family": "R", "known": False},
]
# Accuracy level per method: CAL clearly above CPL, so CAL's means are the bold ones.
LEVEL = {
    "cal": 0.85,
    "cpl": 0.70,
    "mpsl": 0.6,
    "lower_bound": 0.5,
    "upper_bound": 0.95,
    "dna_det": 0.4,
}
NAMES = ["all_acc", "known_acc", "novel_acc", "all_nmi", "all_ari", "novel_nmi", "novel_ari"]
DISPLAY = {"cal": ("CAL", 80), "cpl": ("CPL", 70), "cdal": ("CDAL", 75)}


def metrics_for(method: str, protocol: str, k: str, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, len(method), int(protocol[1:]), len(k)])
    base = LEVEL[method] - (0.05 if protocol == "p2" else 0.0) - (0.05 if k == "unknown" else 0.0)
    values = {name: float(base + rng.uniform(-0.03, 0.03)) for name in NAMES}
    values["known_acc"] = min(1.0, values["known_acc"] + 0.1)
    values["gcd_v2_all_acc"] = values["all_acc"]
    return values


def make_record(
    method: str,
    protocol: str,
    k: str,
    seed: int,
    status: str = "complete",
    data: str = "synth",
    lr: float = 2e-4,
    display: tuple[str, int] | None = None,
    logger: dict | None = None,
) -> dict:
    synthetic = data == "synth"
    method_config: dict = {"name": method, "optim": {"name": "adam", "lr": lr}}
    if display is not None:
        method_config["display"] = {"name": display[0], "order": display[1]}
    config = {
        "seed": seed,
        "split_seed": 2025,
        "data": {"name": data, "root": None},
        "protocol": {"name": protocol},
        "k": {"mode": k},
        "method": method_config,
        "logger": logger or {"name": "none"},
        "paths": {"output_dir": f"sweep/{method}/{protocol}/k-{k}/seed-{seed}"},
        "run_name": f"{method}-{protocol}-seed-{seed}",
    }
    confusion = np.diag([8, 7, 6, 5, 4]).tolist()
    for row in confusion:
        row.append(1)  # one sample per class in an unmatched cluster
    return {
        "schema_version": 1,
        "status": status,
        "error": "RuntimeError: loss is NaN at epoch 3" if status == "failed" else None,
        "method": method,
        "protocol": protocol,
        "k": k,
        "seed": seed,
        "split_seed": 2025,
        "data": data,
        "synthetic": synthetic,
        "selection": "last",
        "selected_epoch": 9,
        "epochs": 10,
        "metrics": metrics_for(method, protocol, k, seed) if status == "complete" else {},
        "num_clusters": 5,
        "k_estimated": 6 if k == "unknown" else None,
        "num_known": 3,
        "num_classes": 5,
        "classes": CLASSES,
        "per_class_acc": [0.9, 0.8, 0.7, 0.6, 0.5],
        "confusion": confusion,
        "history": [],
        "train_images_per_s": 150.0,
        "eval_images_per_s": 900.0,
        "wall_s": 90.0 + seed - 2025,
        "config": config,
        "config_hash": "x",
        "git_commit": "abc",
        "versions": {},
        "device": "cpu",
    }


def write_record(root: Path, record: dict, folder: str | None = None) -> Path:
    run = folder or f"{record['method']}/{record['protocol']}/k-{record['k']}/seed-{record['seed']}"
    path = root / run / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def make_sweep(root: Path, data: str = "synth") -> Path:
    """2 methods x 2 protocols x 3 seeds (K known) with one missing seed (cpl/p2, 2027), one
    duplicate seed (cal/p2, 2026), one failed run (cpl/p1, 2026), one unreadable file, and a
    one-seed CAL K-unknown cell on p1. CAL's records carry `method.display`, CPL's do not (its
    name comes from conf/method/cpl.yaml)."""
    for method in ("cal", "cpl"):
        display = DISPLAY["cal"] if method == "cal" else None
        for protocol in ("p1", "p2"):
            for seed in SEEDS:
                if (method, protocol, seed) == ("cpl", "p2", 2027):
                    continue
                status = "failed" if (method, protocol, seed) == ("cpl", "p1", 2026) else "complete"
                record = make_record(method, protocol, "known", seed, status, data, display=display)
                write_record(root, record)
    write_record(
        root,
        make_record("cal", "p2", "known", 2026, data=data, display=DISPLAY["cal"]),
        "cal/p2/k-known/seed-2026-again",
    )
    write_record(root, make_record("cal", "p1", "unknown", 2025, data=data, display=DISPLAY["cal"]))
    broken = root / "cal/p1/k-unknown/seed-2026/results.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"status": "complete", "metrics": ')  # cut off mid-write
    (root / "multirun.yaml").write_text("not a record\n")
    (root / "cal/p1/k-known/seed-2025/metrics.json").write_text("{}")  # not a record either
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("synth_sweep"))


@pytest.fixture(scope="module")
def tables(sweep) -> dict[str, Path]:
    return write_tables(sweep)


def md_rows(text: str) -> list[list[str]]:
    """The cells of every body row of the Markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[1:]]


def md_row(text: str, label: str) -> list[str]:
    """The cells of the Markdown row whose first cell is `label`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{text}")


# --------------------------------------------------------------------------- collect, validate
def test_load_records_reads_only_results_json_and_keeps_unreadable(sweep):
    df = load_records(sweep)
    assert len(df) == 14  # 11 (incl. 1 failed) + 1 duplicate + 1 K unknown + 1 unreadable
    broken = df[df["status"] == "unreadable"]
    assert broken["path"].tolist() == ["cal/p1/k-unknown/seed-2026/results.json"]
    assert "JSONDecodeError" in broken["error"].iloc[0]
    assert not df["path"].str.startswith("/").any()  # no machine paths
    assert {"all_acc", "gcd_v2_all_acc", "wall_s", "k_estimated", "synthetic"} <= set(df.columns)
    assert str(df["seed"].dtype) == "Int64"


def test_validate_reports_missing_duplicate_failed_unreadable(sweep):
    issues = validate(load_records(sweep))
    by_kind: dict[str, list[str]] = {}
    for issue in issues:
        by_kind.setdefault(issue.kind, []).append(issue.detail)
    assert any("cpl/p2/k=known" in d and "2027" in d for d in by_kind["missing_seed"])
    assert any("cal/p2/k=known" in d and "seed 2026" in d for d in by_kind["duplicate_seed"])
    (failed,) = by_kind["failed"]
    assert "cpl/p1/k-known/seed-2026/results.json" in failed and "loss is NaN" in failed
    assert by_kind["unreadable"][0].startswith("cal/p1/k-unknown/seed-2026/results.json")
    # Seeds, run folders and a split seed fixed at 2025 are not config differences.
    assert "config_mismatch" not in by_kind


def test_validate_names_the_config_key_that_differs(tmp_path):
    for seed in SEEDS:
        write_record(
            tmp_path, make_record("cal", "p1", "known", seed, lr=1e-3 if seed == 2027 else 2e-4)
        )
    (issue,) = [i for i in validate(load_records(tmp_path)) if i.kind == "config_mismatch"]
    assert "method.optim.lr" in issue.detail and "cal/p1/k=known" in issue.detail


def test_display_metadata_is_no_config_difference(tmp_path):
    """A renamed method (method.display) is neither a config mismatch nor a new config hash."""
    for seed, name in zip(SEEDS, ("CAL", "CAL", "CAL (renamed)")):
        write_record(tmp_path, make_record("cal", "p1", "known", seed, display=(name, 80)))
    assert not [i for i in validate(load_records(tmp_path)) if i.kind == "config_mismatch"]

    base = {"seed": 1, "method": {"name": "cal", "epochs": 5}, "trainer": {"threads": 1}}
    shown = {**base, "method": {**base["method"], "display": {"name": "CAL", "order": 80}}}
    changed = {**base, "method": {**base["method"], "epochs": 6}}
    assert config_hash(OmegaConf.create(shown)) == config_hash(OmegaConf.create(base))
    assert config_hash(OmegaConf.create(changed)) != config_hash(OmegaConf.create(base))


# --------------------------------------------------------------------------- summarise
def test_summary_matches_numpy_and_excludes_failed_and_duplicates(sweep):
    summary = summarise(load_records(sweep)).set_index(["method", "protocol", "k"])
    values = [metrics_for("cal", "p1", "known", s)["all_acc"] for s in SEEDS]
    cell = summary.loc[("cal", "p1", "known")]
    assert cell["n"] == 3
    assert cell["all_acc_mean"] == pytest.approx(np.mean(values))
    assert cell["all_acc_std"] == pytest.approx(np.std(values, ddof=1))
    assert cell["wall_s_mean"] == pytest.approx(91.0)
    assert summary.loc[("cpl", "p1", "known"), "n"] == 2  # failed run left out
    assert summary.loc[("cal", "p2", "known"), "n"] == 3  # duplicate seed counted once
    single = summary.loc[("cal", "p1", "unknown")]
    assert single["n"] == 1 and math.isnan(single["all_acc_std"])
    assert single["k_estimated_mean"] == 6


def test_display_names_come_from_records_then_method_configs(tmp_path):
    write_record(tmp_path, make_record("cal", "p1", "known", 2025, display=("CAL*", 80)))
    write_record(tmp_path, make_record("mpsl", "p1", "known", 2025))  # from conf/method/mpsl.yaml
    write_record(tmp_path, make_record("lower_bound", "p1", "known", 2025))
    record = make_record("cpl", "p1", "known", 2025)
    record["method"] = record["config"]["method"]["name"] = "newmethod"  # no config file
    write_record(tmp_path, record)
    summary = summarise(load_records(tmp_path))
    assert summary["display_name"].tolist() == ["Lower bound", "MPSL", "CAL*", "newmethod"]
    md = write_tables(tmp_path)["acc_md"].read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["Lower bound", "MPSL", "CAL*", "newmethod"]  # [0] is the header


def test_every_method_config_has_a_display_name_and_order():
    files = sorted(METHOD_CONF_DIR.glob("*.yaml"))
    assert len(files) >= 10
    orders = {}
    for path in files:
        display = yaml.safe_load(path.read_text())["display"]
        assert isinstance(display["name"], str) and display["name"], path.name
        orders[path.stem] = display["order"]
        assert display_for(path.stem).name == display["name"]
    assert len(set(orders.values())) == len(orders)  # one row position per method
    assert orders["lower_bound"] < orders["upper_bound"] < orders["rankstats"] < orders["cal"]
    assert display_for("mpsl").name == "MPSL"


# --------------------------------------------------------------------------- render
def test_tables_layout_marks_and_caption(sweep, tables):
    md = tables["acc_md"].read_text()
    tex = tables["acc_tex"].read_text()
    caption = md.splitlines()[0]
    assert "Synthetic benchmark (data=synth)" in caption and "last epoch" in caption
    assert "Hungarian" in caption  # the metric convention is stated
    assert "CAL (K unknown)" in md and "CAL (K unknown)" in tex
    assert "\u2020" in md and r"^{\dagger}" in tex and "fewer than 3 seeds" in md
    assert "REAL" not in md.splitlines()[2]  # no real_acc in these records: no REAL column

    summary = pd.read_csv(tables["summary"]).set_index(["method", "protocol", "k"])
    best = 100 * summary.loc[("cal", "p1", "known"), "all_acc_mean"]
    assert f"**{best:.1f}**" in md
    assert rf"\textbf{{{best:.1f} $\pm$" in tex  # bold by Styler highlighting
    cpl = 100 * summary.loc[("cpl", "p1", "known"), "all_acc_mean"]
    assert f"**{cpl:.1f}**" not in md and rf"\textbf{{{cpl:.1f}" not in tex

    assert check_latex(tex) == []
    assert check_latex(tables["nmi_ari_tex"].read_text()) == []
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){2-4}"):
        assert rule in tex
    assert r"\multicolumn{3}{c}{P1}" in tex and "synthetic" in tex.lower()
    assert "Novel NMI" in tables["nmi_ari_md"].read_text()

    issues = tables["issues"].read_text()
    for kind in ("[failed]", "[missing_seed]", "[duplicate_seed]", "[unreadable]"):
        assert kind in issues
    runs = pd.read_csv(tables["runs"])
    assert len(runs) == 14 and (~runs["included"]).sum() == 3
    assert "history" not in runs.columns and "config" not in runs.columns


def test_best_on_test_selection_gets_a_double_dagger(tmp_path):
    for seed in SEEDS:
        record = make_record("cal", "p1", "known", seed)
        record["selection"] = "best_on_test"
        write_record(tmp_path, record)
    paths = write_tables(tmp_path)
    md, tex = paths["acc_md"].read_text(), paths["acc_tex"].read_text()
    assert "\u2021 Checkpoint: epoch with the best test score" in md.splitlines()[0]
    assert "\u2021" in md_row(md, "CAL")[1] and r"^{\ddagger}" in tex
    assert check_latex(tex) == []


def test_bounds_are_never_bold_and_sit_above_a_midrule(tmp_path):
    for method in ("upper_bound", "cal", "cpl"):
        for seed in SEEDS:
            write_record(tmp_path, make_record(method, "p1", "known", seed))
    paths = write_tables(tmp_path)
    md, tex = paths["acc_md"].read_text(), paths["acc_tex"].read_text()
    assert "**" not in md_row(md, "Upper bound (oracle)")[1]  # highest, yet not bold
    assert md_row(md, "CAL")[1].startswith("**")
    lines = tex.splitlines()
    upper = next(i for i, line in enumerate(lines) if line.startswith("Upper bound"))
    assert lines[upper + 1] == r"\midrule" and lines[upper + 2].startswith("CPL")
    assert check_latex(tex) == []


def test_real_acc_is_its_own_column_when_present(tmp_path):
    for seed in SEEDS:
        record = make_record("cal", "p1", "known", seed)
        record["metrics"]["real_acc"] = 0.9 + 0.01 * (seed - 2025)
        write_record(tmp_path, record)
    paths = write_tables(tmp_path)
    md = paths["acc_md"].read_text()
    assert "P1 REAL" in md and md_row(md, "CAL")[4].startswith("91.0 \u00b1 1.0")
    assert "real class" in md.splitlines()[0]
    assert check_latex(paths["acc_tex"].read_text()) == []


def test_real_data_caption_does_not_say_synthetic(tmp_path):
    for seed in SEEDS:
        write_record(tmp_path, make_record("cal", "p1", "known", seed, data="owdfa40"))
    paths = write_tables(tmp_path)
    for name in ("acc_md", "acc_tex", "nmi_ari_md", "diagnostics_md"):
        assert "synthetic" not in paths[name].read_text().lower()
    assert "Data: owdfa40." in paths["acc_md"].read_text()


# --------------------------------------------------------------------------- paper
def test_compare_paper_adds_published_cal_numbers(tmp_path):
    for seed in SEEDS:
        write_record(tmp_path, make_record("cal", "p1", "known", seed, data="owdfa40"))
    paths = write_tables(tmp_path, compare_paper=True)
    md = paths["acc_md"].read_text()
    (paper_row,) = [line for line in md.splitlines() if line.startswith("| CAL (paper)")]
    assert "88.3" in paper_row and "98.0" in paper_row and "76.5" in paper_row
    assert check_latex(paths["acc_tex"].read_text()) == []
    comparison = pd.read_csv(paths["paper_comparison"]).set_index("metric")
    assert comparison.loc["all_acc", "paper_percent"] == pytest.approx(88.3)


def test_compare_paper_prints_every_row_beside_the_paper(tmp_path, capsys):
    """CAL P1 has published numbers; CAL P4 (a protocol the paper lacks) and MPSL (a method
    the paper lacks) keep their rows with blank paper columns."""
    for seed in SEEDS:
        for method, protocol in (("cal", "p1"), ("cal", "p4"), ("mpsl", "p1")):
            metrics = metrics_for(method, "p1", "known", seed)
            record = make_record(method, protocol, "known", seed, data="owdfa40")
            record["metrics"] = metrics
            write_record(tmp_path, record)
    assert cli_aggregate([str(tmp_path), "--compare-paper", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "owdfa40_cal_table2.csv" in printed and "results_sota.png" in printed  # the source
    comparison = (tmp_path / "tables" / "paper_comparison.md").read_text()
    assert comparison in printed
    cal = md_row(comparison, "CAL")
    header = md_row(comparison, "Method")
    assert header[2:7] == ["Precision", "All ours", "All paper", "Known ours", "Known paper"]
    assert cal[1] == "P1" and cal[4] == "88.3" and cal[6] == "98.0"
    rows = [line for line in comparison.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3  # no row dropped
    p4 = [r for r in rows if "| P4" in r]
    (mpsl,) = [r for r in rows if r.startswith("| MPSL")]
    for row in (p4[0], mpsl):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert cells[3] and not cells[4]  # ours shown, paper blank
    frame = pd.read_csv(tmp_path / "tables" / "paper_comparison.csv")
    assert frame.groupby(["method", "protocol"]).ngroups == 3
    assert frame.loc[frame["method"] == "mpsl", "paper_percent"].isna().all()


def test_compare_paper_shows_the_precision_each_cell_trained_at(tmp_path):
    """The record's `precision`, else its config's trainer.precision (older records), else
    unknown; a cell whose seeds differ is "mixed"."""
    for seed in SEEDS:
        cells = {
            "p1": {"precision": "32-true"},
            "p2": {"precision": "bf16-mixed" if seed == 2025 else "32-true"},
            "p3": {},  # an older record: no field, its config names the precision
        }
        for protocol, fields in cells.items():
            record = make_record("cal", protocol, "known", seed, data="owdfa40") | fields
            if protocol == "p3":
                record["config"]["trainer"] = {"precision": "bf16"}  # Lightning's old alias
            write_record(tmp_path, record)
        write_record(tmp_path, make_record("cpl", "p1", "known", seed, data="owdfa40"))
    paths = write_tables(tmp_path, compare_paper=True)
    comparison = paths["paper_comparison_md"].read_text()
    rows = {(cells[0], cells[1]): cells[2] for cells in md_rows(comparison)}
    assert rows == {
        ("CAL", "P1"): "fp32",
        ("CAL", "P2"): "mixed: bf16-mixed, fp32",
        ("CAL", "P3"): "bf16-mixed",
        ("CPL", "P1"): "unknown",  # neither the record nor its config says
    }
    assert "Precision: what each cell trained at" in comparison.splitlines()[0]
    frame = pd.read_csv(paths["paper_comparison"])
    assert set(frame.loc[frame["protocol"] == "p2", "precision"]) == {"mixed: bf16-mixed, fp32"}
    runs = pd.read_csv(paths["runs"])
    assert set(runs["precision"].dropna()) == {"32-true", "bf16-mixed"}
    caption = paths["acc_md"].read_text().splitlines()[0]
    assert "different precisions (bf16-mixed; fp32; mixed: bf16-mixed, fp32; unknown" in caption


def test_compare_paper_caption_names_the_one_precision_of_every_cell(tmp_path):
    for seed in SEEDS:
        write_record(
            tmp_path,
            make_record("cal", "p1", "known", seed, data="owdfa40") | {"precision": "32-true"},
        )
    caption = write_tables(tmp_path, compare_paper=True)["acc_md"].read_text().splitlines()[0]
    assert "Our runs trained at fp32; the reference recipes at fp32." in caption


def test_compare_paper_on_synthetic_says_not_comparable(sweep, tmp_path):
    paths = write_tables(sweep, tmp_path / "out", compare_paper=True)
    caption = paths["acc_md"].read_text().splitlines()[0]
    assert "real owdfa40 data; not comparable" in caption
    assert "not comparable" in paths["paper_comparison_md"].read_text().splitlines()[0]


def test_compare_paper_can_put_synthetic_runs_beside_cpls_table(tmp_path):
    """DNA-Det's only published numbers are in CPL's tables (owdfa23): `--paper owdfa23`."""
    for seed in SEEDS:
        write_record(tmp_path, make_record("dna_det", "p1", "known", seed, display=("DNA-Det", 2)))
    out = tmp_path / "tables"
    cli_aggregate(
        [str(tmp_path), "--out", str(out), "--no-plots", "--compare-paper", "--paper", "owdfa23"]
    )
    comparison = pd.read_csv(out / "paper_comparison.csv")
    known = comparison[(comparison["method"] == "dna_det") & (comparison["metric"] == "known_acc")]
    assert len(known) == 1
    assert known["paper_percent"].iloc[0] == pytest.approx(74.47)
    assert set(known["paper_benchmark"]) == {"owdfa23"}
    assert "real owdfa23 data; not comparable" in (out / "acc.md").read_text().splitlines()[0]
    with pytest.raises(SystemExit):  # --paper only chooses the table of --compare-paper
        cli_aggregate([str(tmp_path), "--paper", "owdfa23"])


def test_compare_paper_on_the_original_ow_dfa_data_shows_cpls_table(tmp_path):
    """`+sweep=cpl_table` runs on data=owdfa23: each of its rows beside CPL's published row."""
    for method in ("dna_det", "cpl"):
        for seed in SEEDS:
            record = make_record(method, "p1", "known", seed, data="owdfa23")
            write_record(tmp_path, record | {"precision": "32-true"})
    paths = write_tables(tmp_path, tmp_path / "tables", compare_paper=True)
    comparison = pd.read_csv(paths["paper_comparison"])
    assert set(comparison["method"]) == {"dna_det", "cpl"}
    published = comparison.set_index(["method", "metric"])["paper_percent"]
    assert published[("dna_det", "novel_acc")] == pytest.approx(34.82)
    assert published[("cpl", "all_acc")] == pytest.approx(83.70)
    assert "not comparable" not in paths["acc_md"].read_text().splitlines()[0]


def test_merge_into_adds_a_sweeps_cells_and_replaces_the_same_cells(sweep, tmp_path, capsys):
    table = tmp_path / "table"
    write_tables(sweep, table)
    before = pd.read_csv(table / "summary.csv")
    extra = tmp_path / "extra"
    for seed in SEEDS:
        write_record(extra, make_record("dna_det", "p1", "known", seed, display=("DNA-Det", 2)))
        record = make_record("cpl", "p2", "known", seed)
        record["metrics"]["all_acc"] = 0.123  # the cell run again, complete this time
        write_record(extra, record)
    assert cli_aggregate([str(extra), "--merge-into", str(table), "--no-plots"]) == 0
    assert "1 cells added, 1 replaced" in capsys.readouterr().out
    after = pd.read_csv(table / "summary.csv")
    assert len(after) == len(before) + 1
    cells = after.set_index(["method", "protocol", "k"])
    assert cells.loc[("cpl", "p2", "known"), "all_acc_mean"] == pytest.approx(0.123)
    assert cells.loc[("cpl", "p2", "known"), "n"] == 3  # the earlier two seeds are gone
    kept = before.set_index(["method", "protocol", "k"]).loc[("cal", "p1", "known")]
    assert cells.loc[("cal", "p1", "known"), "all_acc_mean"] == kept["all_acc_mean"]
    assert list(after["method"]).index("dna_det") < list(after["method"]).index("cpl")  # by order
    runs = pd.read_csv(table / "runs.csv")
    # cpl: p1 three runs kept (one failed), p2 the three new ones in place of two
    assert (runs["method"] == "dna_det").sum() == 3 and (runs["method"] == "cpl").sum() == 6
    assert set(pd.read_csv(table / "diagnostics.csv")["method"]) >= {"dna_det", "cal", "cpl"}
    assert md_row((table / "acc.md").read_text(), "DNA-Det")  # rendered again with the new row
    with pytest.raises(SystemExit):
        cli_aggregate([str(extra), "--merge-into", str(tmp_path / "nowhere")])


def test_paper_csvs_are_tidy_and_hold_the_spec_values():
    columns = [
        "benchmark",
        "protocol",
        "method",
        "k_setting",
        "metric",
        "value_percent",
        "source",
        "note",
    ]
    files = sorted(PAPER_DIR.glob("*.csv"))
    assert len(files) == 4 and (PAPER_DIR / "README.md").is_file()
    for path in files:
        frame = pd.read_csv(path)
        assert list(frame.columns) == columns, path.name
        assert frame["value_percent"].between(0, 100).all() and frame["source"].notna().all()
        assert path.name in (PAPER_DIR / "README.md").read_text()
    table2 = pd.read_csv(PAPER_DIR / "owdfa40_cal_table2.csv")
    key = ["protocol", "method", "k_setting", "metric"]
    values = table2.set_index(key)["value_percent"]
    assert values[("p1", "cal", "known", "all_acc")] == 88.3
    assert values[("p1", "cal", "unknown", "novel_acc")] == 74.5  # README says 76.5
    assert not table2.duplicated(key).any()


# --------------------------------------------------------------------------- --ci
CI_VALUES = {  # all metrics of a method take these per-seed values
    "cal": [0.80, 0.82, 0.84],
    "cpl": [0.79, 0.83, 0.86],  # best mean, not separable from CAL
    "cdal": [0.50, 0.52, 0.51],  # clearly below
}


def test_ci_interval_and_welch_marks_match_scipy(tmp_path):
    for method, values in CI_VALUES.items():
        for seed, value in zip(SEEDS, values):
            record = make_record("cal", "p1", "known", seed, display=DISPLAY[method])
            record["method"] = record["config"]["method"]["name"] = method
            record["metrics"] = {name: value for name in NAMES}
            write_record(tmp_path, record)
    paths = write_tables(tmp_path, ci=True)
    md, tex = paths["acc_md"].read_text(), paths["acc_tex"].read_text()
    assert "Student-t interval" in md.splitlines()[0]

    summary = pd.read_csv(paths["summary"]).set_index("method")
    for method, values in CI_VALUES.items():
        low, high = stats.t.interval(
            0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values)
        )
        half = (high - low) / 2
        assert summary.loc[method, "all_acc_ci95"] == pytest.approx(half)
        cell = md_row(md, DISPLAY[method][0])[1]
        assert f"{100 * np.mean(values):.1f}** \u00b1 {100 * half:.1f}" in cell or (
            cell.startswith(f"{100 * np.mean(values):.1f} \u00b1 {100 * half:.1f}")
        )

    p_cal = stats.ttest_ind(CI_VALUES["cpl"], CI_VALUES["cal"], equal_var=False).pvalue
    p_cdal = stats.ttest_ind(CI_VALUES["cpl"], CI_VALUES["cdal"], equal_var=False).pvalue
    assert p_cal >= 0.05 > p_cdal  # the hand-made sweep tests both outcomes
    assert md_row(md, "CPL")[1].startswith("**")  # the best row
    assert md_row(md, "CAL")[1].endswith("\u2248")  # not significantly below CPL
    assert not md_row(md, "CDAL")[1].endswith("\u2248")  # significantly below
    assert "Welch" in md and r"^{\approx}" in tex and check_latex(tex) == []

    tests = pd.read_csv(paths["significance"])
    acc = tests[(tests["table"] == "acc") & (tests["metric"] == "all_acc")].set_index("method")
    assert acc.loc["cal", "p_value"] == pytest.approx(p_cal)
    assert acc.loc["cdal", "p_value"] == pytest.approx(p_cdal)
    assert (acc["best_method"] == "cpl").all() and "cpl" not in acc.index


# --------------------------------------------------------------------------- LaTeX layout
REPO = Path(__file__).resolve().parents[1]
COMMITTED_TEX = sorted((REPO / "results").glob("*/*.tex"))


def test_latex_has_one_tabular_per_protocol_holding_the_rows_with_values(tables):
    tex = tables["acc_tex"].read_text()
    assert tex.count(r"\begin{tabular}") == 2  # P1 and P2 stacked, not side by side
    assert r"\multicolumn{3}{c}{P1}" in tex and r"\multicolumn{3}{c}{P2}" in tex
    assert tex.count("CAL (K unknown)") == 1  # a P1 cell only: no empty P2 row
    assert tex.count(r"\resizebox{\linewidth}{!}") == 2  # each shrunk where wider
    assert needed_packages(tex) == ["booktabs", "graphicx"] and environment_of(tex) == "table"


def test_diagnostic_heads_and_column_groups():
    assert two_line_head("All NMI") == "All NMI"
    assert two_line_head("pseudo noise (confident)") == r"\shortstack{pseudo noise\\(confident)}"
    assert two_line_head("wall s / run") == r"\shortstack{wall s\\/ run}"
    assert [len(c) for c in column_chunks(13, 4)] == [4, 3, 3, 3]
    assert [list(c) for c in column_chunks(5, 4)] == [[0, 1, 2], [3, 4]]
    assert [len(c) for c in column_chunks(4, 4)] == [4]


def test_latex_environment_option(sweep, tmp_path):
    bare = write_tables(sweep, tmp_path / "bare", latex_env="tabular")
    for name in ("acc_tex", "nmi_ari_tex", "diagnostics_tex"):
        text = bare[name].read_text()
        assert r"\begin{table" not in text and r"\caption{" not in text
        assert "% Caption: " in text and check_latex(text) == []
    wide = write_tables(sweep, tmp_path / "wide", latex_env="table*")["acc_tex"].read_text()
    assert r"\begin{table*}[t]" in wide and wide.rstrip().endswith(r"\end{table*}")
    with pytest.raises(ValueError, match="table, table\\*, tabular"):
        write_tables(sweep, tmp_path / "bad", latex_env="longtable")
    with pytest.raises(SystemExit):
        cli_aggregate([str(sweep), "--latex-env", "longtable"])


def test_tabulars_too_tall_for_one_page_take_several_floats():
    """Stacked protocol tabulars past MAX_FLOAT_LINES rows go into consecutive floats: the first
    captioned and labelled, the others pointing back to it, the footnotes under the last."""

    def tabular(rows: int) -> list[str]:
        return [r"\begin{tabular}{l c}", *[f"m{i} & 1 \\\\" for i in range(rows)], r"\end{tabular}"]

    small = latex_float([tabular(10), tabular(10)], "Cap", "tab:x", "table", ["a note"])
    assert sum(line.startswith(r"\begin{table}") for line in small) == 1
    tall = [tabular(MAX_FLOAT_LINES - 4), tabular(6), tabular(6)]
    lines = latex_float(tall, "Cap", "tab:x", "table*", ["a note"])
    text = "\n".join(lines)
    assert text.count(r"\begin{table*}") == 2 and text.count(r"\caption{Cap}") == 1
    assert text.index(r"\label{tab:x}") < text.index(r"Table~\ref{tab:x} (continued)")
    assert text.index("a note") > text.rindex(r"\begin{table*}")  # under the last float
    assert text.count(r"\begin{tabular}") == 3  # every tabular kept, in order
    bare = latex_float(tall, "Cap", "tab:x", "tabular", [])
    assert not any(line.startswith(r"\begin{table") for line in bare)  # the user's float


def test_diagnostics_latex_in_parts_of_four_columns(tmp_path):
    out = tmp_path / "tables"
    paths = write_tables(diagnostic_sweep(tmp_path / "sweep"), out)
    parts = [paths[n] for n in ("diagnostics_tex", *[f"diagnostics_{i}_tex" for i in (2, 3)])]
    assert sorted(out.glob("diagnostics*.tex")) == sorted(parts)  # 12 columns: 4 + 4 + 4
    first = parts[0].read_text()
    assert r"\label{tab:owdfa-diagnostics}" in first and "n = seeds per cell" in first
    assert r"Table~\ref{tab:owdfa-diagnostics}" in parts[1].read_text()
    assert "CAL (K unknown)" in first  # K folded into the method
    for part in parts:
        assert check_latex(part.read_text()) == []
        spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", part.read_text()).group(1)
        assert spec.startswith("lll") and len(spec) <= 3 + 4
    # a later aggregate with fewer diagnostic columns leaves no stale part behind
    write_tables(make_sweep(tmp_path / "old"), out)
    assert [p.name for p in sorted(out.glob("diagnostics*.tex"))] == [
        "diagnostics.tex",
        "diagnostics_2.tex",
    ]


def test_rerender_keeps_the_numbers_and_changes_the_latex(sweep, tmp_path, capsys):
    out = tmp_path / "tables"
    write_tables(sweep, out)
    before = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    assert cli_aggregate([str(out), "--rerender", "--no-plots", "--latex-env", "tabular"]) == 0
    after = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    for name in before:
        if name.endswith(".tex"):
            assert after[name] != before[name] and environment_of(after[name]) == "tabular"
        else:  # the Markdown tables (their numbers) and the CSVs are unchanged
            assert after[name] == before[name], name
    assert "rendered again" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_aggregate([str(out), "--rerender", "--ci"])


# --------------------------------------------------------------------------- LaTeX compiled
@pytest.fixture(scope="module")
def pdflatex() -> str:
    found = find_pdflatex()
    if found is None:
        pytest.skip(
            "pdflatex is absent and could not be installed (tests/latex/install.sh apt-gets "
            "texlive-latex-recommended as root)"
        )
    return found


def test_the_compile_check_sees_errors_and_tables_wider_than_the_text(pdflatex, tmp_path):
    fits = compile_table(r"\begin{tabular}{l}fits\end{tabular}", tmp_path / "ok", "table", pdflatex)
    assert fits.problems() == [] and fits.returncode == 0
    wide = r"\begin{tabular}{l}" + "word " * 100 + r"\end{tabular}"
    too_wide = compile_table(wide, tmp_path / "wide", "table", pdflatex)
    assert too_wide.errors == [] and too_wide.overfull_pt and too_wide.overfull_pt[0] > 100
    assert "wider than the text" in too_wide.problems()[0]
    broken = compile_table(r"\toprule", tmp_path / "broken", "table", pdflatex)  # no booktabs
    assert broken.returncode != 0 and "Undefined control sequence" in broken.problems()[0]


def compiled_problems(paths: dict[str, Path], build: Path, environment: str) -> dict[str, list]:
    """Every .tex of `paths` compiled in `environment`: file name -> its problems."""
    texs = sorted({p for name, p in paths.items() if name.endswith("_tex")})
    problems = {}
    for tex in texs:
        text = tex.read_text()
        assert environment_of(text) == environment
        compiled = compile_table(text, build / tex.stem, environment)
        problems[tex.name] = compiled.problems()
    return problems


@pytest.mark.parametrize("environment", LATEX_ENVIRONMENTS)
def test_every_latex_table_compiles_and_fits_the_text(environment, sweep, pdflatex, tmp_path):
    """The tables of the report fixtures, with every mark (dagger, approx), paper rows and
    diagnostics in parts: compiled by pdflatex with no error, nothing wider than the text."""
    marked = write_tables(
        sweep, tmp_path / "marked", compare_paper=True, ci=True, latex_env=environment
    )
    diagnostics = write_tables(
        diagnostic_sweep(tmp_path / "diag_sweep"), tmp_path / "diag", latex_env=environment
    )
    problems = compiled_problems(marked, tmp_path / "build_marked", environment)
    problems |= {
        f"diag/{name}": found
        for name, found in compiled_problems(
            diagnostics, tmp_path / "build_diag", environment
        ).items()
    }
    assert len(problems) == 4 + 5  # acc, nmi_ari, 2 + 3 diagnostics parts
    assert {name: found for name, found in problems.items() if found} == {}


@pytest.mark.parametrize(
    "tex", COMMITTED_TEX, ids=[p.relative_to(REPO).as_posix() for p in COMMITTED_TEX]
)
def test_committed_latex_tables_compile_and_fit_the_text(tex, pdflatex, tmp_path):
    text = tex.read_text()
    assert compile_table(text, tmp_path, environment_of(text), pdflatex).problems() == []


def test_committed_results_have_latex_tables():
    assert len(COMMITTED_TEX) >= 9  # the three synth folders: acc, nmi_ari, diagnostics (+ parts)


# --------------------------------------------------------------------------- diagnostics
def diagnostic_metrics(epoch: int, seed: int, known_gap: bool = True) -> dict:
    offset = 0.01 * (seed - 2025)
    values = {
        "conf_known": 0.9 - 0.01 * epoch + offset,
        "conf_novel": 0.5 + 0.05 * epoch,
        "pseudo_noise": 0.6 - 0.1 * epoch + offset,
        "pseudo_noise_confident": None,  # no row above the threshold
        "pseudo_confident_fraction": 0.0,
        "val_uncert": 0.3,
        "num_clusters": 4 + epoch,
        "real_acc": 0.95,
        "transductive_all_acc": 0.7,
        "transductive_gcd_v2_all_acc": 0.7,
        "transductive_gcd_v2_old_acc": 0.8 + offset,
        "transductive_gcd_v2_new_acc": 0.6,
    }
    if not known_gap:
        del values["conf_known"]
    return values


def with_diagnostic_history(record: dict, seed: int) -> dict:
    """`record` with 3 epochs of history carrying the per-epoch diagnostics."""
    record["history"] = [
        {"epoch": e, "metrics": {**record["metrics"], **diagnostic_metrics(e, seed)}}
        for e in range(3)
    ]
    return record


def diagnostic_sweep(root: Path) -> Path:
    """CAL K unknown with per-epoch diagnostics and a K curve over 3 epochs; CPL old-style."""
    for seed in SEEDS:
        record = with_diagnostic_history(make_record("cal", "p1", "unknown", seed), seed)
        record["metrics"] = record["history"][-1]["metrics"]
        record["k_curve"] = [30, 12, 6]
        write_record(root, record)
        write_record(root, make_record("cpl", "p1", "known", seed))
    return root


def test_diagnostics_table_and_old_records(tmp_path):
    paths = write_tables(diagnostic_sweep(tmp_path))
    md = paths["diagnostics_md"].read_text()
    header = md_row(md, "Method")
    for column in ("All NMI", "conf known - novel", "pseudo noise", "transd. New (GCD v2)"):
        assert column in header
    assert "pseudo noise (confident)" not in header  # null in every record: left out
    cal = dict(zip(header, md_row(md, "CAL")))
    last = [diagnostic_metrics(2, seed) for seed in SEEDS]
    gaps = [m["conf_known"] - m["conf_novel"] for m in last]
    assert cal["conf known - novel"] == f"{100 * np.mean(gaps):.1f} \u00b1 1.0"
    assert cal["K"] == "unknown" and cal["seeds"] == "3" and cal["REAL acc"].startswith("95.0")
    assert cal["transd. Old (GCD v2)"] == "81.0 \u00b1 1.0"
    cpl = dict(zip(header, md_row(md, "CPL")))
    assert cpl["pseudo noise"] == "\u2013" and cpl["All NMI"] != "\u2013"  # old records work
    assert cpl["wall s / run"] == "91"
    frame = pd.read_csv(paths["diagnostics"]).set_index("method")
    assert frame.loc["cal", "pseudo_noise_mean"] == pytest.approx(0.4 + 0.01)
    assert check_latex(paths["diagnostics_tex"].read_text()) == []
    assert "synthetic" in md.splitlines()[0].lower()

    # records without any diagnostic key still give a table (NMI, clusters, wall time)
    old = write_tables(make_sweep(tmp_path / "old"))["diagnostics_md"].read_text()
    assert "All NMI" in old and "pseudo noise" not in old


def test_diagnostics_figure_draws_epoch_curves_and_the_k_curve(tmp_path):
    sweep = diagnostic_sweep(tmp_path / "sweep")
    for seed in SEEDS:  # a K-known cell with diagnostics but no K curve
        write_record(sweep, with_diagnostic_history(make_record("mpsl", "p1", "known", seed), seed))
    curves = epoch_curves(load_records(sweep))
    k = curves[curves["curve"] == "k_estimated"].sort_values("epoch")
    assert k["value"].tolist() == [30, 12, 6]  # CAL's k_curve, mean over 3 seeds
    noise = curves[(curves["curve"] == "pseudo_noise") & (curves["method"] == "cal")]
    noise = noise.sort_values("epoch")
    assert noise["value"].tolist() == pytest.approx([0.61, 0.51, 0.41])
    fig = plot_diagnostics(curves, synthetic=True)
    assert "synthetic" in fig._suptitle.get_text()
    assert [ax.get_title() for ax in fig.axes][3].startswith("K estimated")
    # one legend names every cell, also MPSL, which has no K curve (the last panel's)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert sorted(legend) == ["CAL (K unknown)", "MPSL"]
    written = {p.name for p in write_plots(sweep, tmp_path / "plots")}
    assert {"diagnostics.png", "diagnostics.pdf"} <= written
    assert "synthetic" not in plot_diagnostics(curves, synthetic=False)._suptitle.get_text()


# --------------------------------------------------------------------------- plots
def test_family_order_groups_classes():
    labels, starts, families = family_order(CLASSES)
    assert labels == [0, 1, 3, 2, 4] and starts == [1, 3] and families == ["REAL", "S", "R"]


def test_plots_written_as_png_and_pdf(tmp_path):
    sweep = tmp_path / "sweep"
    for method in ("cal", "cpl"):
        for seed in SEEDS[:2]:
            write_record(sweep, make_record(method, "p1", "known", seed))
    written = write_plots(sweep, tmp_path / "plots")
    names = {p.name for p in written}
    assert names == {
        f"{stem}.{ext}"
        for stem in (
            "acc_bars",
            "confusion_cal_p1_k-known_seed-2025",
            "confusion_cpl_p1_k-known_seed-2025",
        )
        for ext in ("png", "pdf")
    }  # no history: no diagnostics figure
    assert all(p.stat().st_size > 1000 for p in written)


def test_accuracy_figure_is_a_text_width_wide_and_its_legend_hides_no_bar(tmp_path):
    """16 methods on P1, 3 of them on P2 too: panels stacked, the figure stays 7 in wide (it grew
    by 1.2 in per method and protocol), the legend sits outside every panel, nothing is cut."""
    sweep = tmp_path / "sweep"
    for i in range(16):
        for protocol in ("p1", "p2") if i < 3 else ("p1",):
            for seed in SEEDS:
                record = make_record("cal", protocol, "known", seed)
                record["method"] = record["config"]["method"]["name"] = f"method_{i:02d}"
                write_record(sweep, record)
    fig = plot_accuracy_bars(summarise(load_records(sweep)))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert [len(ax.get_xticks()) for ax in fig.axes] == [16, 3]  # each panel: its cells
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:  # the panel with its tick labels and title
        assert not legend.overlaps(ax.get_tightbbox(renderer))
    drawn, canvas_in = fig.get_tightbbox(renderer), fig.bbox_inches
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01  # in inches: nothing off the canvas
    assert drawn.x1 <= canvas_in.x1 + 0.01 and drawn.y1 <= canvas_in.y1 + 0.01

    (png,) = [p for p in write_plots(sweep, tmp_path / "plots") if p.name == "acc_bars.png"]
    with Image.open(png) as image:
        width_in, height_in = (pixels / 150 for pixels in image.size)
    assert 6.5 <= width_in <= 7.5 and 3.0 <= height_in <= 7.5


# --------------------------------------------------------------------------- W&B
def test_wandb_offline_aggregate_run_holds_the_table(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    sweep = tmp_path / "sweep"
    wandb_logger = {"name": "wandb", "project": "owdfa-bench", "entity": None, "mode": "offline"}
    for method in ("cal", "cpl"):
        for seed in SEEDS:
            record = make_record(method, "p1", "known", seed, logger=wandb_logger)
            write_record(sweep, record)
    paths = write_report(sweep, plots=True)  # auto: the runs logged to W&B offline
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert paths["wandb"] == run_dir
    (log_file,) = run_dir.glob("run-*.wandb")
    raw = wandb_log_holding(log_file, b"aggregate")
    assert b"aggregate" in raw and b"api_key" not in raw.lower()  # job_type, and no key

    (table_file,) = run_dir.glob("files/media/table/tables/acc_*.table.json")
    table = json.loads(table_file.read_text())
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    md = paths["acc_md"].read_text()
    # numbers that sort, mean and std apart: the same values as the Markdown table's cells
    cal_md = dict(zip(md_row(md, "Method"), md_row(md, "CAL")))
    for column in ("All", "Known", "Novel"):
        mean, std = cal_md[f"P1 {column}"].replace("*", "").split(" ± ")  # bold: the best
        metric = {"All": "all_acc", "Known": "known_acc", "Novel": "novel_acc"}[column]
        assert round(rows["CAL"][f"p1/{metric}/mean"], 1) == float(mean)
        assert round(rows["CAL"][f"p1/{metric}/std"], 1) == float(std)
        assert rows["CAL"][f"p1/{metric}/n"] == len(SEEDS)
    assert list(run_dir.glob("files/media/images/figures/acc_bars*.png"))

    # disabled, or a sweep that did not log to W&B (auto): no second run
    write_report(sweep, plots=False, wandb_mode="disabled")
    write_report(make_sweep(tmp_path / "csv_sweep"), plots=False)
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 1


# --------------------------------------------------------------------------- entry points
def test_cli_and_hydra_callback(sweep, tmp_path, capsys):
    assert cli_aggregate([str(sweep), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "CAL (K unknown)" in printed and "[failed]" in printed
    assert printed.count("Accuracy (%), mean") == 1  # the table is printed once
    (tmp_path / "empty").mkdir()
    assert cli_aggregate([str(tmp_path / "empty"), "--no-plots"]) == 1

    callback = AggregateCallback(plots=False, latex_env="table*")
    callback.on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nope")}}})
    )
    capsys.readouterr()
    copy = make_sweep(tmp_path / "copy")
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(copy)}}}))
    assert r"\begin{table*}" in (copy / "tables" / "acc.tex").read_text()
    assert (copy / "tables" / "diagnostics.md").is_file()
    assert capsys.readouterr().out.count("Accuracy (%), mean") == 1


def test_hydra_config_points_at_the_report_callback():
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "config.yaml")
    target = config.hydra.callbacks.aggregate._target_
    module, name = target.rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[name]), name) is AggregateCallback


STAGES = ["naming", "collect", "validate", "summarise", "paper", "render", "plots", "tracking"]


def test_report_stages_import_one_way():
    """Each stage imports only stages before it (main last), so there is no import circle."""
    package = Path(__file__).resolve().parents[1] / "owdfa_bench" / "report"
    order = [*STAGES, "main"]
    assert sorted(p.stem for p in package.glob("*.py")) == sorted([*order, "__init__"])
    for position, stage in enumerate(order):
        tree = ast.parse((package / f"{stage}.py").read_text())
        imported = {
            node.module.rsplit(".", 1)[-1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("owdfa_bench.report")
        }
        assert imported <= set(order[:position]), (stage, imported - set(order[:position]))
    init = ast.parse((package / "__init__.py").read_text())
    assert not [n for n in ast.walk(init) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_every_cell_of_a_full_sweep_gets_its_own_line_style():
    """15 methods plus unknown-K rows: the default colour cycle repeats after 10."""
    styles = [tuple(sorted(line_style(i).items())) for i in range(30)]
    assert len(set(styles)) == 30
