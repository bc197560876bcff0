"""How the report names, orders and marks cells: shared by every stage, importing none of them.

A cell is one (method, protocol, k) of a sweep. A method's printed name and its place in the
tables come from the `display` key of its config (`conf/method/<name>.yaml`):

    display: {name: "CAL", order: 80}

read from the resolved config inside each `results.json` first (what the run actually used),
then from `conf/method/<name>.yaml`, and last the method id itself (placed after every method
that has an order). A new method therefore appears in the tables without editing the report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from owdfa_bench import resources

CELL = ["method", "protocol", "k"]
MIN_SEEDS = 3  # cells with fewer complete seeds get a dagger in the tables
TEST_SELECTED = "best_on_test"  # the only selection rule whose numbers are marked
# Bounds are shown first and never bold: the upper bound sees the novel labels.
BOUND_METHODS = ("lower_bound", "upper_bound")
K_ORDER = {"known": 0, "unknown": 1}

DAGGER = "\u2020"  # fewer than MIN_SEEDS seeds
DDAGGER = "\u2021"  # checkpoint selected on the test set
NOT_SIGNIFICANT = "\u2248"  # --ci: not significantly different from the best row
PM = "\u00b1"
SYNTHETIC_NOTE = "synthetic data, not real deepfakes"

METHOD_CONF_DIR = resources.conf_dir() / "method"
# How tables print a Lightning precision; any other name is printed as it is.
PRECISION_LABELS = {
    "64-true": "fp64",
    "32-true": "fp32",
    "16-true": "fp16",
    "bf16-true": "bf16",
    "16-mixed": "fp16-mixed",
    "bf16-mixed": "bf16-mixed",
}
UNKNOWN_PRECISION = "unknown"  # a record that says nothing of its precision


@dataclass(frozen=True)
class Display:
    """Printed name and table position of a method (lower order = higher in the table)."""

    name: str
    order: float = math.inf


def display_from_config(config: Any) -> Display | None:
    """The `method.display` entry of a resolved run config, if it has a name."""
    method = config.get("method") if isinstance(config, Mapping) else None
    display = method.get("display") if isinstance(method, Mapping) else None
    if not isinstance(display, Mapping) or not display.get("name"):
        return None
    order = display.get("order")
    number = isinstance(order, int | float) and not isinstance(order, bool)
    return Display(str(display["name"]), float(order) if number else math.inf)


@cache
def display_from_conf(method: str, conf_dir: str | None = None) -> Display | None:
    """The `display` entry of `conf/method/<method>.yaml`, if the file has one."""
    path = Path(conf_dir) if conf_dir is not None else METHOD_CONF_DIR
    path = path / f"{method}.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return display_from_config({"method": config})


def display_for(method: Any, config: Any = None) -> Display:
    """Display of a method: the run's config, else its config file, else the method id."""
    return (
        display_from_config(config)
        or display_from_conf(str(method))
        or Display(str(method), math.inf)
    )


def natural_key(text: Any) -> list[Any]:
    """ "p10" after "p9": digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def protocol_key(protocol: Any) -> str:
    """`owdfa23_p1` -> `p1`: the protocol within its benchmark, as published tables name it."""
    return re.sub(r"^[a-z0-9]+_(?=p\d+$)", "", str(protocol))


def protocol_headers(protocols: Sequence[str]) -> list[str]:
    """Column-group titles: P1, P2, ... unless stripping the benchmark prefix would collide."""
    short = [protocol_key(p).upper() for p in protocols]
    return short if len(set(short)) == len(short) else [str(p).upper() for p in protocols]


def row_rank(method: Any, k: Any, order: float = math.inf) -> tuple[Any, ...]:
    """Sort key of a table row: display order, method id, then K known before K unknown."""
    return (order, str(method), K_ORDER.get(str(k), len(K_ORDER)), str(k))


def row_label(name: Any, k: Any) -> str:
    """`CAL`, `CAL (K unknown)`, or `CAL (k=...)` for any other K setting."""
    if str(k) == "known":
        return str(name)
    if str(k) == "unknown":
        return f"{name} (K unknown)"
    return f"{name} (k={k})"


def cell_name(method: Any, protocol: Any, k: Any) -> str:
    """How issues name a cell: `cal/p1/k=known`."""
    return f"{method}/{protocol}/k={k}"


def _precision_name(precision: Any) -> str:
    if precision is None or (isinstance(precision, float) and math.isnan(precision)):  # pandas NA
        return UNKNOWN_PRECISION
    return PRECISION_LABELS.get(str(precision), str(precision))


def precision_label(precisions: Iterable[Any]) -> str:
    """The precision of a cell from its runs' (Lightning names, None unknown): "fp32", or
    "mixed: bf16-mixed, fp32" when the seeds ran at different precisions."""
    labels = sorted({_precision_name(p) for p in precisions})
    if not labels:
        return UNKNOWN_PRECISION
    return labels[0] if len(labels) == 1 else "mixed: " + ", ".join(labels)
