"""ProtoGCD: SimGCD with dual-level adaptive pseudo-labelling and prototype separation.

Paper: S. Ma, F. Zhu, X.-Y. Zhang, C.-L. Liu, "ProtoGCD: Unified and Unbiased Prototype
Learning for Generalized Category Discovery", IEEE TPAMI 2025.
Official code: github.com/mashijie1028/ProtoGCD @ 8835a4d (`train.py`: the loop and argparse
defaults; `models/loss.py`: `DistillLoss_ratio`, `entropy_regularization_loss`,
`prototype_separation_loss`; `models/model.py`: `DINOHead`; `README.md`: the run commands).
Built on SimGCD (CVMI-Lab/SimGCD @ f843f27).

What it computes, per batch of two views (both views through the network as one batch of 2B):
  model   backbone -> custom pool 1x1 -> BNNeck -> f; projection MLP (2048-2048-256, GELU) on f;
          cosine prototypes P (rows of the head, L2-normalised) on the normalised f, logits
          l in [-1, 1]^C. The same model as the harness's SimGCD.
  losses  L = (1 - lam)(L_dapl + 2 L_ent + gamma L_sep) + lam L_cls + (1 - lam) L_infonce
              + lam L_supcon                      (`train.py` `train`; lam 0.35, gamma 0.1):
          L_dapl    SimGCD's cross-view distillation with a DAPL teacher (`DistillLoss_ratio`):
                    q = softmax(sg(l) / 0.05) (fixed temperature, no warm-up); in each view, the
                    floor(B rho_e) rows with the largest top-1 / (top-2 + 1e-6) teacher ratio
                    get the one-hot of their argmax instead, labelled rows included (their
                    ground truth enters only through L_cls); student log_softmax(l / 0.1) of
                    the other view; rho_e = 0 for `dapl_wait_epochs`, then linear from
                    `dapl_init_ratio` to `dapl_final_ratio` over `dapl_ramp_epochs`, then final;
          L_ent     log C - H(mean over the 2B rows of softmax(l / 0.1)) (SimGCD's me-max);
          L_sep     (1/C) sum_i log((1/(C-1)) sum_{j != i} exp(P_i . P_j / 0.1)) on the
                    normalised prototypes (the code drops rows whose term is NaN, which
                    normalised non-zero rows never give);
          L_cls, L_infonce, L_supcon exactly as SimGCD.
  predict argmax of the logits; `predict_logits` returns l / 0.1 (the student scale).

K: training uses the true K (k=known). The paper's estimator of the number of classes is not in
the released code (`estimate_k.py`, named in a docstring, is absent; `DINOHead_k` is never
called) and its formula could not be checked, so it is not implemented. Under k=unknown the
head follows the harness's SimGCD rule (the rule of the SimGCD row it extends): `k.estimate`
rows when given (e.g. GCD's Brent estimate from a `method=gcd k=unknown` run, which is K-free),
else `unknown_k_factor` x the true total (default 2, SimGCD's over-estimate: it uses the truth
as an upper bound). `k_estimated()` is the number of non-empty heads: prototypes that are the
argmax of at least one training row (first view) in the current epoch.

Recipes: the default ("harness-fair") trains the whole network with the shared CAL recipe (Adam
2e-4, wd 1e-3, StepLR(10, 0.05), 50 epochs), like every other row; `method.recipe=original` is
the official one (SGD 0.1, momentum 0.9, wd 5e-5 without decay on biases and norms, cosine to
lr * 1e-3 over 200 epochs) with only `layer4`, the BNNeck and the heads trainable (the ResNet
analogue of `grad_from_block = 11`).

Deliberate deviations from the official code:
  * Backbone: the OW-DFA ResNet + BNNeck instead of DINO ViT-B/16 (the head reads the BNNeck
    feature, as the harness's SimGCD); the default recipe trains all of it.
  * Views: the shared weak and strong views (officially two draws of one crop-and-flip
    transform; its `ColorJitter()` has default arguments and does nothing).
  * Schedule: the DAPL ramp is 100 of 200 epochs officially; the default recipe scales it to 25
    of 50 (same share of training, a choice of the port); the original recipe keeps 100.
  * gamma = 0.1 (README, CIFAR-100; 0.05 for CUB; argparse default 1): CAL's value is unknown.
    init ratio 0.0 is the README's value (argparse default 0.2).
  * The rank-based hard-label quota is not a confidence threshold, so the method keeps the
    harness's default `confidence_thresholds`.
  * Checkpoint: the official `_best.pt` picks the epoch with the best unlabelled-train All ACC
    (computed with ground truth); the harness reports the last epoch.
  * A batch without labelled rows gets zero CE and SupCon instead of NaN; a head of one
    prototype gets a zero separation term instead of the code's empty mean (NaN).
  * Option, off by default: `dapl_on_labelled: false` keeps labelled rows out of the hard-label
    quota (they keep their soft teacher; the quota is floor(B_u rho) of the unlabelled rows).

Under DDP: the DAPL quota floor(B rho) and its ranking are over every rank's rows (the
global batch's), and so are the usage counts. Not equal to one process: the entropy term,
InfoNCE's and SupCon's contrastive sets and batch-norm statistics are over each rank's share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.common_losses import simgcd_head_rows
from methods.simgcd_family import SimGCDFamily, joint_total
from owdfa_bench.distributed import gather_rows_and_start, sum_over_ranks, world_size
from owdfa_bench.method import Problem, TrainBatch, detach_terms
from owdfa_bench.models import train_only


def dapl_ratio(
    epoch: int,
    wait_epochs: int = 0,
    ramp_epochs: int = 100,
    init_ratio: float = 0.0,
    final_ratio: float = 1.0,
) -> float:
    """Share of hard labels at an epoch: the official `ratio_schedule`, i.e. zeros for
    `wait_epochs`, then `np.linspace(init, final, ramp_epochs)`, then `final` (also past its
    end)."""
    if epoch < wait_epochs:
        return 0.0
    step = epoch - wait_epochs
    if step >= ramp_epochs:
        return float(final_ratio)
    # np.linspace itself, not init + (final - init) * step / (ramp - 1): the two round apart in
    # the last bit, which moves the hard-label count int(B * ratio) by a row at some B
    return float(np.linspace(init_ratio, final_ratio, ramp_epochs)[step])


def dapl_targets(
    teacher_probs: torch.Tensor, ratio: float, eligible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPL teacher of one view: the floor(n * ratio) rows with the largest top-1 / (top-2 +
    1e-6) probability ratio get the one-hot of their argmax, the others keep `teacher_probs`.

    `eligible` (bool [B], default all rows) restricts the ranking and n to those rows. Returns
    (targets, hard) with `hard` the bool mask of the rows given a one-hot target.
    """
    probs = teacher_probs.detach()
    b = probs.shape[0]
    if eligible is None:
        eligible = torch.ones(b, dtype=torch.bool, device=probs.device)
    # DDP: the quota and the ranking are over every rank's rows (the global batch)
    n_eligible = int(sum_over_ranks(eligible.sum().reshape(1))) if world_size() > 1 else None
    n_hard = int((int(eligible.sum()) if n_eligible is None else n_eligible) * ratio)
    hard = torch.zeros(b, dtype=torch.bool, device=probs.device)
    if n_hard <= 0:
        return probs, hard
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0])
    score = (top2[:, 0] / (second + 1e-6)).masked_fill(~eligible, float("-inf"))
    if n_eligible is None:
        hard[score.topk(n_hard).indices] = True
    else:
        scores, start = gather_rows_and_start(score)
        chosen = scores.topk(n_hard).indices - start
        hard[chosen[(chosen >= 0) & (chosen < b)]] = True
    one_hot = F.one_hot(probs.argmax(dim=1), probs.shape[1]).to(probs.dtype)
    return torch.where(hard[:, None], one_hot, probs), hard


def dapl_distillation_loss(
    logits_v1: torch.Tensor,
    logits_v2: torch.Tensor,
    ratio: float,
    teacher_temp: float = 0.05,
    student_temp: float = 0.1,
    eligible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`DistillLoss_ratio` for two views: the mean of the two cross-view terms -sum q log p,
    q the DAPL target of one view, p = softmax(l / student_temp) of the other. Returns the loss
    and the share of rows (both views) given hard labels."""
    targets, hards = [], []
    for view in (logits_v1, logits_v2):
        q, hard = dapl_targets(F.softmax(view.detach() / teacher_temp, dim=1), ratio, eligible)
        targets.append(q)
        hards.append(hard)
    terms = []
    for q, student in ((targets[0], logits_v2), (targets[1], logits_v1)):
        terms.append(-(q * F.log_softmax(student / student_temp, dim=1)).sum(1).mean())
    return (terms[0] + terms[1]) / 2, torch.cat(hards).float().mean()


def prototype_separation_loss(prototypes: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """(1/C) sum_i log( (1/(C-1)) sum_{j != i} exp(P_i . P_j / temp) ), P L2-normalised here.

    `prototype_separation_loss` with temperature = base temperature (so no extra scale). Zero
    (in the graph) for a single prototype.
    """
    c = prototypes.shape[0]
    if c < 2:
        return prototypes.sum() * 0.0
    p = F.normalize(prototypes, dim=1)
    logits = p @ p.t() / temp
    off_diag = ~torch.eye(c, dtype=torch.bool, device=p.device)
    # log-mean-exp over j != i, computed stably
    masked = logits.masked_fill(~off_diag, float("-inf"))
    per_row = torch.logsumexp(masked, dim=1) - math.log(c - 1)
    return per_row.mean()


def protogcd_total(
    terms: dict[str, torch.Tensor],
    sup_weight: float = 0.35,
    entropy_weight: float = 2.0,
    separation_weight: float = 0.1,
) -> torch.Tensor:
    """(1-lam)(dapl + w_ent ent + gamma sep) + lam cls + (1-lam) infonce + lam supcon."""
    cluster = (
        terms["distill"] + entropy_weight * terms["entropy"] + separation_weight * terms["sep"]
    )
    return joint_total(cluster, terms, sup_weight)


class ProtoGCD(SimGCDFamily):
    """ProtoGCD on the shared runner (SimGCD + DAPL + prototype separation)."""

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        sup_weight: float = 0.35,
        entropy_weight: float = 2.0,
        separation_weight: float = 0.1,
        student_temp: float = 0.1,
        teacher_temp: float = 0.05,
        separation_temp: float = 0.1,
        dapl_wait_epochs: int = 0,
        dapl_ramp_epochs: int = 25,
        dapl_init_ratio: float = 0.0,
        dapl_final_ratio: float = 1.0,
        dapl_on_labelled: bool = True,
        infonce_temp: float = 1.0,
        supcon_temp: float = 0.07,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        proj_layers: int = 3,
        unknown_k_factor: float = 2.0,
        no_decay_on_bias_and_norm: bool = False,
        trainable: str | Sequence[str] = "all",
    ):
        rows = simgcd_head_rows(problem, unknown_k_factor)
        super().__init__(problem, optim, backbone, rows, (proj_hidden_dim, proj_dim, proj_layers))
        self.set_joint_weights(
            sup_weight, student_temp, infonce_temp, supcon_temp, no_decay_on_bias_and_norm
        )
        self.entropy_weight, self.separation_weight = (
            float(entropy_weight),
            float(separation_weight),
        )
        self.teacher_temp, self.separation_temp = float(teacher_temp), float(separation_temp)
        self.dapl_wait_epochs, self.dapl_ramp_epochs = int(dapl_wait_epochs), int(dapl_ramp_epochs)
        self.dapl_init_ratio, self.dapl_final_ratio = (
            float(dapl_init_ratio),
            float(dapl_final_ratio),
        )
        self.dapl_on_labelled = bool(dapl_on_labelled)
        self.track_usage(rows)
        self.trainable = train_only(self, trainable)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(x)) / self.student_temp

    def current_ratio(self) -> float:
        return dapl_ratio(
            int(self.current_epoch),
            self.dapl_wait_epochs,
            self.dapl_ramp_epochs,
            self.dapl_init_ratio,
            self.dapl_final_ratio,
        )

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        fwd = self.joint_forward(self.encoder(torch.cat(batch.views[:2])), batch)
        ratio = self.current_ratio()
        distill, hard_share = dapl_distillation_loss(
            fwd.l1,
            fwd.l2,
            ratio,
            self.teacher_temp,
            self.student_temp,
            eligible=None if self.dapl_on_labelled else ~batch.labelled,
        )
        terms = self.joint_terms(
            fwd,
            batch,
            distill=distill,
            entropy=self.memax_term(fwd.logits),
            sep=prototype_separation_loss(self.prototypes(), self.separation_temp),
        )
        loss = protogcd_total(terms, self.sup_weight, self.entropy_weight, self.separation_weight)
        self.count_usage(fwd.l1)
        out = detach_terms({"loss": loss, **terms})
        out["dapl_ratio"] = torch.tensor(ratio)
        out["dapl_hard_share"] = hard_share.detach()
        return out
