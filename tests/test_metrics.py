"""Metrics on hand-made predictions; every expected value is derived by hand in a comment."""

import math

import numpy as np
import pytest

from owdfa_bench.metrics import (
    METRIC_CONVENTION_NOTE,
    OWDFA_KEYS,
    cluster_acc,
    evaluate_predictions,
    hungarian_map,
)

# ----------------------------------------------------------------------------- cluster_acc


def test_cluster_acc_basic_permutation():
    # Counts w[pred, true]: pred 1 -> {0: 2}, pred 0 -> {1: 2, 2: 1}. Best matching 1->0, 0->1
    # (class 2 gets the empty id 2): 2 + 2 = 4 of 5 -> 0.8 (reference headline value).
    y_true = [0, 0, 1, 1, 2]
    y_pred = [1, 1, 0, 0, 0]
    assert cluster_acc(y_true, y_pred) == pytest.approx(0.8)
    assert hungarian_map(y_true, y_pred) == {1: 0, 0: 1}


def test_cluster_acc_tie():
    # Every (pred, true) cell holds 1 sample, so both matchings credit 2 of 4 -> 0.5.
    assert cluster_acc([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.5)


def test_cluster_acc_more_clusters_than_classes():
    # 7 clusters for 2 classes. Class 0 (3 samples) sits in singletons 0, 1, 2: at most 1 credited.
    # Class 1 (5 samples) sits in {3, 3}, 4, 5, 6: cluster 3 credits 2. The other 5 samples are in
    # unmatched clusters and count as errors: 3 / 8 = 0.375 (reference headline value).
    y_true = [0, 0, 0, 1, 1, 1, 1, 1]
    y_pred = [0, 1, 2, 3, 3, 4, 5, 6]
    assert cluster_acc(y_true, y_pred) == pytest.approx(0.375)
    mapping = hungarian_map(y_true, y_pred)
    assert mapping[3] == 1 and len(mapping) == 2  # only pairs that credit samples


def test_cluster_acc_prediction_ids_above_label_ids():
    # Ids 7 and 3 (D = 8) are matched to classes 0 and 1; every sample is credited.
    y_true = [0, 0, 1, 1, 1]
    y_pred = [7, 7, 3, 3, 3]
    assert cluster_acc(y_true, y_pred) == pytest.approx(1.0)
    assert hungarian_map(y_true, y_pred) == {7: 0, 3: 1}


def test_cluster_acc_accepts_integral_floats_and_rejects_bad_input():
    assert cluster_acc(np.array([0.0, 1.0]), np.array([1, 0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        cluster_acc([0, 1], [0])
    with pytest.raises(ValueError, match="negative"):
        cluster_acc([0, -1], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        cluster_acc([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match="integer"):
        cluster_acc([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="at least one sample"):
        cluster_acc([], [])


# ----------------------------------------------------------------------------- evaluate


def test_perfect_permuted_clustering_scores_one_except_direct_known_acc():
    # Known classes 0, 1 and novel 2, 3 are clustered perfectly but with swapped ids.
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    y_pred = np.array([1, 1, 0, 0, 3, 3, 2, 2])
    m = evaluate_predictions(y_true, y_pred, num_known=2)["metrics"]
    for key in OWDFA_KEYS:
        if key != "known_acc":
            assert m[key] == pytest.approx(1.0), key
    for key in ("gcd_v2_all_acc", "gcd_v2_old_acc", "gcd_v2_new_acc", "gcd_v1_all_acc"):
        assert m[key] == pytest.approx(1.0), key
    # Direct accuracy needs pred == y: every known sample is on the other known row.
    assert m["known_acc"] == pytest.approx(0.0)


def test_novel_on_known_id_credited_by_owdfa_not_by_gcd_v2():
    # num_known = 2. Novel class 2 is predicted onto known id 0.
    # Joint counts: pred 0 -> {0: 3, 2: 2}, pred 1 -> {1: 2}. Joint matching 0->0, 1->1; class 2
    # gets the empty id 2. all_acc = (3 + 2) / 7.
    # OW-DFA novel_acc: separate matching on y=[2, 2], pred=[0, 0] -> 1.0 (optimistic).
    # GCD v2 new: under the joint matching id 0 means class 0, so 0 of 2 -> 0.0.
    y_true = [0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 0]
    out = evaluate_predictions(y_true, y_pred, num_known=2)
    m = out["metrics"]
    assert m["all_acc"] == pytest.approx(5 / 7)
    assert m["known_acc"] == pytest.approx(1.0)
    assert m["novel_acc"] == pytest.approx(1.0)
    assert m["gcd_v2_new_acc"] == pytest.approx(0.0)
    assert m["gcd_v2_old_acc"] == pytest.approx(1.0)
    # v1: both separate matchings perfect -> 1.0; v2b: per class 1, 1, 0.
    assert m["gcd_v1_all_acc"] == pytest.approx(1.0)
    assert m["gcd_v2b_all_acc"] == pytest.approx(2 / 3)
    assert out["per_class_acc"] == pytest.approx([1.0, 1.0, 0.0])


def test_gcd_v1_weighted_all_differs_from_joint():
    # num_known = 2; 6 old samples, 4 new.
    # Old: y=[0,0,0,1,1,1], pred=[0,0,1,1,1,1]: separate matching 0->0 (2) + 1->1 (3) = 5/6;
    #      direct accuracy is also 5/6.
    # New: y=[2,2,3,3], pred=[1,1,5,5]: separate matching 1->2, 5->3 = 4/4.
    # v1 all = 0.6 * 5/6 + 0.4 * 1 = 0.9.
    # Joint counts: pred 0 -> {0: 2}, pred 1 -> {0: 1, 1: 3, 2: 2}, pred 5 -> {3: 2}.
    # Joint matching 0->0, 1->1, 5->3 (class 2 unmatched): 2 + 3 + 2 = 7/10.
    y_true = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    y_pred = [0, 0, 1, 1, 1, 1, 1, 1, 5, 5]
    m = evaluate_predictions(y_true, y_pred, num_known=2)["metrics"]
    assert m["gcd_v1_old_acc"] == pytest.approx(5 / 6)
    assert m["gcd_v1_new_acc"] == pytest.approx(1.0)
    assert m["gcd_v1_all_acc"] == pytest.approx(0.9)
    assert m["all_acc"] == m["gcd_v2_all_acc"] == pytest.approx(0.7)
    assert m["gcd_v2_old_acc"] == pytest.approx(5 / 6)
    assert m["gcd_v2_new_acc"] == pytest.approx(0.5)  # class 3 right, class 2 wrong
    assert m["known_acc"] == pytest.approx(5 / 6)
    assert m["novel_acc"] == m["gcd_v1_new_acc"]


def test_class_balanced_accuracy_on_imbalanced_classes():
    # num_known = 1: class 0 ("real") has 6 samples, novel classes 1 and 2 have 2 each.
    # Joint counts: pred 0 -> {0: 5, 2: 1}, pred 1 -> {0: 1, 1: 2}, pred 2 -> {2: 1}.
    # Identity matching: 5 + 2 + 1 = 8/10 = 0.8 (sample-weighted).
    # Per class: 5/6, 2/2, 1/2 -> v2b all = (5/6 + 1 + 1/2) / 3 = 7/9, old = 5/6, new = 3/4.
    y_true = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 0, 0, 1, 1, 1, 2, 0]
    out = evaluate_predictions(y_true, y_pred, num_known=1)
    m = out["metrics"]
    assert m["gcd_v2_all_acc"] == pytest.approx(0.8)
    assert m["gcd_v2b_all_acc"] == pytest.approx(7 / 9)
    assert m["gcd_v2b_old_acc"] == pytest.approx(5 / 6)
    assert m["gcd_v2b_new_acc"] == pytest.approx(3 / 4)
    assert out["per_class_acc"] == pytest.approx([5 / 6, 1.0, 0.5])


def test_no_novel_samples_gives_zero_novel_metrics():
    # Known only: y=[0,0,1,1], pred=[0,0,1,0] -> direct 3/4, joint matching 0->0, 1->1 = 3/4.
    m = evaluate_predictions([0, 0, 1, 1], [0, 0, 1, 0], num_known=2)["metrics"]
    for key in ("novel_acc", "novel_nmi", "novel_ari", "gcd_v2_new_acc", "gcd_v1_new_acc"):
        assert m[key] == 0.0, key
    assert m["known_acc"] == pytest.approx(0.75)
    assert m["all_acc"] == pytest.approx(0.75)
    assert m["gcd_v1_all_acc"] == pytest.approx(0.75)  # weight of the empty new subset is 0


def test_no_known_samples_gives_nan_known_acc():
    # Only novel classes 2, 3 (num_known = 2): direct accuracy is 0/0 as in the reference.
    m = evaluate_predictions([2, 2, 3], [5, 5, 6], num_known=2)["metrics"]
    assert math.isnan(m["known_acc"])
    assert math.isnan(m["gcd_v2_old_acc"])
    assert m["known_nmi"] == 1.0 and m["known_ari"] == 1.0  # sklearn on empty arrays
    assert m["novel_acc"] == pytest.approx(1.0)
    assert m["gcd_v1_all_acc"] == pytest.approx(1.0)


def test_known_mask_comes_from_num_known_not_max_label():
    # Same data, two num_known values: with 1 known class, label 1 becomes novel.
    # y=[0,0,1,1], pred=[0,0,0,0]: direct known acc on class 0 = 1.0 either way; with
    # num_known=2 the known subset also holds class 1 (0 of 2 right) -> 2/4.
    y_true, y_pred = [0, 0, 1, 1], [0, 0, 0, 0]
    assert evaluate_predictions(y_true, y_pred, 1)["metrics"]["known_acc"] == pytest.approx(1.0)
    assert evaluate_predictions(y_true, y_pred, 2)["metrics"]["known_acc"] == pytest.approx(0.5)
    # With num_known=1 the novel subset y=[1,1], pred=[0,0] is matched separately -> 1.0.
    assert evaluate_predictions(y_true, y_pred, 1)["metrics"]["novel_acc"] == pytest.approx(1.0)


def test_num_clusters_counts_non_empty_ids():
    # Ids used: 0, 3, 7 -> 3 clusters although the matrix has size 8.
    out = evaluate_predictions([0, 0, 1, 2], [0, 3, 7, 7], num_known=1)
    assert out["num_clusters"] == 3


def test_confusion_shape_trace_and_unmatched_column():
    # Over-clustered case of test_cluster_acc_more_clusters_than_classes: 3 of 8 credited.
    y_true = [0, 0, 0, 1, 1, 1, 1, 1]
    y_pred = [0, 1, 2, 3, 3, 4, 5, 6]
    out = evaluate_predictions(y_true, y_pred, num_known=1)
    confusion = np.array(out["confusion"])
    assert confusion.shape == (2, 3)  # 2 true labels x (2 classes + "unmatched")
    assert np.trace(confusion[:, :2]) == pytest.approx(out["metrics"]["all_acc"] * 8)
    assert confusion[:, -1].tolist() == [2, 3]  # 2 class-0 and 3 class-1 singletons unmatched
    assert confusion.sum() == 8
    assert out["per_class_acc"] == pytest.approx([1 / 3, 2 / 5])
    assert out["mapping"][3] == 1


def test_confusion_maps_predictions_through_joint_matching():
    # Same as the v1 case: joint mapping {0: 0, 1: 1, 5: 3}; class 2's samples sit in id 1,
    # which is matched to class 1, so they land in column 1 (not unmatched).
    y_true = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    y_pred = [0, 0, 1, 1, 1, 1, 1, 1, 5, 5]
    out = evaluate_predictions(y_true, y_pred, num_known=2)
    assert out["mapping"] == {0: 0, 1: 1, 5: 3}
    assert out["confusion"] == [
        [2, 1, 0, 0, 0],
        [0, 3, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [0, 0, 0, 2, 0],
    ]
    assert out["per_class_acc"] == pytest.approx([2 / 3, 1.0, 0.0, 1.0])


def test_per_class_acc_is_none_for_absent_labels():
    # Label 1 has no sample: its entry is None, and v2b averages over present classes only.
    out = evaluate_predictions([0, 0, 2], [0, 0, 2], num_known=1)
    assert out["per_class_acc"] == [1.0, None, 1.0]
    assert out["metrics"]["gcd_v2b_all_acc"] == pytest.approx(1.0)


def test_nmi_ari_penalise_merged_clusters():
    # All 4 samples in one cluster: NMI = 0 (no information) and ARI = 0 (chance level).
    m = evaluate_predictions([0, 0, 1, 1], [0, 0, 0, 0], num_known=1)["metrics"]
    assert m["all_nmi"] == pytest.approx(0.0)
    assert m["all_ari"] == pytest.approx(0.0)


def test_result_is_plain_and_complete():
    out = evaluate_predictions(np.array([0, 1, 2]), np.array([0, 1, 2]), num_known=2)
    assert set(OWDFA_KEYS) <= set(out["metrics"])
    assert all(type(v) is float for v in out["metrics"].values())
    assert all(type(k) is int and type(v) is int for k, v in out["mapping"].items())
    assert "OW-DFA" in METRIC_CONVENTION_NOTE


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError, match="no samples"):
        evaluate_predictions([], [], num_known=1)
    with pytest.raises(ValueError, match="num_known"):
        evaluate_predictions([0], [0], num_known=-1)
    with pytest.raises(TypeError, match="num_known"):
        evaluate_predictions([0], [0], num_known=1.5)
    with pytest.raises(ValueError, match="negative"):
        evaluate_predictions([0, -1], [0, 0], num_known=1)
