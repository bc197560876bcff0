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

Under DDP: the usage counts behind `k_estimated()` are over every rank's rows. Not equal
to one process with the global batch: the me-max term, InfoNCE's and SupCon's contrastive sets
and batch-norm statistics are over each rank's share of the batch.
"""

from __future__ import annotations

from typing import Any

import torch

from methods.common_losses import self_distillation_loss, simgcd_head_rows
from methods.simgcd_family import SimGCDFamily, joint_total
from owdfa_bench.method import Problem, TrainBatch, detach_terms


def simgcd_total(
    terms: dict[str, torch.Tensor], sup_weight: float = 0.35, memax_weight: float = 1.0
) -> torch.Tensor:
    """(1-lam)(distill + eps memax) + lam cls + (1-lam) infonce + lam supcon."""
    return joint_total(terms["distill"] + memax_weight * terms["memax"], terms, sup_weight)


class SimGCD(SimGCDFamily):
    """SimGCD (CVMI-Lab/SimGCD @ f843f27) on the shared runner."""

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
        rows = simgcd_head_rows(problem, unknown_k_factor)
        super().__init__(problem, optim, backbone, rows, (proj_hidden_dim, proj_dim, proj_layers))
        self.set_joint_weights(
            sup_weight, student_temp, infonce_temp, supcon_temp, no_decay_on_bias_and_norm
        )
        self.set_self_distillation(
            memax_weight, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs
        )
        self.track_usage(self.head.active)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(x))

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        fwd = self.joint_forward(self.encoder(torch.cat(batch.views[:2])), batch)
        t_teacher = self.teacher_temp_at(self.current_epoch)
        terms = self.joint_terms(
            fwd,
            batch,
            distill=self_distillation_loss(fwd.l1, fwd.l2, t_teacher, self.student_temp),
            memax=self.memax_term(fwd.logits),
        )
        loss = simgcd_total(terms, self.sup_weight, self.memax_weight)
        self.count_usage(fwd.l1)
        out = detach_terms({"loss": loss, **terms})
        out["teacher_temp"] = torch.tensor(t_teacher)
        return out
