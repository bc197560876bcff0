"""Openworld-GAN's stages (methods/openworld_gan.py) on tiny hand-made inputs: the WTA hash,
the OOD threshold and test, attribution, k-means, merging, refinement, the label map of
discovered classes, the class weights and the round schedule. The generic tests
(test_methods.py, test_resume.py, ...) run the method end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.openworld_gan import (
    DiscoveryConfig,
    add_clusters,
    attribute,
    cap_discovered,
    compact_discovered,
    discover,
    head_capacity,
    histogram_threshold,
    inverse_frequency_weights,
    kmeans_distance_seeded,
    merge_from,
    nearest_centre_components,
    pairwise_distance_histogram,
    refine,
    refine_keeps,
    round_lr_factor,
    round_of,
    round_starts_of,
    standardize,
    svm_member_predictions,
    top_quantile,
    training_targets,
    weighted_masked_ce,
    wta_codes,
    wta_in_distribution,
    wta_onehot,
    wta_windows,
)
from owdfa_bench.method import Problem


def same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return all(len(set(b[a == v])) == 1 for v in set(a)) and len(set(a)) == len(set(b))


# ----------------------------------------------------------------------------- OOD
def test_wta_codes_take_the_first_largest_of_each_window_and_distance_counts_disagreements():
    x = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 5.0]])
    windows = torch.tensor([[0, 1], [2, 1], [1, 2]])
    codes = wta_codes(x, windows)
    # row 0: (3,1) -> 0, (2,1) -> 0, (1,2) -> 1; row 1: (1,5) -> 1, (5,5) tie -> 0, (5,5) -> 0
    assert codes.tolist() == [[0, 0, 1], [1, 0, 0]]
    h = wta_onehot(codes, 2)
    assert h.shape == (2, 6)
    assert 3 - float(h[0] @ h[1]) == 2  # they disagree on hashes 0 and 2


def test_wta_windows_are_distinct_dims_of_a_seeded_permutation():
    w = wta_windows(64, 5, 2, torch.Generator().manual_seed(0))
    assert w.shape == (64, 2) and bool((w[:, 0] != w[:, 1]).all()) and int(w.max()) < 5
    assert torch.equal(w, wta_windows(64, 5, 2, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="window_size"):
        wta_windows(4, 2, 3)


def test_top_quantile_is_the_official_int_rounded_kth_largest():
    # int(n * (1 - 0.9)) with 1 - 0.9 = 0.0999...: 10 values -> 0 -> at least 1 -> the largest
    assert top_quantile(torch.arange(10.0), 0.9) == 9.0
    assert top_quantile(torch.arange(20.0), 0.9) == 19.0  # int(1.999...) = 1
    assert top_quantile(torch.arange(100.0), 0.9) == 91.0  # int(9.999...) = 9: 9th largest


def test_threshold_from_the_histogram_equals_the_official_rule_on_all_ordered_pairs():
    codes = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]])
    h = wta_onehot(codes, 2)
    dist = 3 - (h @ h.t())  # every ordered pair, self-pairs (0) included: 16 values
    hist = pairwise_distance_histogram(h, 3)
    assert hist.tolist() == torch.bincount(dist.flatten().long(), minlength=4).tolist()
    for frac in (0.9, 0.5, 0.2):
        assert histogram_threshold(hist, "quantiles", frac) == top_quantile(dist, frac)
    mean_std = histogram_threshold(hist, "mean_std", 1.0)
    assert mean_std == pytest.approx(float(dist.mean() + dist.std()))


def test_in_distribution_is_a_mean_distance_strictly_below_the_threshold():
    ref = wta_onehot(torch.tensor([[0, 0, 0], [0, 0, 1]]), 2)
    # pairs (self included): 0, 1, 1, 0 -> int(4 * 0.0999...) = 0 -> the largest: 1
    assert histogram_threshold(pairwise_distance_histogram(ref, 3), "quantiles", 0.9) == 1.0
    queries = wta_onehot(torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 1]]), 2)
    # mean distances: (0 + 1) / 2 = 0.5, (3 + 2) / 2 = 2.5, (2 + 1) / 2 = 1.5
    assert wta_in_distribution(ref, queries, 3, 1.0).tolist() == [True, False, False]
    assert wta_in_distribution(ref, queries, 3, 0.5).tolist() == [False, False, False]
    assert wta_in_distribution(ref, queries, 3, 2.0).tolist() == [True, False, True]


def test_standardize_uses_the_reference_rows_population_std_and_keeps_constant_dims():
    train = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    other = torch.tensor([[4.0, 3.0]])
    a, b = standardize(train, other)
    assert a.tolist() == [[-1.0, 0.0], [1.0, 0.0]]  # mean (1, 1), std (1, 0 -> scale 1)
    assert b.tolist() == [[3.0, 2.0]]
    _, c = standardize(train, other, kind="min_max")
    assert c.tolist() == [[2.0, 2.0]]  # min (0, 1), range (2, 0 -> 1)


def test_attribution_takes_the_prediction_only_for_undiscovered_in_distribution_rows():
    labels = torch.tensor([-1, -1, -1, -1, 5, 2])
    predicted = torch.tensor([1, 6, 1, 6, 1, 1])
    in_known = torch.tensor([True, True, False, False, True, True])
    in_disc = torch.tensor([False, True, False, True, True, True])
    out = attribute(labels, predicted, in_known, in_disc, num_known=4)
    # row 0: known & predicted known; row 1: predicted 6, in a discovered class; row 2: OOD;
    # row 3: discovered; rows 4, 5 keep their labels
    assert out.tolist() == [1, 6, -1, 6, 5, 2]


# ----------------------------------------------------------------------------- clustering
def test_kmeans_seeding_by_distance_separates_an_outlier_and_is_seeded():
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0]])
    for seed in range(5):
        a = kmeans_distance_seeded(x, 2, 300, torch.Generator().manual_seed(seed))
        assert same_partition(a, [0, 0, 0, 1])
    blobs = torch.cat([torch.randn(20, 2) * 0.1, torch.randn(20, 2) * 0.1 + 5])
    a = kmeans_distance_seeded(blobs, 2, 300, torch.Generator().manual_seed(1))
    b = kmeans_distance_seeded(blobs, 2, 300, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and same_partition(a, [0] * 20 + [1] * 20)


def test_new_clusters_are_numbered_after_the_existing_ids_and_small_ones_dropped():
    labels = torch.tensor([-1, 0, -1, -1, 5])
    rows = torch.tensor([True, False, True, True, False])
    assignment = torch.tensor([2, 0, 2])  # cluster 1 is empty
    assert add_clusters(labels, rows, assignment, 6).tolist() == [7, 0, 6, 7, 5]
    assert add_clusters(labels, rows, assignment, 6, min_size=2).tolist() == [6, 0, -1, 6, 5]


def test_compact_renumbers_discovered_ids_in_order_and_keeps_known_ones():
    labels = torch.tensor([-1, 0, 7, 9, 7, 2])
    assert compact_discovered(labels, 3).tolist() == [-1, 0, 3, 4, 3, 2]


# ----------------------------------------------------------------------------- merge
def test_strong_components_merge_mutual_nearest_centres_weak_ones_whole_chains():
    features = np.array([[0.0], [1.0], [10.0], [11.0], [30.0]])  # one row per cluster
    ids = np.arange(5)
    # nearest: 0 <-> 1, 2 <-> 3, 4 -> 3
    assert same_partition(nearest_centre_components(features, ids, "strong"), [0, 0, 1, 1, 2])
    assert same_partition(nearest_centre_components(features, ids, "weak"), [0, 0, 1, 1, 1])


def test_merge_acts_on_ids_from_first_id_and_only_with_more_than_two_clusters():
    features = np.array([[0.0], [0.5], [1.0], [10.0], [11.0], [30.0], [-50.0]])
    labels = np.array([3, 3, 4, 5, 6, 7, 0])  # id 0 is a known class: never merged
    out = merge_from(features, labels, 3)
    # centres 3: 0.25, 4: 1, 5: 10, 6: 11, 7: 30 -> {3, 4}, {5, 6}, {7}
    assert out[-1] == 0 and same_partition(out[:-1], [0, 0, 0, 1, 1, 2])
    assert set(out[:-1]) == {3, 4, 5}
    two = np.array([3, 3, 4, 0])
    assert merge_from(features[:4], two, 3).tolist() == two.tolist()


# ----------------------------------------------------------------------------- refine
def test_refine_rule_needs_purity_above_and_positives_above_the_floors():
    assert refine_keeps(60, 100, 0.5, 50)
    assert not refine_keeps(50, 100, 0.5, 10)  # purity 0.5 is not above 0.5
    assert not refine_keeps(60, 100, 0.5, 60)  # 60 positives is not above 60


def test_refine_drops_impure_classes_removes_negative_members_and_renumbers():
    labels = np.array([3, 3, 3, 4, 4, -1, 0, 5, 5])
    positive = {
        3: np.array([True, True, False]),
        4: np.array([False, False]),
        5: np.array([True, True]),
    }
    out, stats = refine(labels, positive, num_known=3, purity=0.5, min_size=1)
    # 3: 2/3 > 0.5 and 2 > 1: kept, its negative row out; 4: dropped; 5 kept -> renumbered 4
    assert out.tolist() == [3, 3, -1, -1, -1, -1, 0, 4, 4]
    assert stats == {"refine_kept": 2, "refine_dropped": 1, "refine_rows_removed": 3}


def test_svm_predicts_separable_classes_positive_and_a_lone_class_all_positive():
    rng = np.random.RandomState(0)
    features = np.concatenate(
        [rng.randn(10, 4) * 0.1, rng.randn(10, 4) * 0.1 + 3, rng.randn(10, 4) * 0.1 - 3]
    )
    labels = np.array([0] * 10 + [3] * 10 + [4] * 10)
    pred = svm_member_predictions(features, labels, num_known=3)
    assert set(pred) == {3, 4} and all(p.all() for p in pred.values())
    bounded = svm_member_predictions(features, labels, num_known=3, max_rows=15)
    assert all(p.all() for p in bounded.values())
    alone = svm_member_predictions(features, np.array([-1] * 20 + [3] * 10), num_known=3)
    assert alone[3].all()


def test_the_head_bound_keeps_the_largest_discovered_classes():
    labels = np.array([3, 3, 3, 4, 5, 5, 0, -1])
    out, dropped = cap_discovered(labels, num_known=3, capacity=2)
    assert out.tolist() == [3, 3, 3, -1, 4, 4, 0, -1] and dropped == 1
    same, none = cap_discovered(labels, num_known=3, capacity=3)
    assert same.tolist() == labels.tolist() and none == 0


# ----------------------------------------------------------------------------- one round
def test_one_discovery_attributes_known_rows_and_finds_the_two_novel_groups():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=gen) * 3  # classes 0, 1 known; 2, 3 novel

    def rows(c: int, n: int) -> torch.Tensor:
        return means[c] + 0.05 * torch.randn(n, 16, generator=gen)

    train = torch.cat([rows(0, 20), rows(1, 20)])
    train_y = torch.tensor([0] * 20 + [1] * 20)
    features = torch.cat([rows(0, 10), rows(2, 15), rows(3, 15)])
    predicted = torch.tensor([0] * 10 + [1] * 30)  # the novel rows look known to the classifier
    labels = torch.full((40,), -1)
    cfg = DiscoveryConfig(num_hashes=256, num_clusters=2, refine_min_size=5)
    out, stats = discover(train, train_y, features, predicted, labels, 2, 10, cfg, seed=0)
    assert out[:10].tolist() == [0] * 10  # in-distribution to class 0 and predicted 0
    assert same_partition(out[10:], [2] * 15 + [3] * 15) and set(out[10:].tolist()) == {2, 3}
    assert stats["attributed_known"] == 10 and stats["ood"] == 30
    assert stats["clusters_found"] == 2 and stats["discovered"] == 2
    assert stats["classes_added"] == 2 and stats["rows_discovered"] == 30
    # a second round: the discovered rows stay, nothing left to cluster
    again, stats2 = discover(train, train_y, features, out, out, 2, 10, cfg, seed=1)
    assert torch.equal(again, out) and stats2["classes_added"] == 0
    # a head with room for one discovered class keeps one
    capped, stats3 = discover(train, train_y, features, predicted, labels, 2, 1, cfg, seed=0)
    assert stats3["capped"] == 1 and set(capped[10:].tolist()) == {-1, 2}


# ----------------------------------------------------------------------------- training
def test_training_targets_map_unlabelled_rows_to_their_discovered_class():
    y = torch.tensor([1, 0, -1, -1, -1])
    labelled = torch.tensor([True, True, False, False, False])
    index = torch.tensor([0, 2, 4, 5, 3])  # 3 labelled rows in the merged set: 3.. unlabelled
    row_label = torch.tensor([4, 1, -1])  # unlabelled rows 0, 1, 2 (merged 3, 4, 5)
    assert training_targets(y, labelled, index, row_label, 3, 3).tolist() == [1, 0, -1, -1, 4]
    assert training_targets(y, labelled, index, row_label, 3, 0).tolist() == [1, 0, 1, -1, 4]


def test_inverse_frequency_weights_and_the_weighted_ce():
    assert inverse_frequency_weights(torch.tensor([10, 5, 0])).tolist() == [1.0, 2.0, 10.0]
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 1, -1])
    mask = targets >= 0
    ce = weighted_masked_ce(logits, targets, mask, torch.tensor([1.0, 3.0]))
    assert float(ce) == pytest.approx((math.log(2) - 3 * math.log(0.75)) / 4)
    none = weighted_masked_ce(logits, targets, torch.zeros(3, dtype=torch.bool))
    assert float(none) == 0.0 and none.requires_grad


def test_head_capacity_per_k_mode():
    assert head_capacity(Problem(num_known=4, num_classes=10)) == 10
    assert head_capacity(Problem(num_known=4, num_classes=10, k_mode="unknown")) == 40
    assert head_capacity(Problem(4, 10, k_mode="unknown", k_estimate=7)) == 7


def test_round_schedule_and_the_lr_restarted_at_each_round():
    assert round_starts_of([0, 1, 3, 4]) == [0, 1, 3, 4]
    assert round_starts_of([0, 0, 1, 1]) == [0, 1]  # a schedule too short: one round each
    with pytest.raises(ValueError, match="round_starts"):
        round_starts_of([1, 2])
    assert [round_of(e, [0, 1, 3, 4]) for e in range(6)] == [1, 2, 2, 3, 4, 4]
    optim = {"scheduler": "step", "step_size": 1, "gamma": 0.5}
    factors = [round_lr_factor(e, [0, 2], 5, optim) for e in range(5)]
    assert factors == [1.0, 0.5, 1.0, 0.5, 0.25]
    assert round_lr_factor(3, [0, 2], 5, optim, restart=False) == 0.125
