"""Openworld-GAN: iterative discovery of unseen sources by OOD detection, clustering, merging
and SVM refinement around a classifier retrained on the discovered classes.

Paper: S. Girish, S. Suri, S. Rambhatla, A. Shrivastava, "Towards Discovery and Attribution of
Open-world GAN Generated Images", ICCV 2021 (arXiv 2105.04580); CPL (ICCV 2023) reports it as an
OW-DFA baseline. Official code: github.com/Sharath-girish/openworld-gan @ dd31151 (`main.py`:
the stages of each iteration; `train_classifier.py`; `generate_features.py`; `ood_detection.py`;
`clustering.py`; `merge.py`; `refine.py`; `networks.py`: `MulticlassNet`; `cfgs/config.yaml`:
every value).

What it computes. The official pipeline runs `num_iters` = 4 iterations, each: train a classifier
(step 1 on the labelled known classes, 50 epochs; steps 2-4 on them plus the discovered classes,
100 epochs each, starting from the previous step's weights with a new last layer), then discover
on the unlabelled ("eval") rows. Here one harness run holds the iterations as rounds scheduled by
epochs (`round_starts`: 0, 50, 150, 250 of 350 epochs, placed at the same shares of the run by
`epoch_share`); a discovery runs at the start of every round but the first, from the model as the
previous round left it:
  model     backbone -> custom pool 1x1 -> BNNeck (the harness's GlobalFeatureEncoder) -> the FC
            stack of `MulticlassNet` (Linear-ReLU-Dropout(0.5) to 512, 512, 128) -> a linear
            classifier (with bias) whose first K_known + discovered rows are live.
  features  one eval-mode pass over the labelled and the unlabelled rows (test transform): the
            128-d FC output (`extract_level: fc`) and the classifier's argmax.
  OOD       features standardised with the labelled rows' mean and std (`StandardScaler`); the
            WTA hash: 2048 random permutations of the feature dims, each hash the argmax of the
            first `window_size` (2) permuted dims, one-hot, so the distance of two rows is the
            number of hashes on which they disagree. Per known class: threshold = the 0.9
            quantile of the distances of all ordered pairs of its labelled rows (self-pairs
            included; the official `quantiles`: the int(n^2 (1 - 0.9))-th largest value); an
            unlabelled row is in-distribution if its mean distance to the class's rows is below
            it. The same against each discovered class, with its unlabelled member rows.
  attribute an undiscovered row (label -1) in-distribution to some known class and predicted a
            known class gets that prediction; one in-distribution to some discovered class and
            predicted a discovered class gets that one.
  cluster   if more rows than `num_clusters` (500) stay undiscovered, k-means with the official
            seeding (first centre uniform, then each next drawn with probability proportional to
            the Euclidean distance, not its square, to the nearest centre chosen) and 300 Lloyd
            iterations on their standardised features; each cluster becomes a new class.
  merge     on the raw features: each cluster's centre points to its nearest other centre; the
            strongly connected components of that graph (mutual nearest neighbours) merge, first
            among the new clusters, then among all discovered ones (each when more than 2).
  refine    per discovered class, an RBF SVM (C = 1, gamma = 1 / dim: thundersvm's defaults)
            separates its rows from every other labelled-by-discovery row (known-attributed ones
            included); a class whose members are predicted positive at a rate <= 0.5 or whose
            positive members number <= `refine_min_size` (100) is dropped (its rows back to -1),
            otherwise its negatively predicted members go back to -1; ids renumbered K_known, ...
  train     CE on the labelled rows and the unlabelled rows of discovered classes (rows
            attributed to known classes are not added: `add_seen: False`); from the second
            round on weighted by max_c n_c / n_c (`weighted: True` of steps 2-4), the classifier
            re-initialised and the Adam state cleared at each round start (a new network head and
            a new optimiser per official step), the other weights carried over (`pretrained`).
  predict   argmax over the live rows: known ids 0..K_known-1 are the known classes, discovered
            classes follow.

K: the number of classes is discovered (k-means' 500 is an over-clustering that merging and
refinement reduce). k=known: the discovery is bounded by the true number of novel classes (head
of the true K; when a round's refined classes exceed it, the largest are kept). k=unknown: no
bound but the head's preallocated rows: `k.estimate` if given, else `max_classes_factor` x
K_known (10, CAL's over-provisioning). `k_estimated()` is K_known + the discovered classes live
in the head (None under k=known).

Deliberate deviations from the official code:
  * Backbone: the harness's ResNet + BNNeck (official: ImageNet ResNet-50, average pool), with the
    official FC stack and classifier on top. Recipe: CPL's (Adam 2e-4, weight decay 1e-5,
    StepLR(10, 0.2), 50 epochs, batch 128), as ORCA's port, instead of Adam 1e-4 without
    schedule for 50 + 3 x 100 epochs at batch 256 (`reference_optim` in
    conf/method/openworld_gan.yaml).
  * Rounds scaled to the schedule: the 50 / 100 / 100 / 100-epoch steps keep their shares of
    the run (on 50 epochs: rounds at 0, 7, 21, 36; on synth's 6: 0, 1, 3, 4), the lr schedule
    restarts at every round (`restart_schedule_each_round`; the official builds a new
    constant-lr Adam per step). The official's 4th discovery, after the last classifier, only
    relabels its eval set for its transductive evaluation; test rows here are predicted by the
    classifier, so discovery runs before rounds 2..R only (3 with the 4 official iterations).
  * One training set with the shared labelled/unlabelled sampler: the unlabelled half of a
    batch is unused in round 1 and holds the discovered rows later (official: a shuffled set of
    the labelled rows and the discovered rows).
  * Class weights indexed by class id (the official orders the discovered classes' weights by
    the string sort of their names, which misaligns them past 10 clusters).
  * Known-class ids are never renumbered (the official renumbers all ids after clustering, so a
    known class without an attributed row would shift the others); a new cluster id starts
    after max(K_known, the largest id) (the official's starts after the largest attributed id).
  * k-means: an empty cluster keeps its centre (official: NaN centre, then reruns when fewer
    than 2 clusters remain); it stops when the assignment repeats (the same result as running
    all 300 iterations). A `cluster_min_size` above 0 applies to the new clusters only.
  * The WTA permutations, the k-means seeding and the classifier re-initialisation draw from
    generators seeded by (`seed`, round), never from the global RNG; scikit-learn's SVC
    instead of thundersvm's (same kernel, C, gamma and tolerance; CPU). `svm_max_rows` (off by
    default) bounds each SVM's training rows by a seeded subsample of the negatives, for
    OWDFA-40, where ~36k unlabelled rows make one SVM per class slow on the CPU.
  * The mean WTA distance to a class is computed as N - <h, mean of the class's hashes> in
    float64 (the official sums the pairwise distances in float32): the same test, without its
    rounding; the threshold comes from a histogram of the integer distances (the same value
    as the official top-k over all n^2 of them, in bounded memory).
  * Counts on data=synth (conf/preset/synth_openworld_gan.yaml): 25 k-means clusters and a
    refine floor of 5 rows, the official 500 and 100 scaled to a synthetic class's 1/20 of an
    OWDFA-40 class's rows.

As in the official code, an unlabelled row attributed to a known class is never reconsidered, and
a row is in-distribution when it is so for any one of the known classes: the round-2 OOD test
decides what can ever be discovered. On data=synth it lets few rows through: 1 of the 1,780
unlabelled rows after the one-epoch round 1 of the 6-epoch schedule, 34 after the three epochs
of schedule=synth_long (25 clusters, all dropped by the refine floor), so nothing is discovered
there (the record's `openworld_gan.discoveries` lists every round's counts).

Under DDP: every rank embeds its share of the labelled and unlabelled rows (`eval_rows`), rank 0
runs the whole discovery on all of them and every rank takes its labels; the classifier's
re-initialisation is seeded, so the replicas stay equal. Not equal to one process with the
global batch: the weighted CE is each rank's mean, and batch-norm statistics are over each
rank's share.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from owdfa_bench.distributed import from_rank_zero, is_rank_zero
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, build_optimizer, lr_factor
from owdfa_bench.models import GlobalFeatureEncoder

log = logging.getLogger(__name__)

NORMALIZE_TYPES = ("mean_std", "min_max", "none")
THRESH_TYPES = ("quantiles", "mean_std")
CONNECTIONS = ("strong", "weak")
EXTRACT_LEVELS = ("fc", "backbone")


# ============================================================================ schedule
def round_starts_of(starts: Sequence[int]) -> list[int]:
    """The first epoch of every round, ascending, from `round_starts` (epoch_share values): the
    first must be 0; equal values (a schedule too short to give each round an epoch) count once."""
    values = [int(s) for s in starts]
    if not values or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"method.model.round_starts={list(starts)}: must start at 0 and not decrease"
        )
    return sorted(set(values))


def round_of(epoch: int, starts: Sequence[int]) -> int:
    """The 1-based round an epoch belongs to."""
    return sum(1 for s in starts if s <= epoch)


def round_lr_factor(
    epoch: int, starts: Sequence[int], total: int, optim: dict[str, Any], restart: bool = True
) -> float:
    """lr multiplier: the schedule restarted at every round start over the round's length (a
    new optimiser per official step), or run once over the whole run (`restart` False)."""
    if not restart:
        return lr_factor(epoch, total, optim)
    begin = max(s for s in starts if s <= epoch)
    end = min([s for s in starts if s > epoch] + [total])
    return lr_factor(epoch - begin, max(1, end - begin), optim)


# ============================================================================ OOD detection
def standardize(
    train: torch.Tensor, *others: torch.Tensor, kind: str = "mean_std"
) -> tuple[torch.Tensor, ...]:
    """`train` and `others` scaled with statistics of `train` (float64), as scikit-learn's
    StandardScaler (population std; a constant dim keeps scale 1) or MinMaxScaler."""
    rows = [x.double() for x in (train, *others)]
    if kind == "none":
        return tuple(rows)
    ref = rows[0]
    if kind == "mean_std":
        shift, scale = ref.mean(0), ref.std(0, unbiased=False)
    elif kind == "min_max":
        shift = ref.min(0).values
        scale = ref.max(0).values - shift
    else:
        raise ValueError(f"normalize_type={kind!r}: use one of {NORMALIZE_TYPES}")
    scale = torch.where(scale < 10 * torch.finfo(scale.dtype).eps, torch.ones_like(scale), scale)
    return tuple((x - shift) / scale for x in rows)


def wta_windows(
    num_hashes: int, dim: int, window: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The first `window` dims of `num_hashes` uniformly random permutations of `dim` dims
    ([N, window]): all the WTA hash reads of the official `get_hashperm`."""
    if not 1 <= window <= dim:
        raise ValueError(f"window_size={window} must be in [1, {dim}] (the feature dims)")
    return torch.rand(num_hashes, dim, generator=generator).argsort(dim=1)[:, :window]


def wta_codes(x: torch.Tensor, windows: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """WTA code of every row: per hash, the position (0..window-1) of the largest of its
    window's dims, the first on ties ([n, N] long)."""
    windows = windows.to(x.device)
    return torch.cat(
        [x[s : s + block][:, windows].argmax(dim=2) for s in range(0, max(1, len(x)), block)]
    )[: len(x)]


def wta_onehot(codes: torch.Tensor, window: int) -> torch.Tensor:
    """The hashed vector of the official `get_hash`: each code one-hot over `window`, [n, N*w];
    <h_a, h_b> counts the hashes on which a and b agree."""
    return F.one_hot(codes, window).flatten(1).float()


def pairwise_distance_histogram(
    hashed: torch.Tensor, num_hashes: int, block: int = 2048
) -> torch.Tensor:
    """Counts of the WTA distance N - <h_i, h_j> (0..N) over all ordered pairs (i, j) of the
    rows, i = j included: the official threshold's value list, as a histogram ([N + 1])."""
    hist = torch.zeros(num_hashes + 1, dtype=torch.long, device=hashed.device)
    for s in range(0, len(hashed), block):
        agree = (hashed[s : s + block] @ hashed.t()).round().long()
        hist += torch.bincount((num_hashes - agree).flatten(), minlength=num_hashes + 1)
    return hist


def top_quantile(values: torch.Tensor, frac: float) -> float:
    """The official `quantiles(x, frac)`: the int(len (1 - frac))-th largest value (at least
    the largest)."""
    k = max(1, int(values.numel() * (1 - frac)))
    return float(values.flatten().topk(k).values[-1])


def histogram_threshold(hist: torch.Tensor, kind: str = "quantiles", value: float = 0.9) -> float:
    """The OOD threshold of a class from its distance histogram: `top_quantile(distances,
    value)` ('quantiles') or mean + value x std (unbiased, 'mean_std')."""
    hist = hist.double().cpu()
    total = float(hist.sum())
    levels = torch.arange(len(hist), dtype=torch.float64)
    if kind == "quantiles":
        k = max(1, int(total * (1 - value)))
        from_top = torch.cumsum(hist.flip(0), 0)  # rows at or above each level, from the top
        return float(levels.flip(0)[int(torch.nonzero(from_top >= k)[0])])
    if kind == "mean_std":
        mean = float((hist * levels).sum()) / total
        var = float((hist * (levels - mean) ** 2).sum()) / max(1.0, total - 1)
        return mean + value * math.sqrt(var)
    raise ValueError(f"thresh_type={kind!r}: use one of {THRESH_TYPES}")


def wta_in_distribution(
    reference: torch.Tensor, queries: torch.Tensor, num_hashes: int, threshold: float
) -> torch.Tensor:
    """Which query rows have a mean WTA distance to the `reference` rows below `threshold`
    (hashed vectors both). mean_j (N - <q, h_j>) = N - <q, mean_j h_j>, compared exactly as
    N n - <q, sum_j h_j> < threshold n."""
    n = reference.shape[0]
    agree = queries.double() @ reference.double().sum(0)
    return num_hashes * n - agree < threshold * n


def attribute(
    labels: torch.Tensor,
    predicted: torch.Tensor,
    in_known: torch.Tensor,
    in_discovered: torch.Tensor,
    num_known: int,
) -> torch.Tensor:
    """The official attribution: an undiscovered row (-1) in-distribution to some known class and
    predicted a known class takes that prediction; one in-distribution to some discovered class
    and predicted a discovered class takes that one; every other row keeps its label."""
    open_rows = labels == -1
    take = open_rows & (
        (in_known & (predicted < num_known)) | (in_discovered & (predicted >= num_known))
    )
    return torch.where(take, predicted, labels)


# ============================================================================ clustering
def kmeans_distance_seeded(
    x: torch.Tensor, k: int, max_iter: int = 300, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The official `kmeans_gpu`: seeding with the first centre a uniform row and each next a
    row drawn with probability proportional to its Euclidean distance (not squared) to the
    nearest centre so far, then Lloyd iterations (nearest centre, centre = mean) until the
    assignment repeats or `max_iter`; an empty cluster keeps its centre. Assignment [n]."""
    x = x.double()
    n = x.shape[0]
    centres = x.new_empty((k, x.shape[1]))
    centres[0] = x[int(torch.randint(n, (1,), generator=generator))]
    nearest = None
    for c in range(1, k):
        d = (x - centres[c - 1]).norm(dim=1)
        nearest = d if nearest is None else torch.minimum(nearest, d)
        total = float(nearest.sum())
        probs = nearest / total if total > 0 else torch.full_like(nearest, 1.0 / n)
        centres[c] = x[int(torch.multinomial(probs.cpu(), 1, generator=generator))]
    assign = None
    for _ in range(max_iter):
        new = torch.cdist(x, centres).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = x.new_zeros((k, x.shape[1])).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].double()
    return assign


def add_clusters(
    labels: torch.Tensor,
    rows: torch.Tensor,
    assignment: torch.Tensor,
    first_id: int,
    min_size: int = 0,
) -> torch.Tensor:
    """Give the `rows` (bool mask) new classes from their cluster `assignment`: the non-empty
    clusters with at least `min_size` rows become ids first_id, first_id + 1, ... in cluster
    order; rows of smaller ones get -1."""
    if len(assignment) == 0:
        return labels.clone()
    counts = torch.bincount(assignment)
    kept = counts >= max(1, int(min_size))
    new_id = torch.cumsum(kept.long(), 0) - 1 + first_id
    new_id[~kept] = -1
    out = labels.clone()
    out[rows] = new_id[assignment].to(labels.dtype)
    return out


def compact_discovered(labels: torch.Tensor, num_known: int) -> torch.Tensor:
    """Discovered ids (>= num_known) renumbered num_known, num_known + 1, ... in the order of
    the old ids; known ids and -1 unchanged."""
    out = labels.clone()
    disc = labels >= num_known
    if disc.any():
        _, inverse = torch.unique(labels[disc], sorted=True, return_inverse=True)
        out[disc] = inverse + num_known
    return out


# ============================================================================ merge
def nearest_centre_components(
    features: np.ndarray, ids: np.ndarray, connection: str = "strong"
) -> np.ndarray:
    """The official `merge_clusters_nn`: cluster centres (means of `features` per id 0..m-1),
    a directed edge from each centre to its nearest other centre (Euclidean), the connected
    components of that graph (scipy; 'strong': mutual nearest neighbours, 'weak': whole
    chains). Returns the component of every cluster ([m])."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    if connection not in CONNECTIONS:
        raise ValueError(f"connection_type={connection!r}: use one of {CONNECTIONS}")
    m = int(ids.max()) + 1
    onehot = np.zeros((m, len(ids)))
    onehot[ids, np.arange(len(ids))] = 1.0
    centres = (onehot / onehot.sum(1, keepdims=True)) @ features.astype(np.float64)
    d = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = d.argmin(1)
    graph = csr_matrix((np.ones(m), (np.arange(m), nearest)), shape=(m, m))
    _, components = connected_components(
        graph, directed=True, connection=connection, return_labels=True
    )
    return components


def merge_from(
    features: np.ndarray, labels: np.ndarray, first_id: int, connection: str = "strong"
) -> np.ndarray:
    """Merge the classes with id >= first_id (continuous) among themselves by
    `nearest_centre_components`, when there are more than 2 of them (the official rule)."""
    out = labels.copy()
    rows = labels >= first_id
    ids = labels[rows] - first_id
    if rows.any() and len(np.unique(ids)) > 2:
        out[rows] = nearest_centre_components(features[rows], ids, connection)[ids] + first_id
    return out


# ============================================================================ refine
def refine_keeps(positive: int, size: int, purity: float = 0.5, min_size: int = 100) -> bool:
    """The official refine rule: a class stays if the share of its members its SVM predicts
    positive is above `purity` and more than `min_size` members are predicted positive."""
    return size > 0 and positive / size > purity and positive > min_size


def svm_member_predictions(
    features: np.ndarray,
    labels: np.ndarray,
    num_known: int,
    kernel: str = "rbf",
    c: float = 1.0,
    max_rows: int | None = None,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Per discovered class, one SVM (positives: its rows; negatives: every other row with a
    label, known-attributed rows included) and its predictions on the class's own rows (the
    only ones the refine rule reads). `max_rows`: the negatives are subsampled (seeded) so that
    each SVM trains on at most that many rows; a class without negatives is all positive."""
    from sklearn.svm import SVC

    rng = np.random.RandomState(seed)
    labelled = np.flatnonzero(labels != -1)
    out = {}
    for cls in np.unique(labels[labels >= num_known]):
        members = np.flatnonzero(labels == cls)
        negatives = labelled[labels[labelled] != cls]
        if len(negatives) == 0:
            out[int(cls)] = np.ones(len(members), dtype=bool)
            continue
        if max_rows is not None and len(members) + len(negatives) > max_rows:
            keep = max(1, int(max_rows) - len(members))
            drawn = rng.choice(negatives, size=min(keep, len(negatives)), replace=False)
            negatives = np.sort(drawn)
        train = np.concatenate([members, negatives])
        target = np.concatenate([np.ones(len(members)), np.zeros(len(negatives))]).astype(int)
        order = np.argsort(train, kind="stable")  # the official fits on rows in row order
        svm = SVC(kernel=kernel, C=c, gamma="auto", tol=1e-3)
        svm.fit(features[train[order]], target[order])
        out[int(cls)] = svm.predict(features[members]) == 1
    return out


def refine(
    labels: np.ndarray,
    member_positive: dict[int, np.ndarray],
    num_known: int,
    purity: float = 0.5,
    min_size: int = 100,
) -> tuple[np.ndarray, dict[str, int]]:
    """Apply the refine rule with each class's member predictions: dropped classes' rows and
    kept classes' negative members go to -1; kept classes renumbered from num_known in order."""
    out = labels.copy()
    next_id, kept, dropped, removed = num_known, 0, 0, 0
    for cls in sorted(member_positive):
        members = np.flatnonzero(labels == cls)
        positive = member_positive[cls]
        if refine_keeps(int(positive.sum()), len(members), purity, min_size):
            out[members[~positive]] = -1
            out[members[positive]] = next_id
            next_id, kept, removed = next_id + 1, kept + 1, removed + int((~positive).sum())
        else:
            out[members] = -1
            dropped, removed = dropped + 1, removed + len(members)
    return out, {"refine_kept": kept, "refine_dropped": dropped, "refine_rows_removed": removed}


def cap_discovered(labels: np.ndarray, num_known: int, capacity: int) -> tuple[np.ndarray, int]:
    """At most `capacity` discovered classes: the largest stay (ties: the lower id), renumbered
    in id order; the rows of the others go to -1. Returns (labels, classes dropped)."""
    ids, sizes = np.unique(labels[labels >= num_known], return_counts=True)
    if len(ids) <= capacity:
        return labels, 0
    order = np.lexsort((ids, -sizes))  # largest first, then by id
    keep = np.sort(ids[order[: max(0, capacity)]])
    out = np.where(np.isin(labels, keep) | (labels < num_known), labels, -1)
    remap = {int(old): num_known + i for i, old in enumerate(keep)}
    out = np.array([remap.get(int(v), int(v)) for v in out], dtype=labels.dtype)
    return out, len(ids) - len(keep)


# ============================================================================ one discovery
@dataclass(frozen=True)
class DiscoveryConfig:
    """The values of one discovery round (cfgs/config.yaml's ood_detection, clustering, merge
    and refine blocks)."""

    num_hashes: int = 2048
    window_size: int = 2
    normalize_type: str = "mean_std"
    thresh_type: str = "quantiles"
    thresh_value: float = 0.9
    num_clusters: int = 500
    kmeans_max_iter: int = 300
    cluster_min_size: int = 0
    connection_type: str = "strong"
    refine_min_size: int = 100
    refine_purity: float = 0.5
    svm_kernel: str = "rbf"
    svm_c: float = 1.0
    svm_max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.normalize_type not in NORMALIZE_TYPES:
            raise ValueError(f"method.model.normalize_type: use one of {NORMALIZE_TYPES}")
        if self.thresh_type not in THRESH_TYPES:
            raise ValueError(f"method.model.thresh_type: use one of {THRESH_TYPES}")
        if self.connection_type not in CONNECTIONS:
            raise ValueError(f"method.model.connection_type: use one of {CONNECTIONS}")
        if self.num_hashes < 1 or self.window_size < 1 or self.num_clusters < 2:
            raise ValueError("method.model: num_hashes, window_size >= 1 and num_clusters >= 2")


def in_distribution_to_any(
    hashed_ref: torch.Tensor,
    ref_labels: torch.Tensor,
    classes: Sequence[int],
    hashed_queries: torch.Tensor,
    cfg: DiscoveryConfig,
) -> torch.Tensor:
    """Rows of `hashed_queries` in-distribution to at least one of `classes` (each class's
    reference rows: `hashed_ref[ref_labels == c]`, threshold from their pairwise distances)."""
    hit = torch.zeros(len(hashed_queries), dtype=torch.bool, device=hashed_queries.device)
    for c in classes:
        ref = hashed_ref[ref_labels == c]
        if len(ref) == 0:
            continue
        hist = pairwise_distance_histogram(ref, cfg.num_hashes)
        threshold = histogram_threshold(hist, cfg.thresh_type, cfg.thresh_value)
        hit |= wta_in_distribution(ref, hashed_queries, cfg.num_hashes, threshold)
    return hit


def discover(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    predicted: torch.Tensor,
    labels: torch.Tensor,
    num_known: int,
    capacity: int,
    cfg: DiscoveryConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One official discovery (OOD -> attribute -> cluster -> merge -> refine) on the unlabelled
    rows. `train_features`/`train_labels`: the labelled rows; `features`, `predicted`, `labels`:
    each unlabelled row's features, the classifier's argmax and its current label (-1
    undiscovered, < num_known attributed to a known class, else a discovered class). Returns the
    new labels (CPU long) and what happened at each step. The hashing, OOD scores and k-means
    run on `device`; merging and the SVMs on the CPU."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    labels = labels.long().cpu()
    predicted = predicted.long().cpu()
    before = int(torch.unique(labels[labels >= num_known]).numel())
    stats: dict[str, Any] = {"discovered_before": before}
    if len(labels) == 0:
        return labels, {**stats, "discovered": before, "classes_added": 0}

    # --- OOD detection against the known classes and the discovered ones, then attribution
    scaled_train, scaled = standardize(
        train_features.to(device), features.to(device), kind=cfg.normalize_type
    )
    windows = wta_windows(cfg.num_hashes, scaled.shape[1], cfg.window_size, gen)
    h_train = wta_onehot(wta_codes(scaled_train.float(), windows), cfg.window_size)
    h_rows = wta_onehot(wta_codes(scaled.float(), windows), cfg.window_size)
    in_known = in_distribution_to_any(
        h_train, train_labels.to(device), range(num_known), h_rows, cfg
    ).cpu()
    top = max(num_known, int(labels.max()) + 1)
    in_disc = in_distribution_to_any(
        h_rows, labels.to(device), range(num_known, top), h_rows, cfg
    ).cpu()
    undiscovered = labels == -1
    labels = attribute(labels, predicted, in_known, in_disc, num_known)
    stats.update(
        undiscovered=int(undiscovered.sum()),
        in_distribution_known=int((undiscovered & in_known).sum()),
        attributed_known=int((undiscovered & (labels >= 0) & (labels < num_known)).sum()),
        attributed_discovered=int((undiscovered & (labels >= num_known)).sum()),
    )
    stats["ood"] = int((labels == -1).sum())

    # --- k-means over the rows still undiscovered (only when more of them than clusters)
    open_rows = labels == -1
    first_new = max(num_known, int(labels.max()) + 1)
    stats["clustered_rows"], stats["clusters_found"] = 0, 0
    if int(open_rows.sum()) > cfg.num_clusters:
        assignment = kmeans_distance_seeded(
            scaled[open_rows.to(device)], cfg.num_clusters, cfg.kmeans_max_iter, gen
        ).cpu()
        labels = add_clusters(labels, open_rows, assignment, first_new, cfg.cluster_min_size)
        stats["clustered_rows"] = int(open_rows.sum())
        stats["clusters_found"] = int(torch.unique(labels[labels >= first_new]).numel())

    # --- merge: the new clusters among themselves, then every discovered class
    raw = features.double().cpu().numpy()
    lab = labels.numpy().copy()
    lab = merge_from(raw, lab, first_new, cfg.connection_type)
    stats["after_merge_new"] = int(len(np.unique(lab[lab >= first_new])))
    lab = merge_from(raw, lab, num_known, cfg.connection_type)
    stats["after_merge_all"] = int(len(np.unique(lab[lab >= num_known])))

    # --- refine with one SVM per discovered class, then the head's bound
    member_positive = svm_member_predictions(
        raw, lab, num_known, cfg.svm_kernel, cfg.svm_c, cfg.svm_max_rows, seed
    )
    lab, refine_stats = refine(
        lab, member_positive, num_known, cfg.refine_purity, cfg.refine_min_size
    )
    stats.update(refine_stats)
    lab, capped = cap_discovered(lab, num_known, capacity)
    after = int(len(np.unique(lab[lab >= num_known])))
    stats.update(
        capped=capped,
        discovered=after,
        classes_added=after - before,
        rows_discovered=int((lab >= num_known).sum()),
        rows_known=int(((lab >= 0) & (lab < num_known)).sum()),
        seconds=round(time.perf_counter() - start, 3),
    )
    return torch.from_numpy(lab).long(), stats


# ============================================================================ losses
def inverse_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """The official class weights max_c n_c / n_c (a class without rows counts as 1)."""
    counts = counts.double().clamp_min(1.0)
    return (counts.max() / counts).float()


def weighted_masked_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE over the rows in `mask` (nn.CrossEntropyLoss(weight): the weighted mean, divided by
    the summed weights of the targets); an exact zero in the graph when no row is in it."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask], targets[mask], weight=weight)


def training_targets(
    y: torch.Tensor,
    labelled: torch.Tensor,
    index: torch.Tensor,
    row_label: torch.Tensor,
    num_labelled: int,
    lowest: int,
) -> torch.Tensor:
    """CE targets of a batch: a labelled row's class; an unlabelled row (merged index i >=
    num_labelled) its discovered label row_label[i - num_labelled] if >= `lowest` (K_known: the
    discovered classes only, `add_seen` False; 0: known-attributed rows too), else -1."""
    found = row_label.to(index.device)[(index - num_labelled).clamp_min(0)]
    found = torch.where(found >= lowest, found, torch.full_like(found, -1))
    return torch.where(labelled, y, found.to(y.dtype))


def fc_stack(in_dim: int, dims: Sequence[int], dropout: float) -> nn.Sequential:
    """`MulticlassNet.fc`: Linear-ReLU-Dropout for each width in `dims`."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, int(d)), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = int(d)
    return nn.Sequential(*layers)


def head_capacity(problem: Problem, max_classes_factor: int = 10) -> int:
    """Rows of the preallocated classifier: the true K (k=known); under k=unknown the user's
    `k.estimate`, else `max_classes_factor` x K_known (at least K_known + 1)."""
    if problem.k_mode == "known":
        return int(problem.num_classes)
    if problem.k_estimate is not None:
        return int(problem.k_estimate)
    return max(problem.num_known + 1, int(max_classes_factor) * problem.num_known)


# ============================================================================ method
class OpenworldGAN(OWDFAMethod):
    """Openworld-GAN (Sharath-girish/openworld-gan @ dd31151) on the shared runner."""

    train_views: ClassVar[tuple[str, ...]] = ("weak",)
    # the unlabelled rows' labels, the class weights, the rounds done: for an exact resume
    carried_state: ClassVar[tuple[str, ...]] = (
        "row_label",
        "class_weight",
        "rounds",
        "discovered_at",
    )

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        round_starts: Sequence[int] = (0,),
        restart_schedule_each_round: bool = True,
        fc_dims: Sequence[int] = (512, 512, 128),
        fc_dropout: float = 0.5,
        extract_level: str = "fc",
        weighted_ce: bool = True,
        add_seen: bool = False,
        num_hashes: int = 2048,
        window_size: int = 2,
        normalize_type: str = "mean_std",
        thresh_type: str = "quantiles",
        thresh_value: float = 0.9,
        num_clusters: int = 500,
        kmeans_max_iter: int = 300,
        cluster_min_size: int = 0,
        connection_type: str = "strong",
        refine_min_size: int = 100,
        refine_purity: float = 0.5,
        svm_kernel: str = "rbf",
        svm_c: float = 1.0,
        svm_max_rows: int | None = None,
        max_classes_factor: int = 10,
        seed: int = 0,
    ):
        super().__init__(problem, optim)
        if extract_level not in EXTRACT_LEVELS:
            raise ValueError(f"method.model.extract_level={extract_level!r}: use {EXTRACT_LEVELS}")
        self.starts = round_starts_of(round_starts)
        self.restart_schedule = bool(restart_schedule_each_round)
        self.extract_level = extract_level
        self.weighted_ce, self.add_seen = bool(weighted_ce), bool(add_seen)
        self.discovery = DiscoveryConfig(
            num_hashes=int(num_hashes),
            window_size=int(window_size),
            normalize_type=normalize_type,
            thresh_type=thresh_type,
            thresh_value=float(thresh_value),
            num_clusters=int(num_clusters),
            kmeans_max_iter=int(kmeans_max_iter),
            cluster_min_size=int(cluster_min_size),
            connection_type=connection_type,
            refine_min_size=int(refine_min_size),
            refine_purity=float(refine_purity),
            svm_kernel=svm_kernel,
            svm_c=float(svm_c),
            svm_max_rows=None if svm_max_rows is None else int(svm_max_rows),
        )
        self.seed = int(seed)
        self.encoder = GlobalFeatureEncoder(backbone)
        self.fc = fc_stack(self.encoder.dim, fc_dims, float(fc_dropout))
        self.fc_dim = int(fc_dims[-1]) if len(fc_dims) else self.encoder.dim
        self.classifier = nn.Linear(self.fc_dim, head_capacity(problem, max_classes_factor))
        self.register_buffer("num_active", torch.tensor(problem.num_known, dtype=torch.long))
        self.row_label: torch.Tensor | None = None  # unlabelled rows: -1 / known id / discovered
        self.class_weight: torch.Tensor | None = None  # per live row, from round 2 on
        self.rounds: list[dict[str, Any]] = []  # one entry per discovery
        self.discovered_at: int | None = None  # epoch of the last discovery (resume guard)

    # ------------------------------------------------------------------ model
    @property
    def capacity(self) -> int:
        """Discovered classes the head can hold."""
        return self.classifier.out_features - self.problem.num_known

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        a = int(self.num_active)
        return F.linear(h, self.classifier.weight[:a], self.classifier.bias[:a])

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.encoder(x)
        h = self.fc(f)
        return f, h, self.classify(h)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x)[2]

    def k_estimated(self) -> int | None:
        return None if self.problem.k_mode == "known" else int(self.num_active)

    def round_now(self, epoch: int | None = None) -> int:
        return round_of(int(self.current_epoch if epoch is None else epoch), self.starts)

    @torch.no_grad()
    def reset_classifier(self, round_number: int) -> None:
        """nn.Linear's default initialisation (uniform +-1/sqrt(fan_in) for weight and bias),
        from a generator seeded by (seed, round): the same on every rank."""
        gen = torch.Generator().manual_seed(self.seed * 1000 + int(round_number))
        bound = 1.0 / math.sqrt(self.fc_dim)
        for p in (self.classifier.weight, self.classifier.bias):
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))

    # ------------------------------------------------------------------ discovery
    @torch.no_grad()
    def embed(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Discovery features, the classifier's argmax and the labels of a training split
        (test transform, eval mode; unlabelled labels come as -1 and are not read)."""

        def parts(x: torch.Tensor) -> torch.Tensor:
            f, h, logits = self.forward_parts(x)
            feat = h if self.extract_level == "fc" else f
            return torch.cat([feat.float(), logits.argmax(1, keepdim=True).float()], 1)

        out, ys = self.eval_rows(split, "Openworld-GAN discovers on the training rows", parts)
        if out.numel() == 0:
            dim = self.fc_dim if self.extract_level == "fc" else self.encoder.dim
            return out.new_zeros((0, dim)), ys.long(), ys.long()
        return out[:, :-1].cpu(), out[:, -1].long().cpu(), ys.long().cpu()

    def run_discovery(self, epoch: int) -> None:
        """One discovery round on every rank's rows (rank 0 computes, every rank applies)."""
        train_f, _, train_y = self.embed("labelled")
        feats, predicted, _ = self.embed("unlabelled")
        if self.row_label is None or len(self.row_label) != len(feats):
            self.row_label = torch.full((len(feats),), -1, dtype=torch.long)
        round_number = self.round_now(epoch)
        result = None
        if is_rank_zero():
            labels, stats = discover(
                train_f,
                train_y,
                feats,
                predicted,
                self.row_label.cpu(),
                self.problem.num_known,
                self.capacity,
                self.discovery,
                seed=self.seed * 1000 + round_number,
                device=self.device,
            )
            result = {"labels": labels, "stats": stats}
            log.info("Openworld-GAN discovery (epoch %d, round %d): %s", epoch, round_number, stats)
        result = from_rank_zero(result)
        self.apply_discovery(result["labels"], train_y, round_number)
        self.rounds.append({"epoch": int(epoch), "round": round_number, **result["stats"]})
        self.discovered_at = int(epoch)

    def apply_discovery(self, labels: torch.Tensor, train_y: torch.Tensor, round_number: int):
        """New labels of the unlabelled rows -> live head rows, class weights, a new classifier
        and a new optimiser state (the official's next step)."""
        k = self.problem.num_known
        self.row_label = labels.to(self.device)
        discovered = int(torch.unique(labels[labels >= k]).numel())
        self.num_active.fill_(k + discovered)
        counts = torch.bincount(train_y[train_y >= 0], minlength=k)[:k]
        trained = labels[labels >= (0 if self.add_seen else k)]
        counts = torch.cat([counts, torch.zeros(discovered, dtype=torch.long)])
        counts += torch.bincount(trained, minlength=k + discovered)[: k + discovered]
        self.class_weight = inverse_frequency_weights(counts).to(self.device)
        self.reset_classifier(round_number)
        if self._trainer is not None:
            for opt in self.trainer.optimizers:
                opt.state.clear()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        epoch = int(self.current_epoch)
        # a resumed epoch whose discovery is in the checkpoint does not rediscover
        if epoch in self.starts[1:] and self.discovered_at != epoch:
            self.run_discovery(epoch)

    # ------------------------------------------------------------------ training
    def targets(self, batch: TrainBatch) -> torch.Tensor:
        if self.row_label is None:
            return batch.y
        low = 0 if self.add_seen else self.problem.num_known
        n_lab = len(self.trainer.datamodule.splits.labelled)
        return training_targets(batch.y, batch.labelled, batch.index, self.row_label, n_lab, low)

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        _, _, logits = self.forward_parts(batch.views[0])
        target = self.targets(batch)
        use = target >= 0
        weight = None
        if self.weighted_ce and self.class_weight is not None and self.round_now() > 1:
            weight = self.class_weight.to(logits)
        ce = weighted_masked_ce(logits, target, use, weight)
        return {
            "loss": ce,
            "ce": ce.detach(),
            "round": torch.tensor(float(self.round_now())),
            "classes": torch.tensor(float(int(self.num_active))),
            "discovered_rows": (use & ~batch.labelled).float().mean().detach(),
        }

    # ------------------------------------------------------------------ bookkeeping
    def record_extras(self) -> dict[str, Any]:
        return {
            "openworld_gan": {
                "round_starts": list(self.starts),
                "head_rows": int(self.classifier.out_features),
                "classes": int(self.num_active),
                "discoveries": list(self.rounds),
                "discovery_config": asdict(self.discovery),
            }
        }

    def configure_optimizers(self):
        opt = build_optimizer(
            {**self.optim, "scheduler": "none"},
            [p for p in self.parameters() if p.requires_grad],
            self.problem.max_epochs,
        )
        total, starts, optim = int(self.problem.max_epochs), list(self.starts), dict(self.optim)

        def factor(epoch: int) -> float:
            return round_lr_factor(epoch, starts, total, optim, self.restart_schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
