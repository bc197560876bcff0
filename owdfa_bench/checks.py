"""Range checks of values a user sets, each failing with one line: the key, the value and what
to do. The structured configs (`owdfa_bench/config.py`, `owdfa_bench/data/sources.py`) call them
from `__post_init__`; types are checked by OmegaConf when the config is composed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from owdfa_bench.errors import ConfigValueError


def fail(key: str, value: Any, need: str, example: str) -> None:
    raise ConfigValueError(f"{key}={value!r}: {need}; e.g. {key}={example}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer_at_least(key: str, value: Any, low: int, example: Any, optional: bool = False) -> None:
    """An integer >= low (or None when `optional`)."""
    if value is None and optional:
        return
    if not is_int(value) or value < low:
        fail(key, value, f"must be an integer >= {low}" + (" or null" if optional else ""), example)


def number_at_least(key: str, value: Any, low: float, example: Any, strict: bool = False) -> None:
    """A finite number >= low (> low when `strict`)."""
    need = f"must be a finite number {'>' if strict else '>='} {low}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        fail(key, value, need, example)
    if value < low or (strict and value == low):
        fail(key, value, need, example)


def fraction(
    key: str, value: Any, example: Any, zero: str | None = None, one: str | None = None
) -> None:
    """A number in [0, 1]; 0 refused where `zero` says what it would leave (e.g. "no test
    row"), 1 where `one` does."""
    interval = f"{'(' if zero else '['}0, 1{')' if one else ']'}"
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        fail(key, value, f"must be a fraction in {interval}", example)
    for end, leaves in ((0, zero), (1, one)):
        if leaves and value == end:
            fail(key, value, f"must be a fraction in {interval}: {end} leaves {leaves}", example)


def one_of(key: str, value: Any, options: Iterable[Any]) -> None:
    options = list(options)
    if value not in options:
        listed = ", ".join(str(o) for o in options)
        fail(key, value, f"must be one of {listed}", options[0])


def batch_limit(key: str, value: Any, if_zero: str) -> None:
    """Lightning's `limit_*_batches`: null (all), a batch count >= 1 or a fraction in (0, 1];
    `if_zero` says what none would do."""
    if value is None or (is_int(value) and value >= 1):
        return
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return
    need = f"must be null (all), a batch count >= 1 or a fraction in (0, 1] (with 0 {if_zero})"
    fail(key, value, need, 2)
