"""ORCA, SimGCD, GCD and RankStats: loss terms on hand-made tensors (values derived with numpy)
and what is specific to each model; gradients and smoke fits of every method are in
tests/test_methods.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY_BACKBONE, np_log_softmax, np_softmax, scalar_terms, t

from methods.common_losses import (
    cosine_logits,
    entropy_of_mean,
    info_nce_loss,
    masked_cross_entropy,
    mean_entropy_gap,
    pairwise_bce,
    self_distillation_loss,
    simgcd_head_rows,
    supcon_loss,
    teacher_temperature,
)
from methods.gcd import GCD, gcd_loss
from methods.orca import adaptive_margin, orca_losses, orca_partners
from methods.rankstats import (
    rank_stats_bce,
    rank_stats_pairs,
    rankstats_losses,
    sigmoid_rampup,
    widen_known_head,
)
from methods.simgcd import simgcd_total
from owdfa_bench.method import Problem


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- shared terms

Z1 = np.array([[1.0, 0.0, 0.5], [0.2, 1.0, -0.3], [0.3, -0.4, 1.0]])
Z2 = np.array([[0.9, 0.1, 0.4], [0.0, 1.2, -0.1], [-0.2, 0.1, 0.8]])


def test_cosine_logits_match_numpy():
    w = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    expected = 10 * unit_rows(Z1) @ unit_rows(w).T
    np.testing.assert_allclose(cosine_logits(t(Z1), t(w), 10.0).numpy(), expected, rtol=1e-12)


def test_info_nce_matches_numpy():
    z = unit_rows(np.concatenate([Z1, Z2]))
    sim = z @ z.T / 0.5
    n = len(z)
    losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        pos = (i + 3) % n
        losses.append(-(sim[i, pos] - np.log(np.exp(sim[i, others]).sum())))
    got = info_nce_loss(t(Z1), t(Z2), temperature=0.5).item()
    assert got == pytest.approx(np.mean(losses), rel=1e-10)


def test_supcon_matches_numpy_and_is_zero_without_labels():
    labels = np.array([0, 0, 1])
    z = unit_rows(np.concatenate([Z1, Z2]))
    y = np.concatenate([labels, labels])
    sim = z @ z.T / 0.07
    per_anchor = []
    for i in range(6):
        others = [j for j in range(6) if j != i]
        log_prob = sim[i] - np.log(np.exp(sim[i, others]).sum())
        positives = [j for j in others if y[j] == y[i]]
        per_anchor.append(-np.mean(log_prob[positives]))
    got = supcon_loss(t(Z1), t(Z2), torch.tensor(labels), 0.07).item()
    assert got == pytest.approx(np.mean(per_anchor), rel=1e-9)
    empty = torch.zeros(0, 3, requires_grad=True)
    zero = supcon_loss(empty, empty, torch.zeros(0, dtype=torch.long))
    assert zero.item() == 0.0 and zero.requires_grad


def test_entropy_of_mean_by_hand():
    assert entropy_of_mean(t([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(math.log(2))
    assert entropy_of_mean(t([[1.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_pairwise_bce_by_hand():
    sim = t([0.5, 0.25])
    same = torch.tensor([True, False])
    expected = (-math.log(0.5) - math.log(0.75)) / 2
    assert pairwise_bce(sim, same).item() == pytest.approx(expected)
    # the log is clamped at -100, as nn.BCELoss does, so a zero similarity gives 100, not inf
    assert pairwise_bce(t([0.0]), torch.tensor([True])).item() == pytest.approx(100.0)


def test_masked_cross_entropy_is_an_attached_zero_without_rows():
    logits = torch.randn(3, 4, requires_grad=True)
    out = masked_cross_entropy(logits, torch.tensor([0, -1, -1]), torch.zeros(3, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad


# ----------------------------------------------------------------------------- SimGCD


def test_teacher_temperature_schedule_is_numpy_linspace_then_constant():
    expected = np.concatenate([np.linspace(0.07, 0.04, 30), np.full(170, 0.04)])
    got = [teacher_temperature(e, 30, 0.07, 0.04) for e in range(200)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert teacher_temperature(250, 30) == 0.04  # past the schedule: the final value
    assert [teacher_temperature(e, 2) for e in range(3)] == [0.07, 0.04, 0.04]  # synth preset


def test_self_distillation_matches_numpy():
    tt, ts = 0.05, 0.1
    a = -(np_softmax(Z2 / tt) * np_log_softmax(Z1 / ts)).sum(1).mean()
    b = -(np_softmax(Z1 / tt) * np_log_softmax(Z2 / ts)).sum(1).mean()
    got = self_distillation_loss(t(Z1), t(Z2), tt, ts).item()
    assert got == pytest.approx((a + b) / 2, rel=1e-10)


def test_mean_entropy_gap_is_log_c_minus_entropy():
    assert mean_entropy_gap(t(np.full((4, 5), 0.2))).item() == pytest.approx(0.0, abs=1e-12)
    one_hot = np.eye(5)[[2, 2, 2]]
    assert mean_entropy_gap(t(one_hot)).item() == pytest.approx(math.log(5), rel=1e-6)


def test_simgcd_total_weights():
    terms = scalar_terms(distill=1.0, memax=2.0, cls=3.0, infonce=4.0, supcon=5.0)
    # (1-.35)(1 + 0.5*2) + .35*3 + (1-.35)*4 + .35*5
    expected = 0.65 * 2.0 + 1.05 + 2.6 + 1.75
    assert simgcd_total(terms, 0.35, 0.5).item() == pytest.approx(expected)


def test_simgcd_head_rows_per_k_mode():
    assert simgcd_head_rows(Problem(3, 7, "known"), 2.0) == 7
    assert simgcd_head_rows(Problem(3, 7, "unknown", k_estimate=9), 2.0) == 9
    assert simgcd_head_rows(Problem(3, 7, "unknown"), 2.0) == 14  # 2 x true total (documented)


# ----------------------------------------------------------------------------- ORCA


def test_adaptive_margin():
    assert adaptive_margin(0.8) == pytest.approx(0.2)
    assert adaptive_margin(0.1) == 0.5  # capped


def test_orca_partners_same_class_or_nearest_neighbour():
    feats = t([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.25]])
    y = torch.tensor([0, 0, 1, -1])
    labelled = torch.tensor([True, True, True, False])
    # rows 0/1 share class 0; row 2 is alone (itself); unlabelled row 3 is closest to row 1
    assert orca_partners(feats, y, labelled).tolist() == [1, 0, 2, 1]


def test_orca_losses_match_numpy():
    l1 = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
    l2 = np.array([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 2.0]])
    feats = t([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    y = torch.tensor([0, -1, -1])
    labelled = torch.tensor([True, False, False])
    out = orca_losses(t(l1), t(l2), feats, y, labelled, margin=0.2, scale=10.0)
    shifted = l1[:1].copy()
    shifted[0, 0] += 10 * 0.2  # the margin raises the target logit by s * m
    ce = -np_log_softmax(shifted)[0, 0]
    p1, p2 = np_softmax(l1), np_softmax(l2)
    partners = [0, 2, 1]  # labelled row alone -> itself; rows 1 and 2 are each other's neighbour
    pair = -np.mean(np.log((p1 * p2[partners]).sum(1)))
    pbar = p1.mean(0)
    entropy = -(pbar * np.log(pbar)).sum()
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["pair"].item() == pytest.approx(pair, rel=1e-10)
    assert out["entropy"].item() == pytest.approx(entropy, rel=1e-10)
    assert out["loss"].item() == pytest.approx(ce + pair - entropy, rel=1e-10)


# ----------------------------------------------------------------------------- RankStats


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 150) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(75, 150) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(150, 150) == sigmoid_rampup(400, 150) == sigmoid_rampup(3, 0) == 1.0


def test_rank_stats_pairs_compare_top_k_sets():
    feats = t(
        [
            [5.0, 4.0, 3.0, 0.0, 1.0],  # top-3 {0, 1, 2}
            [3.0, 5.0, 4.0, 2.0, 0.0],  # top-3 {0, 1, 2} in another order: same set
            [5.0, 0.0, 3.0, 4.0, 0.0],  # top-3 {0, 2, 3}
        ]
    )
    expected = [[True, True, False], [True, True, False], [False, False, True]]
    assert rank_stats_pairs(feats, topk=3).tolist() == expected


def test_rank_stats_bce_matches_numpy_over_all_ordered_pairs():
    q = np_softmax(Z1)
    q2 = np_softmax(Z2)
    same = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=bool)
    inner = q @ q2.T
    expected = np.mean(np.where(same, -np.log(inner + 1e-7), -np.log(1 - inner + 1e-7)))
    got = rank_stats_bce(t(q), t(q2), torch.tensor(same)).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_widened_head_novel_biases_start_below_the_known_ones():
    head = torch.nn.Linear(4, 5)
    with torch.no_grad():
        head.bias[:] = torch.tensor([0.3, -0.2, 0.1, 9.0, 9.0])
    widen_known_head(head, num_known=3)
    np.testing.assert_allclose(head.bias.detach().numpy(), [0.3, -0.2, 0.1, -1.2, -1.2], rtol=1e-6)


def test_rankstats_pseudo_labels_use_head2_argmax_plus_known_and_the_tag():
    # 2 known + 2 novel classes; row 0 labelled (class 1), rows 1-2 unlabelled
    h1 = t([[0.0, 2.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    h2 = t([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])  # unlabelled argmax: 0 and 1 -> ids 2 and 3
    feats = t([[1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([1, -1, -1])
    labelled = torch.tensor([True, False, False])
    out = rankstats_losses(
        (h1, h1), (h2, h2), feats, y, labelled, num_known=2, rampup_weight=10.0, topk=1
    )
    il = -(np_log_softmax(h1.numpy()[1:])[[0, 1], [2, 3]]).mean()
    assert out["il_ce"].item() == pytest.approx(10.0 / 50.0 * 0.05 * il, rel=1e-10)
    assert out["ce"].item() == pytest.approx(-np_log_softmax(h1.numpy()[:1])[0, 1], rel=1e-10)
    assert out["consistency"].item() == 0.0  # identical views


# ----------------------------------------------------------------------------- GCD


def test_gcd_loss_weights_infonce_and_supcon():
    labelled = torch.tensor([True, True, False])
    y = torch.tensor([0, 0])
    out = gcd_loss(t(Z1), t(Z2), y, labelled, sup_con_weight=0.35)
    expected = 0.65 * info_nce_loss(t(Z1), t(Z2)) + 0.35 * supcon_loss(t(Z1[:2]), t(Z2[:2]), y)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


def blob_features(n_per: int, centres: np.ndarray, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + 0.02 * rng.standard_normal((n_per, centres.shape[1])) for c in centres])
    return torch.tensor(unit_rows(x), dtype=torch.float32), np.repeat(
        np.arange(len(centres)), n_per
    )


@pytest.mark.parametrize("k_mode", ["known", "unknown"])
def test_gcd_clusters_train_and_test_rows_together(k_mode):
    centres = np.eye(6)[:4] * 3  # classes 0-1 known, 2-3 novel
    problem = Problem(num_known=2, num_classes=4, k_mode=k_mode)
    gcd = GCD(
        problem,
        {},
        TINY_BACKBONE,
        proj_out_dim=None,
        kmeans_n_init=3,
        kmeans_estimate_n_init=2,
        k_max=4,
    )
    lab, lab_y = blob_features(6, centres[:2], 0)
    unl, _ = blob_features(6, centres, 1)
    test, test_y = blob_features(5, centres, 2)
    pred = gcd.cluster(lab, torch.tensor(lab_y), unl, test)
    known = test_y < 2
    assert (pred[known] == test_y[known]).all()  # known ids stay aligned: direct Known ACC
    novel_ids = {int(pred[test_y == 2][0]), int(pred[test_y == 3][0])}
    assert novel_ids == {2, 3} if k_mode == "known" else len(novel_ids) >= 1
    assert gcd.k_estimated() == (None if k_mode == "known" else gcd.k_used)
    if k_mode == "unknown":
        assert 2 <= gcd.k_used <= 4 and gcd.k_search  # the Brent search ran and was recorded


def test_gcd_full_clustering_schedule():
    gcd = GCD(Problem(2, 4), {}, TINY_BACKBONE, proj_out_dim=None, cluster_every=3)
    assert gcd.full_clustering_due()  # no centres yet
    gcd.centres = torch.zeros(4, 512)
    due = []
    for epoch in range(7):
        gcd._trainer = SimpleNamespace(max_epochs=7, current_epoch=epoch)
        due.append(gcd.full_clustering_due())
    gcd._trainer = None
    assert due == [False, False, True, False, False, True, True]  # every 3rd and the last


# ----------------------------------------------------------------------------- smoke fit


# Fewer k-means restarts and a smaller projection keep the GCD smoke fit fast. Every method's
# gradients and unknown-K smoke fit: tests/test_methods.py.
FAST_GCD = [
    "method.model.kmeans_n_init=2",
    "method.model.kmeans_estimate_n_init=2",
    "method.model.proj_out_dim=1024",
]


@pytest.mark.slow  # the known-K clustering itself is covered by the fast unit test above
def test_smoke_fit_gcd_known_k_clusters_with_the_true_k(make_cfg):
    from owdfa_bench.runner import run

    record = run(make_cfg("method=gcd", *FAST_GCD))
    assert record["status"] == "complete" and record["k_estimated"] is None
    assert record["num_clusters"] <= record["num_classes"]
    assert 0.0 <= record["metrics"]["known_acc"] <= 1.0  # direct: ids of known clusters aligned
