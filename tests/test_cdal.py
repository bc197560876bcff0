"""CDAL (yzheng97/CDAL, `OW-DFA/`): attention modules, pooling, augmentation, losses, model,
smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BACKBONE, np_log_softmax
from test_cpl import assert_gradients_everywhere, make_batch  # shared CPL-family helpers
from torchvision.transforms.v2.functional import gaussian_blur

from methods.cdal import (
    CDAL,
    AttentionGenerator,
    ConditionalConv,
    attention_channel_probs,
    attention_features,
    aux_loss,
    bilinear_attention_pool,
    blur_kernel_size,
    cdal_total,
    counterfactual_augment,
    match_loss,
    sample_attention_channel,
    smoothed_features,
)
from owdfa_bench.method import Problem

# ----------------------------------------------------------------------------- modules


def test_conditional_conv_mixes_the_expert_kernels_per_sample():
    torch.manual_seed(0)
    cec = ConditionalConv(3, 2, kernel_size=1, num_experts=4)
    x = torch.randn(2, 3, 4, 4)
    out = cec(x)
    routing = torch.sigmoid(cec.route(x.mean(dim=(2, 3))))  # [B, 4]
    for b in range(2):
        kernel = (routing[b] @ cec.conv.weight).view(2, 3, 1, 1)  # sum_e r_e W_e
        assert torch.allclose(out[b : b + 1], F.conv2d(x[b : b + 1], kernel), atol=1e-5)


def test_attention_generator_shape_and_reference_size():
    cfi = AttentionGenerator(256, num_maps=64)
    assert sum(p.numel() for p in cfi.parameters()) == 35_208  # the reference's CFI on 256 channels
    att = AttentionGenerator(8, num_maps=5)(torch.randn(2, 8, 6, 6))
    assert att.shape == (2, 5, 6, 6) and (att >= 0).all()  # ceil(5/2) = 3 + 3 maps, first 5


# ----------------------------------------------------------------------------- pooling


def feature_pair():
    # C = 2 channels over H x W = 1 x 2: R_0 = [1, 3], R_1 = [-2, 0]; one map A = [1, 0].
    features = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]])
    attention = torch.tensor([[[[1.0, 0.0]]]])
    return features, attention


def test_bilinear_attention_pool():
    # Phi = sum_hw A R / HW = [1, -2] / 2 = [0.5, -1]; signed sqrt -> [sqrt .5, -1] (+1e-6);
    # L2 norm: divide by sqrt(1.5).
    features, attention = feature_pair()
    pooled = bilinear_attention_pool(features, attention)
    a, b = math.sqrt(0.5 + 1e-6), math.sqrt(1 + 1e-6)
    n = math.hypot(a, b)
    assert pooled.tolist()[0] == pytest.approx([a / n, -b / n], abs=1e-6)


def test_attention_features_have_no_mean_and_no_sqrt():
    # Psi = normalise_c(sum_hw A R) = [1, -2] / sqrt5.
    features, attention = feature_pair()
    psi = attention_features(features, attention)
    assert psi.shape == (1, 1, 2)
    assert psi[0, 0].tolist() == pytest.approx([1 / math.sqrt(5), -2 / math.sqrt(5)], abs=1e-6)


def test_attention_is_resized_to_the_features():
    features = torch.rand(1, 3, 4, 4)
    small = torch.ones(1, 2, 2, 2)  # constant maps stay constant when resized
    assert torch.allclose(
        bilinear_attention_pool(features, small),
        bilinear_attention_pool(features, torch.ones(1, 2, 4, 4)),
    )


def test_attention_channel_probs_and_sampling():
    # Channel sums 0, 3, 1 -> weights sqrt(1e-6), sqrt(3 + 1e-6), sqrt(1 + 1e-6), L1-normalised.
    att = torch.zeros(1, 3, 2, 2)
    att[0, 1, 0, 0] = 3.0
    att[0, 2] = 0.25
    w = np.sqrt(np.array([0.0, 3.0, 1.0]) + 1e-6)
    assert attention_channel_probs(att)[0].tolist() == pytest.approx(list(w / w.sum()), abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat(
        [sample_attention_channel(att.expand(100, -1, -1, -1), gen) for _ in range(40)]
    )
    share = float((draws == 1).float().mean())
    assert share == pytest.approx(w[1] / w.sum(), abs=0.03)


# ----------------------------------------------------------------------------- augmentation


def test_blur_kernel_fits_small_maps():
    assert blur_kernel_size(32, 32) == 11  # paper recipe: untouched
    assert blur_kernel_size(4, 6) == 7  # reflect padding 3 < 4
    assert blur_kernel_size(1, 5) == 1


def test_torchvision_blur_is_kornias_gaussian_with_reflect_border():
    # kornia gaussian_blur2d((11, 11), (7, 7)): normalised exp(-x^2 / 2 sigma^2), x = -5..5,
    # separable, reflect padding. Written here with numpy.
    x = np.random.default_rng(0).normal(size=(8, 8))
    k = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 49.0))
    k /= k.sum()
    padded = np.pad(x, 5, mode="reflect")
    rows = np.stack([np.convolve(r, k, mode="valid") for r in padded])
    want = np.stack([np.convolve(c, k, mode="valid") for c in rows.T]).T
    got = gaussian_blur(torch.tensor(x)[None, None], kernel_size=[11, 11], sigma=[7.0, 7.0])
    assert got[0, 0].numpy() == pytest.approx(want, abs=1e-6)


def test_smoothed_features_of_a_constant_map():
    # Blurring a constant keeps it; the noise is added on the 2x2 half map and the corners of the
    # bilinear (align_corners) upsampling are exactly the half map's cells.
    features = torch.full((1, 1, 4, 4), 2.0)
    noise = torch.tensor([[[[1.0, -1.0], [0.0, 3.0]]]])
    out = smoothed_features(features, noise, kernel=11, sigma=7.0, noise_std=0.1)
    assert out.shape == features.shape
    corners = [out[0, 0, 0, 0], out[0, 0, 0, 3], out[0, 0, 3, 0], out[0, 0, 3, 3]]
    assert [float(c) for c in corners] == pytest.approx([2.1, 1.9, 2.0, 2.3], abs=1e-6)
    clean = smoothed_features(features, torch.zeros(1, 1, 2, 2))
    assert torch.allclose(clean, features)


def test_counterfactual_augment_picks_one_channel_per_sample():
    features = torch.ones(2, 1, 1, 2)
    smoothed = torch.full((2, 1, 1, 2), 10.0)
    att = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[5.0, 6.0]], [[7.0, 8.0]]]])
    att_cf = att / 10
    # sample 0: R * A[1] + R_s * A_cf[0] = [3, 4] + 10 * [.1, .2] = [4, 6]
    # sample 1: R * A[0] + R_s * A_cf[1] = [5, 6] + 10 * [.7, .8] = [12, 14]
    out = counterfactual_augment(
        features, smoothed, att, att_cf, torch.tensor([1, 0]), torch.tensor([0, 1])
    )
    assert out[:, 0, 0].tolist() == [pytest.approx([4.0, 6.0]), pytest.approx([12.0, 14.0])]


# ----------------------------------------------------------------------------- losses


def test_match_loss_excludes_the_sampled_channel():
    psi = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    psi_aug = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # distances sqrt2 and 0
    # Channel 1 excluded: (sqrt2 + 0) / (B * M = 2); channel 0 excluded: 0.
    assert float(match_loss(psi, psi_aug, torch.tensor([1]))) == pytest.approx(math.sqrt(2) / 2)
    assert float(match_loss(psi, psi_aug, torch.tensor([0]))) == 0.0


def test_aux_loss():
    p = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.2]])
    p_cf = np.array([[0.3, 0.1, 0.0], [1.0, -1.0, 0.5]])
    y = np.array([0, 2])

    def margin_ce(z):
        z = z.copy()
        z[[0, 1], y] += 0.2
        return -np_log_softmax(z)[[0, 1], y].mean()

    logq = np_log_softmax(p_cf)
    entropy = -(np.exp(logq) * logq).sum(axis=1).mean()
    want = margin_ce(p) + margin_ce(p - p_cf) - entropy
    got = aux_loss(torch.tensor(p), torch.tensor(p_cf), torch.tensor(y))
    assert float(got) == pytest.approx(want, abs=1e-6)
    empty = aux_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0


def test_cdal_total_weights():
    one = torch.tensor(1.0)
    assert float(cdal_total(one, 2 * one, 3 * one, 4 * one)) == pytest.approx(1 + 2.5 + 0.8)


# ----------------------------------------------------------------------------- the model


def test_cdal_parameter_count_matches_the_reference():
    model = CDAL(
        Problem(num_known=9, num_classes=22), {}, {"name": "resnet50", "pretrained": False}
    )
    assert sum(p.numel() for p in model.parameters()) == 24_024_912  # the reference model, C = 22


@pytest.mark.parametrize("variant", ["cpl", "mpsl"])
def test_cdal_step_reaches_every_parameter(variant):
    torch.manual_seed(0)
    model = CDAL(Problem(num_known=3, num_classes=5), {}, TINY_BACKBONE, match_variant=variant)
    terms = model.training_losses(make_batch())
    assert {"loss", "cpl", "ce", "glv", "csp", "entropy", "aux", "aux_aug", "match"} <= set(terms)
    assert all(torch.isfinite(v).all() for v in terms.values())
    expected = terms["cpl"] + 0.5 * (terms["aux"] + terms["aux_aug"]) + 0.2 * terms["match"]
    assert float(terms["loss"]) == pytest.approx(float(expected))
    terms["loss"].backward()
    assert_gradients_everywhere(model, "classifier.", "attention.", "attention_cf.", "aux_head.")


def test_cdal_eval_logits_skip_the_attention_branch():
    torch.manual_seed(0)
    model = CDAL(Problem(num_known=3, num_classes=5), {}, TINY_BACKBONE).eval()
    x = torch.randn(2, 3, 32, 32)  # 32 px: 1x1 final map, 8x8 layer 1
    with torch.no_grad():
        before = model.predict_logits(x)
        for p in model.attention.parameters():
            p.add_(1.0)
        after = model.predict_logits(x)
    assert before.shape == (2, 5)
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-6)  # two forward passes


def test_cdal_rejects_an_unknown_match_variant():
    with pytest.raises(ValueError, match="match_variant='both'"):
        CDAL(Problem(num_known=3, num_classes=5), {}, TINY_BACKBONE, match_variant="both")


# ~5 s with one torch thread, ~35 s with conftest's two threads on the shared 2-core machine;
# CPL's smoke fit (default suite) covers the runner path, this one the method-specific parts.
@pytest.mark.slow
def test_cdal_smoke_fit_on_synth_with_the_weighted_sampler(make_cfg):
    # CAL's sampler gives batches with any number of labelled rows (the aux loss must cope).
    from owdfa_bench.runner import run

    record = run(make_cfg("method=cdal", "method.sampler=weighted"))
    assert record["status"] == "complete"
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert all(0.0 <= record["metrics"][m] <= 1.0 for m in ("all_acc", "all_nmi", "known_acc"))
