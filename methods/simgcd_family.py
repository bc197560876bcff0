"""The model and step parts shared by SimGCD and the ports built on it (LegoGCD, ProtoGCD,
PAL-GCD's stage 2).

SimGCD (github.com/CVMI-Lab/SimGCD @ f843f27, `train.py`, `model.py`): an encoder, a projection
MLP for the representation losses and cosine prototypes on the encoder feature; the loss
  L = (1 - lam) L_cluster + lam L_cls + (1 - lam) L_infonce + lam L_supcon,
where each port changes only the clustering term L_cluster (and may add terms after it). This
module holds what the four compute alike; each method's file keeps what it changes, and no
method imports another method's file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from methods.common_losses import (
    cosine_logits,
    decay_groups,
    info_nce_loss,
    masked_cross_entropy,
    mean_entropy_gap,
    projection_mlp,
    supcon_loss,
    teacher_temperature,
)
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, build_optimizer
from owdfa_bench.models import GlobalFeatureEncoder, PrototypeHead


def joint_total(
    cluster: torch.Tensor, terms: dict[str, torch.Tensor], sup_weight: float = 0.35
) -> torch.Tensor:
    """(1-lam) cluster + lam cls + (1-lam) infonce + lam supcon (`train.py`'s total)."""
    lam = sup_weight
    return (
        (1 - lam) * cluster
        + lam * terms["cls"]
        + (1 - lam) * terms["infonce"]
        + lam * terms["supcon"]
    )


@dataclass
class JointForward:
    """One forward pass of both views (view 1 rows first): projections and cosine logits."""

    proj: torch.Tensor
    logits: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor


class SimGCDFamily(OWDFAMethod):
    """Encoder + projection MLP + cosine prototypes, and the SimGCD terms all ports keep.

    Subclasses set the terms' weights with `set_joint_weights` and, when they use SimGCD's
    self-distillation, its teacher schedule with `set_self_distillation`.
    """

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None,
        backbone: dict[str, Any] | None,
        rows: int,
        projection: tuple[int, int, int] = (2048, 256, 3),
    ):
        super().__init__(problem, optim)
        hidden_dim, out_dim, layers = projection
        self.encoder = GlobalFeatureEncoder(backbone)
        self.projector = projection_mlp(self.encoder.dim, hidden_dim, out_dim, layers)
        self.head = PrototypeHead(self.encoder.dim, rows)

    def set_joint_weights(
        self,
        sup_weight: float,
        student_temp: float,
        infonce_temp: float,
        supcon_temp: float,
        no_decay_on_bias_and_norm: bool,
    ) -> None:
        self.sup_weight, self.student_temp = float(sup_weight), float(student_temp)
        self.infonce_temp, self.supcon_temp = float(infonce_temp), float(supcon_temp)
        self.no_decay_on_bias_and_norm = bool(no_decay_on_bias_and_norm)

    def set_self_distillation(
        self, memax_weight: float, teacher_temp: float, warmup_temp: float, warmup_epochs: int
    ) -> None:
        self.memax_weight, self.teacher_temp = float(memax_weight), float(teacher_temp)
        self.warmup_teacher_temp = float(warmup_temp)
        self.warmup_teacher_temp_epochs = int(warmup_epochs)

    def teacher_temp_at(self, epoch: int) -> float:
        """SimGCD's teacher temperature `epoch` epochs into its schedule."""
        return teacher_temperature(
            epoch, self.warmup_teacher_temp_epochs, self.warmup_teacher_temp, self.teacher_temp
        )

    def prototypes(self) -> torch.Tensor:
        return self.head.weight[: self.head.active]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.prototypes())

    def joint_forward(self, features: torch.Tensor, batch: TrainBatch) -> JointForward:
        """Projections and logits of the encoder features of both views of `batch`."""
        b = batch.y.shape[0]
        proj = self.projector(features)
        logits = self.logits(features)
        return JointForward(proj, logits, logits[:b], logits[b:])

    def memax_term(self, logits: torch.Tensor) -> torch.Tensor:
        """SimGCD's me-max: log C - H(mean of softmax(l / student_temp)) over all rows."""
        return mean_entropy_gap(F.softmax(logits / self.student_temp, dim=1))

    def joint_terms(
        self, fwd: JointForward, batch: TrainBatch, **cluster_terms: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """{"cls", *cluster_terms, "infonce", "supcon"}: the method's clustering terms between
        SimGCD's supervised CE (labelled rows of both views) and its representation terms."""
        b, lab = batch.y.shape[0], batch.labelled
        proj = fwd.proj
        return {
            "cls": masked_cross_entropy(
                fwd.logits / self.student_temp, batch.y.repeat(2), lab.repeat(2)
            ),
            **cluster_terms,
            "infonce": info_nce_loss(proj[:b], proj[b:], self.infonce_temp),
            "supcon": supcon_loss(proj[:b][lab], proj[b:][lab], batch.y[lab], self.supcon_temp),
        }

    def configure_optimizers(self):
        if not self.no_decay_on_bias_and_norm:
            return super().configure_optimizers()
        return build_optimizer(self.optim, decay_groups(self), self.problem.max_epochs)
