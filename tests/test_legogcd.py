"""LegoGCD: DKL, LER and the class prior on hand-made tensors (values derived with numpy), the
total, gradient flow, the original recipe, and smoke fits through the runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    SMALL_HEADS,
    TINY_BACKBONE,
    assert_complete_smoke_record,
    assert_heads_get_gradients,
    np_softmax,
    scalar_terms,
    t,
    two_view_batch,
)

from methods.legogcd import (
    LegoGCD,
    dual_view_kl,
    legogcd_total,
    ler_selection,
    local_entropy_loss,
    update_class_prior,
)
from owdfa_bench.method import Problem

Z1 = np.array([[0.9, -0.2, 0.1, 0.4], [0.2, 0.8, -0.5, 0.0], [-0.3, 0.1, 0.7, 0.2]])
Z2 = np.array([[0.5, 0.3, -0.1, 0.2], [0.1, 0.9, 0.0, -0.4], [0.2, -0.6, 0.4, 0.6]])


# ----------------------------------------------------------------------------- DKL


def test_dkl_code_form_applies_log_softmax_to_the_probabilities():
    p1, p2 = np_softmax(Z1 / 0.1), np_softmax(Z2 / 0.1)
    lsm = lambda p: np.log(np_softmax(p))  # noqa: E731 (log_softmax of a probability vector)
    expected = (p1 * (lsm(p1) - lsm(p2))).sum(1).mean()
    got = dual_view_kl(t(Z1), t(Z2), 0.1, form="code").item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_dkl_kl_form_is_the_kl_divergence():
    p1, p2 = np_softmax(Z1 / 0.1), np_softmax(Z2 / 0.1)
    expected = (p1 * (np.log(p1) - np.log(p2))).sum(1).mean()
    assert dual_view_kl(t(Z1), t(Z2), 0.1, form="kl").item() == pytest.approx(expected, rel=1e-10)
    assert dual_view_kl(t(Z1), t(Z1), 0.1, form="kl").item() == pytest.approx(0.0, abs=1e-12)


def test_dkl_gradients_reach_both_views_unless_view2_is_detached():
    for detach, view2_grad in ((False, True), (True, False)):
        a, b = t(Z1, grad=True), t(Z2, grad=True)
        dual_view_kl(a, b, 0.1, detach_view2=detach).backward()
        assert a.grad.abs().sum() > 0
        assert (b.grad is not None and b.grad.abs().sum() > 0) == view2_grad


def test_dkl_rejects_an_unknown_form():
    with pytest.raises(ValueError, match="dkl_form"):
        dual_view_kl(t(Z1), t(Z2), form="symmetric")


# ----------------------------------------------------------------------------- LER


def test_ler_selection_takes_confident_unlabelled_rows_predicted_known():
    logits = t(
        [
            [1.0, 0.0, 0.0, 0.0],  # labelled, confident, known: not selected (labelled)
            [1.0, 0.0, 0.0, 0.0],  # unlabelled, confident, known -> selected
            [0.0, 0.0, 1.0, 0.0],  # unlabelled, confident, novel id 2: not selected
            [0.1, 0.0, 0.05, 0.0],  # unlabelled, known argmax but not confident
        ]
    )
    labelled = torch.tensor([True, False, False, False])
    # softmax(l / 0.1): row 1 max = e^10 / (e^10 + 3) ~ 0.9999; row 3 max ~ 0.34
    selected = ler_selection(logits, labelled, num_known=2, threshold=0.7, student_temp=0.1)
    assert selected.tolist() == [False, True, False, False]


def test_local_entropy_loss_matches_numpy_with_a_skewed_prior():
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    selected = np.array([True, False, True])
    target = np_softmax(Z1 / 0.05)
    log_pred = np.log(np_softmax(Z1 / 0.05 + 0.4 * np.log(prior)))
    per_row = -(target * log_pred).sum(1)
    expected = (per_row * selected).sum() / len(Z1)  # a mean over ALL rows
    got = local_entropy_loss(t(Z1), torch.tensor(selected), t(prior), 0.05, 0.4).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_local_entropy_with_a_uniform_prior_is_entropy_minimisation_with_a_live_target():
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    selected = torch.ones(3, dtype=torch.bool)
    a = t(Z1, grad=True)
    local_entropy_loss(a, selected, uniform).backward()
    b = t(Z1, grad=True)
    p = torch.softmax(b / 0.05, dim=1)
    (-(p * p.log()).sum(1).mean()).backward()  # Shannon entropy, target not detached
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_class_prior_update_by_hand():
    prior = t([0.25, 0.25, 0.25, 0.25])
    expected = 0.999 * 0.25 + 0.001 * np_softmax(Z1).mean(0)  # softmax at temperature 1
    got = update_class_prior(prior, t(Z1), 0.999)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert not got.requires_grad


def test_legogcd_total_weights():
    terms = scalar_terms(
        distill=1.0, dkl=0.5, memax=2.0, cls=3.0, infonce=4.0, supcon=5.0, ler=0.25
    )
    # (1-.35)(1 + .5 + 1*2) + .35*3 + .65*4 + .35*5 + 2*.25
    expected = 0.65 * 3.5 + 1.05 + 2.6 + 1.75 + 0.5
    assert legogcd_total(terms, 0.35, 1.0, 2.0).item() == pytest.approx(expected)


# ----------------------------------------------------------------------------- model


def test_head_size_and_k_estimate_per_k_mode():
    known = LegoGCD(Problem(3, 6, "known"), {}, TINY_BACKBONE, **SMALL_HEADS)
    assert known.head.active == 6 and known.prior.shape == (6,)
    assert known.k_estimated() is None
    unknown = LegoGCD(Problem(3, 6, "unknown"), {}, TINY_BACKBONE, **SMALL_HEADS)
    assert unknown.head.active == 12  # 2 x the true total, the harness's SimGCD rule
    assert unknown.k_estimated() == 12  # before any step: the head size
    unknown.usage[[0, 4]] = 3
    assert unknown.k_estimated() == 2
    assert LegoGCD(Problem(3, 6, "unknown", k_estimate=8), {}, TINY_BACKBONE).head.active == 8


def test_every_trainable_parameter_gets_a_finite_gradient_and_the_prior_moves_once():
    torch.manual_seed(0)
    method = LegoGCD(
        Problem(num_known=3, num_classes=6), {}, TINY_BACKBONE, ler_threshold=0.0, **SMALL_HEADS
    )
    prior_before = method.prior.clone()
    out = method.training_losses(two_view_batch())
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["ler_selected"] > 0  # threshold 0: every unlabelled row predicted known counts
    out["loss"].backward()
    assert_heads_get_gradients(method)
    assert not torch.equal(method.prior, prior_before)
    assert float(method.prior.sum()) == pytest.approx(1.0, abs=1e-6)


def test_predict_logits_are_the_student_scale():
    method = LegoGCD(Problem(3, 6), {}, TINY_BACKBONE, **SMALL_HEADS).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        scores = method.predict_logits(x)
        cos = method.logits(method.encoder(x))
    torch.testing.assert_close(scores, cos / 0.1)
    assert method.confidence_thresholds() == (0.7, 1.0)


def test_original_recipe_composes_and_trains_layer4_and_heads_only():
    from conftest import compose_config

    from owdfa_bench.runner import apply_recipe, build_method

    cfg = apply_recipe(compose_config(["method=legogcd", "method.recipe=original"]))
    assert cfg.method.optim.name == "sgd" and cfg.method.optim.lr == 0.1
    assert cfg.method.epochs == 6  # the synthetic preset's CPU schedule also for this recipe
    method = build_method(cfg, Problem(num_known=3, num_classes=6, max_epochs=6))
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("encoder.backbone.layer4.", "encoder.neck.", "projector.", "head."))
        for n in trainable
    )
    assert "encoder.backbone.conv1.weight" not in trainable
    assert "head.weight" in trainable and "encoder.neck.weight" in trainable
    opt = method.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[1]["weight_decay"] == 0.0
    fair = apply_recipe(compose_config(["method=legogcd"]))
    assert fair.method.optim.name == "adam" and fair.method.model.trainable == "all"


# ----------------------------------------------------------------------------- smoke fits


@pytest.mark.parametrize("k", ["known", "unknown"])
def test_smoke_fit_writes_a_complete_record(make_cfg, k):
    from owdfa_bench.runner import run

    record = run(make_cfg("method=legogcd", f"k={k}"))
    assert_complete_smoke_record(record, k, k_bound="num_classes")
