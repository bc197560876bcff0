"""DNA-Det: its terms on hand-made tensors with values worked out by hand, the crops, the
open-world rule and the prediction layout; gradients and smoke fits are in tests/test_methods.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TINY_BACKBONE, t

from methods.common_losses import supcon_loss
from methods.dna_det import (
    DNADet,
    classification_loss,
    clustering_due,
    dna_det_losses,
    multi_crop_supcon,
    random_crops,
    uncertainty_weighted_sum,
)
from owdfa_bench.method import Problem

E1, E2 = [1.0, 0.0], [0.0, 1.0]


# ----------------------------------------------------------------------------- crops
def test_random_crops_are_crop_major_slices_at_their_drawn_offsets():
    images = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).view(2, 3, 6, 5)
    crops = random_crops(images, 4, 3, torch.Generator().manual_seed(7))
    assert crops.shape == (4 * 2, 3, 3, 3)
    again = torch.Generator().manual_seed(7)  # the same draws: tops first, then lefts
    top = torch.randint(6 - 3 + 1, (4, 2), generator=again)
    left = torch.randint(5 - 3 + 1, (4, 2), generator=again)
    for v in range(4):
        for b in range(2):
            i, j = int(top[v, b]), int(left[v, b])
            assert torch.equal(crops[v * 2 + b], images[b, :, i : i + 3, j : j + 3])


def test_a_crop_larger_than_the_image_is_the_whole_image():
    images = torch.randn(3, 3, 4, 4)
    crops = random_crops(images, 2, 64)
    assert torch.equal(crops, torch.cat([images, images]))


# ----------------------------------------------------------------------------- SupCon
def test_multi_crop_supcon_by_hand_one_crop():
    # three images, one crop each, labels 0 0 1, T = 1: anchors 0 and 1 see their positive at
    # cos 1 and the other image at cos 0 -> log p = 1 - log(e + 1); anchor 2 has no positive
    z = t([[E1], [E1], [E2]])
    got = multi_crop_supcon(z, torch.tensor([0, 0, 1]), 1.0, 1.0).item()
    assert got == pytest.approx(math.log(math.e + 1) - 1, rel=1e-12)


def test_multi_crop_supcon_by_hand_two_crops_and_the_temperature_ratio():
    # two images of classes 0 and 1, two crops each: every anchor's contrast set is its own
    # other crop (cos 1, the positive) and the other image's two crops (cos 0); T = 0.5 doubles
    # the logits and the loss is scaled by T / T_base = 0.5 / 0.07
    z = t([[E1, E1], [E2, E2]])
    got = multi_crop_supcon(z, torch.tensor([0, 1]), 0.5, 0.07).item()
    expected = -(0.5 / 0.07) * (2.0 - math.log(math.exp(2.0) + 2.0))
    assert got == pytest.approx(expected, rel=1e-12)


def test_multi_crop_supcon_with_two_crops_is_the_two_view_supcon():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 2, 5))
    z /= np.linalg.norm(z, axis=2, keepdims=True)
    labels = torch.tensor([0, 1, 0, 2])
    got = multi_crop_supcon(t(z), labels, 0.07).item()
    ref = supcon_loss(t(z[:, 0]), t(z[:, 1]), labels, 0.07).item()  # GCD's, written separately
    assert got == pytest.approx(ref, rel=1e-10)


def test_multi_crop_supcon_without_any_positive_is_an_attached_zero():
    z = torch.nn.functional.normalize(torch.randn(2, 1, 3), dim=2).requires_grad_()
    out = multi_crop_supcon(z, torch.tensor([0, 1]))
    assert out.item() == 0.0 and out.requires_grad


# ----------------------------------------------------------------------------- CE and weights
def test_classification_loss_on_probabilities_is_the_reference_double_softmax():
    logits = t([[0.0, math.log(3.0)]])  # softmax (0.25, 0.75)
    target = torch.tensor([1])
    got = classification_loss(logits, target, on_probabilities=True).item()
    expected = -0.75 + math.log(math.exp(0.25) + math.exp(0.75))
    assert got == pytest.approx(expected, rel=1e-12)
    plain = classification_loss(logits, target, on_probabilities=False).item()
    assert plain == pytest.approx(-math.log(0.75), rel=1e-12)


def test_uncertainty_weighted_sum_by_hand():
    losses = [torch.tensor(2.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)]
    got = uncertainty_weighted_sum(losses, t([1.0, 2.0])).item()
    # 0.5 / 1 * 2 + log 2 + 0.5 / 4 * 3 + log 5
    assert got == pytest.approx(1.0 + 0.375 + math.log(10.0), rel=1e-12)


def test_dna_det_losses_repeat_the_image_labels_over_crop_major_rows():
    torch.manual_seed(0)
    v, b = 3, 2
    logits = torch.randn(v * b, 4, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.randn(v * b, 5, dtype=torch.float64), dim=1)
    labels = torch.tensor([2, 0])
    weights = t([1.0, 1.0])
    out = dna_det_losses(logits, z, labels, v, weights, 0.07, True)
    ce = torch.nn.functional.cross_entropy(logits.softmax(1), torch.tensor([2, 0] * v))
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-12)
    per_image = torch.stack([z[k * b : (k + 1) * b] for k in range(v)], dim=1)  # [B, V, D]
    assert out["supcon"].item() == pytest.approx(
        multi_crop_supcon(per_image, labels).item(), rel=1e-12
    )
    expected = 0.5 * out["ce"] + 0.5 * out["supcon"] + 2 * math.log(2.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-12)


# ----------------------------------------------------------------------------- open world
def test_clustering_due_every_n_epochs_at_the_last_and_outside_a_fit():
    due = [e for e in range(6) if clustering_due(e, 6, 2)]
    assert due == [1, 3, 5]
    assert [e for e in range(6) if clustering_due(e, 6, 0)] == [5]
    assert [e for e in range(6) if clustering_due(e, 6, 10)] == [5]
    assert clustering_due(0, 6, 0, fitting=False)


def test_cluster_count_per_k_mode():
    known = DNADet(Problem(2, 4, "known"), {}, TINY_BACKBONE)
    assert known.num_clusters(torch.zeros(1, 2), torch.tensor([0])) == 4
    given = DNADet(Problem(2, 4, "unknown", k_estimate=3), {}, TINY_BACKBONE)
    assert given.num_clusters(torch.zeros(1, 2), torch.tensor([0])) == 3
    # no estimate: GCD's Brent search over [K_known, room], on two clear blobs of 2 + 1 classes
    brent = DNADet(Problem(2, 4, "unknown"), {}, TINY_BACKBONE, kmeans_estimate_n_init=2)
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0], [0.0, 5.0], [0.0, 5.1]])
    k = brent.num_clusters(feats, torch.tensor([0, 0, 1, 1, -1, -1]))
    assert 2 <= k <= 4 and brent.k_search


# ----------------------------------------------------------------------------- the model
def test_outputs_hold_features_then_logits_and_the_monitor_is_the_classifier():
    model = DNADet(Problem(3, 5, "known"), {}, TINY_BACKBONE).eval()
    with torch.no_grad():
        out = model.predict_logits(torch.randn(4, 3, 32, 32))
    d = model.encoder.dim
    assert out.shape == (4, d + 3)
    np.testing.assert_allclose(out[:, :d].norm(dim=1).numpy(), 1.0, rtol=1e-5)
    model.clustering_now = lambda: False  # an epoch between clusterings
    preds = model.predictions_from_outputs(out)
    assert preds.tolist() == out[:, d:].argmax(1).tolist() and model.centres is None
    conf = model.confidences_from_outputs(out)
    np.testing.assert_allclose(conf, out[:, d:].softmax(1).max(1).values.numpy(), rtol=1e-6)
    assert model.record_extras() == {"dna_det": {"mode": "classifier", "k": None}}


def test_the_uncertainty_weights_have_their_own_group_without_decay():
    optim = {"name": "adam", "lr": 2e-4, "weight_decay": 1e-3, "scheduler": "none"}
    model = DNADet(Problem(3, 5, "known"), optim, TINY_BACKBONE, awl_lr=0.01)
    opt = model.configure_optimizers()
    net, awl = opt.param_groups
    assert awl["params"] == [model.awl] and awl["lr"] == 0.01 and awl["weight_decay"] == 0.0
    assert net["lr"] == 2e-4 and net["weight_decay"] == 1e-3
    assert len(net["params"]) == sum(1 for p in model.parameters() if p.requires_grad) - 1
    assert torch.equal(model.awl.detach(), torch.ones(2))  # main.py: torch.ones(num)
