"""LPS: every loss term against numpy transcriptions of the reference formulas on hand-made
tensors, gradient flow, the recipes (the original one freezes all but layer4 + head), and smoke
fits through the runner."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TINY_BACKBONE, assert_complete_smoke_record, np_softmax, t

from methods.lps import (
    LPS,
    adaptive_margin_cross_entropy,
    class_distribution,
    class_margins,
    lps_losses,
    lps_pseudo_labels,
    margin_scale,
    novel_threshold,
    pseudo_label_contrastive,
    unselected_contrastive,
)
from owdfa_bench.method import Problem, TrainBatch


# numpy transcriptions of the reference's functions (lps_imagenet.py, utils.py)
def np_margin_ce(x, target, p, s, mask=None):
    dist = p * (10 / p.max())
    x_m = x.copy()
    x_m[np.arange(len(x)), target] += s * dist[target]
    ce = -np.log(np_softmax(x_m)[np.arange(len(x)), target])
    return ce.mean() if mask is None else (ce * mask).mean()


def np_pc(o1, o2, labels, temp=0.4):
    out = np.concatenate([o1, o2])
    lab = np.concatenate([labels, labels])
    mask = (lab[None, :] == lab[:, None]).astype(float)
    norm = np.linalg.norm(out, axis=1)
    sim = np.exp(out @ out.T / np.outer(norm, norm) / temp)
    self_sim = np.exp(1 / temp)
    num = (sim * mask).sum(-1) - self_sim
    den = sim.sum(-1) - self_sim
    return np.mean(-np.log(num / den / (mask.sum(-1) - 1)))


def np_uc(o1, o2, mask, temp=0.4):
    out = np.concatenate([o1, o2])
    norm = np.linalg.norm(out, axis=1)
    sim = np.exp(out @ out.T / np.outer(norm, norm) / temp)
    match = np.exp(
        (o1 * o2).sum(-1) / (np.linalg.norm(o1, axis=1) * np.linalg.norm(o2, axis=1)) / temp
    )
    match = np.concatenate([match, match])
    m = np.concatenate([mask, mask])
    return np.mean(-np.log(match / (sim.sum(-1) - np.exp(1 / temp))) * m)


def np_entropy_of_mean(probs):
    p = np.clip(probs.mean(0), 1e-8, None)
    return -(p * np.log(p)).sum()


# 3 known + 2 novel outputs, 10 cos scale; rows 0-1 labelled, 2-5 unlabelled
Z2 = np.array(
    [
        [9.0, 0.0, 0.0, 0.0, 0.0],  # labelled (y = 1), its own prediction ignored
        [0.0, 0.0, 1.0, 0.0, 0.0],  # labelled (y = 2)
        [8.0, 0.0, 0.0, 0.0, 0.0],  # unlabelled, known argmax, conf ~0.9987 >= 0.95: selected
        [2.0, 0.0, 0.0, 0.0, 0.0],  # unlabelled, known argmax, conf ~0.65: not selected
        [0.0, 0.0, 0.0, 1.5, 0.0],  # unlabelled, novel argmax, conf ~0.53 >= 0.5: selected
        [0.0, 0.0, 0.0, 0.0, 0.2],  # unlabelled, novel argmax, conf ~0.23: not selected
    ]
)
Y = torch.tensor([1, 2, -1, -1, -1, -1])
LAB = Y >= 0
RNG = np.random.default_rng(0)
Z1 = RNG.uniform(-10, 10, (6, 5))
Z3 = RNG.uniform(-10, 10, (6, 5))


def test_novel_threshold_ramps_over_the_run():
    assert novel_threshold(0, 90) == 0.4
    assert novel_threshold(45, 90) == pytest.approx(0.6)
    assert novel_threshold(89, 90) == pytest.approx(0.4 + 0.4 * 89 / 90)
    assert novel_threshold(1, 2) == pytest.approx(0.6)  # the smoke trainer's 2 epochs


def test_pseudo_labels_and_selection_by_hand():
    probs, pseudo, selected = lps_pseudo_labels(t(Z2), Y, LAB, num_known=3, novel_threshold=0.5)
    np.testing.assert_allclose(probs.numpy(), np_softmax(Z2), rtol=1e-6)
    assert pseudo.tolist() == [1, 2, 0, 0, 3, 4]  # labelled rows keep their label
    assert selected.tolist() == [True, True, True, False, True, False]


def test_class_distribution_uses_the_soft_probabilities_of_selected_rows():
    probs = np_softmax(Z2)
    sel = np.array([True, True, True, False, True, False])
    got = class_distribution(t(probs), torch.tensor(sel)).numpy()
    np.testing.assert_allclose(got, probs[sel].sum(0) / probs[sel].sum(), rtol=1e-12)
    none = class_distribution(t(probs), torch.zeros(6, dtype=torch.bool))
    np.testing.assert_allclose(none.numpy(), 0.2)


def test_margin_scale_is_kl_of_uniform_to_p_and_margins_are_max_normalised():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    expected = (0.25 * (np.log(0.25) - np.log(p))).sum()
    assert margin_scale(t(p)).item() == pytest.approx(expected, rel=1e-12)
    assert margin_scale(t([0.25] * 4)).item() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(class_margins(t(p)).numpy(), [10.0, 5.0, 2.5, 2.5])


def test_adaptive_margin_cross_entropy_matches_margin_loss():
    p = np.array([0.4, 0.3, 0.2, 0.05, 0.05])
    s = 0.7
    target = np.array([0, 3, 1])
    x = Z1[:3]
    m = class_margins(t(p))
    got = adaptive_margin_cross_entropy(t(x), torch.tensor(target), m, s).item()
    assert got == pytest.approx(np_margin_ce(x, target, p, s), rel=1e-10)
    mask = np.array([1.0, 0.0, 1.0])
    masked = adaptive_margin_cross_entropy(t(x), torch.tensor(target), m, s, t(mask)).item()
    assert masked == pytest.approx(np_margin_ce(x, target, p, s, mask), rel=1e-10)
    # by hand: one row, logits 0, margin s * m_y = 1 on the target -> -log(e / (e + 1))
    one = adaptive_margin_cross_entropy(
        torch.zeros(1, 2), torch.tensor([0]), torch.tensor([10.0, 5.0]), 0.1
    )
    assert one.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    empty = adaptive_margin_cross_entropy(
        torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.long), m[:2], s
    )
    assert empty.item() == 0.0 and empty.requires_grad


def test_pc_loss_matches_the_reference_formula():
    labels = np.array([1, 2, 0, 3])
    rows = [0, 1, 2, 4]
    got = pseudo_label_contrastive(t(Z2[rows] + Z1[rows]), t(Z3[rows]), torch.tensor(labels))
    assert got.item() == pytest.approx(np_pc(Z2[rows] + Z1[rows], Z3[rows], labels), rel=1e-9)
    shared = np.array([0, 0, 1, 0])  # several positives per row
    got = pseudo_label_contrastive(t(Z1[:4]), t(Z3[:4]), torch.tensor(shared))
    assert got.item() == pytest.approx(np_pc(Z1[:4], Z3[:4], shared), rel=1e-9)
    zero = pseudo_label_contrastive(
        torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)
    )
    assert zero.item() == 0.0 and zero.requires_grad


def test_uc_loss_matches_the_reference_formula():
    mask = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    got = unselected_contrastive(t(Z2 + 0.1), t(Z3), t(mask)).item()
    assert got == pytest.approx(np_uc(Z2 + 0.1, Z3, mask), rel=1e-9)


def test_lps_losses_compose_every_term():
    out = lps_losses(t(Z1), t(Z2), t(Z3), Y, LAB, num_known=3, novel_threshold=0.5)
    probs = np_softmax(Z2)
    pseudo = np.array([1, 2, 0, 0, 3, 4])
    sel = np.array([True, True, True, False, True, False])
    p = probs[sel].sum(0) / probs[sel].sum()
    s = (0.2 * (np.log(0.2) - np.log(p))).sum()
    am_lab = np_margin_ce(Z1[:2], pseudo[:2], p, s)
    am_unl = np_margin_ce(Z3[2:], pseudo[2:], p, s, sel[2:].astype(float))
    pc = np_pc(Z2[sel], Z3[sel], pseudo[sel])
    uc = np_uc(Z2, Z3, (~sel).astype(float))
    ent = -np_entropy_of_mean(np_softmax(Z1))
    assert out["margin_scale"].item() == pytest.approx(s, rel=1e-6)
    assert out["am_labelled"].item() == pytest.approx(am_lab, rel=1e-6)
    assert out["am_unlabelled"].item() == pytest.approx(am_unl, rel=1e-6)
    assert out["pc"].item() == pytest.approx(pc, rel=1e-6)
    assert out["uc"].item() == pytest.approx(uc, rel=1e-6)
    assert out["entropy"].item() == pytest.approx(ent, rel=1e-6)
    total = am_lab + am_unl + pc + uc + ent
    assert out["loss"].item() == pytest.approx(total, rel=1e-6)
    assert out["selected"].item() == pytest.approx(4 / 6)


def test_lps_losses_are_finite_without_labelled_or_selected_rows():
    nobody = torch.full((6,), -1)
    flat = np.zeros((6, 5))
    out = lps_losses(t(Z1), t(flat), t(Z3), nobody, nobody >= 0, num_known=3)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["am"].item() == 0.0 and out["pc"].item() == 0.0
    assert out["margin_scale"].item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- the method


def batch(b: int = 8, size: int = 32) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, -1, -1, -1, -1])[:b]
    return TrainBatch(
        views=[torch.randn(b, 3, size, size, generator=g) for _ in range(3)],
        y=y,
        labelled=y >= 0,
        index=torch.arange(b),
    )


@pytest.mark.parametrize("k_mode", ["known", "unknown"])
def test_every_trainable_parameter_gets_a_finite_gradient(k_mode):
    torch.manual_seed(0)
    model = LPS(Problem(3, 6, k_mode), {}, TINY_BACKBONE)
    out = model.training_losses(batch())
    assert all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert model.head.weight.grad.abs().sum() > 0
    assert model.head.active == (6 if k_mode == "known" else 6)  # 2 x 3 known under unknown


def test_frozen_layers_of_the_original_recipe_get_no_gradient():
    torch.manual_seed(0)
    prefixes = ["encoder.backbone.layer4", "encoder.neck", "head"]
    model = LPS(Problem(3, 6), {}, TINY_BACKBONE, trainable=prefixes)
    model.training_losses(batch())["loss"].backward()
    for name, p in model.named_parameters():
        inside = any(name.startswith(pre + ".") or name == pre for pre in prefixes)
        assert p.requires_grad == (inside and name != "encoder.neck.bias"), name
        assert (p.grad is not None) == p.requires_grad, name


def test_confidence_thresholds_are_seen_095_and_the_ramp():
    model = LPS(Problem(3, 6, max_epochs=10), {}, TINY_BACKBONE)
    assert model.confidence_thresholds() == (0.95, 0.4)  # before training: epoch 0
    assert LPS(Problem(3, 7, "unknown"), {}, TINY_BACKBONE).k_estimated() == 6
    assert model.k_estimated() is None


# ----------------------------------------------------------------------------- runner


@pytest.mark.parametrize("k_mode", ["known", "unknown"])
def test_smoke_fit_writes_a_complete_record(make_cfg, k_mode):
    from owdfa_bench.runner import run

    cfg = make_cfg("method=lps", f"k={k_mode}")
    assert_complete_smoke_record(run(cfg), k_mode, cfg)


def test_original_recipe_composes_and_freezes_all_but_layer4_and_the_head(make_cfg):
    from owdfa_bench.runner import apply_recipe, build_method

    cfg = apply_recipe(make_cfg("method=lps", "method.recipe=original"))
    optim = cfg.method.optim
    assert (optim.name, optim.lr, optim.weight_decay, optim.momentum) == ("sgd", 0.1, 1e-4, 0.9)
    assert optim.scheduler == "cosine" and optim.eta_min_ratio == 0.0
    assert cfg.method.epochs == 6 and cfg.method.batch_size == 32  # synth preset's CPU schedule
    model = build_method(cfg, Problem(19, 41, max_epochs=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable)
    assert trainable and all(
        n.startswith(("encoder.backbone.layer4.", "encoder.neck.", "head.")) for n in trainable
    )
    assert "encoder.backbone.conv1.weight" not in trainable
    assert "encoder.neck.weight" in trainable and "head.weight" in trainable
    fair = apply_recipe(make_cfg("method=lps"))
    assert fair.method.optim.name == "adam" and fair.method.model.trainable == "all"


def test_smoke_fit_under_the_original_recipe(make_cfg):
    from owdfa_bench.runner import run

    record = run(make_cfg("method=lps", "method.recipe=original"))
    assert record["status"] == "complete"
    assert record["config"]["method"]["optim"]["name"] == "sgd"
