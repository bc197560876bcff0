"""Mechanism diagnostics of every method, every epoch (CAL paper, Sec. 3 "Observations").

CAL motivates its design with two observations on open-world attribution: known classes are
predicted with much higher confidence than novel ones (Observation 1, confidence skew), and the
pseudo-labels a model would take from its own predictions on unlabelled rows are noisy, most of
all for novel classes (Observation 2). The harness measures both for every method:

* on the test split: `conf_known`, `conf_novel` (mean max-softmax confidence on known- and
  novel-class samples) and `val_uncert` = 1 - mean max-softmax, as the references' `val_stat`
  logs it (the `val_stat` of the CAL and CPL code);
* on the unlabelled *training* rows, against their hidden labels: `pseudo_noise`, the fraction
  wrong after one Hungarian matching over those rows; `pseudo_noise_confident`, the same among
  the rows the method would trust (confidence at or above its own threshold for the predicted
  side, `OWDFAMethod.confidence_thresholds`), and `pseudo_confident_fraction`, the share of
  rows that pass. The same predictions give the transductive accuracy the GCD papers report
  (all metric keys again, prefixed `transductive_`).

The hidden labels enter here only; no method receives them (tests/test_label_hiding.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from owdfa_bench.metrics import evaluate_predictions

TRANSDUCTIVE_PREFIX = "transductive_"


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def confidence_skew(confidence: np.ndarray, y_true: np.ndarray, num_known: int) -> dict[str, Any]:
    """`conf_known`, `conf_novel` and `val_uncert` of one evaluation of the test split."""
    confidence = np.asarray(confidence, dtype=np.float64)
    known = np.asarray(y_true) < num_known
    return {
        "conf_known": _mean_or_none(confidence[known]),
        "conf_novel": _mean_or_none(confidence[~known]),
        "val_uncert": float(1.0 - confidence.mean()) if confidence.size else None,
    }


def pseudo_label_noise(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    confidence: np.ndarray,
    thresholds: tuple[float, float],
    num_known: int,
) -> dict[str, Any]:
    """Noise of the pseudo-labels a method's predictions on unlabelled rows would give.

    `thresholds` = (known, novel): a row predicted as a known id (< num_known) is confident
    when its confidence reaches the first, otherwise the second. Returns the `pseudo_*` keys and
    every metric of `evaluate_predictions` prefixed `transductive_`.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    confidence = np.asarray(confidence, dtype=np.float64)
    result = evaluate_predictions(y_true, y_pred, num_known)
    lookup = np.full(int(y_pred.max()) + 1, -1, dtype=np.int64)
    for pred_id, true_id in result["mapping"].items():
        lookup[pred_id] = true_id
    wrong = lookup[y_pred] != y_true
    threshold = np.where(y_pred < num_known, thresholds[0], thresholds[1])
    confident = confidence >= threshold
    out: dict[str, Any] = {
        "pseudo_noise": float(wrong.mean()),
        "pseudo_noise_confident": _mean_or_none(wrong[confident].astype(np.float64)),
        "pseudo_confident_fraction": float(confident.mean()),
    }
    out.update({TRANSDUCTIVE_PREFIX + k: v for k, v in result["metrics"].items()})
    out[TRANSDUCTIVE_PREFIX + "num_clusters"] = result["num_clusters"]
    return out
