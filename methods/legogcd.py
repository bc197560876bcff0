"""LegoGCD: SimGCD plus local entropy regularisation (LER) and a dual-view KL term (DKL).

Paper: X. Cao et al., "Solving the Catastrophic Forgetting Problem in Generalized Category
Discovery", CVPR 2024 (the repository's `paper/CVPR2024_LegoGCD_Xinzi_Cao.pdf`).
Official code: github.com/Cliffia123/LegoGCD @ 83ee36a (`train.py`: the training loop and LER,
`model.py`: `DINOHead`, `DistillLoss` with the DKL term, `update_qhat`, `get_params_groups`;
`scripts/run_*.sh`: per-dataset values). Built on SimGCD (CVMI-Lab/SimGCD @ f843f27).

What it computes, per batch of two views (both views through the network as one batch of 2B):
  model   backbone -> custom pool 1x1 -> BNNeck -> f; projection MLP (2048-2048-256, GELU) on f;
          cosine prototypes on the L2-normalised f, logits l in [-1, 1]^C (C = K, or the
          k=unknown head size below). The same model as the harness's SimGCD.
  losses  L = (1 - lam)(L_distill + L_dkl + eps L_memax) + lam L_cls + (1 - lam) L_infonce
              + lam L_supcon + beta L_ler          (`train.py` `train`; lam 0.35, beta 2):
          L_cls, L_distill, L_memax, L_infonce, L_supcon exactly as SimGCD (teacher temperature
                    0.07 -> 0.04, student 0.1);
          L_dkl     one-direction KL between the views' student distributions p1 = softmax(l1 /
                    0.1) and p2 = softmax(l2 / 0.1), both views carrying gradients, added inside
                    `DistillLoss.forward` (`model.py`). The code applies `F.log_softmax` to
                    p1 and p2, which are already probabilities: DKL_i = sum_k p1_ik
                    (log_softmax(p1_i)_k - log_softmax(p2_i)_k). That is what runs here
                    (`dkl_form: code`); `dkl_form: kl` is the textbook sum p1 (log p1 - log p2)
                    the paper writes;
          L_ler     entropy minimisation on the unlabelled rows predicted *known* with
                    confidence: o_i = unlabelled & max softmax(l_i / 0.1) >= delta & argmax <
                    K_known (predicted ids only, `train.py`), LER_i = -sum_k
                    softmax(l_i / 0.05)_k log softmax(l_i / 0.05 + 0.4 log q)_k with the target
                    NOT detached, L_ler = (1 / 2B) sum_i o_i LER_i (a mean over all rows);
          q         running class prior, uniform at the start, updated once per step after the
                    loss: q <- 0.999 q + 0.001 mean_i softmax(sg(l_i)) over all 2B rows
                    (`update_qhat`, temperature 1 on the cosine logits, so q stays near uniform).
  predict argmax of the logits. `predict_logits` returns l / 0.1, whose softmax is the
          confidence LER thresholds (so the harness's confidence diagnostics read that scale).

K: LegoGCD assumes K known (as SimGCD). Under k=unknown the head follows the harness's SimGCD
rule: `k.estimate` rows when given, else `unknown_k_factor` x the true total (default 2; SimGCD's
appendix over-estimate, which uses the truth as an upper bound, so it is not a K-free run; give
`k.estimate`, e.g. GCD's estimate, for one). `k_estimated()` is the number of prototypes that are
the argmax of at least one training row (first view) in the current epoch.

Recipes: the default ("harness-fair") trains the whole network with the shared CAL recipe (Adam
2e-4, wd 1e-3, StepLR(10, 0.05), 50 epochs), like every other row; `method.recipe=original` is
the official one (SGD 0.1, momentum 0.9, wd 5e-5 without decay on biases and norms, cosine to
lr * 1e-3 over 200 epochs) with only `layer4`, the BNNeck and the heads trainable, the ResNet
analogue of the official `grad_from_block = 11` (last ViT block only).

Deliberate deviations from the official code:
  * Backbone: the OW-DFA ResNet + BNNeck instead of DINO ViT-B/16 (the head reads the BNNeck
    feature, as the harness's SimGCD); the default recipe trains all of it (see Recipes).
  * Views: the shared weak and strong views. The official two views are two draws of one
    transform whose `ColorJitter()` has default arguments, i.e. crop and flip only.
  * The teacher warm-up is 8 of 50 epochs under the default recipe (30 of 200 scaled to the same
    share of training); the original recipe keeps 30 of 200.
  * eps (me-max weight) is 1; the official scripts use 2 for CUB and CIFAR-100. The REAL-heavy
    class balance of OW-DFA argues against the larger weight (a judgement, not CAL's setting).
  * delta = 0.7, the official default (also CUB, Herbarium, ImageNet-1k); CAL's value is unknown.
  * A batch without labelled rows gets zero CE and SupCon instead of NaN; the teacher schedule
    holds its last value past its end (as the harness's SimGCD).
  * Options, off by default: `dkl_form: kl` and `dkl_detach_view2: true` (the paper's
    pseudo-code, which detaches view 2); `ler_weight: 1` is the paper's Table 6 value for
    CIFAR-100 (the single-GPU `train.py` hard-codes 2 for every dataset).

Under DDP: the class prior q-hat is updated with every rank's rows at every step, and the
usage counts too. Not equal to one process with the global batch: the me-max term, InfoNCE's
and SupCon's contrastive sets and batch-norm statistics are over each rank's share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from methods.common_losses import self_distillation_loss, simgcd_head_rows
from methods.simgcd_family import SimGCDFamily, joint_total
from owdfa_bench.distributed import gather_rows
from owdfa_bench.method import Problem, TrainBatch, detach_terms
from owdfa_bench.models import train_only

DKL_FORMS = ("code", "kl")


def dual_view_kl(
    logits_v1: torch.Tensor,
    logits_v2: torch.Tensor,
    student_temp: float = 0.1,
    form: str = "code",
    detach_view2: bool = False,
) -> torch.Tensor:
    """LegoGCD's DKL: mean over rows of sum_k p1_k (a_k - b_k), p_v = softmax(l_v / student_temp).

    form "code" (`DistillLoss.forward`, `model.py`): a = log_softmax(p1), b = log_softmax(p2),
    the log-softmax of the probability vectors themselves. form "kl": a = log p1, b = log p2
    (KL(p1 || p2)).
    Both views carry gradients unless `detach_view2`.
    """
    if form not in DKL_FORMS:
        raise ValueError(f"dkl_form={form!r}: use one of {DKL_FORMS}")
    z2 = logits_v2.detach() if detach_view2 else logits_v2
    if form == "kl":
        log_p1 = F.log_softmax(logits_v1 / student_temp, dim=1)
        log_p2 = F.log_softmax(z2 / student_temp, dim=1)
        return (log_p1.exp() * (log_p1 - log_p2)).sum(1).mean()
    p1 = F.softmax(logits_v1 / student_temp, dim=1)
    p2 = F.softmax(z2 / student_temp, dim=1)
    return (p1 * (F.log_softmax(p1, dim=1) - F.log_softmax(p2, dim=1))).sum(1).mean()


def ler_selection(
    logits: torch.Tensor,
    labelled: torch.Tensor,
    num_known: int,
    threshold: float,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Rows LER regularises: unlabelled, max softmax(l / student_temp) >= threshold, and the
    argmax a known id (< num_known). Uses predictions only, never a label (`train.py`)."""
    probs = F.softmax(logits.detach() / student_temp, dim=1)
    confidence, predicted = probs.max(dim=1)
    return (~labelled) & (confidence >= threshold) & (predicted < num_known)


def local_entropy_loss(
    logits: torch.Tensor,
    selected: torch.Tensor,
    prior: torch.Tensor,
    temp: float = 0.05,
    adjust: float = 0.4,
) -> torch.Tensor:
    """L_ler = (1/N) sum_i o_i * -sum_k softmax(l_i/temp)_k log softmax(l_i/temp + adjust log q)_k.

    The target softmax(l_i / temp) is not detached (`train.py`), so with a uniform
    prior q this is the Shannon entropy of softmax(l_i / temp). The mean runs over all N rows,
    unselected rows counting as zero.
    """
    target = F.softmax(logits / temp, dim=1)
    log_pred = F.log_softmax(logits / temp + adjust * prior.log()[None, :], dim=1)
    per_row = -(target * log_pred).sum(1)
    return (per_row * selected.to(per_row.dtype)).mean()


def update_class_prior(
    prior: torch.Tensor, logits: torch.Tensor, momentum: float = 0.999
) -> torch.Tensor:
    """`update_qhat`: momentum * q + (1 - momentum) * mean_i softmax(sg(l_i)) (temperature 1)."""
    return momentum * prior + (1.0 - momentum) * F.softmax(logits.detach(), dim=1).mean(0)


def legogcd_total(
    terms: dict[str, torch.Tensor],
    sup_weight: float = 0.35,
    memax_weight: float = 1.0,
    ler_weight: float = 2.0,
) -> torch.Tensor:
    """(1-lam)(distill + dkl + eps memax) + lam cls + (1-lam) infonce + lam supcon + beta ler."""
    cluster = terms["distill"] + terms["dkl"] + memax_weight * terms["memax"]
    return joint_total(cluster, terms, sup_weight) + ler_weight * terms["ler"]


class LegoGCD(SimGCDFamily):
    """LegoGCD on the shared runner (SimGCD + LER + DKL)."""

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
        warmup_teacher_temp_epochs: int = 8,
        infonce_temp: float = 1.0,
        supcon_temp: float = 0.07,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        proj_layers: int = 3,
        dkl_form: str = "code",
        dkl_detach_view2: bool = False,
        ler_threshold: float = 0.7,
        ler_temp: float = 0.05,
        ler_logit_adjust: float = 0.4,
        ler_weight: float = 2.0,
        prior_momentum: float = 0.999,
        unknown_k_factor: float = 2.0,
        no_decay_on_bias_and_norm: bool = False,
        trainable: str | Sequence[str] = "all",
    ):
        if dkl_form not in DKL_FORMS:
            raise ValueError(f"method.model.dkl_form={dkl_form!r}: use one of {DKL_FORMS}")
        rows = simgcd_head_rows(problem, unknown_k_factor)
        super().__init__(problem, optim, backbone, rows, (proj_hidden_dim, proj_dim, proj_layers))
        self.set_joint_weights(
            sup_weight, student_temp, infonce_temp, supcon_temp, no_decay_on_bias_and_norm
        )
        self.set_self_distillation(
            memax_weight, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs
        )
        self.dkl_form, self.dkl_detach_view2 = str(dkl_form), bool(dkl_detach_view2)
        self.ler_threshold, self.ler_temp = float(ler_threshold), float(ler_temp)
        self.ler_logit_adjust, self.ler_weight = float(ler_logit_adjust), float(ler_weight)
        self.prior_momentum = float(prior_momentum)
        # q-hat: saved in checkpoints so that a resumed run continues the same prior
        self.register_buffer("prior", torch.full((rows,), 1.0 / rows))
        self.track_usage(rows)
        self.trainable = train_only(self, trainable)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(x)) / self.student_temp

    def confidence_thresholds(self) -> tuple[float, float]:
        """LER trusts known-predicted rows at delta; it never selects a novel-predicted row."""
        return (self.ler_threshold, 1.0)

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        fwd = self.joint_forward(self.encoder(torch.cat(batch.views[:2])), batch)
        logits, l1, l2 = fwd.logits, fwd.l1, fwd.l2
        t_teacher = self.teacher_temp_at(self.current_epoch)
        selected = ler_selection(
            logits,
            batch.labelled.repeat(2),
            self.problem.num_known,
            self.ler_threshold,
            self.student_temp,
        )
        terms = self.joint_terms(
            fwd,
            batch,
            distill=self_distillation_loss(l1, l2, t_teacher, self.student_temp),
            dkl=dual_view_kl(l1, l2, self.student_temp, self.dkl_form, self.dkl_detach_view2),
            memax=self.memax_term(logits),
        )
        terms["ler"] = local_entropy_loss(
            logits, selected, self.prior, self.ler_temp, self.ler_logit_adjust
        )
        loss = legogcd_total(terms, self.sup_weight, self.memax_weight, self.ler_weight)
        with torch.no_grad():  # after the loss, once per step (`train.py`: `update_qhat`),
            # over every rank's rows (DDP)
            self.prior.copy_(
                update_class_prior(self.prior, gather_rows(logits.detach()), self.prior_momentum)
            )
        self.count_usage(l1)
        out = detach_terms({"loss": loss, **terms})
        out["teacher_temp"] = torch.tensor(t_teacher)
        out["ler_selected"] = selected.float().mean().detach()
        return out
