"""CAL (methods/cal.py), its official-checkpoint loader and `owdfa-bench evaluate` on it.

Loss terms, the threshold update and the pruning rule are checked on hand-made tensors against
values derived by hand or with numpy; the model on a small resnet18 at 64 px; the whole method
through the shared runner on the tiny synthetic set of tests/conftest.py.
"""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.fft
import torch
from compare import differences
from helpers import TINY_BACKBONE, np_log_softmax, np_softmax, t

from methods.cal import (
    CAL,
    REFERENCE_HEAD,
    REFERENCE_PREFIXES,
    ConfidenceStats,
    DCTAttention,
    acr_loss,
    ccr_loss,
    ccr_weight_schedule,
    confidence_statistics,
    dct_2d,
    idct_2d,
    load_cal_reference_state_dict,
    marginal_entropy_regulariser,
    merge_unlabelled_prototypes,
    num_unlabelled_to_keep,
    prototype_usage,
    prune_prototypes,
    supervised_ce,
    updated_novel_threshold,
)
from owdfa_bench.evaluate import evaluate_checkpoint
from owdfa_bench.method import Problem, TrainBatch

# ----------------------------------------------------------------------------- DCT


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 3, 7, 5), (2, 1, 64, 64)])
def test_dct_matches_scipy_dctn_type2(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = scipy.fft.dctn(x.numpy(), type=2, axes=(-2, -1))
    np.testing.assert_allclose(dct_2d(x).numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        idct_2d(torch.from_numpy(expected)).numpy(),
        scipy.fft.idctn(expected, type=2, axes=(-2, -1)),
        atol=1e-10,
    )
    np.testing.assert_allclose(idct_2d(dct_2d(x)).numpy(), x.numpy(), atol=1e-10)


def test_dct_float32_is_close_to_scipy_at_256px():
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    expected = scipy.fft.dctn(x.double().numpy(), type=2, axes=(-2, -1))
    got = dct_2d(x).double().numpy()
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert torch.allclose(idct_2d(dct_2d(x)), x, atol=1e-4)


def test_dct_attention_matches_its_definition_and_pools_64_to_2():
    torch.manual_seed(0)
    attention = DCTAttention(in_channels=3)
    assert sum(p.numel() for p in attention.parameters()) == 593  # as the reference
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = attention(x, (2, 2))
    assert got.shape == (2, 1, 2, 2)
    # by hand: scipy DCT, the conv net, scipy inverse, channel mean, sigmoid, 32x32 block means
    coeffs = scipy.fft.dctn(x.double().numpy(), type=2, axes=(-2, -1))
    with torch.no_grad():
        gate = attention.freq_attn_net(torch.from_numpy(coeffs).float()).double().numpy()
    spatial = scipy.fft.idctn(coeffs * gate, type=2, axes=(-2, -1))
    attn = 1 / (1 + np.exp(-spatial.mean(axis=1, keepdims=True)))
    blocks = attn.reshape(2, 1, 2, 32, 2, 32).mean(axis=(3, 5))
    np.testing.assert_allclose(got.numpy(), blocks, atol=1e-5)


def test_dct_attention_resizes_bilinearly_when_pooling_cannot_reach_the_size():
    attention = DCTAttention()
    with torch.no_grad():
        out = attention(torch.randn(1, 3, 4, 4), (8, 8))
    assert out.shape == (1, 1, 8, 8)
    assert bool(((out > 0) & (out < 1)).all())


# ----------------------------------------------------------------------------- losses

ZW = [[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]]
ZS = [[1.0, 0.5, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]


def test_supervised_ce_over_labelled_rows_of_both_views():
    y, labelled = torch.tensor([0, -1, 2]), torch.tensor([True, False, True])
    got = supervised_ce(t(ZW), t(ZS), y, labelled, student_temp=2.0)
    lw, ls = np_log_softmax(np.array(ZW) / 2), np_log_softmax(np.array(ZS) / 2)
    expected = -(lw[0, 0] + lw[2, 2] + ls[0, 0] + ls[2, 2]) / 4
    assert got.item() == pytest.approx(expected, abs=1e-12)
    none = supervised_ce(t(ZW), t(ZS), y, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0


def test_marginal_entropy_regulariser_is_half_kl_to_uniform():
    got = marginal_entropy_regulariser([t(ZW), t(ZS)], student_temp=0.5)
    p_bar = np_softmax(np.concatenate([ZW, ZS]) / 0.5).mean(axis=0)
    expected = (math.log(3) + (p_bar * np.log(p_bar)).sum()) / 2
    assert got.item() == pytest.approx(expected, abs=1e-12)
    balanced = marginal_entropy_regulariser([t(np.eye(3)), t(np.eye(3))])
    assert balanced.item() == pytest.approx(0.0, abs=1e-12)


def test_ccr_loss_weights_confident_rows_first_and_unconfident_rows_last():
    zw, zs = t(ZW).requires_grad_(True), t(ZS).requires_grad_(True)
    lam = ccr_weight_schedule(epoch=1, max_epochs=5)
    assert lam == pytest.approx(0.4)
    got = ccr_loss(zw, zs, lam, teacher_temp=0.1, student_temp=1.0)
    q = np_softmax(np.array(ZW) / 0.1)
    r = q.max(axis=1)
    w = 0.6 * r + 0.4 * (1 - r)
    expected = np.mean(w * -(q * np_log_softmax(np.array(ZS))).sum(axis=1))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    got.backward()
    assert zw.grad is None or torch.all(zw.grad == 0)  # targets and weights are stop-gradient
    assert zs.grad.abs().sum() > 0
    assert ccr_weight_schedule(49, 50) == 1.0


def test_acr_uses_the_known_and_novel_thresholds_on_weak_logits():
    # K_k = 2 of C = 4; confidences: a .980 (known), b .711 (known), c .870 (novel), d .475 (novel)
    z = t([[5.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]])
    logp = np_log_softmax(z.numpy())
    loss, n = acr_loss(z, num_known=2, known_threshold=0.9, novel_threshold=0.8)
    assert n == 2
    assert loss.item() == pytest.approx(-(logp[0, 0] + logp[2, 2]) / 2, abs=1e-12)
    loss, n = acr_loss(z, 2, 0.9, 0.0)  # the initial theta_novel accepts every novel row
    assert n == 3
    assert loss.item() == pytest.approx(-(logp[0, 0] + logp[2, 2] + logp[3, 3]) / 3, abs=1e-12)
    loss, n = acr_loss(z, 2, 0.99, 1.2)  # theta above 1 silences novel pseudo-labels
    assert n == 0 and loss.item() == 0.0
    assert acr_loss(z[:0], 2, 0.9, 0.0)[1] == 0


def test_confidence_statistics_count_agreeing_rows_on_each_side():
    zw = t([[5.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0], [2.0, 0, 0, 0]])
    zs = t([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    stats = confidence_statistics(zw, zs, num_known=2)
    p = np_softmax(zw.numpy()).max(axis=1)
    assert (stats.count_known, stats.count_novel) == (1, 1)
    assert stats.sum_known == pytest.approx(p[0]) and stats.sum_novel == pytest.approx(p[1])


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        (ConfidenceStats(1.8, 2, 0.45, 1), 0.9 * 0.5),  # ratio 0.45 / 0.9
        (ConfidenceStats(0.1, 2, 0.9, 1), 0.9 * 10.0),  # ratio 18 clipped to 10
        (ConfidenceStats(0.9, 1, 0.01, 2), 0.9 * float(np.float32(0.1))),  # 0.0056 -> 0.1
        (ConfidenceStats(0.9, 1, 0.3, 1), 0.9 * float(np.float32(1 / 3))),  # through float32
        (ConfidenceStats(0.9, 1, 0.0, 0), 0.37),  # no novel row: previous value kept
        (ConfidenceStats(0.0, 0, 0.9, 1), 0.37),  # no known row: previous value kept
    ],
)
def test_novel_threshold_update(stats, expected):
    assert updated_novel_threshold(stats, gamma=0.9, previous=0.37) == expected


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize(
    ("usage", "keep"),
    [
        ([50, 30, 10, 5, 3, 1, 1, 0, 0, 0], 8),  # k_min 4; the drop 1 -> 0 keeps one zero
        ([1000, 0, 0, 0, 0], 2),  # the drop after the dominant one keeps one more
        ([0, 0, 0, 0, 0], 5),  # nothing used: keep all
        ([4, 4, 4, 4], 4),  # coverage only at the last one
        ([400, 300, 200, 50, 40, 5, 5], 6),  # big step 40 -> 5 in the tail extends by one
        ([5, 40, 300, 5, 200, 400, 50], 6),  # order of the input does not matter
        ([], 0),
    ],
)
def test_num_unlabelled_to_keep(usage, keep):
    assert num_unlabelled_to_keep(usage, coverage=0.9544) == keep
    if usage:
        assert num_unlabelled_to_keep(torch.tensor(usage), 0.9544) == keep


def test_merge_assigns_once_averages_unweighted_and_normalises():
    k0 = [9.0, 9.0]
    u0, u1, u2 = [1.0, 0.0], [0.0, 2.0], [-1.5, 0.0]  # anchors by usage 10, 8, 5
    u3, u4, u5 = [0.8, 0.3], [0.1, 3.0], [0.9, -0.1]  # lows: nearest u0, u1, u0
    weight = t([k0, u0, u1, u2, u3, u4, u5])
    usage = torch.tensor([100, 10, 8, 5, 1, 0, 2])
    got = merge_unlabelled_prototypes(weight, usage, num_known=1, keep=3)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    expected = np.array(
        [
            k0,
            unit(np.mean([u0, u3, u5], axis=0)),  # unweighted, not by usage
            unit(np.mean([u1, u4], axis=0)),
            u2,  # no assignee: raw value, not normalised
        ]
    )
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert torch.equal(weight[3], t(u2))  # the input is not modified


def test_merge_orders_tied_usage_by_index_and_keeps_known_rows():
    weight = t([[7.0, 7.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    got = merge_unlabelled_prototypes(weight, torch.tensor([0, 3, 3, 3]), num_known=1, keep=2)
    expected_second = np.array([0.05, 1.0]) / np.linalg.norm([0.05, 1.0])
    np.testing.assert_allclose(got.numpy(), [[7, 7], [1, 0], expected_second], atol=1e-12)
    full = prune_prototypes(weight, torch.tensor([0, 3, 3, 3]), num_known=1)
    assert full.shape == (4, 2)  # equal usage: coverage keeps all three


def test_prototype_usage_counts_softmax_argmax():
    logits = t([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert prototype_usage(logits, 4).tolist() == [1, 2, 0, 0]


# ----------------------------------------------------------------------------- the module


def make_cal(k_mode: str = "known", **kwargs) -> CAL:
    problem = Problem(num_known=2, num_classes=4, k_mode=k_mode, max_epochs=4)
    return CAL(problem, {"name": "adam"}, TINY_BACKBONE, **kwargs)


def test_dpp_writes_back_merged_prototypes_and_zeroes_the_rest():
    torch.manual_seed(0)
    model = make_cal("unknown")
    assert model.head.weight.shape[0] == 20 and model.k_estimated() == 20
    before = model.head.weight.detach().clone()
    # usage: known 0 and 1, unlabelled prototypes 2 and 3 ten times each -> keep 3 unlabelled
    rows = torch.full((40, 20), -5.0)
    for i, proto in enumerate([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10):
        rows[i, proto] = 5.0
    model._weak_logits.append(rows)
    expected = prune_prototypes(before, prototype_usage(rows, 20), num_known=2)
    model.dynamic_prototype_pruning()
    weight = model.head.weight.detach()
    assert model.head.active == 5 and model.k_estimated() == 5 and model.k_curve == [5]
    assert torch.equal(weight[:2], before[:2])
    assert torch.allclose(weight[:5], expected)
    assert bool((weight[5:20] == 0).all())
    assert model._weak_logits == []
    with torch.no_grad():
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 5)


def test_dpp_keeps_everything_when_pruning_would_not_shrink():
    model = make_cal("unknown")
    before = model.head.weight.detach().clone()
    model._weak_logits.append(torch.eye(20))  # every prototype used once
    model.dynamic_prototype_pruning()
    assert model.head.active == 20 and torch.equal(model.head.weight.detach(), before)


def test_known_k_head_uses_the_true_total_and_never_prunes():
    model = make_cal("known")
    assert model.head.weight.shape[0] == 4 and model.k_estimated() is None
    model.dynamic_prototype_pruning()
    assert model.head.active == 4 and model.k_curve == []


def test_training_losses_shapes_gradients_and_total():
    torch.manual_seed(0)
    model = make_cal("known", pseudo_start_epoch=0)
    model.train()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]  # 32 px: a 1x1 map
    batch = TrainBatch(
        views=views,
        y=torch.tensor([0, 1, -1, -1]),
        labelled=torch.tensor([True, True, False, False]),
        index=torch.arange(4),
    )
    losses = model.training_losses(batch)
    assert set(losses) == {"loss", "cls", "reg", "acr", "ccr", "pseudo_labels"}
    total = losses["cls"] + losses["reg"] + losses["acr"] + 0.2 * losses["ccr"]
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert losses["pseudo_labels"].item() > 0  # theta_novel = 0 accepts novel predictions
    assert all(torch.isfinite(v).all() for v in losses.values())
    losses["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.neck.bias" not in trainable  # BNNeck bias frozen
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert model.freq_attention.freq_attn_net[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model.predict_logits(views[0]).shape == (4, 4)
        assert model.features(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_epoch_end_updates_threshold_before_pruning_and_state_dict_keeps_them():
    model = make_cal("unknown")
    model.on_train_epoch_start()
    model.conf_stats.add(ConfidenceStats(1.8, 2, 0.45, 1))
    model.update_threshold()
    assert float(model.novel_threshold) == pytest.approx(0.45)
    model.head.set_active(7)
    state = model.state_dict()
    assert {"head.num_active", "novel_threshold"} <= set(state)
    fresh = make_cal("unknown")
    fresh.load_state_dict(state)
    assert fresh.head.active == 7 and float(fresh.novel_threshold) == pytest.approx(0.45)
    model.on_train_epoch_start()  # statistics reset at epoch start
    assert model.conf_stats == ConfidenceStats()


def test_lightning_validates_before_on_train_epoch_end():
    """CAL evaluates epoch e before pruning it, as the reference: pin the installed Lightning."""
    events: list[str] = []

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            events.append("validate")

        def on_train_epoch_end(self):
            events.append("train_epoch_end")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 2)))
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=1,
        limit_val_batches=1,
    )
    trainer.fit(Probe(), data, data)
    assert events == ["validate", "train_epoch_end"] * 2


# ----------------------------------------------------------------------------- checkpoints


def to_reference_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CAL state dict in the key layout of an official CAL Lightning checkpoint."""
    out = {}
    for key, value in state.items():
        if key == REFERENCE_HEAD[1]:
            out[REFERENCE_HEAD[0]] = value
            continue
        for ref, ours in REFERENCE_PREFIXES:
            if key.startswith(ours):
                out[ref + key[len(ours) :]] = value
    dim = state["encoder.neck.weight"].shape[0]
    out["encoder.encoder.fc.weight"] = torch.zeros(1000, dim)  # timm's unused classifier
    out["encoder.encoder.fc.bias"] = torch.zeros(1000)
    return out


def test_reference_checkpoint_loads_into_our_model_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    source = make_cal("unknown")
    source.train()
    with torch.no_grad():
        source(torch.randn(4, 3, 32, 32))  # non-trivial BN running statistics
    source.head.set_active(7)
    state = to_reference_layout(source.state_dict())
    assert not any(k.startswith(("head.", "novel")) for k in state)
    path = tmp_path / "wok_protocol1_seed2025.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)

    torch.manual_seed(1)
    target = make_cal("unknown")
    x = torch.randn(4, 3, 32, 32)
    source.eval(), target.eval()
    with torch.no_grad():
        assert not torch.allclose(target(x)[:, :7], source(x))
        report = load_cal_reference_state_dict(target, loaded, num_active=7)
        # separate forward passes: equal up to float rounding, not bit for bit
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)
    assert report["num_active"] == 7 and report["num_prototypes"] == 20
    assert sorted(report["ignored_keys"]) == [
        "encoder.encoder.fc.bias",
        "encoder.encoder.fc.weight",
    ]
    all_rows = make_cal("unknown")
    all_rows.eval()
    report = load_cal_reference_state_dict(all_rows, loaded)  # the reference's eval: every row
    assert report["num_active"] == 20
    with torch.no_grad():
        torch.testing.assert_close(all_rows(x)[:, :7], source(x), rtol=1e-5, atol=1e-6)


def test_reference_checkpoint_errors_name_the_keys():
    model = make_cal("unknown")
    state = to_reference_layout(model.state_dict())
    broken = {k: v for k, v in state.items() if k != "encoder.bottleneck.running_var"}
    broken["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.bottleneck.running_var") as err:
        load_cal_reference_state_dict(model, broken)
    assert "encoder.extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="prototypes"):
        load_cal_reference_state_dict(make_cal("known"), state)
    with pytest.raises(ValueError, match="num-active"):
        load_cal_reference_state_dict(model, state, num_active=1)  # below K_k = 2


# ----------------------------------------------------------------------------- runner
# One step per epoch on 8 images: enough for DPP to act at the end of epoch 0.
ONE_STEP = ("method.batch_size=8", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")


def test_smoke_fit_unknown_k_prunes_the_head(make_cfg):
    from owdfa_bench.runner import run

    cfg = make_cfg("method=cal", "k=unknown", *ONE_STEP)
    # the shared synthetic CPU schedule (conf/preset/synth_cal.yaml): 6 epochs, ACR from epoch 1
    assert (cfg.method.epochs, cfg.method.model.pseudo_start_epoch) == (6, 1)
    assert cfg.method.model.pseudo_start_epoch == 1
    record = run(cfg)
    assert record["status"] == "complete"
    start = 10 * record["num_known"]
    k_per_epoch = [h["metrics"]["k_estimated"] for h in record["history"]]
    assert k_per_epoch[0] == start  # epoch 0 is evaluated before its pruning
    assert record["num_known"] <= k_per_epoch[-1] < start  # DPP shrank the head
    assert record["k_estimated"] == k_per_epoch[-1]


@pytest.mark.slow
def test_evaluate_cli_reproduces_a_known_k_run(make_cfg, tmp_path, capsys):
    from owdfa_bench import evaluate
    from owdfa_bench.runner import run

    cfg = make_cfg("method=cal", "k=known", "trainer.limit_val_batches=null")
    record = run(cfg)
    assert record["status"] == "complete" and record["k_estimated"] is None
    ckpt = f"{cfg.run_dir}/checkpoints/last.ckpt"
    # the CLI on the run's checkpoint: the run's config.yaml (method=cal repeats the run's own)
    out = tmp_path / "evaluate.json"
    assert evaluate.cli_evaluate(["--ckpt", ckpt, "--out", str(out), "method=cal"]) == 0
    evaluated = json.loads(out.read_text())
    # known K: nothing changes the weights after the last validation
    assert evaluated["metrics"]["all_acc"] == pytest.approx(record["metrics"]["all_acc"])
    assert evaluated["reference_all_rows"] is None and evaluated["load"]["format"] == "owdfa_bench"
    assert "all_acc" in capsys.readouterr().out
    missing = ["--ckpt", str(tmp_path / "missing.ckpt"), "method=cal"]
    assert evaluate.cli_evaluate(missing) == 1  # a user error: one line
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_reference_layout_of_a_pruned_run_evaluates_like_ours(make_cfg, tmp_path):
    from owdfa_bench.runner import run

    cfg = make_cfg("method=cal", "k=unknown", *ONE_STEP)
    record = run(cfg)
    ours_ckpt = f"{cfg.run_dir}/checkpoints/last.ckpt"
    state = torch.load(ours_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    active = int(state["head.num_active"])
    rows = state["head.weight"].shape[0]
    assert record["num_known"] <= active < rows
    reference = tmp_path / "reference_layout.ckpt"
    torch.save({"state_dict": to_reference_layout(state)}, reference)
    ours = evaluate_checkpoint(make_cfg("method=cal", "k=unknown"), ours_ckpt)
    theirs = evaluate_checkpoint(make_cfg("method=cal", "k=unknown"), reference, active)
    assert theirs["load"]["format"] == "cal_reference" and theirs["num_active"] == active
    assert not differences(ours["metrics"], theirs["metrics"])  # two models built: floats to 1e-6
    assert theirs["reference_all_rows"]["k_estimated"] == rows
