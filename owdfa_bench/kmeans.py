"""Semi-supervised k-means (GCD's SS-k-means) and GCD's Brent search for the number of classes.

Reference: sgvaze/generalized-category-discovery @ 831a645
(`methods/clustering/faster_mix_k_means_pytorch.py`, `methods/estimate_k/estimate_k.py`).
Everything runs on whole matrices in torch (one distance matrix per iteration, centre updates by
a one-hot matmul), on whatever device the features live on.

* `semi_supervised_kmeans`: rows with a label >= 0 are pinned to the cluster of that id, so
  cluster c *is* class c (known-class ids stay aligned and direct Known ACC is defined). Pinned
  clusters start at their class means; the other clusters are seeded by k-means++ on the free
  rows with the pinned centres already in place. Each iteration assigns free rows to the nearest
  centre (squared Euclidean), recomputes every centre from all its rows, and stops when
  (sum of centre shifts)^2 < tol, as in GCD's `K_Means.fit_mix_once`. Restarts keep the run with
  the lowest inertia (sum over pinned and free rows). With no pinned row it is plain k-means.
* `estimate_k_brent`: plain k-means over all training features for a candidate K, scored by the
  Hungarian accuracy of the *labelled* rows only; `scipy.optimize.minimize_scalar(method=
  "bounded")` minimises minus that score over [k_min, k_max] (GCD `estimate_k.py`).

Deviations from GCD's code, with reasons:
* An empty cluster keeps its previous centre (GCD's code takes the mean of an empty set: NaN).
* Cluster ids of pinned rows are their label values, not the rank of the label among the
  labelled classes present (identical when every known class has a labelled row, and still
  aligned when one does not).
* The Brent objective runs our k-means (k-means++ seeding, `n_init` restarts, seeded) instead of
  scikit-learn's `KMeans(random_state=0)`: same algorithm, one code path, and it vectorises on
  GPU. A candidate K is truncated to int as in GCD and evaluated once (cached).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from owdfa_bench.metrics import cluster_acc


@dataclass
class KMeansResult:
    assignments: np.ndarray  # [N] cluster id of every row
    centres: torch.Tensor  # [K, D]
    inertia: float  # sum of squared distances of every row to its centre
    n_iter: int  # iterations of the kept restart
    seconds: float = 0.0  # wall time of all restarts


@dataclass
class KEstimate:
    k: int  # the estimated total number of classes
    scores: dict[int, float] = field(default_factory=dict)  # labelled Hungarian ACC per K tried
    seconds: float = 0.0


def _as_float_tensor(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.float() if not torch.is_floating_point(x) or x.dtype == torch.float16 else x


def squared_distances(
    x: torch.Tensor, centres: torch.Tensor, x_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """||x_i - c_k||^2 for all pairs, [N, K], through the expanded product (clamped at 0).

    `x_sq` = the rows' squared norms, [N], when the caller already has them.
    """
    if x_sq is None:
        x_sq = (x * x).sum(1)
    d = x_sq[:, None] - 2.0 * x @ centres.t() + (centres * centres).sum(1)[None]
    return d.clamp_min_(0.0)


def kmeans_plusplus(
    x: torch.Tensor, num_new: int, existing: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """`num_new` k-means++ seeds drawn from the rows of x, given centres already in place.

    The first seed is uniform when no centre exists; every further seed is drawn with
    probability proportional to the squared distance to the nearest centre so far.
    """
    if num_new == 0:
        return x.new_zeros((0, x.shape[1]))
    if x.shape[0] == 0:
        raise ValueError("k-means++ needs at least one free (unlabelled) row to seed from")
    x_sq = (x * x).sum(1)
    seeds: list[torch.Tensor] = []
    if existing is None or existing.shape[0] == 0:
        first = torch.randint(x.shape[0], (1,), generator=generator, device="cpu").item()
        seeds.append(x[first])
        nearest = squared_distances(x, x[first][None], x_sq).squeeze(1)
    else:
        nearest = squared_distances(x, existing, x_sq).min(dim=1).values
    while len(seeds) < num_new:
        weights = nearest.double().cpu()
        if float(weights.sum()) <= 0.0:  # every row sits on a centre: fall back to uniform
            weights = torch.ones_like(weights)
        pick = torch.multinomial(weights, 1, generator=generator).item()
        seeds.append(x[pick])
        nearest = torch.minimum(nearest, squared_distances(x, x[pick][None], x_sq).squeeze(1))
    return torch.stack(seeds)


def _check_labels(labels: torch.Tensor, n: int, num_clusters: int) -> None:
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the features, got {labels.shape}")
    if labels.numel() and int(labels.max()) >= num_clusters:
        raise ValueError(
            f"a pinned label ({int(labels.max())}) is not a cluster id below num_clusters="
            f"{num_clusters}; pinned rows must carry class ids 0..num_clusters-1"
        )


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int):
    """Per-cluster sums and counts as one matmul (deterministic on GPU, unlike index_add_)."""
    one_hot = torch.nn.functional.one_hot(assign, k).to(x.dtype)
    return one_hot.t() @ x, one_hot.sum(0).long()


def _fit_once(x, labels, pinned, num_clusters, max_iter, tol, generator):
    free = ~pinned
    centres = x.new_zeros((num_clusters, x.shape[1]))
    has_class = torch.zeros(num_clusters, dtype=torch.bool, device=x.device)
    if bool(pinned.any()):
        sums, counts = _cluster_sums(x[pinned], labels[pinned], num_clusters)
        has_class = counts > 0
        centres[has_class] = sums[has_class] / counts[has_class, None].to(x.dtype)
    n_new = int((~has_class).sum())
    if n_new > int(free.sum()):
        raise ValueError(
            f"{n_new} clusters have no labelled row but only {int(free.sum())} free rows exist; "
            "lower num_clusters or give more unlabelled rows"
        )
    centres[~has_class] = kmeans_plusplus(x[free], n_new, centres[has_class], generator)

    assign = labels.clone()
    inertia = torch.zeros((), dtype=x.dtype, device=x.device)
    n_iter = 0
    x_sq = (x * x).sum(1)
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is returned)
        dist = squared_distances(x, centres, x_sq)
        assign = torch.where(pinned, labels, dist.argmin(dim=1))
        inertia = dist.gather(1, assign[:, None]).sum()
        sums, counts = _cluster_sums(x, assign, num_clusters)
        non_empty = counts > 0
        new_centres = centres.clone()
        new_centres[non_empty] = sums[non_empty] / counts[non_empty, None].to(x.dtype)
        shift = (new_centres - centres).norm(dim=1).sum()
        centres = new_centres
        if float(shift) ** 2 < tol:
            break
    return assign, centres, float(inertia), n_iter


def semi_supervised_kmeans(
    features,
    labels=None,
    num_clusters: int = 2,
    n_init: int = 10,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
) -> KMeansResult:
    """SS-k-means of GCD on `features` [N, D]; `labels` [N] holds a class id to pin or -1.

    Returns the assignments of all rows (pinned rows keep their label), the centres, the
    inertia and iteration count of the best of `n_init` restarts. Deterministic given `seed`.
    Features are used as given (GCD L2-normalises them first; the caller does that).
    """
    start = time.perf_counter()
    x = _as_float_tensor(features)
    n = x.shape[0]
    if x.ndim != 2 or n == 0:
        raise ValueError(f"features must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    if not 1 <= num_clusters <= n:
        raise ValueError(
            f"num_clusters must be in [1, {n}] (the number of rows), got {num_clusters}"
        )
    if labels is None:
        labels = torch.full((n,), -1, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long).to(x.device)
    _check_labels(labels, n, num_clusters)
    pinned = labels >= 0
    labels = torch.where(pinned, labels, torch.zeros_like(labels))
    generator = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(max(1, int(n_init))):
        run = _fit_once(x, labels, pinned, num_clusters, max_iter, tol, generator)
        if best is None or run[2] < best[2]:
            best = run
    assign, centres, inertia, n_iter = best
    return KMeansResult(
        assignments=assign.cpu().numpy(),
        centres=centres,
        inertia=inertia,
        n_iter=n_iter,
        seconds=time.perf_counter() - start,
    )


def assign_to_centres(features, centres: torch.Tensor) -> np.ndarray:
    """Nearest-centre ids of `features` (squared Euclidean)."""
    x = _as_float_tensor(features).to(centres.device)
    return squared_distances(x, centres.to(x.dtype)).argmin(dim=1).cpu().numpy()


def open_world_assignments(
    train: torch.Tensor,
    train_y: torch.Tensor,
    test: torch.Tensor,
    num_clusters: int,
    **kmeans: Any,
) -> tuple[np.ndarray, KMeansResult]:
    """GCD's open-world rule: SS-k-means with `num_clusters` clusters over the training rows
    (`train_y`: class id of labelled rows, -1 for unlabelled ones) and the test rows together,
    labelled rows pinned to their class; the test rows' cluster ids, and the run. Cluster
    c < K_known holds known class c's labelled rows, so known ids stay aligned."""
    features = torch.cat([train, test])
    labels = torch.cat([train_y.long().cpu(), torch.full((len(test),), -1)])
    result = semi_supervised_kmeans(features, labels, num_clusters, **kmeans)
    return result.assignments[len(train) :], result


def cluster_confidence(
    features: torch.Tensor, centres: torch.Tensor, temperature: float
) -> np.ndarray:
    """max softmax(cos(f, centre) / T) per row: a confidence of a cluster assignment."""
    sims = F.normalize(features.float(), dim=1) @ F.normalize(centres.float(), dim=1).t()
    return (sims / temperature).softmax(dim=1).max(dim=1).values.numpy()


def estimate_k_brent(
    features,
    labels,
    k_min: int,
    k_max: int,
    n_init: int = 10,
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
) -> KEstimate:
    """GCD's K estimate: argmax over K in [k_min, k_max] of the labelled rows' Hungarian ACC.

    `features` [N, D] are all training rows; `labels` [N] the class of labelled rows, -1
    elsewhere (unlabelled labels are never read). For each candidate K, plain k-means runs on
    all rows; only the labelled rows are scored. Bounded Brent (`minimize_scalar`) searches K.
    """
    start = time.perf_counter()
    x = _as_float_tensor(features)
    y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    labelled = y >= 0
    if not labelled.any():
        raise ValueError("estimating K needs labelled rows (labels >= 0); none were given")
    k_max = min(int(k_max), x.shape[0])
    k_min = int(k_min)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"K search range [{k_min}, {k_max}] is empty; check k_min and k_max")
    scores: dict[int, float] = {}

    def minus_labelled_acc(k_float: float) -> float:
        k = int(k_float)
        if k not in scores:
            run = semi_supervised_kmeans(
                x, None, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed
            )
            scores[k] = cluster_acc(y[labelled], run.assignments[labelled])
        return -scores[k]

    if k_min == k_max:
        minus_labelled_acc(k_min)
        k = k_min
    else:
        res = minimize_scalar(minus_labelled_acc, bounds=(k_min, k_max), method="bounded")
        k = int(res.x)
    return KEstimate(k=k, scores=dict(sorted(scores.items())), seconds=time.perf_counter() - start)
