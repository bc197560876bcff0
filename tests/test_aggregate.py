"""Aggregation of fabricated run records into tables, issues and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from owdfa_bench.aggregate import (
    PAPER_DIR,
    AggregateCallback,
    check_latex,
    cli_aggregate,
    load_records,
    summarise,
    validate,
    write_tables,
)
from owdfa_bench.plots import family_order, write_plots

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
LEVEL = {"cal": 0.85, "cpl": 0.70}


def metrics_for(method: str, protocol: str, k: str, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, len(method), int(protocol[1:]), len(k)])
    base = LEVEL[method] - (0.05 if protocol == "p2" else 0.0) - (0.05 if k == "unknown" else 0.0)
    names = ["all_acc", "known_acc", "novel_acc", "all_nmi", "all_ari", "novel_nmi", "novel_ari"]
    values = {name: float(base + rng.uniform(-0.03, 0.03)) for name in names}
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
) -> dict:
    synthetic = data == "synth"
    config = {
        "seed": seed,
        "split_seed": 2025,
        "data": {"name": data, "root": None},
        "protocol": {"name": protocol},
        "k": {"mode": k},
        "method": {"name": method, "optim": {"name": "adam", "lr": lr}},
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
    one-seed CAL K-unknown cell on p1."""
    for method in ("cal", "cpl"):
        for protocol in ("p1", "p2"):
            for seed in SEEDS:
                if (method, protocol, seed) == ("cpl", "p2", 2027):
                    continue
                status = "failed" if (method, protocol, seed) == ("cpl", "p1", 2026) else "complete"
                write_record(root, make_record(method, protocol, "known", seed, status, data))
    write_record(
        root, make_record("cal", "p2", "known", 2026, data=data), "cal/p2/k-known/seed-2026-again"
    )
    write_record(root, make_record("cal", "p1", "unknown", 2025, data=data))
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


def test_tables_layout_marks_and_caption(sweep, tables):
    md = tables["acc_md"].read_text()
    tex = tables["acc_tex"].read_text()
    caption = md.splitlines()[0]
    assert "Synthetic benchmark (data=synth)" in caption and "last epoch" in caption
    assert "Hungarian" in caption  # the metric convention is stated
    assert "CAL (K unknown)" in md and "CAL (K unknown)" in tex
    assert "\u2020" in md and r"^{\dagger}" in tex and "fewer than 3 seeds" in md

    summary = pd.read_csv(tables["summary"]).set_index(["method", "protocol", "k"])
    best = 100 * summary.loc[("cal", "p1", "known"), "all_acc_mean"]
    assert f"**{best:.1f}**" in md
    assert rf"\mathbf{{{best:.1f}}}" in tex
    cpl = 100 * summary.loc[("cpl", "p1", "known"), "all_acc_mean"]
    assert f"**{cpl:.1f}**" not in md

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


def test_real_data_caption_does_not_say_synthetic(tmp_path):
    for seed in SEEDS:
        write_record(tmp_path, make_record("cal", "p1", "known", seed, data="owdfa40"))
    paths = write_tables(tmp_path)
    for name in ("acc_md", "acc_tex", "nmi_ari_md"):
        assert "synthetic" not in paths[name].read_text().lower()
    assert "Data: owdfa40." in paths["acc_md"].read_text()


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


def test_compare_paper_on_synthetic_says_not_comparable(sweep, tmp_path):
    paths = write_tables(sweep, tmp_path / "out", compare_paper=True)
    caption = paths["acc_md"].read_text().splitlines()[0]
    assert "real owdfa40 data; not comparable" in caption


def test_check_latex_catches_malformed_tables():
    good = (
        "\\begin{table}\n\\begin{tabular}{l cc}\n\\toprule\n"
        " & \\multicolumn{2}{c}{P1} \\\\\nA & $1 \\pm 2$ & 3 \\\\\n\\bottomrule\n"
        "\\end{tabular}\n\\end{table}\n"
    )
    assert check_latex(good) == []
    assert any("spans 2 columns" in p for p in check_latex(good.replace("& 3 ", "")))
    assert any("brace" in p for p in check_latex(good.replace("{P1}", "{P1")))
    assert any("never closed" in p for p in check_latex(good.replace("\\end{table}\n", "")))
    assert any("unbalanced $" in p for p in check_latex(good.replace("$1", "1")))


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
    }
    assert all(p.stat().st_size > 1000 for p in written)


def test_cli_and_hydra_callback(sweep, tmp_path, capsys):
    assert cli_aggregate([str(sweep), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "CAL (K unknown)" in printed and "[failed]" in printed
    (tmp_path / "empty").mkdir()
    assert cli_aggregate([str(tmp_path / "empty"), "--no-plots"]) == 1

    callback = AggregateCallback(plots=False)
    callback.on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nope")}}})
    )
    copy = make_sweep(tmp_path / "copy")
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(copy)}}}))
    assert (copy / "tables" / "acc.tex").is_file()
