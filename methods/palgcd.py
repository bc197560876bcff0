"""PAL-GCD: prior-constrained association learning with a proxy memory, then joint SimGCD.

Paper: Wang, Zhong and Gong, "Prior-Constrained Association Learning for Fine-Grained
Generalized Category Discovery", AAAI 2025 (arXiv 2502.09501).
Official code: github.com/Terminator8758/PAL-GCD @ 646a38c (`train.py`: the two-stage loop and
argparse defaults; `model.py`: `DINOHead` with the BN neck; `association/semi_association.py`:
`semi_association`, `association_algo`, `initialize_proxy_memory`; `association/
proxy_memory.py`: `ProxyMemory`, `ExemplarMemory`; `util/faiss_rerank.py`: the k-reciprocal
Jaccard distance of Zhong et al., CVPR 2017; `run_*_stage1_and_stage2.sh`: per-dataset values).
Built on SimGCD (CVMI-Lab/SimGCD @ f843f27).

What it computes:
  model   backbone -> custom pool 1x1 -> f (2048-d); f_mem = normalise(BNNeck(f)), the BN with
          its bias frozen at 0 that PAL-GCD puts in its head (`DINOHead(bn_after_x=True)`), feeds
          the memory and the association; the projection MLP (2048-2048-256, GELU) and the
          cosine classifier read f (the classifier normalises it), as PAL-GCD's head does.
  association (start of each stage-1 epoch; once at the start of stage 2)
          embed every training row with the test transform in eval mode; L2-normalised class
          means of the labelled rows are the K_known centres; a random subset (`sample_ratio`,
          drawn with `np.random.RandomState(epoch)`) of the unlabelled rows joins them; the
          k-reciprocal Jaccard distance (k1 = 20, k2 = 6) is computed on [centres; subset],
          centre-centre pairs are excluded; the pairs below `thresh` are visited from the
          closest on: two unassigned rows open a new cluster, an unassigned row joins the other's
          cluster, two clusters merge into the smaller id unless both hold a labelled centre
          (the prior constraint: two known classes never merge). Clusters with a labelled row
          or more than `outlier_thresh` rows become proxies (normalised mean of their members'
          f_mem); every other row is left out of the memory loss until the next association.
  losses  stage 1: L = L_mem. L_mem, per row of both views with a proxy: scores s = f_mem . m /
          0.05 against every proxy, the positives (the proxies of the row's cluster, one here)
          plus the highest-scoring others up to 50 entries, L_i = -mean_{p in P} log softmax(s
          over those entries)_p; the mean over the rows. The proxies are constants between
          associations (`memory_detach: true`, the default: `run_cifar100_stage1_and_stage2.sh`
          and `run_imagenet100_stage1_and_stage2.sh`, whose thresh, outlier_thresh and
          sample_ratio the config copies, pass `--memory_detach True`; argparse's default is
          False, which the CUB, Cars, Aircraft and Herbarium scripts keep). With
          `memory_detach: false`, after each stage-1 step, for every row in order, m <-
          normalise(0.2 m + 0.8 f_mem) (`ExemplarMemory.backward`; the new feature dominates).
          stage 2 (k=known only): SimGCD's L = (1 - lam)(L_distill + eps L_memax) + lam L_cls +
          (1 - lam) L_infonce + lam L_supcon, plus 0.1 L_mem against a constant memory; the
          teacher-temperature warm-up counts from the first stage-2 epoch; a new optimiser state
          and a restarted schedule, as the official code builds a new optimiser for stage 2.
  predict stage 2: argmax of the classifier; stage 1, and every epoch under k=unknown: the
          cluster of the nearest proxy by cosine (the official code's outlier rule; it has no
          test-split prediction). `predict_logits` returns l / 0.1 or s = cos / 0.05.

K: stage 1 needs no K: the number of clusters comes out of the association, and under k=unknown
the whole run is stage 1 (no classifier is trained, `k.estimate` is not used) and `k_estimated()`
is the number of proxies of the last association. Under k=known the stage-2 classifier has the
true K, as the official head (`gt_num_classes`).

The association in torch (`kreciprocal_jaccard_pairs`) never forms an N x N matrix: the
neighbour lists are computed in row blocks (matrix product + top-k), the k-reciprocal encoding
V and its query expansion are sparse rows (a few hundred non-zeros each), and the Jaccard
overlaps sum_k min(V_ik, V_jk) are accumulated block by block through V's columns into a
bounded [rows x N] buffer, keeping only the pairs below `thresh`. Only pairs that share
non-zeros in V can be below the threshold (any other pair has Jaccard distance 1), so the result
equals the dense computation (tests/test_palgcd.py checks it against a dense numpy version).
Time and memory at OWDFA-40 scale: benchmarks/palgcd_association.py and benchmarks/README.md.

Recipes: the default ("harness-fair") trains the whole network with the shared CAL recipe (Adam
2e-4, wd 1e-3, StepLR(10, 0.05)) over 50 epochs split into a 15-epoch stage 1 and a 35-epoch
stage 2, the schedule restarting at stage 2. `method.recipe=original`: stage 1 for 30 epochs at
SGD lr 0.01 (cosine with T_max = 200, as `train.py` builds it while the generic-dataset stage 1
runs 30 epochs), stage 2 for 200 epochs at SGD lr 0.1 (cosine over 200), momentum 0.9, wd 5e-5
without decay on biases and norms, only `layer4`, the neck and the heads trainable (the ResNet
analogue of `grad_from_block = 11`).

Deliberate deviations from the official code:
  * Backbone: the OW-DFA ResNet + BNNeck instead of DINO ViT-B/16; the default recipe trains
    all of it. Views: the shared weak and strong views (officially two crop-and-flip draws).
  * Sampler: the shared labelled/unlabelled weighted sampler in both stages; the official stage
    1 draws 16 images from each of 8 clusters per batch (`GCDClassUniformlySampler`), which the
    shared data layer does not offer. Rows without a proxy are skipped by the memory loss, as the
    official stage 2 does with its weighted sampler.
  * Re-ranking: the k-reciprocal Jaccard distance in torch (blockwise and sparse, above)
    instead of faiss and dense numpy loops; the same numbers up to float rounding.
  * The subset of unlabelled rows is drawn from a local `RandomState(epoch)`: the same rows as
    the official `np.random.seed(epoch)` without re-seeding NumPy's global generator.
  * Pairs of equal distance are visited in row-major order (a stable sort; NumPy's default sort
    is not stable). Cluster ids: known classes keep their class id, new clusters are numbered
    K_known, K_known + 1, ... (the official relabelling gives the same ids when every known
    class has labelled rows); proxies are renumbered likewise after the small clusters go.
  * The memory is updated after the loss, before the backward pass, instead of inside the
    backward pass: the same order of updates and the same gradients (they use the memory of the
    forward pass).
  * Stage 2's association interval is "once at its start" (the generic-dataset setting; CUB,
    Cars and Aircraft re-associate every epoch: `stage2_association_interval: 1`).
  * Values for OW-DFA: thresh 0.6 and outlier_thresh 100 (the generic-dataset values), sample
    ratio 0.3 (the CIFAR-100 setting); CAL's values are unknown. The 15 + 35 split of the default
    50 epochs is a choice of the port. The teacher warm-up is 5 of 35 stage-2 epochs (30 of 200
    scaled to the same share).
  * Outliers are not assigned to their nearest proxy for a printed accuracy (the official code
    prints it and discards it).

Under DDP: every rank embeds its share of the training rows; rank 0 associates them all and
every rank takes its proxy memory; with `memory_detach: false`, each step's memory update uses
every rank's rows (rank 0's first, in batch order), so the memories stay equal. Not equal to
one process with the global batch: stage 2's me-max, InfoNCE and SupCon sets and batch-norm
statistics are over each rank's share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.common_losses import decay_groups, self_distillation_loss
from methods.simgcd_family import SimGCDFamily, joint_total
from owdfa_bench.distributed import from_rank_zero, gather_rows, is_rank_zero
from owdfa_bench.method import Problem, TrainBatch, build_optimizer, lr_factor
from owdfa_bench.models import custom_avg_pool2d, train_only

log = logging.getLogger(__name__)

PREDICT_MODES = ("auto", "head", "proxies")
MISSING_SCORE = -1.0e4  # score of a cluster id with no proxy (known class without labelled rows)


# ============================================================================ association
@dataclass
class SparseRows:
    """A sparse [N, n_cols] matrix in CSR form: row r holds col[crow[r]:crow[r+1]] (ascending)."""

    crow: torch.Tensor  # [N + 1] int64
    col: torch.Tensor  # [nnz] int64
    val: torch.Tensor  # [nnz] float
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1

    def row_of_entry(self) -> torch.Tensor:
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.n_rows, device=counts.device), counts)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.n_rows, self.n_cols, dtype=self.val.dtype, device=self.val.device)
        dense[self.row_of_entry(), self.col] = self.val
        return dense


def _segment_positions(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Flattened positions starts[s] + 0 .. lengths[s] - 1 of every segment s, in order."""
    first = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - first, lengths, output_size=total)
    return torch.arange(total, device=lengths.device).add_(shift)


def knn_ranks(x: torch.Tensor, k: int, max_block_elems: int = 1 << 24) -> torch.Tensor:
    """The k nearest rows of every row of the L2-normalised x by cosine, itself first: [N, k].

    Row blocks of x @ x.T (at most `max_block_elems` scores at a time) then top-k; the faiss
    search of the official code on normalised features gives the same ranking.
    """
    n = x.shape[0]
    k = min(int(k), n)
    block = max(1, min(n, max_block_elems // max(1, n)))
    out = torch.empty((n, k), dtype=torch.long, device=x.device)
    for s in range(0, n, block):
        sims = x[s : s + block] @ x.t()
        rows = torch.arange(s, min(n, s + block), device=x.device)
        sims[rows - s, rows] = float("inf")  # a row is its own first neighbour
        out[s : s + block] = sims.topk(k, dim=1).indices
    return out


def _reciprocal(rank: torch.Tensor, width: int, rows: torch.Tensor):
    """k-reciprocal neighbours of `rows`: the first `width` neighbours j of each row i that have
    i among their own first `width` neighbours. Returns (candidates [B, width], mask [B, width])."""
    forward = rank[rows, :width]
    backward = rank[forward, :width]
    return forward, (backward == rows[:, None, None]).any(dim=-1)


def kreciprocal_expansion(rank: torch.Tensor, k1: int, block_rows: int = 2048):
    """The expanded k-reciprocal set of every row (Zhong et al. 2017; `compute_jaccard_distance`).

    R(i) = the k-reciprocal neighbours of i with a window of k1 + 1 columns of `rank` (capped at
    the k1 columns the search returned, as the official code's slicing is); for each c in R(i)
    whose own half set R_half(c) (window round(k1 / 2) + 1) shares more than 2/3 of its members
    with R(i), R_half(c) is added. Returns (idx [N, W], valid [N, W]), each row's members sorted
    ascending and first, padding after them.
    """
    n, cols = rank.shape
    w1 = min(k1 + 1, cols)
    wh = min(int(np.around(k1 / 2)) + 1, cols)
    every = torch.arange(n, device=rank.device)
    half_idx, half_mask = [], []
    for s in range(0, n, block_rows):
        h, m = _reciprocal(rank, wh, every[s : s + block_rows])
        half_idx.append(h)
        half_mask.append(m)
    half_idx, half_mask = torch.cat(half_idx), torch.cat(half_mask)
    out_idx = []
    for s in range(0, n, block_rows):
        rows = every[s : s + block_rows]
        cand, cmask = _reciprocal(rank, w1, rows)  # R(i): [B, w1]
        h = half_idx[cand]  # R_half(c) of each candidate: [B, w1, wh]
        hm = half_mask[cand] & cmask[..., None]
        in_r = ((h[..., None] == cand[:, None, None, :]) & cmask[:, None, None, :]).any(-1)
        overlap = (in_r & hm).sum(-1)
        size = half_mask[cand].sum(-1)
        accept = cmask & (overlap.to(torch.float64) > 2.0 / 3.0 * size.to(torch.float64))
        members = torch.cat(
            [
                cand.masked_fill(~cmask, n),
                h.masked_fill(~(hm & accept[..., None]), n).flatten(1),
            ],
            dim=1,
        )
        members, _ = members.sort(dim=1)
        dup = torch.zeros_like(members, dtype=torch.bool)
        dup[:, 1:] = members[:, 1:] == members[:, :-1]
        members = members.masked_fill(dup, n).sort(dim=1).values
        width = int((members < n).sum(1).max())
        out_idx.append(members[:, :width])
    width = max(t.shape[1] for t in out_idx)
    idx = torch.cat([F.pad(t, (0, width - t.shape[1]), value=n) for t in out_idx])
    valid = idx < n
    return idx.clamp_max(n - 1), valid


def kreciprocal_encoding(
    x: torch.Tensor, rank: torch.Tensor, k1: int = 20, k2: int = 6, max_gather: int = 1 << 24
) -> SparseRows:
    """The sparse k-reciprocal encoding V with local query expansion (`compute_jaccard_distance`).

    V[i, j] = softmax over j in the expanded set of -(2 - 2 x_i . x_j) (x L2-normalised), zero
    elsewhere; then, for k2 != 1, row i is replaced by the mean of the rows of its first k2
    neighbours (itself included).
    """
    n, d = x.shape
    idx, valid = kreciprocal_expansion(rank, k1)
    width = idx.shape[1]
    block = max(1, min(n, max_gather // max(1, width * d)))
    weights = []
    for s in range(0, n, block):
        e = s + block
        members = x.index_select(0, idx[s:e].reshape(-1)).view(-1, width, d)
        dots = torch.bmm(members, x[s:e, :, None]).squeeze(-1)  # [B, W]
        logits = (2.0 * dots).masked_fill(~valid[s:e], float("-inf"))  # -(2 - 2 cos) + 2
        weights.append(torch.softmax(logits, dim=1))
    weights = torch.cat(weights)
    counts = valid.sum(1)
    crow = torch.zeros(n + 1, dtype=torch.long, device=x.device)
    crow[1:] = torch.cumsum(counts, 0)
    v = SparseRows(crow, idx[valid], weights[valid], n)
    k2 = min(int(k2), rank.shape[1])
    if k2 == 1:
        return v
    return _query_expansion(v, rank[:, :k2])


def _query_expansion(v: SparseRows, neighbours: torch.Tensor, max_terms: int = 1 << 22):
    """Row i of the result = mean over the rows neighbours[i] of v (sparse, row blocks)."""
    n, k2 = neighbours.shape
    lengths = v.crow[1:] - v.crow[:-1]
    per_row = lengths[neighbours].sum(1)
    bounds = _blocks(per_row, max_terms)
    crows, cols, vals = [], [], []
    for s, e in bounds:
        nb = neighbours[s:e].reshape(-1)
        seg = lengths.index_select(0, nb)
        total = int(seg.sum())
        pos = _segment_positions(v.crow.index_select(0, nb), seg, total)
        row_key = torch.arange(nb.numel(), device=nb.device).div_(k2, rounding_mode="floor") * n
        key = torch.repeat_interleave(row_key, seg, output_size=total).add_(
            v.col.index_select(0, pos)
        )
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=v.val.dtype, device=v.val.device)
        sums.index_add_(0, inverse, v.val.index_select(0, pos) / k2)
        crows.append(torch.bincount(uniq // n, minlength=e - s))
        cols.append(uniq % n)
        vals.append(sums)
    crow = torch.zeros(n + 1, dtype=torch.long, device=v.crow.device)
    crow[1:] = torch.cumsum(torch.cat(crows), 0)
    return SparseRows(crow, torch.cat(cols), torch.cat(vals), n)


def _blocks(cost: torch.Tensor, budget: int, max_rows: int | None = None) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed cost stays within `budget` (one row at least)."""
    cum = torch.cumsum(cost.to(torch.int64), 0).cpu().numpy()
    n = len(cum)
    bounds, s = [], 0
    while s < n:
        before = cum[s - 1] if s else 0
        e = int(np.searchsorted(cum, before + budget, side="right"))
        e = max(e, s + 1)
        if max_rows is not None:
            e = min(e, s + max_rows)
        bounds.append((s, e))
        s = e
    return bounds


def jaccard_pairs(
    v: SparseRows,
    thresh: float,
    num_fixed: int = 0,
    max_terms: int = 1 << 21,
    max_buffer: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs i < j with Jaccard distance 1 - a / (2 - a) < thresh, a = sum_k min(V_ik, V_jk).

    The pairs among the first `num_fixed` rows (the labelled centres) are left out, as the
    official code sets that block to 100. Row blocks bound the work (`max_terms` min-terms) and
    the accumulator (`max_buffer` floats). Returns (i, j, distance), row-major.
    """
    n = v.n_rows
    rows = v.row_of_entry()
    order = torch.argsort(v.col, stable=True)
    csc_row, csc_val = rows.index_select(0, order), v.val.index_select(0, order)
    col_count = torch.bincount(v.col, minlength=n)
    col_end = torch.cumsum(col_count, 0)
    # entry e = (i, k) sits at position csc_pos[e] of column k, whose rows ascend: the rows
    # j > i of that column follow it, so each pair i < j is met once (from its row i)
    csc_pos = torch.empty_like(order)
    csc_pos[order] = torch.arange(order.numel(), device=order.device)
    later = col_end.index_select(0, v.col) - csc_pos - 1  # rows j > i sharing column k
    terms_per_row = torch.zeros(n, dtype=torch.long, device=v.col.device)
    terms_per_row.index_add_(0, rows, later)
    # a > floor <=> distance 1 - a / (2 - a) < thresh; the margin keeps float ties for the exact
    # test below, and pairs that share no column (a = 0, distance 1) are never candidates
    floor = max(0.0, 2.0 * (1.0 - thresh) / (2.0 - thresh) - 1e-6)
    max_rows = max(1, max_buffer // max(1, n))
    acc = torch.zeros(min(n, max_rows) * n, dtype=v.val.dtype, device=v.val.device)
    out_i, out_j, out_d = [], [], []
    for s, e in _blocks(terms_per_row, max_terms, max_rows=max_rows):
        e0, e1 = int(v.crow[s]), int(v.crow[e])
        vals, cnt = v.val[e0:e1], later[e0:e1]
        total = int(cnt.sum())
        pos = _segment_positions(csc_pos[e0:e1] + 1, cnt, total)
        contrib = torch.minimum(
            torch.repeat_interleave(vals, cnt, output_size=total), csc_val.index_select(0, pos)
        )
        key = torch.repeat_interleave((rows[e0:e1] - s) * n, cnt, output_size=total)
        key.add_(csc_row.index_select(0, pos))
        block = acc[: (e - s) * n]
        block.zero_()
        block.index_add_(0, key, contrib)
        flat = (block > floor).nonzero().squeeze(1)
        a = block.index_select(0, flat)
        ii = flat.div(n, rounding_mode="floor") + s
        jj = flat.remainder(n)
        dist = (1.0 - a / (2.0 - a)).clamp_min(0.0)
        keep = (dist < thresh) & ~((ii < num_fixed) & (jj < num_fixed))
        out_i.append(ii[keep])
        out_j.append(jj[keep])
        out_d.append(dist[keep])
    if not out_i:
        empty = torch.zeros(0, dtype=torch.long, device=v.col.device)
        return empty, empty, torch.zeros(0, dtype=v.val.dtype, device=v.val.device)
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_d)


def kreciprocal_jaccard_pairs(
    x: torch.Tensor,
    thresh: float,
    k1: int = 20,
    k2: int = 6,
    num_fixed: int = 0,
    timings: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (i < j) of rows of the L2-normalised x whose k-reciprocal Jaccard distance is below
    `thresh`, excluding pairs among the first `num_fixed` rows, sorted by distance (stable).

    `timings`, when given, receives the seconds of each phase and V's non-zeros per row.
    """
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"thresh must be in (0, 1], got {thresh}")
    if x.shape[0] < 2:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty, x.new_zeros(0)
    t0 = time.perf_counter()
    rank = knn_ranks(x, k1)
    t1 = time.perf_counter()
    v = kreciprocal_encoding(x, rank, k1, k2)
    t2 = time.perf_counter()
    i, j, d = jaccard_pairs(v, thresh, num_fixed)
    order = torch.argsort(d, stable=True)
    if timings is not None:
        timings.update(
            knn_s=round(t1 - t0, 3),
            encoding_s=round(t2 - t1, 3),
            jaccard_s=round(time.perf_counter() - t2, 3),
            nnz_per_row=round(v.col.numel() / max(1, v.n_rows), 1),
        )
    return i[order], j[order], d[order]


def prior_constrained_association(
    pair_i: np.ndarray, pair_j: np.ndarray, init_labels: np.ndarray, num_known: int
) -> np.ndarray:
    """PAL-GCD's greedy association (`association_algo`) over pairs sorted by distance.

    `init_labels`: a known class id (< num_known) for the labelled centres, -1 elsewhere. For
    each pair: two unassigned rows open a new cluster (ids num_known, num_known + 1, ...), an
    unassigned row joins the other's cluster, two different clusters merge into the smaller id
    unless both ids are known (< num_known). Returns every row's cluster id (-1: never paired)
    with the new clusters renumbered num_known, num_known + 1, ... in order of their ids.
    """
    init_labels = np.asarray(init_labels, dtype=np.int64)
    n = init_labels.size
    parent = np.arange(n)
    cluster = init_labels.copy()  # the cluster id of a root; -1: an unassigned row (a root)
    next_id = num_known - 1

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in zip(np.asarray(pair_i).tolist(), np.asarray(pair_j).tolist()):
        ri, rj = find(i), find(j)
        if ri == rj:
            continue
        li, lj = cluster[ri], cluster[rj]
        if li < 0 and lj < 0:
            next_id += 1
            cluster[ri] = next_id
            parent[rj] = ri
        elif lj < 0:
            parent[rj] = ri
        elif li < 0:
            parent[ri] = rj
        elif li >= num_known or lj >= num_known:  # never two known classes
            if li < lj:
                parent[rj] = ri
            else:
                parent[ri] = rj
    labels = np.array([cluster[find(a)] for a in range(n)], dtype=np.int64)
    new = np.unique(labels[labels >= num_known])
    renumber = dict(zip(new.tolist(), range(num_known, num_known + new.size)))
    return np.array([renumber.get(int(lb), int(lb)) for lb in labels], dtype=np.int64)


@dataclass
class AssociationResult:
    """One association: the proxy memory and which training row belongs to which proxy."""

    proxies: torch.Tensor  # [P, D] L2-normalised cluster means of f_mem
    proxy_label: torch.Tensor  # [P] cluster id of each proxy (known ids first, then new ones)
    row_proxy: torch.Tensor  # [N_train] proxy index of each training row, -1 = left out
    row_label: np.ndarray  # [N_train] cluster id of each training row (-1: none)
    stats: dict[str, Any] = field(default_factory=dict)


def build_proxies(
    row_label: np.ndarray,
    features: torch.Tensor | Sequence[torch.Tensor],
    num_labelled: int,
    num_known: int,
    outlier_thresh: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`initialize_proxy_memory`: a proxy for each cluster with a labelled row (rows <
    num_labelled) or more than `outlier_thresh` rows; the proxy is the normalised mean of its
    members' features. New-cluster proxies are renumbered num_known, num_known + 1, ...

    `features`: [N, D], or consecutive row blocks of it (e.g. labelled then unlabelled rows),
    so that no concatenated copy is needed. Returns (proxies [P, D], proxy_label [P],
    row_proxy [N])."""
    blocks = [features] if torch.is_tensor(features) else list(features)
    device, dim = blocks[0].device, blocks[0].shape[1]
    labels = torch.as_tensor(row_label, dtype=torch.long, device=device)
    n = labels.numel()
    if n != sum(b.shape[0] for b in blocks):
        raise ValueError(f"{n} row labels for {sum(b.shape[0] for b in blocks)} feature rows")
    member = labels >= 0
    row_proxy = torch.full((n,), -1, dtype=torch.long, device=device)
    if not bool(member.any()):
        return blocks[0].new_zeros((0, dim)), labels.new_zeros(0), row_proxy
    ids, inverse = torch.unique(labels[member], return_inverse=True)
    size = torch.bincount(inverse, minlength=ids.numel())
    is_lab = torch.zeros(n, dtype=torch.long, device=device)
    is_lab[:num_labelled] = 1
    n_lab = torch.zeros(ids.numel(), dtype=torch.long, device=device)
    n_lab.index_add_(0, inverse, is_lab[member])
    kept = (n_lab > 0) | (size > outlier_thresh)
    n_proxies = int(kept.sum())
    proxy_of_id = torch.full((ids.numel(),), -1, dtype=torch.long, device=device)
    proxy_of_id[kept] = torch.arange(n_proxies, device=device)
    row_proxy[member] = proxy_of_id[inverse]
    sums = blocks[0].new_zeros((n_proxies + 1, dim))  # the last row collects rows without one
    start = 0
    for block in blocks:
        target = row_proxy[start : start + block.shape[0]]
        sums.index_add_(0, torch.where(target >= 0, target, n_proxies), block)
        start += block.shape[0]
    proxies = F.normalize(sums[:n_proxies], dim=1)
    proxy_label = ids[kept].clone()
    new = proxy_label >= num_known
    proxy_label[new] = num_known + torch.arange(int(new.sum()), device=device)
    return proxies, proxy_label, row_proxy


def associate(
    labelled: torch.Tensor,
    labelled_y: torch.Tensor,
    unlabelled: torch.Tensor,
    num_known: int,
    thresh: float = 0.6,
    k1: int = 20,
    k2: int = 6,
    sample_ratio: float = 1.0,
    outlier_thresh: int = 100,
    seed: int = 0,
) -> AssociationResult:
    """One PAL-GCD association (`semi_association` with `associate_type='thresholding'`,
    `rerank=True`, `subclass_split_num=1`) on L2-normalised features of the training rows.

    Training rows are the labelled rows then the unlabelled rows (the merged index of the
    harness's training set). The labels of unlabelled rows are never read.
    """
    start = time.perf_counter()
    device = labelled.device
    y = torch.as_tensor(labelled_y, dtype=torch.long, device=device)
    classes = torch.unique(y)
    if bool((classes >= num_known).any()) or bool((classes < 0).any()):
        raise ValueError(f"labelled rows must carry known class ids 0..{num_known - 1}")
    sums = labelled.new_zeros((classes.numel(), labelled.shape[1]))
    sums.index_add_(0, torch.searchsorted(classes, y), labelled)
    centres = F.normalize(sums, dim=1)
    n_lab, n_unl = labelled.shape[0], unlabelled.shape[0]
    if sample_ratio < 1.0:
        sel = np.random.RandomState(int(seed)).choice(
            n_unl, replace=False, size=int(sample_ratio * n_unl)
        )
    else:
        sel = np.arange(n_unl)
    sel_t = torch.as_tensor(sel, dtype=torch.long, device=device)
    nc = classes.numel()
    hybrid = unlabelled.new_empty((nc + sel.size, unlabelled.shape[1]))  # one copy of the rows
    hybrid[:nc] = centres
    torch.index_select(unlabelled, 0, sel_t, out=hybrid[nc:])
    t0 = time.perf_counter()
    phases: dict[str, Any] = {}
    pi, pj, pd = kreciprocal_jaccard_pairs(hybrid, thresh, k1, k2, num_fixed=nc, timings=phases)
    t1 = time.perf_counter()
    init = np.concatenate([classes.cpu().numpy(), np.full(sel.size, -1, dtype=np.int64)])
    labels = prior_constrained_association(pi.cpu().numpy(), pj.cpu().numpy(), init, num_known)
    t2 = time.perf_counter()
    row_label = np.full(n_lab + n_unl, -1, dtype=np.int64)
    centre_label = dict(zip(classes.cpu().tolist(), labels[:nc].tolist()))
    row_label[:n_lab] = [centre_label[c] for c in y.cpu().tolist()]
    row_label[n_lab + sel] = labels[nc:]
    del hybrid
    proxies, proxy_label, row_proxy = build_proxies(
        row_label, (labelled, unlabelled), n_lab, num_known, outlier_thresh
    )
    novel_clusters = np.unique(labels[labels >= num_known]).size
    stats = {
        "rows_associated": int(nc + sel.size),
        "unlabelled_sampled": int(sel.size),
        "pairs_below_thresh": int(pi.numel()),
        "new_clusters": int(novel_clusters),
        "proxies": int(proxies.shape[0]),
        "new_proxies": int((proxy_label >= num_known).sum()),
        "rows_with_proxy": int((row_proxy >= 0).sum()),
        "unlabelled_left_out": int((row_proxy[n_lab:] < 0).sum()),
        **phases,
        "rerank_s": round(t1 - t0, 3),
        "greedy_s": round(t2 - t1, 3),
        "total_s": round(time.perf_counter() - start, 3),
    }
    return AssociationResult(proxies, proxy_label, row_proxy, row_label, stats)


# ============================================================================ proxy memory
def proxy_memory_loss(
    features: torch.Tensor,
    row_proxy: torch.Tensor,
    memory: torch.Tensor,
    proxy_label: torch.Tensor,
    temp: float = 0.05,
    neg_k: int = 50,
) -> torch.Tensor:
    """`ProxyMemory.forward`: mean over rows of -(1/|P_i|) sum_{p in P_i} log softmax(s_i[sel])_p.

    s_i = f_i . m / temp against the (constant) memory; P_i = the proxies with the label of row
    i's proxy; sel = P_i plus the highest-scoring other proxies, min(neg_k, P) entries in all.
    `features` are the rows that have a proxy. Zero (in the graph) when there is none.
    """
    if features.shape[0] == 0 or memory.shape[0] == 0:
        return features.sum() * 0.0
    scores = features @ memory.detach().t() / temp
    positive = proxy_label[None, :] == proxy_label[row_proxy][:, None]
    k = min(int(neg_k), memory.shape[0])
    top = scores.detach().masked_fill(positive, float("inf")).topk(k, dim=1).indices
    selected = scores.gather(1, top)
    target = positive.gather(1, top).to(scores.dtype) / positive.sum(1, keepdim=True)
    return -(target * F.log_softmax(selected, dim=1)).sum(1).mean()


def update_proxy_memory(
    memory: torch.Tensor, features: torch.Tensor, row_proxy: torch.Tensor, momentum: float = 0.2
) -> torch.Tensor:
    """`ExemplarMemory.backward`'s update, row by row in order: m_p <- normalise(momentum m_p +
    (1 - momentum) f) for the proxy p of each row. Vectorised by rounds (the r-th row of every
    proxy in round r), which keeps the sequential order per proxy. Returns the new memory."""
    memory = memory.clone()
    if features.shape[0] == 0:
        return memory
    f = features.detach().to(memory.dtype)
    order = torch.argsort(row_proxy, stable=True)
    sorted_p = row_proxy[order]
    counts = torch.bincount(sorted_p, minlength=memory.shape[0])
    first = torch.cumsum(counts, 0) - counts
    rank_in_proxy = torch.arange(sorted_p.numel(), device=f.device) - first[sorted_p]
    for r in range(int(counts.max())):
        rows = order[rank_in_proxy == r]
        p = row_proxy[rows]
        memory[p] = F.normalize(momentum * memory[p] + (1.0 - momentum) * f[rows], dim=1)
    return memory


# ============================================================================ schedule
def two_stage_lr_factor(
    epoch: int,
    optim: dict[str, Any],
    stage1_epochs: int,
    total_epochs: int,
    second_stage: bool,
    stage2_lr_ratio: float = 1.0,
    restart: bool = True,
    stage1_schedule_epochs: int | None = None,
) -> float:
    """lr multiplier of the two-stage run: stage 1's schedule over `stage1_schedule_epochs`
    (default: stage 1's length, or the whole run without stage 2); from stage 2 on,
    `stage2_lr_ratio` x the schedule restarted at stage 2 over its own length (`restart`), or
    the stage-1 schedule continued."""
    in_stage2 = second_stage and epoch >= stage1_epochs
    if in_stage2 and restart:
        length = total_epochs - stage1_epochs
        return stage2_lr_ratio * lr_factor(epoch - stage1_epochs, length, optim)
    length = stage1_schedule_epochs or (stage1_epochs if second_stage else total_epochs)
    return (stage2_lr_ratio if in_stage2 else 1.0) * lr_factor(epoch, length, optim)


# ============================================================================ method
class PALGCD(SimGCDFamily):
    """PAL-GCD on the shared runner: association + proxy memory, then joint SimGCD (k=known)."""

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        two_stage: bool = True,
        stage1_epochs: int = 15,
        stage2_lr_ratio: float = 1.0,
        restart_schedule_at_stage2: bool = True,
        stage1_schedule_epochs: int | None = None,
        thresh: float = 0.6,
        k1: int = 20,
        k2: int = 6,
        sample_ratio: float = 0.3,
        outlier_thresh: int = 100,
        association_interval: int = 1,
        stage2_association_interval: int = 0,
        memory_temp: float = 0.05,
        memory_momentum: float = 0.2,
        memory_neg_k: int = 50,
        memory_detach: bool = True,
        stage2_memory_weight: float = 0.1,
        sup_weight: float = 0.35,
        memax_weight: float = 1.0,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 5,
        infonce_temp: float = 1.0,
        supcon_temp: float = 0.07,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        proj_layers: int = 3,
        predict_with: str = "auto",
        no_decay_on_bias_and_norm: bool = False,
        trainable: str | Sequence[str] = "all",
    ):
        if predict_with not in PREDICT_MODES:
            raise ValueError(f"method.model.predict_with={predict_with!r}: use {PREDICT_MODES}")
        if int(association_interval) < 1:
            raise ValueError("method.model.association_interval must be >= 1 (epochs)")
        # stage 2 needs the classifier, which needs the true K: k=unknown runs stage 1 only
        second_stage = (
            bool(two_stage)
            and problem.k_mode == "known"
            and int(stage1_epochs) < int(problem.max_epochs)
        )
        if predict_with == "head" and not second_stage:
            raise ValueError(
                "method.model.predict_with=head needs stage 2 (k=known, two_stage=true and "
                "stage1_epochs below the number of epochs); use auto or proxies"
            )
        rows = problem.num_classes if problem.k_mode == "known" else problem.num_known
        super().__init__(problem, optim, backbone, rows, (proj_hidden_dim, proj_dim, proj_layers))
        self.stage1_epochs, self.second_stage = int(stage1_epochs), second_stage
        self.predict_with = predict_with
        self.stage2_lr_ratio = float(stage2_lr_ratio)
        self.restart_schedule_at_stage2 = bool(restart_schedule_at_stage2)
        self.stage1_schedule_epochs = stage1_schedule_epochs
        self.assoc = {
            "thresh": float(thresh),
            "k1": int(k1),
            "k2": int(k2),
            "sample_ratio": float(sample_ratio),
            "outlier_thresh": int(outlier_thresh),
        }
        self.association_interval = int(association_interval)
        self.stage2_association_interval = int(stage2_association_interval)
        self.memory_temp, self.memory_momentum = float(memory_temp), float(memory_momentum)
        self.memory_neg_k, self.memory_detach = int(memory_neg_k), bool(memory_detach)
        self.stage2_memory_weight = float(stage2_memory_weight)
        self.set_joint_weights(
            sup_weight, student_temp, infonce_temp, supcon_temp, no_decay_on_bias_and_norm
        )
        self.set_self_distillation(
            memax_weight, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs
        )
        if not self.second_stage:  # a stage-1-only run never trains the SimGCD heads
            for p in [*self.projector.parameters(), *self.head.parameters()]:
                p.requires_grad_(False)
        self.trainable = train_only(self, trainable)
        # the proxy memory; its size changes with every association, so it is saved by hand
        self.register_buffer("memory", torch.zeros(0, self.encoder.dim), persistent=False)
        self.register_buffer("proxy_label", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("row_proxy", torch.zeros(0, dtype=torch.long), persistent=False)
        self.associations: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ model
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, f_mem): the pooled backbone feature and normalise(BNNeck(f))."""
        f = custom_avg_pool2d(self.encoder.feature_map(x), 1).flatten(1)
        return f, F.normalize(self.encoder.neck(f), dim=1)

    def stage(self, epoch: int | None = None) -> int:
        epoch = int(self.current_epoch if epoch is None else epoch)
        return 2 if self.second_stage and epoch >= self.stage1_epochs else 1

    def prediction_mode(self) -> str:
        if self.predict_with != "auto":
            return self.predict_with
        return "head" if self.stage() == 2 else "proxies"

    def proxy_scores(self, f_mem: torch.Tensor) -> torch.Tensor:
        """cos / memory_temp to each proxy, as scores over cluster ids [B, max id + 1]."""
        if self.memory.shape[0] == 0:
            return f_mem.new_zeros((f_mem.shape[0], 1))
        width = int(self.proxy_label.max()) + 1
        out = f_mem.new_full((f_mem.shape[0], width), MISSING_SCORE)
        out[:, self.proxy_label] = f_mem @ self.memory.t() / self.memory_temp
        return out

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        f, f_mem = self.features(x)
        if self.prediction_mode() == "head":
            return self.logits(f) / self.student_temp
        return self.proxy_scores(f_mem)

    def k_estimated(self) -> int | None:
        if self.problem.k_mode == "known":
            return None
        return int(self.memory.shape[0]) if self.memory.shape[0] else None

    # ------------------------------------------------------------------ association
    def association_due(self, epoch: int) -> bool:
        if self.memory.shape[0] == 0 or self.row_proxy.numel() == 0:
            return True  # none yet (also after resuming without one)
        if self.stage(epoch) == 1:
            return epoch % self.association_interval == 0
        since = epoch - self.stage1_epochs
        if since == 0:
            return True
        return (
            self.stage2_association_interval > 0 and since % self.stage2_association_interval == 0
        )

    @torch.no_grad()
    def embed_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """f_mem and labels of a training split (test transform, eval mode; unlabelled labels
        are never read)."""
        feats, ys = self.eval_rows(
            split, "PAL-GCD associates the training rows", lambda x: self.features(x)[1].float()
        )
        if feats.shape[0] == 0:
            return torch.zeros(0, self.encoder.dim, device=self.device), ys.long()
        return feats, ys.long()

    def run_association(self, epoch: int) -> AssociationResult | None:
        """Associate the training rows and set the proxy memory. Under DDP every rank embeds
        its share of the rows, rank 0 associates them all (its GPU kernels are not bitwise
        reproducible) and every rank takes its memory; the result is returned on rank 0."""
        labelled, labelled_y = self.embed_split("labelled")
        unlabelled, _ = self.embed_split("unlabelled")
        result, memory = None, None
        if is_rank_zero():
            result = associate(
                labelled, labelled_y, unlabelled, self.problem.num_known, seed=epoch, **self.assoc
            )
            log.info("PAL-GCD association (epoch %d): %s", epoch, result.stats)
            memory = {
                "proxies": result.proxies.cpu(),
                "proxy_label": result.proxy_label.cpu(),
                "row_proxy": result.row_proxy.cpu(),
                "stats": result.stats,
            }
        memory = from_rank_zero(memory)
        self.set_memory(memory["proxies"], memory["proxy_label"], memory["row_proxy"])
        self.associations.append(
            {"epoch": int(epoch), "stage": self.stage(epoch), **memory["stats"]}
        )
        return result

    def set_memory(self, proxies, proxy_label, row_proxy) -> None:
        self.memory = proxies.to(self.device, torch.float32)
        self.proxy_label = proxy_label.to(self.device, torch.long)
        self.row_proxy = row_proxy.to(self.device, torch.long)

    def on_train_epoch_start(self) -> None:
        epoch = int(self.current_epoch)
        if self.second_stage and epoch == self.stage1_epochs:
            for opt in self.trainer.optimizers:  # stage 2 builds a new optimiser officially
                opt.state.clear()
        if self.association_due(epoch):
            self.run_association(epoch)

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        f, f_mem = self.features(torch.cat(batch.views[:2]))
        rows = self.row_proxy[batch.index.to(self.row_proxy.device).repeat(2)]
        valid = rows >= 0
        memory = self.memory.clone()  # the forward pass's memory (updated below)
        mem_loss = proxy_memory_loss(
            f_mem[valid], rows[valid], memory, self.proxy_label, self.memory_temp, self.memory_neg_k
        )
        stage = self.stage()
        out: dict[str, torch.Tensor] = {"memory": mem_loss.detach()}
        if stage == 1:
            loss = mem_loss
            if not self.memory_detach:  # with every rank's rows (DDP): one memory everywhere
                self.memory = update_proxy_memory(
                    self.memory,
                    gather_rows(f_mem[valid]),
                    gather_rows(rows[valid]),
                    self.memory_momentum,
                )
        else:
            fwd = self.joint_forward(f, batch)
            t_teacher = self.teacher_temp_at(int(self.current_epoch) - self.stage1_epochs)
            terms = self.joint_terms(
                fwd,
                batch,
                distill=self_distillation_loss(fwd.l1, fwd.l2, t_teacher, self.student_temp),
                memax=self.memax_term(fwd.logits),
            )
            cluster = terms["distill"] + self.memax_weight * terms["memax"]
            loss = (
                joint_total(cluster, terms, self.sup_weight) + self.stage2_memory_weight * mem_loss
            )
            out.update({k: v.detach() for k, v in terms.items()})
            out["teacher_temp"] = torch.tensor(t_teacher)
        out["loss"] = loss
        out["stage"] = torch.tensor(float(stage))
        out["memory_rows"] = valid.float().mean().detach()
        return out

    # ------------------------------------------------------------------ bookkeeping
    def record_extras(self) -> dict[str, Any]:
        return {
            "palgcd": {
                "second_stage": self.second_stage,
                "stage1_epochs": self.stage1_epochs,
                "prediction": self.prediction_mode(),
                "associations": list(self.associations),
            }
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["palgcd_memory"] = {
            "memory": self.memory.cpu(),
            "proxy_label": self.proxy_label.cpu(),
            "row_proxy": self.row_proxy.cpu(),
            "associations": list(self.associations),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("palgcd_memory")
        if saved:
            self.set_memory(saved["memory"], saved["proxy_label"], saved["row_proxy"])
            self.associations = list(saved.get("associations", []))

    def configure_optimizers(self):
        params = (
            decay_groups(self)
            if self.no_decay_on_bias_and_norm
            else [p for p in self.parameters() if p.requires_grad]
        )
        opt = build_optimizer({**self.optim, "scheduler": "none"}, params, self.problem.max_epochs)
        total = int(self.problem.max_epochs)

        def factor(epoch: int) -> float:
            return two_stage_lr_factor(
                epoch,
                self.optim,
                self.stage1_epochs,
                total,
                self.second_stage,
                self.stage2_lr_ratio,
                self.restart_schedule_at_stage2,
                self.stage1_schedule_epochs,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
