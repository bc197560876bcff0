"""RankStats (AutoNovel), incremental-learning variant, for open-world attribution.

Paper: K. Han, S.-A. Rebuffi, S. Ehrhardt, A. Vedaldi, A. Zisserman, "Automatically Discovering
and Learning New Visual Categories with Ranking Statistics", ICLR 2020.
Official code: github.com/k-han/AutoNovel @ 5eda7e4 (`auto_novel.py: train_IL`,
`utils/util.py: BCE, PairEnum`, `utils/ramps.py`).

What it computes (joint stage, IL variant), per batch (view x = weak, x' = strong):
  model   backbone -> custom pool 1x1 -> BNNeck -> ReLU -> f (non-negative, so ranks mean
          something); head1 = Linear(f, K) widened to all K classes (IL), head2 = Linear(f, K_u)
          with K_u = K - K_known; head1's novel biases start at min(known biases) - 1;
  pairs   for every ordered pair (i, j) of unlabelled rows, i = j included: s_ij = 1 if the sets
          of the top-k (k = 5) indices of the detached features are identical, else 0;
  losses  L = CE(head1(x_l), y_l)
            + BCE: -mean_ij [s log(q_i . q'_j + 1e-7) + (1 - s) log(1 - q_i . q'_j + 1e-7)],
              q = softmax(head2(x_u)), q' = softmax(head2(x'_u))
            + (w / 50) * 0.05 * CE(head1(x_u), argmax head2(x_u) + K_known)     (IL term)
            + w * (MSE(softmax head1(x), softmax head1(x')) + MSE(same for head2)) over all rows,
          w = 50 exp(-5 (1 - min(e, R) / R)^2) per epoch e, ramp-up length R;
  predict argmax of the widened head1: one joint K-way prediction (our choice: CPL reports a
          RankStats row but does not say how it adapted the method).

Labelled vs unlabelled rows come from the harness tag (`batch.labelled`), never from the label:
the reference's `label < num_labeled_classes` reads ground truth and is only valid when the
unlabelled pool holds novel classes only (NCD); in OW-DFA it also holds known classes, which
therefore take part in the ranking pairs and the IL pseudo-label CE.

K: known -> the true total K. Unknown -> `k.estimate` if given, else `unknown_k_factor` x
K_known (default 2, so K_u = K_known; a rule of ours, the reference takes K_u as given).
`k_estimated()` reports how many head1 outputs are used: distinct argmax outputs over the
training rows (view x) of the current epoch.

Deliberate deviations from the reference:
  * No RotNet self-supervision (stage 1) or supervised pre-training on D_L (stage 2): the joint
    stage starts from the backbone's weights (ImageNet for real runs), head1 is widened at
    construction, and the whole backbone is fine-tuned (reference: `layer4` and heads only).
  * ResNet + BNNeck with a ReLU after the BNNeck (the reference's ReLU on its pooled feature).
  * Default recipe: the shared OW-DFA Adam 50-epoch recipe (CPL's, like ORCA, for a fair
    comparison), with the ramp-up length scaled from 150 of 200 epochs to the same 3/4 of the
    run (`rampup_length: null`); the reference SGD recipe is `reference_optim` in
    conf/method/rankstats.yaml. The reference also steps its scheduler at the *start* of each
    epoch (old PyTorch idiom); here the scheduler steps after each epoch.
  * Top-k index sets come from a stable sort, so ties (many exact zeros after the ReLU) are
    broken by index instead of in unspecified order.
  * A batch without labelled rows gets zero CE; one without unlabelled rows zero BCE and IL CE.

Under DDP: not equal to one process with the global batch: the rank-statistics pairs and
batch-norm statistics are over each rank's share of the batch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.common_losses import masked_cross_entropy, open_world_head_rows, pairwise_bce
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, detach_terms
from owdfa_bench.models import GlobalFeatureEncoder


def sigmoid_rampup(epoch: float, length: float) -> float:
    """exp(-5 (1 - min(epoch, length) / length)^2); 1 when length is 0 (AutoNovel `ramps`)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(float(epoch), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * phase * phase)


def rank_stats_pairs(features: torch.Tensor, topk: int = 5) -> torch.Tensor:
    """[U, U] bool: True where two rows have the same set of top-k feature indices."""
    k = min(int(topk), features.shape[1])
    top = torch.argsort(features.detach(), dim=1, descending=True, stable=True)[:, :k]
    top = torch.sort(top, dim=1).values
    return (top[:, None, :] == top[None, :, :]).all(dim=2)


def rank_stats_bce(
    q: torch.Tensor, q_other: torch.Tensor, same: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """AutoNovel's pairwise BCE over all ordered pairs (i, j): <q_i, q'_j> against s_ij."""
    if q.shape[0] == 0:
        return q.sum() * 0.0
    return pairwise_bce(q @ q_other.t(), same, eps)


def widen_known_head(head: nn.Linear, num_known: int) -> None:
    """IL initialisation: novel biases of head1 start at min(known biases) - 1."""
    with torch.no_grad():
        head.bias[num_known:] = head.bias[:num_known].min() - 1.0


def rankstats_losses(
    h1: tuple[torch.Tensor, torch.Tensor],
    h2: tuple[torch.Tensor, torch.Tensor],
    features: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    num_known: int,
    rampup_weight: float,
    rampup_coefficient: float = 50.0,
    increment_coefficient: float = 0.05,
    topk: int = 5,
) -> dict[str, torch.Tensor]:
    """Every RankStats-IL term; h1/h2 hold each head's logits for (view x, view x')."""
    unl = ~labelled
    p1, p1_other = F.softmax(h1[0], dim=1), F.softmax(h1[1], dim=1)
    p2, p2_other = F.softmax(h2[0], dim=1), F.softmax(h2[1], dim=1)
    ce = masked_cross_entropy(h1[0], y, labelled)
    same = rank_stats_pairs(features[unl], topk)
    bce = rank_stats_bce(p2[unl], p2_other[unl], same)
    pseudo = torch.where(unl, h2[0].detach().argmax(dim=1) + num_known, torch.zeros_like(y))
    il_ce = masked_cross_entropy(h1[0], pseudo, unl)
    il_ce = rampup_weight / rampup_coefficient * increment_coefficient * il_ce
    consistency = F.mse_loss(p1, p1_other) + F.mse_loss(p2, p2_other)
    loss = ce + bce + il_ce + rampup_weight * consistency
    return {"loss": loss, "ce": ce, "bce": bce, "il_ce": il_ce, "consistency": consistency}


class RankStats(OWDFAMethod):
    """RankStats (AutoNovel, IL variant; k-han/AutoNovel @ 5eda7e4) on the shared runner."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        topk: int = 5,
        rampup_length: float | None = None,
        rampup_coefficient: float = 50.0,
        increment_coefficient: float = 0.05,
        unknown_k_factor: int = 2,
    ):
        super().__init__(problem, optim)
        num_classes = open_world_head_rows(problem, unknown_k_factor)
        num_novel = num_classes - problem.num_known
        if num_novel < 1:
            raise ValueError(
                f"RankStats needs at least one novel output, but K={num_classes} equals the "
                f"{problem.num_known} known classes; set k.estimate above {problem.num_known}"
            )
        self.topk = int(topk)
        # null: the reference's 150 of 200 epochs, as the same share of this run
        self.rampup_length = (
            0.75 * problem.max_epochs if rampup_length is None else float(rampup_length)
        )
        self.rampup_coefficient = float(rampup_coefficient)
        self.increment_coefficient = float(increment_coefficient)
        self.encoder = GlobalFeatureEncoder(backbone)
        self.head1 = nn.Linear(self.encoder.dim, num_classes)
        self.head2 = nn.Linear(self.encoder.dim, num_novel)
        widen_known_head(self.head1, problem.num_known)
        self.track_usage(num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.encoder(x))

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head1(self.features(x))

    def rampup_weight(self) -> float:
        return self.rampup_coefficient * sigmoid_rampup(self.current_epoch, self.rampup_length)

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        f1 = self.features(batch.views[0])
        f2 = self.features(batch.views[1])
        h1 = (self.head1(f1), self.head1(f2))
        h2 = (self.head2(f1), self.head2(f2))
        w = self.rampup_weight()
        out = rankstats_losses(
            h1,
            h2,
            f1,
            batch.y,
            batch.labelled,
            self.problem.num_known,
            w,
            self.rampup_coefficient,
            self.increment_coefficient,
            self.topk,
        )
        self.count_usage(h1[0])
        out = detach_terms(out)
        out["rampup_weight"] = torch.tensor(w)
        return out
