"""CPL (`owdfa/algorithm/owssl/CPL.py`): every loss term on hand-made tensors, the model, a
smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.common_losses import (
    entropy_of_mean,
    labelled_partners,
    margin_cross_entropy,
    pairwise_bce,
)
from methods.cpl import (
    CPL,
    cpl_losses,
    cpl_total,
    glv_pairs,
    labelled_first,
    local_similarity,
    part_features,
    sample_gumbel,
    soft_pseudo_label_loss,
)
from owdfa_bench.method import Problem, TrainBatch

TINY_BACKBONE = {"name": "resnet18", "pretrained": False}


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# ----------------------------------------------------------------------------- margin CE


def test_margin_ce_adds_the_margin_to_the_target_logit():
    logits = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, -1.0]])
    y = np.array([0, 2])
    shifted = logits.copy()
    shifted[[0, 1], y] += 0.2  # target logits 1.2 and -0.8
    expected = -np_log_softmax(shifted)[[0, 1], y].mean()
    plain = -np_log_softmax(logits)[[0, 1], y].mean()
    got = margin_cross_entropy(torch.tensor(logits), torch.tensor(y), 0.2)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(got) < plain  # the reference's negative margin makes CE easier


def test_margin_ce_without_rows_is_zero_and_attached():
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = margin_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    assert float(loss) == 0.0 and loss.requires_grad


# ----------------------------------------------------------------------------- similarities


def test_local_similarity_is_weighted_by_the_row_sample():
    # Sample 0: part 0 = [3, 0], part 1 = [0, 4] -> weights (0.6, 0.8).
    # Sample 1: both parts [1, 0] -> weights (1/sqrt2, 1/sqrt2).
    # Part cosines between the samples: part 0: 1, part 1: 0.
    # S[0,1] = 0.6; S[1,0] = 1/sqrt2; S[0,0] = 0.6 + 0.8; S[1,1] = sqrt2.
    parts = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [0.0, 0.0]]])  # [B, D, P]
    s = local_similarity(parts)
    r = 1 / math.sqrt(2)
    assert s.numpy() == pytest.approx(np.array([[1.4, 0.6], [r, 2 * r]]), abs=1e-6)


def test_part_features_overlapping_custom_pool():
    # 8 -> 3: kernel 4, stride 2. Window (0, 0) = mean of r*8 + c, r, c in 0..3 = 13.5.
    fmap = torch.arange(64.0).view(1, 1, 8, 8)
    parts = part_features(fmap, 3).view(3, 3)
    assert parts[0].tolist() == [13.5, 15.5, 17.5]
    assert parts[:, 0].tolist() == [13.5, 29.5, 45.5]


def test_part_features_resize_a_map_smaller_than_the_grid():
    # 2x2 [[a, b], [c, d]] -> 3x3 by bilinear align_corners: corners kept, middles averaged.
    fmap = torch.tensor([[[[0.0, 2.0], [4.0, 8.0]]]])
    parts = part_features(fmap, 3).view(3, 3)
    assert parts.tolist() == [[0.0, 1.0, 2.0], [2.0, 3.5, 5.0], [4.0, 6.0, 8.0]]


# ----------------------------------------------------------------------------- GLV pairs


def test_labelled_partner_is_another_row_of_the_class():
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([labelled_partners(targets, gen) for _ in range(2000)])
    assert (picks[:, 0] == 1).all() and (picks[:, 1] == 0).all()
    assert (picks[:, 2] == 2).all()  # alone in its class: itself
    assert (picks[:, 3] != 3).all() and set(picks[:, 3].tolist()) == {4, 5}
    share = float((picks[:, 3] == 4).float().mean())
    assert 0.45 < share < 0.55  # uniform over the two others
    again = labelled_partners(targets, torch.Generator().manual_seed(0))
    assert again.tolist() == picks[0].tolist()  # reproducible from the generator


def glv_hand_example():
    """One labelled row (class 0) and three unlabelled rows; one part (P = 1), 2-D features.

    Global angles 0, 45, 50, -30 deg: nearest neighbours n1 = (2, 1, 0) for rows (1, 2, 3).
    Part angles 0, 20, 70, 75 deg: cosines (0,1) .940 (0,2) .342 (0,3) .259 (1,2) .643
    (1,3) .574 (2,3) .996.
      row 1: a = 2nd of S[1,:] = .940; b = 2nd of S[:,2] = .996 -> fails -> partner n0 = 1
      row 2: a = .996; b = 2nd of S[:,1] = .940 -> passes -> partner 1
      row 3: a = .996; b = 2nd of S[:,0] = .940 -> passes -> partner 0
    """
    f_g = torch.tensor([unit(0), unit(45), unit(50), unit(-30)])
    f_p = torch.tensor([unit(0), unit(20), unit(70), unit(75)])[:, :, None]
    return torch.tensor([0]), f_g, f_p


def test_glv_pairs_hand_example():
    targets, f_g, f_p = glv_hand_example()
    partners, mask = glv_pairs(targets, f_g, f_p)
    assert partners.tolist() == [0, 1, 1, 0]
    assert mask.tolist() == [0.0, 1.0, 1.0]


def numpy_glv_pairs(targets, f_g, f_p):
    """The reference's `_get_pair` vote written literally with loops; labelled part omitted."""
    b, L = len(f_g), len(targets)
    g = f_g / np.linalg.norm(f_g, axis=1, keepdims=True)
    gsim = g @ g.T
    norms = np.linalg.norm(f_p, axis=1)  # [B, P]
    w = norms / np.sqrt((norms**2).sum(axis=1, keepdims=True))
    s = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            for p in range(f_p.shape[2]):
                cos = f_p[i, :, p] @ f_p[j, :, p] / (norms[i, p] * norms[j, p])
                s[i, j] += w[i, p] * cos
    partners, mask = [], []
    for u in range(L, b):
        n0, n1 = np.argsort(-gsim[u])[:2]
        a = np.sort(s[u])[-2]
        bb = np.sort(s[:, n1])[-2]
        mask.append(float(a - bb >= 0))
        partners.append(n1 if a - bb >= 0 else n0)
    return partners, mask


def test_glv_pairs_match_a_literal_numpy_version():
    rng = np.random.default_rng(3)
    targets = np.array([0, 1, 1])
    f_g = rng.normal(size=(9, 5))
    f_p = rng.normal(size=(9, 4, 3))  # P = 3 parts: the weights matter
    want_partners, want_mask = numpy_glv_pairs(targets, f_g, f_p)
    partners, mask = glv_pairs(torch.tensor(targets), torch.tensor(f_g), torch.tensor(f_p))
    assert partners[3:].tolist() == want_partners
    assert mask.tolist() == want_mask
    assert partners[0] == 0 and partners[1] == 2 and partners[2] == 1
    assert 0 < sum(want_mask) < len(want_mask)  # the example exercises both branches


def test_glv_pairs_any_batch_size():
    # One unlabelled row and nothing else: it is its own partner (the reference drops GLV).
    partners, mask = glv_pairs(
        torch.zeros(0, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 3, 9)
    )
    assert partners.tolist() == [0] and mask.shape == (1,)
    partners, mask = glv_pairs(torch.tensor([1, 1]), torch.randn(2, 3), torch.randn(2, 3, 9))
    assert partners.tolist() == [1, 0] and mask.numel() == 0


# ----------------------------------------------------------------------------- loss terms


def pair_bce(probs: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """GLV's term as cpl_losses computes it: BCE(<p_i, p_partner(i)>, 1)."""
    return pairwise_bce((probs * probs[partners]).sum(dim=1))


def test_pair_bce_loss():
    # Similarities: <p0, p1> = 0.5*0.9 + 0.5*0.1 = 0.5; <p1, p0> = 0.5; <p2, p2> = 1.
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    loss = pair_bce(probs, torch.tensor([1, 0, 2]))
    assert float(loss) == pytest.approx(2 * math.log(2) / 3, abs=1e-6)
    sims = torch.tensor([0.5, 0.5, 1.0])
    assert float(loss) == pytest.approx(float(F.binary_cross_entropy(sims, torch.ones(3))))
    # Orthogonal partners: -log 0 is clamped at 100 as in PyTorch's BCE.
    hard = pair_bce(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]))
    assert float(hard) == pytest.approx(100.0)


def test_soft_pseudo_label_loss_with_fixed_gumbel_noise():
    z = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    g = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    soft = np.exp(np_log_softmax(z + g))  # rows: argmax 2 and 1
    logp = np_log_softmax(z)
    conf = np.exp(logp[[0, 1], [2, 1]])
    ce = -(soft * logp).sum(axis=1)
    mask = np.array([1.0, 0.0])
    got = soft_pseudo_label_loss(torch.tensor(z), torch.tensor(g), torch.tensor(mask))
    assert float(got) == pytest.approx((ce * conf * mask).mean(), abs=1e-6)  # mean over U = 2
    unmasked = soft_pseudo_label_loss(torch.tensor(z), torch.tensor(g))
    assert float(unmasked) == pytest.approx((ce * conf).mean(), abs=1e-6)


def test_soft_pseudo_label_confidence_is_not_detached():
    z = torch.tensor([[1.0, -0.5, 0.3]], requires_grad=True)
    g = torch.zeros(1, 3)
    soft_pseudo_label_loss(z, g).backward()
    # Gradient of conf * CE_soft with conf attached, derived with numpy:
    zn = z.detach().numpy()[0]
    p = np.exp(zn - zn.max()) / np.exp(zn - zn.max()).sum()
    s, t = p, 0  # zero noise: soft target = p, argmax 0
    ce = -(s * np.log(p)).sum()
    d_ce = p - s  # d/dz of soft CE with a fixed target
    d_conf = p[t] * (np.eye(3)[t] - p)
    expected = d_conf * ce + p[t] * d_ce
    assert z.grad.numpy()[0] == pytest.approx(expected, abs=1e-6)


def test_sample_gumbel_matches_torch_gumbel_softmax():
    logits = torch.randn(4, 5)
    torch.manual_seed(11)
    ours = torch.softmax(logits + sample_gumbel(logits.shape), dim=1)
    torch.manual_seed(11)
    theirs = F.gumbel_softmax(logits, tau=1, hard=False)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_marginal_entropy():
    assert float(entropy_of_mean(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))) == pytest.approx(
        math.log(2)
    )
    # A collapsed mean [1, 0] is clamped: -(1e-8 * log 1e-8), the reference's `entropy`.
    collapsed = entropy_of_mean(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert float(collapsed) == pytest.approx(-1e-8 * math.log(1e-8), rel=1e-3)


def test_cpl_total_weights():
    one = torch.tensor(1.0)
    assert float(cpl_total(one, 2 * one, 3 * one, 4 * one)) == pytest.approx(1 + 1 + 1.5 - 4)


def test_cpl_losses_on_the_hand_example():
    targets, f_g, f_p = glv_hand_example()
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.3, 0.2]], requires_grad=True)
    gumbel = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    terms = cpl_losses(logits, targets, f_g, f_p, gumbel)
    probs = torch.softmax(logits, dim=1)
    partners = torch.tensor([0, 1, 1, 0])
    mask = torch.tensor([0.0, 1.0, 1.0])
    assert float(terms["ce"]) == pytest.approx(float(margin_cross_entropy(logits[:1], targets)))
    assert float(terms["glv"]) == pytest.approx(float(pair_bce(probs, partners)))
    assert float(terms["csp"]) == pytest.approx(
        float(soft_pseudo_label_loss(logits[1:], gumbel, mask))
    )
    expected = terms["ce"] + 0.5 * terms["glv"] + 0.5 * terms["csp"] - terms["entropy"]
    assert float(terms["loss"]) == pytest.approx(float(expected))
    assert float(terms["glv_pass_rate"]) == pytest.approx(2 / 3)
    terms["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("num_labelled", [0, 4])
def test_cpl_losses_on_one_sided_batches(num_labelled):
    # All unlabelled (possible with sampler=weighted): CE is 0; all labelled: CSP is 0.
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([0, 1, 1, 2])[:num_labelled]
    gumbel = torch.zeros(4 - num_labelled, 3)
    terms = cpl_losses(logits, targets, torch.randn(4, 5), torch.randn(4, 5, 9), gumbel)
    assert all(torch.isfinite(v) for v in terms.values())
    assert float(terms["ce" if num_labelled == 0 else "csp"]) == 0.0
    terms["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_labelled_first_order():
    labelled = torch.tensor([False, True, False, True, True])
    assert labelled_first(labelled).tolist() == [1, 3, 4, 0, 2]


# ----------------------------------------------------------------------------- the model


def test_cpl_parameter_count_matches_the_reference():
    # The reference model: 25,643,048 incl. timm's unused ImageNet fc (2,049,000), C = 22.
    model = CPL(Problem(num_known=9, num_classes=22), {}, {"name": "resnet50", "pretrained": False})
    assert sum(p.numel() for p in model.parameters()) == 25_643_048 - 2_049_000


def make_batch(b: int = 8, size: int = 32, seed: int = 0) -> TrainBatch:
    """Alternating labelled / unlabelled rows of random images (as the CPL sampler yields)."""
    gen = torch.Generator().manual_seed(seed)
    labelled = torch.tensor([True, False] * (b // 2))
    y = torch.where(labelled, torch.tensor([0, 1, 2, 0] * (b // 4)), -1)
    return TrainBatch(
        views=[torch.randn(b, 3, size, size, generator=gen)],
        y=y,
        labelled=labelled,
        index=torch.arange(b),
    )


def assert_gradients_everywhere(model: torch.nn.Module, *nonzero_prefixes: str) -> None:
    """Every trainable parameter got a finite gradient; those under the prefixes a non-zero one.

    (timm's ResNet zero-initialises each block's last BN, so at initialisation the convolutions
    inside a residual branch get an exactly zero gradient: reached, but zero.)
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    dead = [
        n for n, p in trainable if n.startswith(nonzero_prefixes) and not p.grad.abs().sum() > 0
    ]
    assert dead == []


@pytest.mark.parametrize(
    ("k_mode", "estimate", "rows"), [("known", None, 5), ("unknown", None, 30), ("unknown", 7, 7)]
)
def test_cpl_head_size(k_mode, estimate, rows):
    # k=known: the true K (5); k=unknown: the user's estimate, else 10 x the 3 known classes.
    model = CPL(
        Problem(num_known=3, num_classes=5, k_mode=k_mode, k_estimate=estimate), {}, TINY_BACKBONE
    )
    assert model.classifier.head.weight.shape[0] == rows
    assert model.k_estimated() == (None if k_mode == "known" else rows)


def test_cpl_step_depends_on_the_tags_not_the_row_order():
    # Rows are reordered labelled-first (the reference's layout): interleaving them differently
    # but keeping each group's order gives the same losses (eval mode: no dropout/batch stats).
    torch.manual_seed(0)
    model = CPL(Problem(num_known=3, num_classes=5), {}, TINY_BACKBONE).eval()
    batch = make_batch()  # rows: L, U, L, U, ...
    order = torch.tensor([1, 3, 0, 5, 7, 2, 4, 6])  # U, U, L, U, U, L, L, L
    moved = TrainBatch(
        views=[batch.views[0][order]],
        y=batch.y[order],
        labelled=batch.labelled[order],
        index=batch.index[order],
    )
    torch.manual_seed(1)
    a = model.training_losses(batch)
    torch.manual_seed(1)
    b = model.training_losses(moved)
    assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}


def test_cpl_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = CPL(Problem(num_known=3, num_classes=5), {}, TINY_BACKBONE)
    terms = model.training_losses(make_batch())
    assert {"loss", "ce", "glv", "csp", "entropy", "glv_pass_rate"} == set(terms)
    assert all(torch.isfinite(v).all() for v in terms.values())
    terms["loss"].backward()
    assert_gradients_everywhere(model, "classifier.")
    model.eval()
    with torch.no_grad():
        logits = model.predict_logits(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()


def test_cpl_smoke_fit_on_synth(make_cfg):
    # The reference recipe (alternating sampler) through the same runner the CLI calls.
    from owdfa_bench.runner import run

    record = run(make_cfg("method=cpl"))
    assert record["status"] == "complete" and record["k_estimated"] is None
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert all(0.0 <= record["metrics"][m] <= 1.0 for m in ("all_acc", "all_nmi", "known_acc"))
