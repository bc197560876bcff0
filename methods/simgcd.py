"""SimGCD: parametric generalized category discovery with self-distillation.

Paper: X. Wen, B. Zhao, X. Qi, "Parametric Classification for Generalized Category Discovery:
A Baseline Study", ICCV 2023. Official code: github.com/CVMI-Lab/SimGCD @ f843f27
(`train.py`, `model.py`: `DINOHead`, `DistillLoss`, `SupConLoss`, `info_nce_logits`).

What it computes, per batch of two views (both views go through the network as one batch):
  model   backbone -> custom pool 1x1 -> BNNeck -> f; a projection MLP (2048-2048-256, GELU)
          on f for the representation losses; cosine prototypes on the L2-normalised f, logits
          l in [-1, 1]^C (C = K known + novel);
  losses  L = (1 - lam) (L_distill + eps L_memax) + lam L_cls + (1 - lam) L_infonce
              + lam L_supcon, with lam = 0.35, eps = 1:
          L_cls     CE(l / 0.1, y) on the labelled rows of both views;
          L_distill cross-view CE of softmax(l / 0.1) against the detached teacher
                    softmax(l_other / tau_t), tau_t going linearly 0.07 -> 0.04 over the first 30
                    of 200 epochs, then 0.04;
          L_memax   log C - H(mean over all 2B rows of softmax(l / 0.1));
          L_infonce InfoNCE (tau 1.0) on the projections of all rows;
          L_supcon  SupCon (tau 0.07) on the normalised projections of the labelled rows.
  predict argmax of the cosine logits (parametric; no clustering at test time).

K: under k=known the head has the true total K (as the paper). Under k=unknown the head has
`k.estimate` rows when the user gives one, else `unknown_k_factor` x the true total (default 2):
SimGCD's appendix over-estimate (SimGCD issue #7), which *uses the true total as an upper
bound*, so it is not a K-free run; give `k.estimate` for one. The me-max term leaves surplus
prototypes unused. `k_estimated()` reports how many prototypes are used: the number of distinct
argmax prototypes over the training rows (first view, labelled and unlabelled) of the current
epoch, counted during training (the test split is not looked at; its own count is the metrics'
`num_clusters`).

Deliberate deviations from the reference:
  * Backbone: the OW-DFA ResNet (timm, ImageNet weights for real runs) + BNNeck instead of DINO
    ViT-B/16 (one backbone for every method), and the whole backbone is fine-tuned, as in
    the OW-DFA methods; the reference trains only the last ViT block (`grad_from_block=11`).
  * Views: the shared weak and strong views instead of two draws of one contrastive transform.
  * A batch without labelled rows (possible with the weighted sampler) gets zero CE and zero
    SupCon instead of NaN.
  * The teacher-temperature schedule indexes by epoch and holds its final value past the
    schedule's end, so a run longer than its configured epochs does not fail.
"""

from __future__ import annotations

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
    self_distillation_loss,
    simgcd_head_rows,
    supcon_loss,
    teacher_temperature,
)
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, build_optimizer
from owdfa_bench.models import GlobalFeatureEncoder, PrototypeHead


def simgcd_total(
    terms: dict[str, torch.Tensor], sup_weight: float = 0.35, memax_weight: float = 1.0
) -> torch.Tensor:
    """(1-lam)(distill + eps memax) + lam cls + (1-lam) infonce + lam supcon."""
    lam = sup_weight
    cluster = terms["distill"] + memax_weight * terms["memax"]
    return (
        (1 - lam) * cluster
        + lam * terms["cls"]
        + (1 - lam) * terms["infonce"]
        + lam * terms["supcon"]
    )


class SimGCD(OWDFAMethod):
    """SimGCD (CVMI-Lab/SimGCD @ f843f27) on the shared runner."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        sup_weight: float = 0.35,
        memax_weight: float = 1.0,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        infonce_temp: float = 1.0,
        supcon_temp: float = 0.07,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        proj_layers: int = 3,
        unknown_k_factor: float = 2.0,
        no_decay_on_bias_and_norm: bool = True,
    ):
        super().__init__(problem, optim)
        self.sup_weight, self.memax_weight = float(sup_weight), float(memax_weight)
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.warmup_teacher_temp_epochs = int(warmup_teacher_temp_epochs)
        self.infonce_temp, self.supcon_temp = float(infonce_temp), float(supcon_temp)
        self.no_decay_on_bias_and_norm = bool(no_decay_on_bias_and_norm)
        self.encoder = GlobalFeatureEncoder(backbone)
        self.projector = projection_mlp(self.encoder.dim, proj_hidden_dim, proj_dim, proj_layers)
        self.head = PrototypeHead(self.encoder.dim, simgcd_head_rows(problem, unknown_k_factor))
        self.register_buffer(
            "usage", torch.zeros(self.head.active, dtype=torch.long), persistent=False
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.head.weight[: self.head.active])

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(x))

    def k_estimated(self) -> int | None:
        if self.problem.k_mode == "known":
            return None
        used = int((self.usage > 0).sum())
        return used if used > 0 else self.head.active  # before any training step: head size

    def on_train_epoch_start(self) -> None:
        self.usage.zero_()

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        b = batch.y.shape[0]
        features = self.encoder(torch.cat(batch.views[:2]))
        proj = self.projector(features)
        logits = self.logits(features)
        l1, l2 = logits[:b], logits[b:]
        lab = batch.labelled
        t_teacher = teacher_temperature(
            self.current_epoch,
            self.warmup_teacher_temp_epochs,
            self.warmup_teacher_temp,
            self.teacher_temp,
        )
        terms = {
            "cls": masked_cross_entropy(
                logits / self.student_temp, batch.y.repeat(2), lab.repeat(2)
            ),
            "distill": self_distillation_loss(l1, l2, t_teacher, self.student_temp),
            "memax": mean_entropy_gap(F.softmax(logits / self.student_temp, dim=1)),
            "infonce": info_nce_loss(proj[:b], proj[b:], self.infonce_temp),
            "supcon": supcon_loss(proj[:b][lab], proj[b:][lab], batch.y[lab], self.supcon_temp),
        }
        loss = simgcd_total(terms, self.sup_weight, self.memax_weight)
        self.usage += torch.bincount(l1.detach().argmax(1), minlength=self.usage.numel())
        out = {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
        out["teacher_temp"] = torch.tensor(t_teacher)
        return out

    def configure_optimizers(self):
        if not self.no_decay_on_bias_and_norm:
            return super().configure_optimizers()
        return build_optimizer(self.optim, decay_groups(self), self.problem.max_epochs)
