"""The same records and tables come out of the harness as before a refactor.

`tests/data/golden_records.json` holds, for a tiny deterministic multirun (the tiny synthetic
set of `conftest.TINY_SYNTH`, trainer=smoke, seed 2025, logger=none), what each run computes:
metrics, history, confusion, per-class accuracy, counts, classes and the other result keys; and
the report's tables over the four runs. Timings, paths, the commit and package versions are
left out. This test reruns the cells and compares; floats with an absolute tolerance of 1e-6
(bit-for-bit is not promised across machines).

Regenerate (only when a change is meant to alter results, and say so in the commit):
    python tests/test_golden_records.py --write

The config hashes are those of 88adfe8 except CAL's: removing `method.model.plot_k_curve`
(methods do no I/O; the report draws the K curve) changed CAL's resolved config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from compare import differences

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "data" / "golden_records.json"
METHODS = ("lower_bound", "upper_bound", "cal", "cpl")
SEED = 2025
# What says where, when or with what a run was made, not what it computed.
VOLATILE_KEYS = {
    "wall_s",
    "setup_s",
    "train_images_per_s",
    "eval_images_per_s",
    "git_commit",
    "versions",
    "device",
    "config",
    "config_hash",
    "traceback",
    "error",
    "resumed",
    # the PNG bytes of the synthetic set depend on the zlib and OpenCV builds (its manifest
    # records the versions); the metrics pin the pixels
    "data_digest",
}
TABLES = ("acc.md", "nmi_ari.md")
SUMMARY_VOLATILE = ("wall_s", "train_images_per_s", "eval_images_per_s")
# A fixed stand-in for the machine paths, so the config hash can be compared across machines.
HASH_PATHS = ["data.root=/golden/synth", "output_root=/golden/outputs"]


def cell_overrides(method: str) -> list[str]:
    from conftest import TINY_SYNTH

    return [
        "trainer=smoke",
        "logger=none",
        "data=synth",
        f"method={method}",
        f"seed={SEED}",
        "sweep_name=golden",
        *TINY_SYNTH,
    ]


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE_KEYS}


def config_hash_of(method: str) -> str:
    from conftest import compose_config

    from owdfa_bench.records import config_hash
    from owdfa_bench.runner import apply_recipe

    return config_hash(apply_recipe(compose_config([*cell_overrides(method), *HASH_PATHS])))


def summary_rows(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    frame = pd.read_csv(path)
    frame = frame[[c for c in frame.columns if not c.startswith(SUMMARY_VOLATILE)]]
    return json.loads(frame.to_json(orient="records"))


def run_cells(synth_root: Path, output_root: Path) -> dict[str, Any]:
    """Run the four cells into one sweep folder, then the report's tables over it."""
    from conftest import compose_config

    from owdfa_bench.report.main import write_tables
    from owdfa_bench.runner import run

    records = {}
    for method in METHODS:
        cfg = compose_config(
            [*cell_overrides(method), f"data.root={synth_root}", f"output_root={output_root}"]
        )
        record = run(cfg)
        assert record["status"] == "complete", record.get("error")
        records[method] = comparable(json.loads(Path(cfg.run_dir, "results.json").read_text()))
    paths = write_tables(output_root / "golden", output_root / "tables")
    tables = {name: (output_root / "tables" / name).read_text() for name in TABLES}
    return {
        "records": records,
        "tables": tables,
        "summary": summary_rows(paths["summary"]),
        "config_hash": {m: config_hash_of(m) for m in METHODS},
    }


@pytest.mark.skipif(not GOLDEN.is_file(), reason="no golden records yet (--write makes them)")
def test_records_and_tables_match_the_golden_run(synth_root, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = run_cells(synth_root, tmp_path / "outputs")
    for part in ("records", "summary"):
        diff = differences(golden[part], got[part], part)
        assert not diff, f"{len(diff)} differences, e.g. " + "; ".join(diff[:10])
    for name in TABLES:
        assert got["tables"][name] == golden["tables"][name], name


def test_config_hash_of_an_unchanged_config_is_stable():
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else None
    if golden is None:
        pytest.skip("no golden records yet")
    assert {m: config_hash_of(m) for m in METHODS} == golden["config_hash"]


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(TESTS.parent))
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden_records.py --write")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_cells(Path(tmp) / "synth", Path(tmp) / "outputs")
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
