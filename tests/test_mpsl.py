"""MPSL (`owdfa/algorithm/owssl/MPSL.py`): Haar bands, multi-perspective voting, unmasked FCP,
model, smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.common_losses import entropy_of_mean, margin_cross_entropy, pairwise_bce
from methods.mpsl import MPSL, haar_high_bands, mpsl_losses, mpv_pairs, summed_cosine
from owdfa_bench.method import Problem, TrainBatch

TINY_BACKBONE = {"name": "resnet18", "pretrained": False}


def test_haar_high_bands_of_one_block():
    # [[a, b], [c, d]] = [[1, 2], [3, 5]]:
    #   (a + b - c - d) / 2 = -2.5, (a - b + c - d) / 2 = -1.5, (a - b - c + d) / 2 = 0.5.
    # Orthonormal: LL = 11 / 2 and LL^2 + 2.5^2 + 1.5^2 + 0.5^2 = 39 = 1 + 4 + 9 + 25.
    bands = haar_high_bands(torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]]))
    assert [float(b) for b in bands] == [-2.5, -1.5, 0.5]
    assert 5.5**2 + sum(float(b) ** 2 for b in bands) == pytest.approx(39.0)


def test_haar_high_bands_shapes_and_odd_sizes():
    bands = haar_high_bands(torch.randn(2, 4, 8, 8))
    assert len(bands) == 3 and all(b.shape == (2, 4, 16) for b in bands)
    # 3x3 is zero-padded to 4x4 (pytorch_wavelets mode='zero'): the last block [[x, 0], [0, 0]]
    # has every band equal to x / 2.
    odd = torch.zeros(1, 1, 3, 3)
    odd[0, 0, 2, 2] = 4.0
    assert [b[0, 0, -1].item() for b in haar_high_bands(odd)] == [2.0, 2.0, 2.0]


def test_summed_cosine_has_no_norm_weighting():
    # Sample 0: positions [3, 0] and [0, 4]; sample 1: [1, 0] twice. Cosines 1 and 0.
    feats = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [0.0, 0.0]]])
    assert summed_cosine(feats).numpy() == pytest.approx(np.array([[2.0, 1.0], [1.0, 2.0]]))


def numpy_vote(sim: np.ndarray, n1: np.ndarray, num_labelled: int) -> np.ndarray:
    rows = np.sort(sim[num_labelled:], axis=1)[:, -2]
    cols = np.sort(sim[:, n1], axis=0)[-2]
    return rows - cols >= 0


def numpy_mpv(f_g, bands, parts, num_labelled):
    """The reference's multi-perspective vote written literally with numpy."""
    g = f_g / np.linalg.norm(f_g, axis=1, keepdims=True)
    order = np.argsort(-(g @ g.T)[num_labelled:], axis=1)
    n0, n1 = order[:, 0], order[:, 1]

    def cos_stack(x):  # [B, B, P] per-position cosines
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return np.einsum("idp,jdp->ijp", u, u)

    band_pass = np.zeros(len(n1), bool)
    for b in bands:
        band_pass |= numpy_vote(cos_stack(b).sum(axis=2), n1, num_labelled)
    part_pass = np.zeros(len(n1), bool)
    for p in parts:
        norms = np.linalg.norm(p, axis=1)
        w = norms / np.sqrt((norms**2).sum(axis=1, keepdims=True))
        part_pass |= numpy_vote((cos_stack(p) * w[:, None, :]).sum(axis=2), n1, num_labelled)
    both = band_pass & part_pass
    return np.where(both, n1, n0), both, band_pass | part_pass


def test_mpv_pairs_match_a_literal_numpy_version():
    rng = np.random.default_rng(7)
    targets = np.array([0, 0])
    f_g = rng.normal(size=(12, 6))
    bands = [rng.normal(size=(12, 6, 4)) for _ in range(3)]
    parts = [rng.normal(size=(12, 6, g * g)) for g in (3, 5)]
    want_partners, want_both, want_either = numpy_mpv(f_g, bands, parts, 2)
    partners, both, either = mpv_pairs(
        torch.tensor(targets),
        torch.tensor(f_g),
        [torch.tensor(b) for b in bands],
        [torch.tensor(p) for p in parts],
    )
    assert partners.tolist() == [1, 0, *want_partners.tolist()]
    assert both.tolist() == want_both.astype(float).tolist()
    assert either.tolist() == want_either.astype(float).tolist()
    assert (want_both != want_either).any()  # the AND and the OR differ on this example


def test_mpsl_losses_combine_unmasked_fcp():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    targets = torch.tensor([0, 1])
    gumbel = torch.zeros(4, 4)  # zero noise: the soft target of row u is softmax(z_u)
    f_g = torch.randn(6, 5)
    bands, parts = [torch.randn(6, 5, 4)] * 3, [torch.randn(6, 5, 9)]
    terms = mpsl_losses(logits, targets, f_g, bands, parts, gumbel)
    # FCP by hand: every unlabelled row counts, weight p[argmax p] (not detached), no mask.
    p = torch.softmax(logits[2:], dim=1)
    soft_ce = -(p * p.log()).sum(dim=1)
    assert float(terms["fcp"]) == pytest.approx(
        float((soft_ce * p.max(dim=1).values).mean()), abs=1e-6
    )
    partners, _, _ = mpv_pairs(targets, f_g, bands, parts)
    probs = torch.softmax(logits, dim=1)
    similarity = (probs * probs[partners]).sum(dim=1)
    assert float(terms["mpv"]) == pytest.approx(float(pairwise_bce(similarity)))
    expected = (
        margin_cross_entropy(logits[:2], targets)
        + 0.5 * terms["mpv"]
        + 0.5 * terms["fcp"]
        - entropy_of_mean(probs)
    )
    assert float(terms["loss"]) == pytest.approx(float(expected))
    assert 0.0 <= float(terms["mpv_pass_rate"]) <= float(terms["mpv_either_rate"]) <= 1.0


def test_mpsl_parameter_count():
    # resnet50 body 23,508,032 + fc2 2048 x 22 + BNNeck 2 x 2048 + (9 + 25 + 49) part BNs of
    # 2 x 2048 = 23,897,152 (the reference adds timm's unused 2,049,000-parameter fc).
    model = MPSL(
        Problem(num_known=9, num_classes=22), {}, {"name": "resnet50", "pretrained": False}
    )
    assert sum(p.numel() for p in model.parameters()) == 23_897_152


def test_mpsl_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = MPSL(Problem(num_known=3, num_classes=5), {}, TINY_BACKBONE)
    gen = torch.Generator().manual_seed(0)
    labelled = torch.tensor([True, False] * 4)
    batch = TrainBatch(
        views=[torch.randn(8, 3, 32, 32, generator=gen)],
        y=torch.where(labelled, torch.tensor([0, 1, 2, 0] * 2), -1),
        labelled=labelled,
        index=torch.arange(8),
    )
    terms = model.training_losses(batch)
    assert all(torch.isfinite(v).all() for v in terms.values())
    terms["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert all(p.grad.abs().sum() > 0 for n, p in trainable if n.startswith("classifier."))
    model.eval()
    with torch.no_grad():
        assert model.predict_logits(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_mpsl_rejects_empty_part_grids():
    with pytest.raises(ValueError, match="part_grids"):
        MPSL(Problem(num_known=3, num_classes=5), {}, TINY_BACKBONE, part_grids=[])


# ~5 s with one torch thread, ~35 s with conftest's two threads on the shared 2-core machine;
# CPL's smoke fit (default suite) covers the runner path, this one the method-specific parts.
@pytest.mark.slow
def test_mpsl_smoke_fit_on_synth_unknown_k(make_cfg):
    from owdfa_bench.runner import run

    record = run(make_cfg("method=mpsl", "k=unknown"))
    assert record["status"] == "complete"
    assert record["k_estimated"] == 10 * record["num_known"]  # unknown_k_factor x known
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert all(0.0 <= record["metrics"][m] <= 1.0 for m in ("all_acc", "all_nmi", "known_acc"))
