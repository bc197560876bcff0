"""Clustering and attribution metrics for OW-DFA, in two named conventions.

Predictions are class or cluster ids (argmax of the logits, or k-means ids); labels are contiguous
with the known classes first (``0..num_known-1``) and the novel classes after. The known/novel
split always comes from the explicit ``num_known``, never from the largest label seen.

Two conventions are in use in the literature and give different numbers on the same predictions,
so every key says which one it belongs to:

* **OW-DFA convention** (keys ``all_acc``, ``known_acc``, ``novel_acc``, ``*_nmi``, ``*_ari``;
  :data:`OWDFA_KEYS`). This is what the CAL, CPL and CDAL code computes (``val_stat``, inherited
  from ORCA) and what their papers report:

  - ``all_acc``: Hungarian accuracy over all samples (one joint matching);
  - ``known_acc``: *direct* accuracy ``mean(pred == y)`` on known-class samples, with no matching,
    so the model must put a known sample on the output row of its class;
  - ``novel_acc``: Hungarian accuracy on novel-class samples with a *separate* matching, in which a
    novel class may be matched to any output id, including a known one (optimistic);
  - NMI (sklearn default, arithmetic normalisation) and ARI on all, known and novel samples.

* **GCD conventions** (keys prefixed ``gcd_``), as in the generalized-category-discovery and
  SimGCD code, with "old" = known and "new" = novel:

  - ``gcd_v2_*``: one joint Hungarian matching over all samples; All / Old / New are read off it
    (a novel sample predicted onto a known class's output is wrong). ``gcd_v2_all_acc`` always
    equals ``all_acc``;
  - ``gcd_v1_*``: separate matchings on old and new samples; All is their mean weighted by the
    share of old samples. ``gcd_v1_new_acc`` always equals ``novel_acc``;
  - ``gcd_v2b_*``: class-balanced variant of v2, the mean per-class accuracy under the joint
    matching (useful on OWDFA-40, where the real class dominates).

A table must say in its caption which convention it shows (see :data:`METRIC_CONVENTION_NOTE`).

Edge cases, as in the reference code: with no novel sample, ``novel_acc/nmi/ari`` are 0.0; with no
known sample, ``known_acc`` is NaN (0/0) and sklearn returns 1.0 for ``known_nmi/ari``. The GCD
blocks follow the same rule (empty new subset -> 0.0, empty old subset -> NaN), and the v1 All
weights an empty subset by zero. Hungarian accuracy uses a square contingency matrix, so when there
are more clusters than classes the unmatched clusters count as errors; ``num_clusters`` (the
number of non-empty predicted ids) should be reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

OWDFA_KEYS: tuple[str, ...] = (
    "all_acc",
    "known_acc",
    "novel_acc",
    "all_nmi",
    "all_ari",
    "known_nmi",
    "known_ari",
    "novel_nmi",
    "novel_ari",
)

METRIC_CONVENTION_NOTE = (
    "OW-DFA convention (as in the CAL/CPL code): All ACC uses one Hungarian matching over all "
    "test samples, Known ACC is direct accuracy without matching, and Novel ACC uses a separate "
    "Hungarian matching on novel-class samples only (not the GCD v2 metric)."
)


# Metrics added by name (`register_metric`): (y_true, y_pred, num_known) -> float, computed on the
# same predictions by `evaluate_predictions`, so they reach results.json, the logger and the
# report's summary.csv like every built-in key.
EXTRA_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {}


def register_metric(name: str):
    """Decorator: add `fn(y_true, y_pred, num_known) -> float` to every evaluation as `name`."""

    def add(fn: Callable[[np.ndarray, np.ndarray, int], float]):
        if name in EXTRA_METRICS and EXTRA_METRICS[name] is not fn:
            raise ValueError(f"metric {name!r} is registered twice; give it another name")
        EXTRA_METRICS[name] = fn
        return fn

    return add


def _as_labels(values: Any, name: str) -> np.ndarray:
    """1-D non-negative int64 array from an array-like, or a clear error."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one id per sample), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer ids; got non-integer values")
    elif arr.size and arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer ids; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(
            f"{name} contains negative ids (min {arr.min()}); evaluation needs the true label of "
            "every sample and predictions as class/cluster ids >= 0 (unlabelled -1 is not allowed)"
        )
    return arr


def _checked_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true and y_pred must have the same length, got {y_true.size} and {y_pred.size}"
        )
    return y_true, y_pred


def _contingency(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Square counts ``w[pred, true]`` of size D = max(max pred, max true) + 1."""
    size = int(max(y_pred.max(), y_true.max())) + 1
    counts = np.bincount(y_pred * size + y_true, minlength=size * size)
    return counts.reshape(size, size)


def _match(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[dict[int, int], int]:
    """Hungarian matching maximising matched samples: ({pred: true} with overlap > 0, matched)."""
    counts = _contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    matched = counts[rows, cols]
    # Pairs with zero overlap are arbitrary completions of the permutation (a dummy row or column
    # of the square matrix, or a tie at zero); they credit no sample, so they are left out.
    mapping = {int(p): int(t) for p, t, n in zip(rows, cols, matched) if n > 0}
    return mapping, int(matched.sum())


def hungarian_map(y_true: Any, y_pred: Any) -> dict[int, int]:
    """Predicted id -> true label under the Hungarian matching that maximises matched samples.

    Only pairs that credit at least one sample are returned; a predicted id absent from the
    mapping is unmatched (all its samples count as errors).
    """
    y_true, y_pred = _checked_pair(y_true, y_pred)
    if y_true.size == 0:
        return {}
    return _match(y_true, y_pred)[0]


def cluster_acc(y_true: Any, y_pred: Any) -> float:
    """Hungarian (clustering) accuracy: best one-to-one matching of predicted ids to labels.

    The contingency matrix is square (size max(max pred, max true) + 1), so with more clusters
    than classes the clusters left without a class count as errors.
    """
    y_true, y_pred = _checked_pair(y_true, y_pred)
    if y_true.size == 0:
        raise ValueError("cluster_acc needs at least one sample (got empty arrays)")
    return _match(y_true, y_pred)[1] / y_true.size


def _mapped_predictions(y_pred: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Each prediction replaced by its matched class, or -1 when its cluster is unmatched."""
    lookup = np.full(int(y_pred.max()) + 1, -1, dtype=np.int64)
    for pred_id, true_id in mapping.items():
        lookup[pred_id] = true_id
    return lookup[y_pred]


def _mean_or(values: np.ndarray, empty: float) -> float:
    return float(np.mean(values)) if values.size else empty


def evaluate_predictions(y_true: Any, y_pred: Any, num_known: int) -> dict[str, Any]:
    """All metrics of one evaluation, in the OW-DFA and GCD conventions (see module docstring).

    Returns ``{"metrics": {...}, "num_clusters", "per_class_acc", "confusion", "mapping"}``:

    * ``metrics``: flat dict of floats in [0, 1] (``known_acc`` and ``gcd_*_old_acc`` are NaN when
      there is no known sample);
    * ``num_clusters``: number of distinct predicted ids (non-empty clusters);
    * ``per_class_acc``: index = true label 0..max label; accuracy of that class under the joint
      matching, ``None`` for labels without samples;
    * ``confusion``: rows = true label 0..max label, columns = the class each prediction is matched
      to by the joint matching, plus a last "unmatched" column; its trace is ``all_acc * N``;
    * ``mapping``: the joint matching, predicted id -> true label (pairs that credit samples).
    """
    y_true, y_pred = _checked_pair(y_true, y_pred)
    if y_true.size == 0:
        raise ValueError("evaluate_predictions got no samples; the evaluation split is empty")
    if isinstance(num_known, bool) or not isinstance(num_known, (int, np.integer)):
        raise TypeError(f"num_known must be an int, got {type(num_known).__name__}")
    if num_known < 0:
        raise ValueError(f"num_known must be >= 0, got {num_known}")
    num_known = int(num_known)
    n_samples = y_true.size
    is_known = y_true < num_known
    is_novel = ~is_known
    n_known, n_novel = int(is_known.sum()), int(is_novel.sum())

    # ---- joint matching: OW-DFA All ACC, GCD v2 and v2b, confusion, per-class accuracy
    mapping, all_matched = _match(y_true, y_pred)
    mapped = _mapped_predictions(y_pred, mapping)
    correct = mapped == y_true

    num_labels = int(y_true.max()) + 1
    unmatched_col = num_labels
    cols = np.where(mapped >= 0, mapped, unmatched_col)
    confusion = np.bincount(
        y_true * (num_labels + 1) + cols, minlength=num_labels * (num_labels + 1)
    ).reshape(num_labels, num_labels + 1)
    class_sizes = confusion.sum(axis=1)
    has_samples = class_sizes > 0
    class_acc = np.divide(
        np.diag(confusion[:, :num_labels]).astype(np.float64),
        class_sizes,
        out=np.zeros(num_labels),
        where=has_samples,
    )
    label_ids = np.arange(num_labels)
    known_classes = has_samples & (label_ids < num_known)
    novel_classes = has_samples & (label_ids >= num_known)

    # ---- separate matchings on each subset: OW-DFA Novel ACC, GCD v1
    known_sep = cluster_acc(y_true[is_known], y_pred[is_known]) if n_known else float("nan")
    novel_sep = cluster_acc(y_true[is_novel], y_pred[is_novel]) if n_novel else 0.0
    # Weighted by subset share; an empty subset has weight 0 (so its NaN/0.0 never leaks in).
    v1_all = sum(
        n / n_samples * acc for n, acc in ((n_known, known_sep), (n_novel, novel_sep)) if n
    )

    yk, pk = y_true[is_known], y_pred[is_known]
    yn, pn = y_true[is_novel], y_pred[is_novel]
    metrics = {
        # OW-DFA convention (CAL/CPL `val_stat`)
        "all_acc": all_matched / n_samples,
        "known_acc": _mean_or(pk == yk, float("nan")),
        "novel_acc": novel_sep,
        "all_nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "all_ari": float(adjusted_rand_score(y_true, y_pred)),
        # sklearn gives 1.0 on empty arrays, which is what the reference reports then.
        "known_nmi": float(normalized_mutual_info_score(yk, pk)),
        "known_ari": float(adjusted_rand_score(yk, pk)),
        "novel_nmi": float(normalized_mutual_info_score(yn, pn)) if n_novel else 0.0,
        "novel_ari": float(adjusted_rand_score(yn, pn)) if n_novel else 0.0,
        # GCD v2: one joint matching, Old/New read off it
        "gcd_v2_all_acc": all_matched / n_samples,
        "gcd_v2_old_acc": _mean_or(correct[is_known], float("nan")),
        "gcd_v2_new_acc": _mean_or(correct[is_novel], 0.0),
        # GCD v1: separate matchings, All = share-weighted mean
        "gcd_v1_all_acc": float(v1_all),
        "gcd_v1_old_acc": known_sep,
        "gcd_v1_new_acc": novel_sep,
        # GCD v2b: class-balanced mean under the joint matching
        "gcd_v2b_all_acc": _mean_or(class_acc[has_samples], 0.0),
        "gcd_v2b_old_acc": _mean_or(class_acc[known_classes], float("nan")),
        "gcd_v2b_new_acc": _mean_or(class_acc[novel_classes], 0.0),
    }
    for name, fn in EXTRA_METRICS.items():
        metrics[name] = float(fn(y_true, y_pred, num_known))
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "num_clusters": int(np.unique(y_pred).size),
        "per_class_acc": [
            float(a) if present else None for a, present in zip(class_acc, has_samples)
        ],
        "confusion": confusion.tolist(),
        "mapping": mapping,
    }
