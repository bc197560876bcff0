"""OwMatch: loss terms on hand-made tensors (values by hand or with numpy), the multi-crops, the
EMA, gradient flow, the recipes, the third view, and smoke fits through the runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_BACKBONE, assert_complete_smoke_record, np_softmax, t
from PIL import Image
from torch import nn

from methods.common_losses import open_world_head_rows
from methods.owmatch import (
    OwMatch,
    class_thresholds,
    clustering_loss,
    color_distortion,
    confidence_loss,
    group_thresholds,
    hue_rotation,
    multi_crops,
    pin_labelled_logits,
    push_queue,
    random_resized_boxes,
    sinkhorn_codes,
    soft_cross_entropy,
    update_group_tracker,
)
from owdfa_bench.method import Problem, TrainBatch
from owdfa_bench.models import ema_update


def np_sinkhorn(z: np.ndarray, scale: float, eps: float, iters: int) -> np.ndarray:
    """The reference's algorithm, written out plainly (no max subtraction)."""
    q = np.exp(z / scale / eps).T
    q = q / q.sum()
    c, n = q.shape
    for _ in range(iters):
        q = q / q.sum(axis=1, keepdims=True) / c
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T


Z = np.array([[4.0, -2.0, 1.0], [0.5, 3.0, -1.0], [-3.0, 0.0, 6.0], [2.0, 2.0, -5.0]])


# ----------------------------------------------------------------------------- self-labelling


def test_pin_labelled_logits_sets_the_true_class_to_the_hard_logit():
    z = t(Z).requires_grad_(True)
    y = torch.tensor([2, -1, 0, -1])
    out = pin_labelled_logits(z, y, y >= 0, 10.0)
    expected = Z.copy()
    expected[0, 2] = expected[2, 0] = 10.0
    np.testing.assert_array_equal(out.numpy(), expected)
    assert not out.requires_grad and z.grad is None  # a detached copy, the input untouched


def test_push_queue_grows_by_whole_batches_then_keeps_its_length():
    queue = torch.zeros(0, 2)
    lengths = []
    for i in range(5):
        queue = push_queue(queue, torch.full((2, 2), float(i)), queue_len=5)
        lengths.append(len(queue))
    assert lengths == [2, 4, 6, 6, 6]  # overshoots 5 (4 < 5 before the 3rd batch), then FIFO
    assert queue[:, 0].tolist() == [2, 2, 3, 3, 4, 4]  # oldest dropped, newest last
    exact = torch.zeros(0, 1)
    for i in range(4):
        exact = push_queue(exact, torch.full((2, 1), float(i)), queue_len=4)
    assert exact.flatten().tolist() == [2, 2, 3, 3]  # 1024 at batch 128: stays exactly 1024


def test_sinkhorn_matches_numpy_and_has_its_marginals():
    got = sinkhorn_codes(t(Z), scale=10.0, epsilon=0.05, iters=10).numpy()
    np.testing.assert_allclose(got, np_sinkhorn(Z, 10.0, 0.05, 10), rtol=1e-10)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)  # one code per row
    # once converged each class holds N / C of the mass (the uniform marginal)
    mild = sinkhorn_codes(t(Z * 0.1), iters=50).numpy()
    np.testing.assert_allclose(mild.sum(axis=0), len(Z) / 3, rtol=1e-3)


def test_sinkhorn_codes_of_equal_logits_are_uniform_and_pinned_rows_follow_their_label():
    flat = sinkhorn_codes(torch.zeros(6, 3, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(flat, 1 / 3, rtol=1e-12)
    rng = np.random.default_rng(0)
    z = t(np.clip(rng.normal(0, 3, (12, 4)), -10, 10))
    y = torch.tensor([3, 1] + [-1] * 10)
    codes = sinkhorn_codes(pin_labelled_logits(z, y, y >= 0, 10.0))
    assert codes[:2].argmax(1).tolist() == [3, 1]


def test_sinkhorn_raises_instead_of_returning_nan():
    with pytest.raises(FloatingPointError):
        sinkhorn_codes(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))


def test_sinkhorn_accepts_bf16_and_returns_float32():
    codes = sinkhorn_codes(t(Z).to(torch.bfloat16))
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()


def test_soft_cross_entropy_and_both_clustering_forms_match_numpy():
    q2 = np_softmax(Z * 0.7)
    q1 = np_softmax(-Z)
    z1, z2 = Z, Z[::-1].copy()
    crops = [Z * 0.5, Z + 1.0]

    def ce(q, z):
        return -(q * np.log(np_softmax(z))).sum(1).mean()

    assert soft_cross_entropy(t(q2), t(z1)).item() == pytest.approx(ce(q2, z1), rel=1e-12)
    with_crops = clustering_loss(t(q2), t(z1), [t(c) for c in crops]).item()
    expected = (ce(q2, z1) + ce(q2, crops[0]) + ce(q2, crops[1])) / 3
    assert with_crops == pytest.approx(expected, rel=1e-12)
    without = clustering_loss(t(q2), t(z1), codes1=t(q1), logits2=t(z2)).item()
    assert without == pytest.approx((ce(q2, z1) + ce(q1, z2)) / 2, rel=1e-12)
    with pytest.raises(ValueError):
        clustering_loss(t(q2), t(z1))


# ----------------------------------------------------------------------------- thresholds


def test_group_thresholds_by_hand():
    mu = t([0.2, 0.4, 0.1])
    # 0.8 * [0.5, 1, 0.25] = [0.4, 0.8, 0.2] -> the last one floored at 0.3
    np.testing.assert_allclose(group_thresholds(t(0.8), mu, 0.3).numpy(), [0.4, 0.8, 0.3])
    both = class_thresholds(t([0.8, 0.6]), mu, t([0.5, 0.5]), 0.3).numpy()
    np.testing.assert_allclose(both, [0.4, 0.8, 0.3, 0.6, 0.6])
    # the start values (tau = mu = 0.5) give 0.5 everywhere
    start = class_thresholds(t([0.5, 0.5]), t([0.5] * 2), t([0.5] * 3)).numpy()
    np.testing.assert_allclose(start, 0.5)


def test_update_group_tracker_matches_numpy_and_skips_empty_groups():
    probs = np_softmax(Z)  # 4 rows, 3 outputs; seen group = column 0, novel = columns 1-2
    seen = probs.argmax(1) < 1
    tau, mu = update_group_tracker(t(0.5), t([0.5]), t(probs), torch.tensor(seen), slice(0, 1))
    rows = probs[seen]
    assert tau.item() == pytest.approx(0.99 * 0.5 + 0.01 * rows.max(1).mean(), rel=1e-12)
    np.testing.assert_allclose(mu.numpy(), 0.99 * 0.5 + 0.01 * rows[:, :1].mean(0), rtol=1e-12)
    tau_n, mu_n = update_group_tracker(
        t(0.5), t([0.5, 0.5]), t(probs), torch.tensor(~seen), slice(1, 3)
    )
    np.testing.assert_allclose(
        mu_n.numpy(), 0.99 * 0.5 + 0.01 * probs[~seen][:, 1:].mean(0), rtol=1e-12
    )
    none = torch.zeros(4, dtype=torch.bool)
    same_tau, same_mu = update_group_tracker(t(0.7), t([0.3]), t(probs), none, slice(0, 1))
    assert same_tau.item() == 0.7 and same_mu.tolist() == [0.3]


def test_confidence_loss_uses_a_strict_threshold_and_the_batch_size():
    weak = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.4, 0.3, 0.3]])
    strong = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.5, 0.5, 0.5]])
    thresholds = t([0.9, 0.6, 0.6])  # row 0: 0.9 is not > 0.9; row 1 passes; row 2: 0.4 < 0.9
    loss, mask = confidence_loss(t(strong), t(weak), thresholds)
    assert mask.tolist() == [False, True, False]
    expected = -np.log(np_softmax(strong)[1, 1]) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- multi-crops


def test_random_resized_boxes_lie_inside_the_image_with_the_crop_scale():
    g = torch.Generator().manual_seed(0)
    like = torch.zeros(1)
    boxes = random_resized_boxes(500, 32, 32, (0.3, 0.75), like, g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    area = (w * h / 1024).numpy()
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 0.75 + 1e-6
    ratio = (w / h).numpy()
    assert ratio.min() >= 0.75 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    # scale 1 never fits a non-square ratio: the fallback is the whole image, as torchvision
    whole = random_resized_boxes(4, 8, 8, (1.0, 1.0), like, g)
    assert whole.tolist() == [[0.0, 0.0, 8.0, 8.0]] * 4


def test_hue_rotation_keeps_greys_and_is_the_identity_at_zero():
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(hue_rotation(x, torch.zeros(3)).numpy(), x.numpy(), atol=1e-6)
    grey = x[:, :1].expand(3, 3, 4, 4).contiguous()
    np.testing.assert_allclose(hue_rotation(grey, torch.full((3,), 0.1)), grey, atol=1e-5)
    # a full turn is the identity as well
    np.testing.assert_allclose(hue_rotation(x, torch.ones(3)).numpy(), x.numpy(), atol=1e-5)


def test_color_distortion_solarises_above_128_and_is_identity_when_off():
    x = torch.tensor([0.1, 0.49, 0.51, 0.9]).view(1, 1, 2, 2).expand(2, 3, 2, 2).contiguous()
    off = color_distortion(x, jitter_p=0.0, solarize_p=0.0, equalize_p=0.0)
    assert torch.equal(off, x)
    sol = color_distortion(x, jitter_p=0.0, solarize_p=1.0, equalize_p=0.0)
    expected = torch.tensor([0.1, 0.49, 0.49, 0.1]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    np.testing.assert_allclose(sol.numpy(), expected.numpy(), atol=1e-6)
    jittered = color_distortion(torch.rand(8, 3, 6, 6), 0.5, jitter_p=1.0)
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_multi_crops_shape_order_and_normalisation():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 32, 32, generator=g)
    crops = multi_crops(images, 2, 18, generator=g)
    assert crops.shape == (10, 3, 18, 18) and torch.isfinite(crops).all()
    # constant images give constant crops (after flip and crop): image i -> rows i and 5 + i
    const = torch.zeros(2, 3, 16, 16)
    const[1] += 0.5
    out = multi_crops(const, 2, 9, color_strength=0.0, generator=g)
    assert out.shape == (4, 3, 9, 9)
    for row, src in ((0, 0), (1, 1), (2, 0), (3, 1)):
        spread = out[row].amax(dim=(1, 2)) - out[row].amin(dim=(1, 2))
        assert float(spread.max()) < 1e-5, (row, src)


# ----------------------------------------------------------------------------- EMA


def test_ema_update_averages_every_float_entry_and_decays_the_student():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        ema[1].running_mean.fill_(1.0)
        student[1].running_mean.fill_(3.0)
        student[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ema_update(ema, student, decay=0.9, student_decay=0.1)
    after = ema.state_dict()
    for key, value in before.items():
        if key.endswith("num_batches_tracked"):
            assert int(after[key]) == 0  # integer entries are not averaged
            assert int(student.state_dict()[key]) == 7
            continue
        # every float entry of the EMA copy started at 1 (running_var's default is 1 as well)
        np.testing.assert_allclose(after[key].numpy(), 0.9 + 0.1 * value.numpy(), 1e-6)
        np.testing.assert_allclose(student.state_dict()[key].numpy(), 0.9 * value.numpy(), 1e-6)


# ----------------------------------------------------------------------------- the method


def batch(b: int = 8, size: int = 32, views: int = 3, labelled_rows: int = 4) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, -1, -1, -1, -1])[:b]
    y[labelled_rows:] = -1
    return TrainBatch(
        views=[torch.randn(b, 3, size, size, generator=g) for _ in range(views)],
        y=y,
        labelled=y >= 0,
        index=torch.arange(b),
    )


@pytest.mark.parametrize("n_crop", [2, 0])
@pytest.mark.parametrize("k_mode", ["known", "unknown"])
def test_every_trainable_parameter_gets_a_finite_gradient(n_crop, k_mode):
    torch.manual_seed(0)
    model = OwMatch(Problem(3, 6, k_mode), {}, TINY_BACKBONE, n_crop=n_crop, queue_len=16)
    out = model.training_losses(batch())
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["loss"].item() == pytest.approx(
        (out["sup"] + out["conf"] + out["clu"]).item(), rel=1e-6
    )
    out["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("ema.") for n in trainable)
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert model.head.weight.grad.abs().sum() > 0
    assert len(model.queue2) == 8 and len(model.queue1) == (8 if n_crop == 0 else 0)


def test_a_batch_without_labelled_rows_is_finite():
    torch.manual_seed(0)
    model = OwMatch(Problem(3, 6), {}, TINY_BACKBONE, queue_len=16)
    out = model.training_losses(batch(labelled_rows=0))
    assert out["sup"].item() == 0.0 and torch.isfinite(out["loss"])


def test_thresholds_are_read_before_the_update_and_then_move():
    torch.manual_seed(0)
    model = OwMatch(Problem(3, 6), {}, TINY_BACKBONE, queue_len=16)
    assert model.confidence_thresholds() == (0.5, 0.5)  # --adathres-init 0.5
    model.training_losses(batch())
    seen, novel = model.confidence_thresholds()
    assert (seen, novel) != (0.5, 0.5) and 0.3 <= min(seen, novel) <= max(seen, novel) <= 1.0
    assert float(model.thr_tau[0]) != 0.5 or float(model.thr_tau[1]) != 0.5


def test_ema_model_is_what_predicts_and_follows_the_student():
    torch.manual_seed(0)
    model = OwMatch(Problem(3, 6), {}, TINY_BACKBONE, ema_decay=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the student moves; the EMA copy has not seen it yet
    model.eval()
    with torch.no_grad():
        before = model.predict_logits(x)
        assert torch.allclose(before, model.logits(x, ema=True))
        assert not torch.allclose(before, model.logits(x))
        model.update_ema()
        w = model.ema["head"].weight
        assert torch.allclose(w, model.head.weight - 0.5, atol=1e-6)
    no_ema = OwMatch(Problem(3, 6), {}, TINY_BACKBONE, ema_decay=None).eval()
    with torch.no_grad():
        assert torch.equal(no_ema.predict_logits(x), no_ema.logits(x))


def test_unknown_k_head_size_and_k_estimated():
    assert open_world_head_rows(Problem(3, 7, "known")) == 7
    assert open_world_head_rows(Problem(3, 7, "unknown", k_estimate=9)) == 9
    assert open_world_head_rows(Problem(3, 7, "unknown"), 2.0) == 6  # 2 x K_known, not 2 x 7
    model = OwMatch(Problem(3, 7, "unknown"), {}, TINY_BACKBONE)
    assert model.head.active == 6 and model.k_estimated() == 6  # before any step: the head
    assert model.thr_mu_seen.numel() == 3 and model.thr_mu_novel.numel() == 3
    model.usage[[0, 4]] = 5
    assert model.k_estimated() == 2
    assert OwMatch(Problem(3, 7), {}, TINY_BACKBONE).k_estimated() is None


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="threshold_init"):
        OwMatch(Problem(3, 6), {}, TINY_BACKBONE, threshold_init=-1)
    with pytest.raises(ValueError, match="n_crop"):
        OwMatch(Problem(3, 6), {}, TINY_BACKBONE, n_crop=-1)


# ----------------------------------------------------------------------------- views


def test_the_two_weak_views_are_independent_draws(tmp_path):
    from owdfa_bench.data.datamodule import DataSplits, OWDFADataModule

    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :8] = 255  # left half white: a flip changes the image
    Image.fromarray(arr).save(tmp_path / "a.png")
    splits = DataSplits(
        labelled=[(str(tmp_path / "a.png"), 0)],
        unlabelled=[],
        test=[],
        num_known=1,
        classes=[{"label": 0}],
    )
    dm = OWDFADataModule(splits, 16, OwMatch.train_views, batch_size=1)
    dataset = dm.train_dataset()
    torch.manual_seed(0)
    differ = 0
    for _ in range(40):
        v1, v2, strong = dataset[0]["views"]
        assert v1.shape == v2.shape == strong.shape == (3, 16, 16)
        if not torch.equal(v1, v2):
            differ += 1
            assert torch.equal(v1, v2.flip(-1))  # the weak view only flips
    assert 5 < differ < 35  # independent draws: they differ about half the time


# ----------------------------------------------------------------------------- runner


@pytest.mark.parametrize("k_mode", ["known", "unknown"])
def test_smoke_fit_writes_a_complete_record(make_cfg, k_mode):
    from owdfa_bench.runner import run

    cfg = make_cfg("method=owmatch", f"k={k_mode}")
    assert_complete_smoke_record(run(cfg), k_mode, cfg)


def test_original_recipe_composes_with_sgd_ema_decay_and_the_whole_network(make_cfg):
    from owdfa_bench.runner import apply_recipe, build_method

    cfg = apply_recipe(make_cfg("method=owmatch", "method.recipe=original"))
    assert cfg.method.optim.name == "sgd" and cfg.method.optim.lr == 0.1
    assert cfg.method.optim.scheduler == "cosine" and cfg.method.optim.eta_min_ratio == 0.0
    assert cfg.method.epochs == 6 and cfg.method.batch_size == 32  # synth preset's CPU schedule
    assert cfg.method.model.ema_student_decay == 2.0e-5
    model = build_method(cfg, Problem(19, 41, max_epochs=2))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    # the reference freezes nothing; the BNNeck bias is frozen by design and the EMA is a copy
    assert [n for n in frozen if not n.startswith("ema.")] == ["encoder.neck.bias"]
    fair = apply_recipe(make_cfg("method=owmatch"))
    assert fair.method.optim.name == "adam" and fair.method.model.ema_student_decay == 0.0
