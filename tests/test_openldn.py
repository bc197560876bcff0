"""OpenLDN: stage A's terms (pair MSE, SimNet's pair layout, FixMatch term, the bi-level
meta-gradient), the class-balanced handover, MixMatch's sharpening, mixup and losses, the
EMA, the two-stage schedule, the method's own steps, and an exact resume inside stage B."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BACKBONE, np_log_softmax, np_softmax, t

from methods.common_losses import masked_cross_entropy
from methods.openldn import (
    OpenLDN,
    SimNet,
    class_balanced_pseudo_labels,
    cosine_similarity_matrix,
    discovery_length,
    discovery_losses,
    fixmatch_term,
    linear_rampup,
    mixmatch_losses,
    mixup,
    mixup_lambda,
    reference_pair_inputs,
    sharpen,
    simnet_meta_gradients,
    symmetric_pair_mse,
    two_stage_lr_factor,
)
from owdfa_bench.method import Problem, TrainBatch


# ----------------------------------------------------------------------------- stage A terms
def test_symmetric_pair_mse_is_the_mean_squared_gap_with_gradients_to_both():
    p = t([[1.0, 0.5], [0.5, 1.0]], grad=True)
    s = t([[0.8, 0.5], [0.1, 0.9]], grad=True)
    loss = symmetric_pair_mse(p, s)
    assert float(loss) == pytest.approx((0.04 + 0.0 + 0.16 + 0.01) / 4)
    loss.backward()
    np.testing.assert_allclose(s.grad.numpy(), 2 * (s - p).detach().numpy() / 4)
    np.testing.assert_allclose(p.grad.numpy(), -s.grad.numpy())


def test_cosine_similarity_matrix_clamps_the_norms():
    a = t([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    sim = cosine_similarity_matrix(a, a)
    np.testing.assert_allclose(sim[0].numpy(), [1.0, 0.0, 0.6])
    assert torch.isfinite(sim).all() and float(sim[1, 1]) == 0.0  # zero row: no NaN


def test_simnet_pair_layout_by_hand():
    """S_ij = sigmoid(w2 relu(W1 [f_j; f_i] + b1) + b2), as the reference's feat_pairs view."""
    net = SimNet(dim=1, hidden=1).double()
    with torch.no_grad():
        net.linear1.weight.copy_(t([[1.0, 2.0]]))
        net.linear1.bias.zero_()
        net.linear2.weight.fill_(1.0)
        net.linear2.bias.zero_()
    sim = net(t([[1.0], [3.0]]))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # (i, j): f_j + 2 f_i
    np.testing.assert_allclose(sim.detach().numpy(), [[sig(3), sig(5)], [sig(7), sig(9)]])


def test_simnet_equals_the_reference_concatenated_pairs():
    torch.manual_seed(0)
    net = SimNet(dim=3, hidden=5).double()
    f = torch.randn(4, 3, dtype=torch.float64)
    pairs = reference_pair_inputs(f)
    assert pairs.shape == (16, 6)
    torch.testing.assert_close(pairs[1 * 4 + 2], torch.cat([f[2], f[1]]))  # row i*n+j: [f_j, f_i]
    reference = torch.sigmoid(net.linear2(F.relu(net.linear1(pairs)))).view(-1, 4)
    torch.testing.assert_close(net(f), reference)


def test_fixmatch_term_by_hand():
    weak = t([[2.0, 0.0], [0.0, 0.1], [0.0, 3.0]])
    strong = t([[1.0, 1.0], [0.5, 0.0], [0.0, 2.0]])
    loss, mask = fixmatch_term(strong, weak, threshold=0.6)
    p = np_softmax(weak.numpy())
    assert mask.tolist() == [True, False, True] and p[1].max() < 0.6
    ls = np_log_softmax(strong.numpy())
    assert float(loss) == pytest.approx((-ls[0, 0] - ls[2, 1]) / 3)
    empty, _ = fixmatch_term(strong[:0], weak[:0])
    assert float(empty) == 0.0


def test_discovery_losses_total_and_row_order():
    torch.manual_seed(1)
    weak, strong = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([0, -1, 1, -1, 2])
    labelled = y >= 0
    sim = torch.rand(5, 5, dtype=torch.float64)
    out = discovery_losses(weak, strong, sim, y, labelled, threshold=0.0)
    probs = weak.softmax(1)
    mean = probs.mean(0)
    assert float(out["entropy"]) == pytest.approx(float(-(mean * mean.log()).sum()))
    assert float(out["ce"]) == pytest.approx(float(F.cross_entropy(weak[labelled], y[labelled])))
    pseudo = F.cross_entropy(strong, weak[~labelled].argmax(1))
    assert float(out["pseudo"]) == pytest.approx(float(pseudo))  # threshold 0: every row
    total = out["pair"] - out["entropy"] + out["ce"] + out["pseudo"]
    assert float(out["loss"]) == pytest.approx(float(total))
    # labelled rows first (the reference's order) gives the same pair and entropy terms
    order = torch.tensor([0, 2, 4, 1, 3])
    moved = discovery_losses(weak[order], strong, sim[order][:, order], y[order], labelled[order])
    assert float(moved["pair"]) == pytest.approx(float(out["pair"]))
    assert float(moved["entropy"]) == pytest.approx(float(out["entropy"]))


# ----------------------------------------------------------------------------- bi-level step
def tiny_bilevel(seed: int = 0):
    """A linear classifier on fixed features, a small SimNet, the stage-A inner loss and the
    labelled CE of the updated copy, in float64."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -1, -1, -1])
    labelled = y >= 0
    simnet = SimNet(dim=3, hidden=4).double()
    theta = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)}
    phi = {n: p.detach().clone().requires_grad_(True) for n, p in simnet.named_parameters()}

    def features(th):  # the features depend on theta too, as the backbone's do
        return feats * (1 + th["w"].sum() * 0.1)

    def inner(th, ph):
        f = features(th)
        sim = torch.func.functional_call(simnet, ph, (f,))
        logits = f @ th["w"].t()
        return discovery_losses(logits, logits[~labelled], sim, y, labelled)["loss"]

    def outer(th):
        logits = features(th) @ th["w"].t()
        return masked_cross_entropy(logits, y, labelled)

    return theta, phi, inner, outer


def updated_ce(theta, phi, inner, outer, lr):
    th = {n: v.detach().requires_grad_(True) for n, v in theta.items()}
    (g,) = torch.autograd.grad(inner(th, phi), [th["w"]])
    return float(outer({"w": th["w"] - lr * g}))


def test_meta_gradient_matches_finite_differences_and_lowers_the_updated_ce():
    theta, phi, inner, outer = tiny_bilevel()
    lr = 0.5  # large inner step: a visible dependence on SimNet
    ce, grads = simnet_meta_gradients(inner, outer, theta, phi, lr)
    assert float(ce) == pytest.approx(updated_ce(theta, phi, inner, outer, lr))
    name = "linear1.weight"
    k = list(phi).index(name)
    eps = 1e-6
    for idx in [(0, 0), (1, 4), (3, 5)]:
        bumped = {n: v.detach().clone() for n, v in phi.items()}
        bumped[name][idx] += eps
        up = updated_ce(theta, bumped, inner, outer, lr)
        bumped[name][idx] -= 2 * eps
        down = updated_ce(theta, bumped, inner, outer, lr)
        assert float(grads[k][idx]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)
    # a small step of SimNet against its meta-gradient lowers the labelled CE of the copy
    step = {n: (v - 1e-2 * g).detach() for (n, v), g in zip(phi.items(), grads)}
    assert updated_ce(theta, step, inner, outer, lr) < float(ce)
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- handover
def test_class_balanced_pseudo_labels_take_the_most_confident_rows_per_novel_class():
    probs = t(
        [
            [0.9, 0.05, 0.05, 0.0],  # known 0: never selected
            [0.1, 0.7, 0.2, 0.0],  # novel 1 (0.7)
            [0.0, 0.9, 0.1, 0.0],  # novel 1 (0.9)
            [0.0, 0.6, 0.4, 0.0],  # novel 1 (0.6): over the budget of 2
            [0.0, 0.2, 0.8, 0.0],  # novel 2
            [0.3, 0.0, 0.0, 0.7],  # novel 3
            [0.0, 0.0, 0.35, 0.65],  # novel 3 (tie with the next: lower row first)
            [0.0, 0.35, 0.0, 0.65],
        ]
    )
    rows, targets = class_balanced_pseudo_labels(probs, num_known=1, per_class=2)
    assert rows.tolist() == [2, 1, 4, 5, 6] and targets.tolist() == [1, 1, 2, 3, 3]
    none, _ = class_balanced_pseudo_labels(probs, num_known=4, per_class=2)
    assert none.numel() == 0


# ----------------------------------------------------------------------------- stage B terms
def test_sharpen_by_hand():
    out = sharpen(t([[0.2, 0.8], [0.5, 0.5]]), temperature=0.5)
    np.testing.assert_allclose(out.numpy(), [[0.04 / 0.68, 0.64 / 0.68], [0.5, 0.5]])


def test_mixup_by_hand_and_lambda_at_least_a_half():
    x = t([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    y = t([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    mx, my = mixup(x, y, 0.7, torch.tensor([2, 0, 1]))
    np.testing.assert_allclose(mx.numpy(), [[1.9, 1.2], [0.3, 1.4], [2.8, 3.4]])
    np.testing.assert_allclose(my.numpy(), [[0.85, 0.15], [0.3, 0.7], [0.35, 0.65]])
    torch.manual_seed(0)
    lams = [mixup_lambda(0.75) for _ in range(50)]
    assert all(0.5 <= v <= 1.0 for v in lams) and len(set(lams)) > 1
    assert mixup_lambda(0.0) == 1.0


def test_mixmatch_losses_by_hand():
    lx_logits, tx = t([[1.0, 2.0]]), t([[0.25, 0.75]])
    lu_logits, tu = t([[0.0, 0.0], [2.0, 0.0]]), t([[1.0, 0.0], [0.5, 0.5]])
    lx, lu = mixmatch_losses(lx_logits, tx, lu_logits, tu)
    ls = np_log_softmax(lx_logits.numpy())
    assert float(lx) == pytest.approx(-(0.25 * ls[0, 0] + 0.75 * ls[0, 1]))
    pu = np_softmax(lu_logits.numpy())
    assert float(lu) == pytest.approx(float(((pu - tu.numpy()) ** 2).mean()))
    zx, zu = mixmatch_losses(lx_logits[:0], tx[:0], lu_logits[:0], tu[:0])
    assert float(zx) == float(zu) == 0.0


def test_linear_rampup():
    assert [linear_rampup(c, 4) for c in (-1, 0, 1, 4, 9)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert linear_rampup(3, 0) == 1.0


def test_two_stage_schedule_restarts_at_stage_b():
    optim = {"scheduler": "step", "step_size": 2, "gamma": 0.1}
    factors = [two_stage_lr_factor(e, optim, 3, 8, ratio=4.0) for e in range(8)]
    assert factors == pytest.approx([1, 1, 0.1, 4, 4, 0.4, 0.4, 0.04])
    assert two_stage_lr_factor(5, {"scheduler": "none"}, 3, 8) == 1.0
    assert [discovery_length(15, e) for e in (1, 2, 3, 50)] == [1, 1, 2, 15]


# ----------------------------------------------------------------------------- the method
def tiny_method(**kw) -> OpenLDN:
    torch.manual_seed(0)
    problem = Problem(num_known=3, num_classes=5, max_epochs=4)
    return OpenLDN(problem, {"name": "adam", "lr": 1e-3}, TINY_BACKBONE, discovery_epochs=2, **kw)


def three_view_batch(b: int = 8, size: int = 16) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, -1, -1, -1, -1])[:b]
    views = [torch.randn(b, 3, size, size, generator=g) for _ in range(3)]
    return TrainBatch(views=views, y=y, labelled=y >= 0, index=torch.arange(b))


def test_discovery_step_moves_simnet_only_through_its_own_step():
    method = tiny_method()
    method.train()
    batch = three_view_batch()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    out = method.discovery_step(batch)
    after = method.state_dict()
    simnet = [k for k in before if k.startswith("simnet.")]
    assert all(not torch.equal(before[k], after[k]) for k in simnet)
    # Adam's first step: each SimNet weight moved by about lr against its meta-gradient's sign
    moved = (after["simnet.linear2.weight"] - before["simnet.linear2.weight"]).abs()
    assert torch.allclose(moved, torch.full_like(moved, 1e-4), rtol=1e-2)
    # the model's parameters wait for the optimiser; only step (3)'s forward moved its BN stats
    unchanged = [k for k in before if not k.startswith("simnet.") and "running" not in k]
    unchanged = [k for k in unchanged if "num_batches" not in k]
    assert all(torch.equal(before[k], after[k]) for k in unchanged)
    key = "encoder.backbone.bn1.num_batches_tracked"
    assert int(after[key]) == int(before[key]) + 1  # one forward of the real model, not three
    out["loss"].backward()
    assert all(p.grad is None for p in method.simnet.parameters())
    grads = [p.grad for n, p in method.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(out["simnet_ce"]) > 0 and 0 <= float(out["mask_rate"]) <= 1


def test_stage_b_restarts_the_network_and_predicts_with_the_ema():
    method = tiny_method()
    initial = {k: v.clone() for k, v in method.state_dict().items() if k.startswith("head.")}
    with torch.no_grad():
        method.head.weight.add_(1.0)
    assert not method.use_ema()
    method.start_stage_b()
    assert method.use_ema() and torch.equal(method.head.weight, initial["head.weight"])
    assert torch.equal(method.ema["head"].weight, method.head.weight)
    method.train()
    method.pseudo_target = torch.tensor([-1, -1, -1, -1, 3, -1, 4, -1])
    batch = three_view_batch()
    out = method.mixmatch_step(batch)
    assert float(out["pseudo_rows"]) == pytest.approx(2 / 8)
    out["loss"].backward()
    assert method.head.weight.grad is not None and torch.isfinite(method.head.weight.grad).all()
    method.eval()
    x = batch.views[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(method.predict_logits(x), method.logits(x, ema=True))


def test_continue_keeps_the_stage_a_weights():
    method = tiny_method(stage_b_init="continue", ema_decay=None)
    with torch.no_grad():
        method.head.weight.add_(1.0)
    kept = method.head.weight.clone()
    method.start_stage_b()
    assert torch.equal(method.head.weight, kept) and not method.use_ema()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="stage_b_init"):
        tiny_method(stage_b_init="scratch")
    with pytest.raises(ValueError, match="temperature"):
        tiny_method(temperature=0.0)


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resumes_exactly_inside_stage_b(make_cfg, monkeypatch, tmp_path):
    """The generic resume test crashes in stage A; here stage B starts at epoch 1, so the crash
    after step 5 is mid-way through a stage-B epoch (pseudo-labels, EMA, ramp, SimNet's Adam)."""
    from test_resume import SCHEDULE, assert_same_results, crash_before_step

    from owdfa_bench.runner import run

    base = ("method=openldn", "method.model.discovery_epochs=1", *SCHEDULE)
    whole = run(make_cfg(*base, f"output_root={tmp_path / 'whole'}"))
    assert [e["epoch"] for e in whole["openldn"]["pseudo_labelling"]] == [1, 2]
    for step in (2, 5):
        cfg = make_cfg(*base, f"output_root={tmp_path / f'crash-{step}'}")
        with monkeypatch.context() as patch:
            crash_before_step(patch, step, RuntimeError("simulated crash"))
            with pytest.raises(RuntimeError, match="simulated crash"):
                run(cfg)
        resumed = run(cfg)
        assert_same_results(resumed, whole, f"crashed after step {step}")
        assert resumed["openldn"] == whole["openldn"]
