"""The recipes of docs/extending.md for extending the harness, run as written.

docs/extending.md holds code blocks whose first line is `# file: PATH` (a new file) or
`# append to: PATH`. This test copies the repository, applies every block, and runs each
recipe's check command in the copy (tiny data, smoke trainer).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_SYNTH, write_owdfa40_tree

RECIPES = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"```(?:python|yaml)\n(# (file|append to): (\S+)\n.*?)```", re.S)


def recipe_blocks() -> list[tuple[str, str, str]]:
    """(mode, path, text) of every block of docs/extending.md, in order."""
    text = RECIPES.read_text(encoding="utf-8")
    return [(mode, path, block) for block, mode, path in BLOCK.findall(text)]


def test_the_page_has_a_recipe_for_each_kind_of_extension():
    paths = [path for _, path, _ in recipe_blocks()]
    assert "methods/known_entropy.py" in paths and "conf/method/known_entropy.yaml" in paths
    assert "protocols/owdfa40.yaml" in paths and "conf/protocol/p4.yaml" in paths
    assert "owdfa_bench/metrics.py" in paths
    assert "owdfa_bench/data/my_lab.py" in paths and "conf/data/my_lab.yaml" in paths


@pytest.fixture(scope="module")
def extended_repo(tmp_path_factory) -> Path:
    """A copy of the repository with every recipe applied."""
    copy = tmp_path_factory.mktemp("recipes") / "repo"
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "outputs", "__pycache__", "*.egg-info", "build"
    )
    shutil.copytree(REPO, copy, symlinks=True, ignore=ignore)
    for mode, path, text in recipe_blocks():
        target = copy / path
        body = text.split("\n", 1)[1]  # without the `# file:` / `# append to:` line
        if mode == "file":
            assert not target.exists(), f"{path} already exists: the recipe would overwrite it"
            target.write_text(body)
        else:
            target.write_text(target.read_text() + body)
    return copy


# One process runs every recipe's check (one import of torch and Lightning instead of four):
# name -> the overrides of `python run.py ...` in docs/extending.md, plus tiny data.
DRIVER = """
import json, sys
from owdfa_bench.config import compose_config
from owdfa_bench.runner import run

cells = json.loads(sys.argv[1])
for name, overrides in cells.items():
    record = run(compose_config(overrides))
    print(name, record["status"], record.get("error"), flush=True)
"""


@pytest.fixture(scope="module")
def checks(extended_repo, tmp_path_factory) -> dict[str, dict]:
    """The record of each recipe's check command, run in the extended copy."""
    tmp = tmp_path_factory.mktemp("checks")
    synth = [f"data.root={tmp / 'synth'}", *TINY_SYNTH]
    my_lab = write_owdfa40_tree(tmp / "my_lab")
    common = ["trainer=smoke", "logger=none"]
    cells = {
        "method": ["method=known_entropy", *synth],
        "protocol": ["protocol=p4", "method=lower_bound", *synth],
        "metric": ["method=lower_bound", *synth],
        "data": [
            "data=my_lab",
            f"data.root={my_lab}",
            "method=lower_bound",
            "method.batch_size=16",
        ],
    }
    cells = {k: [*common, f"output_root={tmp / k}", *v] for k, v in cells.items()}
    cmd = [sys.executable, "-c", DRIVER, json.dumps(cells)]
    out = subprocess.run(cmd, cwd=extended_repo, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    records = {}
    for name in cells:
        (path,) = (tmp / name).glob("single/*/*/k-*/seed-*/results.json")
        records[name] = json.loads(path.read_text())
        assert records[name]["status"] == "complete", records[name].get("error")
    return records


def test_the_method_recipe_trains(checks):
    assert checks["method"]["method"] == "known_entropy" and checks["method"]["num_classes"] == 41


def test_the_protocol_recipe_trains_with_its_known_classes(checks):
    record = checks["protocol"]
    assert record["protocol"] == "p4" and record["num_known"] == 9
    assert sum(c["known"] for c in record["classes"]) == 9


def test_the_metric_recipe_reaches_every_evaluation(checks):
    record = checks["metric"]
    assert 0.0 <= record["metrics"]["known_macro_f1"] <= 1.0
    assert all("known_macro_f1" in h["metrics"] for h in record["history"])


def test_the_data_source_recipe_reads_its_folder(checks):
    record = checks["data"]
    assert record["data"] == "my_lab" and record["counts"]["test"] > 0
