"""Mechanism diagnostics on hand-made predictions, and their place in every results.json."""

from __future__ import annotations

import numpy as np
import pytest

from owdfa_bench.diagnostics import confidence_skew, pseudo_label_noise
from owdfa_bench.runner import run

DIAGNOSTIC_KEYS = {
    "conf_known",
    "conf_novel",
    "val_uncert",
    "num_clusters",
    "pseudo_noise",
    "pseudo_noise_confident",
    "pseudo_confident_fraction",
    "transductive_all_acc",
    "transductive_gcd_v2_old_acc",
    "transductive_gcd_v2_new_acc",
}


def test_confidence_skew_splits_known_and_novel_samples():
    conf = np.array([0.9, 0.7, 0.4, 0.2])
    y = np.array([0, 1, 2, 3])  # two known classes (0, 1), two novel
    got = confidence_skew(conf, y, num_known=2)
    assert got["conf_known"] == pytest.approx(0.8)
    assert got["conf_novel"] == pytest.approx(0.3)
    assert got["val_uncert"] == pytest.approx(1 - 0.55)
    assert confidence_skew(conf[:2], y[:2], 2)["conf_novel"] is None


def test_pseudo_noise_uses_one_matching_and_the_method_thresholds():
    # truth 0 0 2 2 3 3; predictions 0 0 5 5 5 4 -> matching {0:0, 5:2, 4:3}: rows 4 wrong only
    y = np.array([0, 0, 2, 2, 3, 3])
    pred = np.array([0, 0, 5, 5, 5, 4])
    conf = np.array([0.99, 0.5, 0.9, 0.9, 0.96, 0.2])
    got = pseudo_label_noise(y, pred, conf, thresholds=(0.95, 0.85), num_known=2)
    assert got["pseudo_noise"] == pytest.approx(1 / 6)
    assert got["transductive_all_acc"] == pytest.approx(5 / 6)
    # confident: row 0 (known id, 0.99 >= 0.95) and rows 2, 3, 4 (novel ids, >= 0.85)
    assert got["pseudo_confident_fraction"] == pytest.approx(4 / 6)
    assert got["pseudo_noise_confident"] == pytest.approx(1 / 4)  # row 4 is the wrong one
    assert got["transductive_known_acc"] == pytest.approx(1.0)
    assert got["transductive_num_clusters"] == 3
    none = pseudo_label_noise(y, pred, conf * 0, thresholds=(0.95, 0.95), num_known=2)
    assert none["pseudo_noise_confident"] is None and none["pseudo_confident_fraction"] == 0.0


@pytest.mark.parametrize("method", ["cal", "cpl", "gcd"])
def test_every_history_entry_carries_the_diagnostics(make_cfg, method):
    fast_gcd = ["method.model.kmeans_n_init=2", "method.model.proj_out_dim=64"]
    extra = fast_gcd if method == "gcd" else []
    record = run(make_cfg(f"method={method}", *extra))
    assert record["status"] == "complete"
    for entry in record["history"]:
        assert set(entry["metrics"]) >= DIAGNOSTIC_KEYS, set(entry["metrics"])
    assert DIAGNOSTIC_KEYS | {"real_acc"} <= set(record["metrics"])
    assert 0.0 <= record["metrics"]["pseudo_noise"] <= 1.0
