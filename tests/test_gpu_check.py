"""The GPU check script (`benchmarks/gpu_check.sh`): its CPU rehearsal end to end, and the
report it writes when steps fail or run out of time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO

STEPS = ("install", "cuda_tests", "prepare", "throughput", "e2e")


def load_helper():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_rehearsal_writes_every_figure(tmp_path):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        GPU_CHECK_WORK=str(tmp_path / "work"),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["ok"] is True
    steps = report["steps"]
    assert list(steps) == list(STEPS)
    # everything imports in this venv: nothing is installed
    assert steps["install"]["status"] == "skipped"
    tests = steps["cuda_tests"]
    assert tests["status"] == "ok"
    assert tests["figures"]["skipped"] >= 3 and tests["figures"]["passed"] == 0
    assert tests["figures"]["failed"] == tests["figures"]["errors"] == 0
    assert steps["prepare"]["figures"]["images"] > 0
    bench = steps["throughput"]
    assert bench["status"] == "ok"
    figures = bench["figures"]
    assert figures["settings"]["method"] == "cal" and figures["settings"]["channels_last"]
    cases = figures["cases"]
    assert set(cases) >= {"loader:0", "loader:2", "ceiling", "loader_bmp:2", "loader_only:2"}
    for case, f in cases.items():
        assert f["status"] == "ok" and f["images_per_s"] > 0, case
        assert f.get("gpu_util_mean") is None  # no nvidia-smi here
    assert set(figures["loader_ratios"]) == {"loader:0", "loader:2", "loader_bmp:2"}
    assert isinstance(figures["loader_bound"], bool)
    for key in ("limit_s", "seconds"):
        assert all(s[key] > 0 for s in steps.values() if s["status"] != "skipped"), key
    e2e = steps["e2e"]
    assert e2e["status"] == "ok" and e2e["figures"]["status"] == "complete"
    assert e2e["figures"]["trainer"]["accelerator"] == "cpu"
    record = json.loads((out / "cal_results.json").read_text())
    assert record["method"] == "cal" and record["status"] == "complete"
    assert (out / "gpu_check.log").stat().st_size > 0
    assert report["summary"]["status"] == {name: steps[name]["status"] for name in STEPS}
    assert report["machine"]["gpu"] is None


def test_report_keeps_each_steps_error_and_timeout(tmp_path):
    """A step that failed, one killed by its time limit, one never reached: the JSON says so."""
    helper = load_helper()
    steps, out = tmp_path / "steps", tmp_path / "out"
    steps.mkdir()
    out.mkdir()
    (steps / "install.rc").write_text("1\n")
    (steps / "install.log").write_text("pip: no matching distribution\nERROR: hydra-core\n")
    (steps / "cuda_tests.rc").write_text("124\n")
    (steps / "cuda_tests.log").write_text("collected 3 items\n")
    (steps / "cuda_tests.limit_s").write_text("120\n")
    (steps / "prepare.rc").write_text("skipped\n")
    (steps / "prepare.log").write_text("not run: 470 s budget spent\n")
    (steps / "throughput.rc").write_text("1\n")
    (steps / "throughput.json").write_text(
        json.dumps(
            {
                "cases": {
                    "loader:8": {"status": "ok", "images_per_s": 900.0},
                    "ceiling": {"status": "ok", "images_per_s": 1000.0},
                    "ceiling_benchmark": {"status": "failed", "error": "RuntimeError: x"},
                },
                **helper.ratios(
                    {"loader:8": {"images_per_s": 900.0}, "ceiling": {"images_per_s": 1000.0}}
                ),
            }
        )
    )
    report = helper.build_report(steps, out, "gpu", 12.0)
    got = report["steps"]
    assert got["install"]["status"] == "failed" and "hydra-core" in got["install"]["error"]
    assert got["cuda_tests"]["status"] == "timeout" and got["cuda_tests"]["limit_s"] == 120
    assert got["prepare"]["status"] == "skipped" and "budget" in got["prepare"]["error"]
    # only a diagnostic case failed: the required figures stand
    assert got["throughput"]["status"] == "ok"
    assert got["throughput"]["figures"]["loader_ratios"] == {"loader:8": 0.9}
    assert got["throughput"]["figures"]["loader_bound"] is False
    assert got["e2e"]["status"] == "not run"
    assert report["ok"] is False


def test_ratios_flag_a_loader_bound_run():
    helper = load_helper()
    cases = {
        "loader:8": {"images_per_s": 400.0},
        "loader:16": {"images_per_s": 700.0},
        "loader_bmp:16": {"images_per_s": 990.0},
        "ceiling": {"images_per_s": 1000.0},
    }
    got = helper.ratios(cases)
    assert got["loader_ratios"] == {"loader:8": 0.4, "loader:16": 0.7, "loader_bmp:16": 0.99}
    # the plain loader at its best worker count decides; the BMP variant is a diagnostic
    assert got["best_loader_ratio"] == 0.7 and got["loader_bound"] is True
