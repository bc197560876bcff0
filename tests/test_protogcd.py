"""ProtoGCD: DAPL schedule and targets, the distillation, prototype separation and the total on
hand-made tensors (values derived with numpy), gradient flow, the original recipe, and smoke
fits through the runner."""

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

from methods.protogcd import (
    ProtoGCD,
    dapl_distillation_loss,
    dapl_ratio,
    dapl_targets,
    protogcd_total,
    prototype_separation_loss,
)
from owdfa_bench.method import Problem

Z1 = np.array([[0.9, -0.2, 0.1], [0.2, 0.8, 0.75], [-0.3, 0.1, 0.7], [0.5, 0.45, 0.0]])
Z2 = np.array([[0.5, 0.3, -0.1], [0.1, 0.9, 0.0], [0.2, -0.6, 0.4], [0.0, 0.2, 0.6]])


# ----------------------------------------------------------------------------- DAPL


# (wait, ramp, init, final): the original recipe's, an odd one, the default recipe's 25 of 50
DAPL_SCHEDULES = ((0, 100, 0.0, 1.0), (3, 10, 0.2, 0.9), (0, 25, 0.0, 1.0))


def official_ratio_schedule(wait, ramp, init, final, total=200):
    """`DistillLoss_ratio.ratio_schedule` (models/loss.py @ 8835a4d)."""
    return np.concatenate(
        [np.zeros(wait), np.linspace(init, final, ramp), np.ones(total - wait - ramp) * final]
    )


def test_dapl_ratio_is_the_official_schedule():
    for wait, ramp, init, final in DAPL_SCHEDULES:
        expected = official_ratio_schedule(wait, ramp, init, final)
        got = [dapl_ratio(e, wait, ramp, init, final) for e in range(len(expected))]
        np.testing.assert_array_equal(got, expected)  # bit for bit
    assert dapl_ratio(500, 0, 100) == 1.0  # past the schedule: the final ratio
    assert dapl_ratio(0, 0, 1, 0.3, 1.0) == 0.3


def test_dapl_hard_label_count_is_the_official_one_at_every_batch_size():
    """int(B * ratio_schedule[epoch]), as `DistillLoss_ratio.forward` counts its hard labels, for
    B = 1..256 at every epoch; the closed form init + (final - init) * step / (ramp - 1) rounds
    apart and gave a row fewer at some B (B = 55 at epoch 27 of a 100-epoch ramp)."""
    closed_form_misses = 0
    for wait, ramp, init, final in DAPL_SCHEDULES:
        for epoch, official in enumerate(official_ratio_schedule(wait, ramp, init, final)):
            ratio = dapl_ratio(epoch, wait, ramp, init, final)
            step = min(max(epoch - wait, 0), ramp - 1)
            closed = 0.0 if epoch < wait else init + (final - init) * step / (ramp - 1)
            for b in range(1, 257):
                assert int(b * ratio) == int(b * official), (wait, ramp, epoch, b)
                closed_form_misses += int(b * closed) != int(b * official)
    assert closed_form_misses > 0  # the range covers the batch sizes where the two differ
    probs = torch.softmax(torch.randn(55, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    _, hard = dapl_targets(probs, dapl_ratio(27, 0, 100))
    assert int(hard.sum()) == int(55 * np.linspace(0.0, 1.0, 100)[27]) == 15


def test_dapl_targets_make_the_most_separated_rows_one_hot():
    probs = t([[0.5, 0.4, 0.1], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.34, 0.33, 0.33]])
    # top-1 / top-2 ratios: 1.25, 18, 3.5, 1.03 -> floor(4 * 0.5) = 2 hard rows: 1 and 2
    q, hard = dapl_targets(probs, 0.5)
    assert hard.tolist() == [False, True, True, False]
    np.testing.assert_allclose(q.numpy()[[1, 2]], [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(q.numpy()[[0, 3]], probs.numpy()[[0, 3]])
    assert not dapl_targets(probs, 0.2)[1].any()  # floor(4 * 0.2) = 0
    assert dapl_targets(probs, 1.0)[1].all()
    # only eligible rows compete: floor(2 * 0.5) = 1 of rows 0 and 3 (row 0 has the larger ratio)
    _, hard = dapl_targets(probs, 0.5, eligible=torch.tensor([True, False, False, True]))
    assert hard.tolist() == [True, False, False, False]


def test_dapl_distillation_matches_numpy():
    ratio, tt, ts = 0.5, 0.05, 0.1
    targets = []
    for z in (Z1, Z2):
        q = np_softmax(z / tt)
        top = np.sort(q, axis=1)[:, ::-1]
        score = top[:, 0] / (top[:, 1] + 1e-6)
        hard = np.argsort(-score, kind="stable")[: int(len(z) * ratio)]
        q = q.copy()
        q[hard] = np.eye(z.shape[1])[q[hard].argmax(1)]
        targets.append(q)
    log_p = lambda z: np.log(np_softmax(z / ts))  # noqa: E731
    a = -(targets[0] * log_p(Z2)).sum(1).mean()  # teacher of view 1 -> student of view 2
    b = -(targets[1] * log_p(Z1)).sum(1).mean()
    got, share = dapl_distillation_loss(t(Z1), t(Z2), ratio, tt, ts)
    assert got.item() == pytest.approx((a + b) / 2, rel=1e-10)
    assert share.item() == pytest.approx(0.5)


def test_dapl_teacher_is_detached():
    a, b = t(Z1, grad=True), t(Z2, grad=True)
    loss, _ = dapl_distillation_loss(a, b, 0.5)
    grad_a = torch.autograd.grad(loss, a, retain_graph=True)[0]
    # only the student side carries gradient: the same as with constant teachers
    c = t(Z1, grad=True)
    loss_c, _ = dapl_distillation_loss(c, b.detach(), 0.5)
    grad_c = torch.autograd.grad(loss_c, c)[0]
    np.testing.assert_allclose(grad_a.numpy(), grad_c.numpy(), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- separation


def test_prototype_separation_matches_numpy():
    w = np.array([[1.0, 0.0, 0.2], [0.6, 0.8, 0.0], [0.0, 0.3, 1.0], [-1.0, 0.1, 0.0]])
    p = w / np.linalg.norm(w, axis=1, keepdims=True)
    logits = p @ p.T / 0.1
    c = len(p)
    rows = [np.log(np.exp(np.delete(logits[i], i)).sum() / (c - 1)) for i in range(c)]
    assert prototype_separation_loss(t(w), 0.1).item() == pytest.approx(np.mean(rows), rel=1e-10)


def test_prototype_separation_pushes_prototypes_apart_and_is_zero_for_one():
    w = t([[1.0, 0.0], [0.9, 0.1]], grad=True)
    prototype_separation_loss(w).backward()
    step = w.detach() - 0.01 * w.grad
    assert prototype_separation_loss(step).item() < prototype_separation_loss(w.detach()).item()
    one = torch.ones(1, 3, requires_grad=True)
    zero = prototype_separation_loss(one)
    assert zero.item() == 0.0 and zero.requires_grad


def test_protogcd_total_weights():
    terms = scalar_terms(distill=1.0, entropy=2.0, sep=4.0, cls=3.0, infonce=4.0, supcon=5.0)
    # (1-.35)(1 + 2*2 + .1*4) + .35*3 + .65*4 + .35*5
    expected = 0.65 * 5.4 + 1.05 + 2.6 + 1.75
    assert protogcd_total(terms, 0.35, 2.0, 0.1).item() == pytest.approx(expected)


# ----------------------------------------------------------------------------- model


def test_head_size_and_k_estimate_per_k_mode():
    assert ProtoGCD(Problem(3, 6), {}, TINY_BACKBONE).k_estimated() is None
    unknown = ProtoGCD(Problem(3, 6, "unknown"), {}, TINY_BACKBONE, **SMALL_HEADS)
    assert unknown.head.active == 12 and unknown.k_estimated() == 12
    unknown.usage[[1, 2, 7]] = 1
    assert unknown.k_estimated() == 3
    assert ProtoGCD(Problem(3, 6, "unknown", k_estimate=5), {}, TINY_BACKBONE).head.active == 5


@pytest.mark.parametrize("on_labelled", [True, False])
def test_every_trainable_parameter_gets_a_finite_gradient(on_labelled):
    torch.manual_seed(0)
    method = ProtoGCD(
        Problem(num_known=3, num_classes=6),
        {},
        TINY_BACKBONE,
        dapl_init_ratio=0.5,
        dapl_on_labelled=on_labelled,
        **SMALL_HEADS,
    )
    out = method.training_losses(two_view_batch())
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["dapl_ratio"].item() == 0.5
    # floor(8 * 0.5) = 4 of 8 rows per view, or floor(4 unlabelled * 0.5) = 2
    assert out["dapl_hard_share"].item() == pytest.approx(0.5 if on_labelled else 0.25)
    out["loss"].backward()
    assert_heads_get_gradients(method)


def test_original_recipe_composes_and_trains_layer4_and_heads_only():
    from conftest import compose_config

    from owdfa_bench.runner import apply_recipe, build_method

    cfg = apply_recipe(compose_config(["method=protogcd", "method.recipe=original"]))
    assert cfg.method.optim.name == "sgd" and cfg.method.model.dapl_ramp_epochs == 3
    method = build_method(cfg, Problem(num_known=3, num_classes=6, max_epochs=6))
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("encoder.backbone.layer4.", "encoder.neck.", "projector.", "head."))
        for n in trainable
    )
    opt = method.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- smoke fits


@pytest.mark.parametrize("k", ["known", "unknown"])
def test_smoke_fit_writes_a_complete_record(make_cfg, k):
    from owdfa_bench.runner import run

    record = run(make_cfg("method=protogcd", f"k={k}"))
    assert_complete_smoke_record(record, k, k_bound="num_classes")
