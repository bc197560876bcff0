"""PAL-GCD: the association step against a dense brute-force numpy version on small N (the
k-reciprocal encoding, the Jaccard pairs, the greedy prior-constrained association), the
proxies, the proxy-memory loss and update, the two-stage schedule, gradient flow, the original
recipe, and smoke fits through the runner under k=known and k=unknown."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import SMALL_HEADS, TINY_BACKBONE, assert_heads_get_gradients, two_view_batch

from methods.palgcd import (
    PALGCD,
    associate,
    build_proxies,
    jaccard_pairs,
    knn_ranks,
    kreciprocal_encoding,
    kreciprocal_expansion,
    kreciprocal_jaccard_pairs,
    prior_constrained_association,
    proxy_memory_loss,
    two_stage_lr_factor,
    update_proxy_memory,
)
from owdfa_bench.method import Problem


# ----------------------------------------------------------------------------- brute force
def np_kreciprocal(x: np.ndarray, k1: int, k2: int):
    """Dense numpy re-ranking, written from Zhong et al. 2017 / `compute_jaccard_distance`
    (loops over rows, N x N matrices): returns (jaccard [N, N], V [N, N], rank [N, k1])."""
    n = len(x)
    sims = x @ x.T
    np.fill_diagonal(sims, np.inf)
    rank = np.argsort(-sims, axis=1, kind="stable")[:, : min(k1, n)]

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=int)

    full = [reciprocal(i, k1) for i in range(n)]
    half = [reciprocal(i, int(np.around(k1 / 2))) for i in range(n)]
    v = np.zeros((n, n))
    for i in range(n):
        members = list(full[i])
        for c in full[i]:
            if len(np.intersect1d(half[c], full[i])) > 2 / 3 * len(half[c]):
                members.extend(half[c])
        members = np.unique(members)
        dist = 2 - 2 * x[i] @ x[members].T
        w = np.exp(-(dist - dist.min()))
        v[i, members] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    overlap = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    jaccard = 1 - overlap / (2 - overlap)
    jaccard[jaccard < 0] = 0
    return jaccard, v, rank


def np_association(jaccard: np.ndarray, init: np.ndarray, thresh: float) -> np.ndarray:
    """`association_algo` written out on a dense matrix: centre block and lower triangle masked,
    pairs below thresh from the closest on, clusters kept as member lists and relabelled."""
    w = jaccard.copy()
    n, nc = len(w), int((init >= 0).sum())
    w[:nc, :nc] = 100
    w[np.tril_indices(n)] = 1000
    rows, cols = np.where(w < thresh)
    order = np.argsort(w[rows, cols], kind="stable")
    return np_greedy(rows[order], cols[order], init)


def np_greedy(rows, cols, init: np.ndarray) -> np.ndarray:
    labels = init.copy()
    groups: dict[int, list[int]] = {}
    for i in np.where(init >= 0)[0]:
        groups.setdefault(int(labels[i]), []).append(int(i))
    pre_max = int(init.max())
    count = pre_max
    for i, j in zip(rows, cols):
        a, b = int(labels[i]), int(labels[j])
        if a == -1 and b == -1:
            count += 1
            labels[[i, j]] = count
            groups[count] = [int(i), int(j)]
        elif a != -1 and b == -1:
            groups[a].append(int(j))
            labels[j] = a
        elif a == -1 and b != -1:
            groups[b].append(int(i))
            labels[i] = b
        elif a != b and (a > pre_max or b > pre_max):
            low, high = min(a, b), max(a, b)
            labels[groups[high]] = low
            groups[low].extend(groups.pop(high))
    out = labels.copy()
    for new, old in enumerate(np.unique(labels[labels >= 0])):
        out[labels == old] = new
    return out


def blobs(n_per: int, n_classes: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per)
    x = centres[y] + noise * rng.standard_normal((len(y), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


# ----------------------------------------------------------------------------- re-ranking
def test_knn_ranks_match_numpy_and_put_each_row_first():
    x, _ = blobs(10, 5, 12, 0.4, 0)
    sims = x @ x.T
    np.fill_diagonal(sims, np.inf)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :7]
    got = knn_ranks(torch.tensor(x), 7, max_block_elems=3 * len(x))  # several row blocks
    np.testing.assert_array_equal(got.numpy(), expected)
    assert (got[:, 0] == torch.arange(len(x))).all()
    assert knn_ranks(torch.tensor(x[:4]), 20).shape == (4, 4)  # k is capped at N


@pytest.mark.parametrize("k1,k2", [(6, 3), (5, 1), (20, 6), (3, 2)])
def test_kreciprocal_encoding_matches_the_dense_numpy_version(k1, k2):
    x, _ = blobs(12, 6, 16, 0.35, 1)
    _, v_np, rank_np = np_kreciprocal(x, k1, k2)
    xt = torch.tensor(x)
    rank = knn_ranks(xt, k1)
    np.testing.assert_array_equal(rank.numpy(), rank_np)
    v = kreciprocal_encoding(xt, rank, k1, k2, max_gather=5 * 16 * 8)  # many small blocks
    np.testing.assert_allclose(v.to_dense().numpy(), v_np, rtol=1e-10, atol=1e-13)
    rows_sum = v.to_dense().sum(1)
    torch.testing.assert_close(rows_sum, torch.ones_like(rows_sum))


def test_kreciprocal_expansion_keeps_each_row_and_no_duplicates():
    x, _ = blobs(8, 4, 10, 0.5, 2)
    idx, valid = kreciprocal_expansion(knn_ranks(torch.tensor(x), 6), 6, block_rows=5)
    for i in range(len(x)):
        members = idx[i][valid[i]].tolist()
        assert i in members and len(members) == len(set(members)) == valid[i].sum()
        assert members == sorted(members)


@pytest.mark.parametrize("thresh", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("budget", [None, 40])
def test_jaccard_pairs_match_the_dense_numpy_matrix(thresh, budget):
    x, _ = blobs(12, 6, 16, 0.35, 3)
    jac, _, _ = np_kreciprocal(x, 6, 3)
    xt = torch.tensor(x)
    v = kreciprocal_encoding(xt, knn_ranks(xt, 6), 6, 3)
    small = {} if budget is None else {"max_terms": budget, "max_buffer": 3 * len(x)}
    i, j, d = jaccard_pairs(v, thresh, num_fixed=4, **small)
    w = jac.copy()
    w[:4, :4] = 100
    w[np.tril_indices(len(x))] = 1000
    rows, cols = np.where(w < thresh)
    assert list(zip(i.tolist(), j.tolist())) == list(zip(rows.tolist(), cols.tolist()))
    np.testing.assert_allclose(d.numpy(), w[rows, cols], rtol=1e-10, atol=1e-12)


def test_sorted_pairs_are_ascending_and_thresh_is_checked():
    x, _ = blobs(10, 4, 16, 0.35, 4)
    i, j, d = kreciprocal_jaccard_pairs(torch.tensor(x), 0.6, 6, 3)
    assert len(d) > 0 and bool((d[1:] >= d[:-1]).all()) and bool((i < j).all())
    with pytest.raises(ValueError, match="thresh"):
        kreciprocal_jaccard_pairs(torch.tensor(x), 1.5)


# ----------------------------------------------------------------------------- association
def test_prior_constraint_never_merges_two_known_classes():
    # rows 0, 1: centres of known classes 0 and 1; rows 2-6 unlabelled
    init = np.array([0, 1, -1, -1, -1, -1, -1])
    pairs = [(0, 2), (1, 3), (2, 3), (3, 4), (2, 4), (5, 6), (2, 5)]
    i, j = np.array(pairs).T
    labels = prior_constrained_association(i, j, init, num_known=2)
    # (2, 3) and (2, 4) would join classes 0 and 1: refused; (5, 6) opens cluster 2, which
    # (2, 5) then merges into class 0
    assert labels.tolist() == [0, 1, 0, 1, 1, 0, 0]
    labels = prior_constrained_association(i[:6], j[:6], init, num_known=2)
    assert labels.tolist() == [0, 1, 0, 1, 1, 2, 2]
    assert prior_constrained_association([], [], init, 2).tolist() == init.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_greedy_association_matches_the_member_list_version(seed):
    rng = np.random.default_rng(seed)
    n, nc = 40, 4
    init = np.concatenate([np.arange(nc), np.full(n - nc, -1)])
    all_pairs = [(a, b) for a in range(n) for b in range(a + 1, n) if not (a < nc and b < nc)]
    pick = rng.choice(len(all_pairs), size=60, replace=False)
    i, j = np.array([all_pairs[p] for p in pick]).T
    expected = np_greedy(i, j, init)
    got = prior_constrained_association(i, j, init, num_known=nc)
    np.testing.assert_array_equal(got, expected)


def test_association_end_to_end_matches_the_brute_force():
    x, y = blobs(14, 6, 16, 0.3, 5)  # classes 0-2 known, 3-5 novel
    num_known = 3
    is_lab = (y < num_known) & (np.arange(len(y)) % 2 == 0)
    lab, lab_y, unl = x[is_lab], y[is_lab], x[~is_lab]
    result = associate(
        torch.tensor(lab),
        torch.tensor(lab_y),
        torch.tensor(unl),
        num_known,
        thresh=0.6,
        k1=6,
        k2=3,
        outlier_thresh=3,
    )
    centres = np.stack([lab[lab_y == c].mean(0) for c in range(num_known)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    hybrid = np.concatenate([centres, unl])
    jac, _, _ = np_kreciprocal(hybrid, 6, 3)
    init = np.concatenate([np.arange(num_known), np.full(len(unl), -1)])
    expected = np_association(jac, init, 0.6)
    n_lab = len(lab)
    np.testing.assert_array_equal(result.row_label[n_lab:], expected[num_known:])
    np.testing.assert_array_equal(result.row_label[:n_lab], lab_y)  # a labelled row: its class
    assert result.stats["new_clusters"] >= 1 and result.stats["proxies"] >= num_known
    assert result.stats["rows_associated"] == num_known + len(unl)


def test_unlabelled_sampling_draws_the_official_subset_without_touching_numpy_state():
    x, y = blobs(10, 4, 12, 0.3, 6)
    lab, lab_y, unl = x[y < 2], y[y < 2], x[y >= 2]
    state = np.random.get_state()
    np.random.seed(123)
    before = np.random.random()
    result = associate(
        torch.tensor(lab), torch.tensor(lab_y), torch.tensor(unl), 2, sample_ratio=0.5, seed=7
    )
    np.random.seed(123)
    assert np.random.random() == before  # the global generator was not re-seeded
    np.random.seed(7)  # the official draw: np.random.seed(epoch); np.random.choice(range(n))
    official = np.random.choice(range(len(unl)), replace=False, size=int(0.5 * len(unl)))
    np.random.set_state(state)
    sampled = np.where(result.row_label[len(lab) :] >= 0)[0]
    assert set(sampled) <= set(official.tolist())
    assert result.stats["unlabelled_sampled"] == len(official)
    not_drawn = np.setdiff1d(np.arange(len(unl)), official)
    assert (result.row_proxy[len(lab) + not_drawn] == -1).all()


def test_build_proxies_keeps_labelled_or_large_clusters_and_renumbers():
    row_label = np.array([0, 0, 1, 2, 2, 2, 3, -1, 3, 3, 3, 3, 3])
    feats = torch.nn.functional.normalize(torch.randn(13, 5, dtype=torch.float64), dim=1)
    proxies, labels, row_proxy = build_proxies(
        row_label, feats, num_labelled=3, num_known=2, outlier_thresh=4
    )
    # cluster 2 (3 rows, no labelled row) is dropped; cluster 3 (6 rows) is kept as id 2
    assert labels.tolist() == [0, 1, 2]
    assert row_proxy.tolist() == [0, 0, 1, -1, -1, -1, 2, -1, 2, 2, 2, 2, 2]
    members = [[0, 1], [2], [6, 8, 9, 10, 11, 12]]
    for p, rows in enumerate(members):
        mean = feats[rows].mean(0)
        torch.testing.assert_close(proxies[p], mean / mean.norm())


# ----------------------------------------------------------------------------- memory
def test_proxy_memory_loss_matches_numpy():
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    memory = unit(rng.standard_normal((5, 4)))
    labels = np.array([0, 1, 1, 2, 3])  # proxies 1 and 2 share a label: two positives
    feats = unit(rng.standard_normal((3, 4)))
    row_proxy = np.array([0, 2, 4])
    temp, neg_k = 0.05, 3
    losses = []
    for f, p in zip(feats, row_proxy):
        s = memory @ f / temp
        pos = np.where(labels == labels[p])[0]
        others = [q for q in np.argsort(-s, kind="stable") if q not in pos]
        sel = list(pos) + others[: neg_k - len(pos)]
        log_sm = s[sel] - np.log(np.exp(s[sel]).sum())
        losses.append(-log_sm[: len(pos)].mean())
    got = proxy_memory_loss(
        torch.tensor(feats),
        torch.tensor(row_proxy),
        torch.tensor(memory),
        torch.tensor(labels),
        temp,
        neg_k,
    )
    assert got.item() == pytest.approx(np.mean(losses), rel=1e-10)
    empty = torch.zeros(0, 4, requires_grad=True)
    zero = proxy_memory_loss(
        empty, torch.zeros(0, dtype=torch.long), torch.tensor(memory), torch.tensor(labels)
    )
    assert zero.item() == 0.0 and zero.requires_grad


def test_memory_update_is_sequential_per_proxy():
    rng = np.random.default_rng(1)
    memory = torch.nn.functional.normalize(torch.tensor(rng.standard_normal((3, 4))), dim=1)
    feats = torch.nn.functional.normalize(torch.tensor(rng.standard_normal((6, 4))), dim=1)
    row_proxy = torch.tensor([2, 0, 2, 1, 2, 0])
    expected = memory.clone()
    for f, p in zip(feats, row_proxy.tolist()):  # ExemplarMemory.backward, row by row
        m = 0.2 * expected[p] + 0.8 * f
        expected[p] = m / m.norm()
    got = update_proxy_memory(memory, feats, row_proxy, 0.2)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, memory)  # a new tensor; the input is unchanged


# ----------------------------------------------------------------------------- schedule
def test_two_stage_lr_factor_restarts_the_schedule_at_stage_two():
    fair = {"scheduler": "step", "step_size": 10, "gamma": 0.05}
    got = [two_stage_lr_factor(e, fair, 15, 50, True) for e in (0, 9, 10, 14, 15, 24, 25, 35)]
    np.testing.assert_allclose(got, [1, 1, 0.05, 0.05, 1, 1, 0.05, 0.0025])
    # k=unknown (stage 1 only): one schedule over the run
    assert two_stage_lr_factor(15, fair, 15, 50, False) == pytest.approx(0.05)
    original = {"scheduler": "cosine", "eta_min_ratio": 1e-3}
    f = lambda e: two_stage_lr_factor(e, original, 30, 230, True, 10.0, True, 200)  # noqa: E731
    cos = lambda e, t: 1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * e / t)) / 2  # noqa: E731
    assert f(0) == 1.0 and f(29) == pytest.approx(cos(29, 200))  # stage 1: T_max 200
    assert f(30) == pytest.approx(10.0) and f(130) == pytest.approx(10 * cos(100, 200))


# ----------------------------------------------------------------------------- model
def with_memory(method: PALGCD) -> PALGCD:
    g = torch.Generator().manual_seed(1)
    memory = torch.nn.functional.normalize(torch.randn(5, method.encoder.dim, generator=g), dim=1)
    row_proxy = torch.tensor([0, 0, 1, 2, 3, -1, 4, -1])  # two unlabelled rows without a proxy
    method.set_memory(memory, torch.tensor([0, 1, 2, 3, 4]), row_proxy)
    return method


def test_stage_two_trains_every_parameter():
    torch.manual_seed(0)
    problem = Problem(num_known=3, num_classes=6, max_epochs=3)
    method = with_memory(PALGCD(problem, {}, TINY_BACKBONE, stage1_epochs=0, **SMALL_HEADS))
    assert method.second_stage and method.stage() == 2 and method.prediction_mode() == "head"
    memory = method.memory.clone()
    out = method.training_losses(two_view_batch())
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["memory_rows"].item() == pytest.approx(12 / 16)
    out["loss"].backward()
    assert_heads_get_gradients(method)
    assert torch.equal(method.memory, memory)  # stage 2: the memory is constant


@pytest.mark.parametrize("detach", [False, True])
def test_stage_one_trains_the_encoder_through_the_memory(detach):
    torch.manual_seed(0)
    problem = Problem(num_known=3, num_classes=6, max_epochs=6)
    method = with_memory(
        PALGCD(problem, {}, TINY_BACKBONE, stage1_epochs=4, memory_detach=detach, **SMALL_HEADS)
    )
    assert method.stage() == 1 and method.prediction_mode() == "proxies"
    memory = method.memory.clone()
    out = method.training_losses(two_view_batch())
    out["loss"].backward()
    assert set(out) >= {"loss", "memory", "stage"} and "cls" not in out
    grads = {n: p.grad for n, p in method.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if n.startswith("encoder."))
    assert all(g is None for n, g in grads.items() if n.startswith(("projector.", "head.")))
    assert torch.equal(method.memory, memory) == detach
    norms = method.memory.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_proxies_are_constant_between_associations_by_default():
    """The CIFAR-100 / ImageNet-100 scripts the config copies pass --memory_detach True."""
    from conftest import compose_config

    from owdfa_bench.runner import apply_recipe

    for recipe in ("fair", "original"):
        cfg = apply_recipe(compose_config(["method=palgcd", f"method.recipe={recipe}"]))
        assert cfg.method.model.memory_detach is True
    assert PALGCD(Problem(3, 6, max_epochs=2), {}, TINY_BACKBONE, **SMALL_HEADS).memory_detach


def test_unknown_k_runs_stage_one_only_and_reports_the_proxies():
    method = PALGCD(Problem(3, 6, "unknown", max_epochs=10), {}, TINY_BACKBONE, **SMALL_HEADS)
    assert not method.second_stage and method.k_estimated() is None
    assert not any(p.requires_grad for p in method.head.parameters())
    with_memory(method)
    assert method.k_estimated() == 5
    method.eval()
    with torch.no_grad():
        scores = method.predict_logits(torch.randn(2, 3, 16, 16))
    assert scores.shape == (2, 5)  # one score per cluster id
    with pytest.raises(ValueError, match="predict_with=head"):
        PALGCD(Problem(3, 6, "unknown"), {}, TINY_BACKBONE, predict_with="head")


def test_proxy_scores_leave_ids_without_a_proxy_out():
    method = PALGCD(Problem(3, 6, max_epochs=2), {}, TINY_BACKBONE, **SMALL_HEADS)
    memory = torch.nn.functional.normalize(torch.randn(3, method.encoder.dim), dim=1)
    method.set_memory(memory, torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2]))
    f_mem = memory[[1]]
    scores = method.proxy_scores(f_mem)
    assert scores.shape == (1, 4) and scores.argmax().item() == 2
    assert scores[0, 1].item() < -1e3  # class 1 has no proxy


class FakeDataModule:
    """eval_loader(split): batches of random images with the split's labels (-1 unlabelled)."""

    def __init__(self, n_lab: int = 12, n_unl: int = 20, num_known: int = 3):
        g = torch.Generator().manual_seed(2)
        self.images = {
            "labelled": torch.randn(n_lab, 3, 16, 16, generator=g),
            "unlabelled": torch.randn(n_unl, 3, 16, 16, generator=g),
        }
        self.labels = {
            "labelled": torch.arange(n_lab) % num_known,
            "unlabelled": torch.full((n_unl,), -1),
        }

    def eval_loader(self, split: str, shard: bool = False):
        x, y = self.images[split], self.labels[split]
        index = torch.arange(len(x))
        return [
            {"image": x[s : s + 8], "y": y[s : s + 8], "index": index[s : s + 8]}
            for s in range(0, len(x), 8)
        ]


def test_epoch_hook_associates_and_resets_the_optimiser_at_stage_two():
    problem = Problem(num_known=3, num_classes=6, max_epochs=4)
    method = PALGCD(
        problem, {}, TINY_BACKBONE, stage1_epochs=2, outlier_thresh=1, sample_ratio=0.5, k1=5
    )
    opt = method.configure_optimizers()["optimizer"]
    trainer = SimpleNamespace(current_epoch=0, optimizers=[opt], datamodule=FakeDataModule())
    method._trainer = trainer
    try:
        due = []
        for epoch in range(4):
            trainer.current_epoch = epoch
            opt.state[next(iter(method.parameters()))]["step"] = torch.tensor(1.0)
            before = len(method.associations)
            method.on_train_epoch_start()
            due.append(len(method.associations) > before)
            assert bool(opt.state) == (epoch != 2)  # cleared when stage 2 starts
        assert due == [True, True, True, False]  # every stage-1 epoch, once in stage 2
        assert [a["stage"] for a in method.associations] == [1, 1, 2]
        assert method.row_proxy.shape == (32,) and method.memory.shape[0] >= 3
        assert method.associations[0]["unlabelled_sampled"] == 10
        extras = method.record_extras()["palgcd"]
        assert extras["second_stage"] and len(extras["associations"]) == 3
    finally:
        method._trainer = None


def test_memory_survives_a_checkpoint_round_trip():
    method = with_memory(PALGCD(Problem(3, 6, max_epochs=2), {}, TINY_BACKBONE, **SMALL_HEADS))
    method.associations = [{"epoch": 0, "proxies": 5}]
    checkpoint: dict = {}
    method.on_save_checkpoint(checkpoint)
    fresh = PALGCD(Problem(3, 6, max_epochs=2), {}, TINY_BACKBONE, **SMALL_HEADS)
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(fresh.memory, method.memory)
    assert torch.equal(fresh.row_proxy, method.row_proxy)
    assert fresh.associations == method.associations
    assert "memory" not in fresh.state_dict()  # kept out of the strict state-dict load


def test_original_recipe_composes_and_trains_layer4_and_heads_only():
    from conftest import compose_config

    from owdfa_bench.runner import apply_recipe, build_method

    cfg = apply_recipe(compose_config(["method=palgcd", "method.recipe=original"]))
    assert cfg.method.optim.name == "sgd" and cfg.method.optim.lr == 0.01
    assert cfg.method.model.stage2_lr_ratio == 10.0
    method = build_method(cfg, Problem(num_known=3, num_classes=6, max_epochs=6))
    assert method.second_stage and method.stage1_epochs == 1  # the synth preset's schedule
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("encoder.backbone.layer4.", "encoder.neck.", "projector.", "head."))
        for n in trainable
    )
    conf = method.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[1]["weight_decay"] == 0.0
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.1)  # stage 2 at lr 0.1


# ----------------------------------------------------------------------------- smoke fits
@pytest.mark.parametrize("k", ["known", "unknown"])
def test_smoke_fit_writes_a_complete_record(make_cfg, k):
    from owdfa_bench.runner import run

    # stage1_epochs=1: both stages run in the smoke trainer's 2 epochs under k=known
    record = run(make_cfg("method=palgcd", f"k={k}", "method.model.stage1_epochs=1"))
    assert record["status"] == "complete"
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert all(v is None or math.isfinite(v) for v in record["metrics"].values())
    extras = record["palgcd"]
    stages = [a["stage"] for a in extras["associations"]]
    if k == "known":
        assert stages == [1, 2] and extras["prediction"] == "head"
        assert record["k_estimated"] is None
    else:
        assert stages == [1, 1] and extras["prediction"] == "proxies"
        assert record["k_estimated"] == extras["associations"][-1]["proxies"]
        assert record["k_estimated"] >= record["num_known"]
