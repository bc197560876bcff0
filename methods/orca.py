"""ORCA: open-world semi-supervised learning with an uncertainty-adaptive margin.

Paper: K. Cao, M. Brbic, J. Leskovec, "Open-World Semi-Supervised Learning", ICLR 2022.
Official code: github.com/snap-stanford/orca @ 5f33afd (`orca_imagenet.py`, `orca_cifar.py`,
`utils.py`: `MarginLoss`, `entropy`; `models/resnet.py`: `NormedLinear`).

What it computes, per batch (view 1 = weak, view 2 = strong, two separate forward passes):
  model   backbone -> custom pool 1x1 -> BNNeck -> f -> dropout -> cosine head with scale 10,
          l = 10 cos(f, w_c), C = K outputs;
  margin  m = min(1 - mean max-softmax confidence, 0.5), computed at the start of every epoch
          from an eval-mode pass over the unlabelled training rows (the reference runs its
          `test` on them before each epoch);
  losses  L = CE(l + 10 m e_y, y) on labelled rows of view 1 (the margin *raises* the target
          logit: the reference's MarginLoss(m = -m), s = 10)
            + BCE(<p_i(x), p_pi(i)(x')>, 1) over all rows, pi(i) = a random other labelled row of
              the same class (labelled i; itself when alone) or the nearest neighbour by cosine
              of the detached view-1 features over the whole batch (unlabelled i); the partner's
              probabilities come from view 2
            - H(mean_i p_i(x)), p = softmax(l);
  predict argmax over all C outputs.

Port to OW-DFA: CPL's trainer extends ORCA's, so ORCA inside the harness is the CPL trainer
(`methods/cpl.py`) with global-feature nearest-neighbour pairing only, a second view for the
partner probabilities, the adaptive margin at scale 10 instead of CPL's fixed +0.2, and no
soft-pseudo-label term. It keeps CPL's ResNet + BNNeck, dropout 0.2 before the head, Adam and
50-epoch recipe and balanced alternating sampler by default. The original SGD recipe (lr 0.1,
momentum 0.9, ImageNet-100: weight decay 1e-4, 90 epochs, milestones 30/60) is the
`reference_optim` block of conf/method/orca.yaml (override shown there).

K: known -> the true total K (the reference assumes K known). Unknown -> `k.estimate` if given,
else `unknown_k_factor` x K_known (default 2; a rule of ours: ORCA's unknown-K experiment is not
in its code). `k_estimated()` reports how many outputs are used: distinct argmax outputs over the
training rows (view 1) of the current epoch.

Deliberate deviations from the reference:
  * ResNet (timm) + BNNeck + dropout, whole backbone fine-tuned (reference: SimCLR ResNet with
    all but `layer4` frozen, no BNNeck, no dropout), as the CPL trainer it is ported into.
  * The margin pass uses the labelled/unlabelled split of the harness (eval transform) and runs
    at every epoch start, epoch 0 included, like the reference. `margin_source:
    previous_epoch` instead uses the mean confidence of the previous epoch's training rows that
    were unlabelled (view 1, train mode; m = 0.5 in epoch 0): no extra pass, not the reference.
  * The labelled partner is drawn with torch's RNG (`common_losses.labelled_partners`, as
    CPL), not NumPy's; the nearest neighbour excludes the row itself instead of taking the 2nd
    of the top-2 (they differ only when another row has exactly the same feature).
  * A batch without labelled rows (weighted sampler only) gets zero CE.

Under DDP: the margin's mean confidence is over every rank's unlabelled rows (the eval pass
is split between ranks and summed), and so are the usage counts. Not equal to one process with
the global batch: the nearest-neighbour partners, the entropy of the mean prediction and
batch-norm statistics are over each rank's share.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.common_losses import (
    cosine_logits,
    entropy_of_mean,
    margin_cross_entropy,
    open_world_head_rows,
    orca_partners,
    pairwise_bce,
)
from owdfa_bench.distributed import sum_over_ranks
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, detach_terms
from owdfa_bench.models import GlobalFeatureEncoder, PrototypeHead

log = logging.getLogger(__name__)
MARGIN_SOURCES = ("unlabelled_pass", "previous_epoch")


def adaptive_margin(mean_confidence: float, cap: float = 0.5) -> float:
    """ORCA's m = min(1 - mean max-softmax confidence, cap)."""
    return min(1.0 - float(mean_confidence), float(cap))


def orca_losses(
    logits_v1: torch.Tensor,
    logits_v2: torch.Tensor,
    features_v1: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    margin: float,
    scale: float = 10.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Every ORCA term of one batch; `logits_*` are already scaled (scale * cosine)."""
    p1, p2 = F.softmax(logits_v1, dim=1), F.softmax(logits_v2, dim=1)
    partners = orca_partners(features_v1, y, labelled, generator)
    pair_sim = (p1 * p2[partners]).sum(dim=1)
    ce = margin_cross_entropy(logits_v1[labelled], y[labelled], scale * margin)
    pair = pairwise_bce(pair_sim)
    entropy = entropy_of_mean(p1)
    return {"loss": ce + pair - entropy, "ce": ce, "pair": pair, "entropy": entropy}


class ORCA(OWDFAMethod):
    """ORCA (snap-stanford/orca @ 5f33afd) on the shared runner."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")
    # the margin and this epoch's confidence sums (they set the next margin): for a resume
    carried_state: ClassVar[tuple[str, ...]] = ("margin", "_conf_sum", "_conf_count")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        scale: float = 10.0,
        margin_cap: float = 0.5,
        margin_source: str = "unlabelled_pass",
        dropout: float = 0.2,
        unknown_k_factor: int = 2,
    ):
        super().__init__(problem, optim)
        if margin_source not in MARGIN_SOURCES:
            raise ValueError(
                f"method.model.margin_source={margin_source!r}: use one of {MARGIN_SOURCES}"
            )
        self.scale, self.margin_cap = float(scale), float(margin_cap)
        self.margin_source = margin_source
        self.encoder = GlobalFeatureEncoder(backbone)
        self.dropout = nn.Dropout(dropout)
        self.head = PrototypeHead(self.encoder.dim, open_world_head_rows(problem, unknown_k_factor))
        self.margin = self.margin_cap  # before any confidence is measured (u ~ 1 at init)
        self.track_usage(self.head.active)
        self._conf_sum, self._conf_count = 0.0, 0  # unlabelled training rows of this epoch

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(
            self.dropout(features), self.head.weight[: self.head.active], self.scale
        )

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(x))

    # ------------------------------------------------------------------ adaptive margin
    @torch.no_grad()
    def unlabelled_mean_confidence(self) -> float:
        """Mean max-softmax confidence over the unlabelled training rows, eval mode."""
        needed_for = (
            "ORCA's margin_source=unlabelled_pass (set method.model.margin_source="
            "previous_epoch otherwise)"
        )
        conf, _ = self.eval_rows(
            "unlabelled",
            needed_for,
            lambda x: F.softmax(self.predict_logits(x).float(), dim=1).max(dim=1).values,
        )
        # summed batch by batch as the loader gives them (every row under DDP), the reference's
        # order of additions
        size = self.trainer.datamodule.eval_batch_size
        total = sum(float(chunk.sum()) for chunk in conf.split(size))
        return total / conf.numel() if conf.numel() else 1.0 - self.margin_cap

    def on_train_epoch_start(self) -> None:
        if self.margin_source == "unlabelled_pass":
            self.margin = adaptive_margin(self.unlabelled_mean_confidence(), self.margin_cap)
        elif self._conf_count:
            self.margin = adaptive_margin(self._conf_sum / self._conf_count, self.margin_cap)
        self._conf_sum, self._conf_count = 0.0, 0
        super().on_train_epoch_start()  # zeroes the usage counts

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        f1 = self.encoder(batch.views[0])
        f2 = self.encoder(batch.views[1])
        l1, l2 = self.logits(f1), self.logits(f2)
        out = orca_losses(l1, l2, f1, batch.y, batch.labelled, self.margin, self.scale)
        with torch.no_grad():  # every rank's unlabelled rows (DDP)
            conf = F.softmax(l1[~batch.labelled], dim=1).max(dim=1).values
            total, count = sum_over_ranks(
                torch.tensor([float(conf.sum()), conf.numel()], dtype=torch.float64).to(l1.device)
            ).tolist()
            self._conf_sum += total
            self._conf_count += int(count)
        self.count_usage(l1)
        out = detach_terms(out)
        out["margin"] = torch.tensor(self.margin)
        return out
