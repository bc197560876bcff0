"""NACH: the learning status and class-wise thresholds, the distribution alignment, the
pseudo-label mask, the consistency and pairwise terms on hand-made tensors (values by hand or
with numpy), and one step of the method (state sized and updated, every term in the loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TINY_BACKBONE, assert_heads_get_gradients, np_softmax, t, two_view_batch

from methods.nach import (
    NACH,
    align_distribution,
    class_thresholds,
    consistency_loss,
    learning_effect,
    learning_status,
    pairwise_term,
    select_pseudo_labels,
    update_class_mean,
    update_row_labels,
)
from owdfa_bench.method import Problem

ROWS = torch.tensor([-1, 0, 2, 0, -1, -1])  # latest confident label of 6 unlabelled rows


# ----------------------------------------------------------------------------- learning pace
def test_learning_status_counts_each_class_and_the_unused_rows():
    sigma, unused = learning_status(ROWS, 3)
    assert sigma.tolist() == [2, 0, 1] and unused == 3
    sigma, unused = learning_status(torch.zeros(0, dtype=torch.long), 2)
    assert sigma.tolist() == [0, 0] and unused == 0


def test_learning_effect_with_and_without_warmup():
    sigma = torch.tensor([2, 0, 1])
    # warm-up: 3 rows still unused outweigh the best class (2)
    assert learning_effect(sigma, 3, warmup=True).tolist() == pytest.approx([2 / 3, 0, 1 / 3])
    assert learning_effect(sigma, 1, warmup=True).tolist() == pytest.approx([1, 0, 0.5])
    assert learning_effect(sigma, 3, warmup=False).tolist() == pytest.approx([1, 0, 0.5])
    assert learning_effect(torch.zeros(3, dtype=torch.long), 0).tolist() == [0, 0, 0]


def test_class_thresholds_convex_and_linear_maps():
    beta = torch.tensor([2 / 3, 0.0, 1 / 3, 1.0], dtype=torch.float64)
    # convex: tau * b / (2 - b): 2/3 -> 0.5 tau, 1/3 -> 0.2 tau, 1 -> tau
    convex = class_thresholds(beta, 0.95, "convex")
    assert convex.tolist() == pytest.approx([0.475, 0.0, 0.19, 0.95])
    linear = class_thresholds(beta, 0.95, "linear")
    assert linear.tolist() == pytest.approx([0.95 * 2 / 3, 0.0, 0.95 / 3, 0.95])
    with pytest.raises(ValueError, match="threshold_mapping"):
        class_thresholds(beta, 0.95, "concave")


def test_update_row_labels_keeps_unsure_rows_and_the_last_of_a_repeated_row():
    before = torch.full((4,), -1)
    rows = torch.tensor([2, 0, 2, 3, 1])
    pseudo = torch.tensor([1, 0, 2, 1, 2])
    confidence = t([0.96, 0.5, 0.97, 0.99, 0.95])
    after = update_row_labels(before, rows, pseudo, confidence, tau=0.95)
    # row 0 not confident; row 2 confident twice -> its last label 2; row 1 at tau exactly
    assert after.tolist() == [-1, 2, 2, 1]
    assert before.tolist() == [-1, -1, -1, -1]  # a copy
    assert update_row_labels(after, rows[:0], pseudo[:0], confidence[:0]).tolist() == [-1, 2, 2, 1]


# ----------------------------------------------------------------------------- distribution
def test_update_class_mean_first_batch_then_ema():
    first = update_class_mean(torch.zeros(2, dtype=torch.float64), t([0.5, 0.5]), 0.9)
    assert first.tolist() == [0.5, 0.5]
    assert update_class_mean(first, t([1.0, 0.0]), 0.9).tolist() == pytest.approx([0.55, 0.45])


def test_align_distribution_divides_by_the_running_mean_toward_uniform():
    probs = t([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    running = t([0.5, 0.25, 0.25])
    # uniform / running = [2/3, 4/3, 4/3]: row 1 -> [1.2, 1.2, 0.4] / 2.8, row 2 ->
    # [0.4, 0.8, 2.4] / 3.6 (the 1e-6 terms change the 6th decimal at most)
    aligned = align_distribution(probs, running)
    np.testing.assert_allclose(
        aligned.numpy(), [[3 / 7, 3 / 7, 1 / 7], [1 / 9, 2 / 9, 6 / 9]], atol=1e-5
    )
    np.testing.assert_allclose(aligned.sum(1).numpy(), [1.0, 1.0])
    # aligning to the running mean itself is the identity (up to eps)
    same = align_distribution(probs, running, target=running)
    np.testing.assert_allclose(same.numpy(), probs.numpy(), atol=1e-5)


def test_select_pseudo_labels_uses_the_threshold_of_each_rows_class():
    aligned = t([[0.7, 0.2, 0.1], [0.1, 0.35, 0.55], [0.2, 0.45, 0.35]])
    thresholds = t([0.7, 0.4, 0.6])
    pseudo, confidence, mask = select_pseudo_labels(aligned, thresholds)
    assert pseudo.tolist() == [0, 2, 1]
    assert confidence.tolist() == [0.7, 0.55, 0.45]
    assert mask.tolist() == [True, False, True]  # 0.7 >= 0.7 passes; 0.55 < 0.6 does not


def test_consistency_loss_averages_over_all_given_rows():
    logits = t([[2.0, 0.0], [0.0, 1.0]], grad=True)
    loss = consistency_loss(logits, torch.tensor([0, 0]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)) / 2)
    empty = consistency_loss(logits[:0], torch.tensor([], dtype=torch.long), torch.tensor([]))
    assert empty.item() == 0.0 and empty.requires_grad


# ----------------------------------------------------------------------------- pairwise
def test_pairwise_term_is_the_bce_of_each_row_with_its_partner():
    zw = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
    zs = np.array([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 2.0]])
    pw, ps = np_softmax(zw), np_softmax(zs)
    partners = [0, 2, 1]
    expected = -np.mean(np.log((pw * ps[partners]).sum(1)))
    out = pairwise_term(t(pw), t(ps), torch.tensor(partners))
    assert out.item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- the method
def tiny_nach(monkeypatch, **kwargs) -> NACH:
    """NACH on 3 known + 2 novel classes, its train set laid out as `two_view_batch`'s rows
    (4 labelled, then 4 unlabelled)."""
    model = NACH(Problem(num_known=3, num_classes=5), backbone=TINY_BACKBONE, **kwargs)
    monkeypatch.setattr(NACH, "_unlabelled_layout", lambda self: (4, 4))
    return model


def test_thresholds_follow_the_learning_status(monkeypatch):
    model = tiny_nach(monkeypatch)
    assert model.confidence_thresholds() == (0.0, 0.0)  # nothing learned yet
    # statuses: class 0 three rows, class 3 one row, one row unused -> beta = [1, 0, 0, 1/3, 0]
    model.row_labels = torch.tensor([0, 0, 0, 3, -1])
    expected = [0.95, 0.0, 0.0, 0.95 * 0.2, 0.0]
    assert model.thresholds().tolist() == pytest.approx(expected)
    seen, novel = model.confidence_thresholds()
    assert seen == pytest.approx(0.95 / 3) and novel == pytest.approx(0.095)


def test_a_first_step_sizes_and_updates_the_state_and_reaches_every_term(monkeypatch):
    model = tiny_nach(monkeypatch, threshold=0.2)  # low tau: rows reach it at init
    batch = two_view_batch()
    out = model.training_losses(batch)
    out["loss"].backward()
    assert_heads_get_gradients(model)
    total = out["sup"] + out["unsup"] + out["pair"] - out["entropy"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    # warm-up thresholds start at 0: every unlabelled row is pseudo-labelled
    assert out["mask_rate"].item() == 1.0 and out["thr_seen"].item() == 0.0
    assert model.da_mean.sum().item() == pytest.approx(1.0)  # the first batch's mean
    assert model.row_labels.shape == (4,)
    assert ((model.row_labels >= -1) & (model.row_labels < 5)).all()
    assert (model.row_labels >= 0).any()  # at tau 0.2 over 5 outputs some row is sure
    state = model.carried_state_dict()["buffers"]
    assert torch.equal(state["row_labels"], model.row_labels)  # saved for an exact resume
    assert "da_mean" in model.state_dict()


def test_bad_settings_are_refused():
    problem = Problem(num_known=3, num_classes=5)
    with pytest.raises(ValueError, match="threshold_mapping"):
        NACH(problem, backbone=TINY_BACKBONE, threshold_mapping="concave")
    with pytest.raises(ValueError, match="da_momentum"):
        NACH(problem, backbone=TINY_BACKBONE, da_momentum=1.0)
