"""Compare two records: floats within a tolerance, everything else exactly. Floats from two
separately built models or separate forward passes may differ in the last bits on some CPUs."""

from __future__ import annotations

import math
from typing import Any

TOLERANCE = 1e-6


def differences(want: Any, got: Any, where: str = "", tolerance: float = TOLERANCE) -> list[str]:
    """Where `got` differs from `want`: floats within `tolerance`, everything else exactly."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in want if k not in got]
        out += [f"{where}.{k}: unexpected" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += differences(want[k], got[k], f"{where}.{k}", tolerance)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: length {len(got)} != {len(want)}"]
        out = []
        for i, (a, b) in enumerate(zip(want, got)):
            out += differences(a, b, f"{where}[{i}]", tolerance)
        return out
    if is_float_pair(want, got):
        close = math.isclose(want, got, rel_tol=0, abs_tol=tolerance)
        return [] if close else [f"{where}: {got} != {want}"]
    return [] if want == got else [f"{where}: {got!r} != {want!r}"]


def is_float_pair(a: Any, b: Any) -> bool:
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    return numbers and (isinstance(a, float) or isinstance(b, float))
