"""Semi-supervised k-means and the Brent K estimate (owdfa_bench/kmeans.py) on hand-made points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from owdfa_bench.kmeans import (
    assign_to_centres,
    cluster_confidence,
    estimate_k_brent,
    kmeans_plusplus,
    open_world_assignments,
    semi_supervised_kmeans,
    squared_distances,
)
from owdfa_bench.metrics import cluster_acc


def blobs(centres: list[list[float]], per_blob: int, spread: float = 0.05, seed: int = 0):
    """Points around each centre and the blob id of every point."""
    rng = np.random.default_rng(seed)
    c = np.asarray(centres, dtype=np.float32)
    x = np.concatenate([ci + spread * rng.standard_normal((per_blob, c.shape[1])) for ci in c])
    y = np.repeat(np.arange(len(c)), per_blob)
    return x.astype(np.float32), y


FIVE_CORNERS = [[0, 0], [4, 0], [0, 4], [4, 4], [8, 8]]  # blobs 0-2 "known", 3-4 "novel"


def test_squared_distances_match_numpy():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    c = torch.tensor([[1.0, 1.0], [-2.0, 0.5]])
    expected = ((x.numpy()[:, None, :] - c.numpy()[None]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(x, c).numpy(), expected, rtol=1e-6)


def test_one_dimensional_case_by_hand():
    # 0 is pinned to cluster 0; whichever free point k-means++ seeds first, the run ends with
    # clusters {0, 1} and {10, 11}: centres 0.5 and 10.5, inertia 4 * 0.25 = 1.
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    for seed in range(5):
        res = semi_supervised_kmeans(x, [0, -1, -1, -1], num_clusters=2, n_init=1, seed=seed)
        assert res.assignments.tolist() == [0, 0, 1, 1]
        np.testing.assert_allclose(res.centres.numpy().ravel(), [0.5, 10.5])
        assert res.inertia == pytest.approx(1.0)


def test_pinned_rows_keep_their_class_and_known_ids_align():
    x, blob = blobs(FIVE_CORNERS, per_blob=20)
    labels = np.where((blob < 3) & (np.arange(len(blob)) % 2 == 0), blob, -1)  # half of known
    # one labelled row of class 0 placed inside blob 3: it must stay in cluster 0
    x = np.concatenate([x, [[4.0, 4.0]]]).astype(np.float32)
    labels = np.concatenate([labels, [0]])
    res = semi_supervised_kmeans(x, labels, num_clusters=5, n_init=3, seed=0)
    assert res.assignments[-1] == 0
    # unlabelled rows of known blobs land on their own class id (cluster c is class c) ...
    known_free = (labels < 0) & (np.concatenate([blob, [0]]) < 3)
    assert (res.assignments[known_free] == np.concatenate([blob, [0]])[known_free]).all()
    # ... and each novel blob gets one of the two remaining ids, a different one each
    novel3, novel4 = res.assignments[:-1][blob == 3], res.assignments[:-1][blob == 4]
    assert len(set(novel3)) == 1 and len(set(novel4)) == 1
    assert {novel3[0], novel4[0]} == {3, 4}


def test_same_seed_same_result_and_restarts_never_worse():
    x, _ = blobs(FIVE_CORNERS, per_blob=15, spread=0.8, seed=1)
    a = semi_supervised_kmeans(x, None, num_clusters=5, n_init=1, seed=3)
    b = semi_supervised_kmeans(x, None, num_clusters=5, n_init=1, seed=3)
    assert (a.assignments == b.assignments).all() and a.inertia == b.inertia
    many = semi_supervised_kmeans(x, None, num_clusters=5, n_init=8, seed=3)
    assert many.inertia <= a.inertia + 1e-6  # the first restart is the same draw


def test_assign_to_centres_is_nearest_centre():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    assert assign_to_centres(np.array([[1.0, 1.0], [9.0, -1.0]]), centres).tolist() == [0, 1]


def test_kmeans_plusplus_never_seeds_on_an_existing_centre():
    x = torch.tensor([[0.0], [0.0], [5.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        assert kmeans_plusplus(x, 1, torch.tensor([[0.0]]), g).item() == 5.0


@pytest.mark.parametrize(
    ("labels", "k", "match"),
    [([0, 5, -1, -1], 2, "pinned label"), ([-1] * 4, 5, "num_clusters"), ([0, 1], 2, "shape")],
)
def test_bad_input_is_named(labels, k, match):
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=match):
        semi_supervised_kmeans(x, labels, num_clusters=k)


def test_brent_estimate_maximises_labelled_accuracy():
    x, blob = blobs(FIVE_CORNERS, per_blob=12)
    labels = np.where(blob < 3, blob, -1)  # only the three "known" blobs carry labels
    est = estimate_k_brent(x, labels, k_min=1, k_max=10, n_init=3, seed=0)
    # fewer than 3 clusters cannot separate the 3 labelled classes (at most 2/3 correct), so
    # the estimate is at least 3; above that the score is blind to merged or split *novel*
    # blobs, the flat objective behind GCD's collapse towards K_known that CAL reports on OWDFA-40
    two = semi_supervised_kmeans(x, None, num_clusters=2, n_init=3, seed=0)
    assert cluster_acc(blob[blob < 3], two.assignments[blob < 3]) <= 2 / 3
    assert est.k >= 3
    assert est.scores[est.k] == max(est.scores.values()) == pytest.approx(1.0)
    assert all(1 <= k <= 10 for k in est.scores)
    assert len(est.scores) < 10  # Brent, not a scan over every K


def test_brent_estimate_needs_labelled_rows():
    with pytest.raises(ValueError, match="labelled"):
        estimate_k_brent(np.zeros((4, 2)), [-1] * 4, k_min=1, k_max=3)


def test_open_world_rule_keeps_known_ids_and_gives_a_novel_blob_a_new_id():
    # known classes 0 and 1 (labelled rows near (0, 0) and (10, 0)), one novel class near
    # (0, 10) among the unlabelled rows; K = 3
    train = torch.tensor(
        [[0.0, 0.0], [0.2, 0.0], [10.0, 0.0], [10.0, 0.2], [0.0, 10.0], [0.2, 10.0]],
        dtype=torch.float64,
    )
    train_y = torch.tensor([0, 0, 1, 1, -1, -1])
    test = torch.tensor([[9.8, 0.1], [0.1, 0.1], [0.1, 9.9], [0.0, 10.2]], dtype=torch.float64)
    preds, result = open_world_assignments(train, train_y, test, 3, n_init=3, seed=0)
    assert preds.tolist() == [1, 0, 2, 2]
    # class 0's centre: its two labelled rows and the test row it took
    np.testing.assert_allclose(result.centres[0].numpy(), [0.1, 0.1 / 3], rtol=1e-12)
    assert result.assignments[:4].tolist() == [0, 0, 1, 1]  # labelled rows stay pinned


def test_cluster_confidence_is_the_max_softmax_of_scaled_cosines():
    features = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    centres = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # row 0: cosines (1, 0); row 1: (1/sqrt 2, 1/sqrt 2), a tie
    expected = [1 / (1 + np.exp(-1 / 0.5)), 0.5]
    np.testing.assert_allclose(cluster_confidence(features, centres, 0.5), expected, rtol=1e-6)
