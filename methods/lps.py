"""LPS: learning-pace synchronisation for open-world semi-supervised learning.

Paper: B. Ye, K. Gan, T. Wei, M.-L. Zhang, "Bridging the Gap: Learning Pace Synchronization for
Open-World Semi-Supervised Learning", IJCAI 2024 (arXiv 2309.11930).
Official code: github.com/yebo0216best/LPS-main @ 6c018d5: `lps_imagenet.py` and
`lps_cifar.py` (`train`: pseudo-labels, masks, the AM / PC / UC / entropy terms;
`pl_contrastive_clustering`, `un_contrastive_learning`, `del_tensor_0_cloumn`; the optimiser and
frozen layers in `__main__`), `utils.py` (`MarginLoss`, `entropy`, `TransformTwice_imagenet`),
`models/resnet.py` (ResNet-50 with a `NormedLinear` fc).

What it computes, per batch (views: x, x2 two weak draws, x3 the strong view):
  model    backbone -> 1x1 pool -> BNNeck -> f -> cosine head x 10 (ORCA's `NormedLinear`,
           weights drawn uniform(-1, 1)); z = 10 cos(f, w_c). Logits z1, z2, z3 of the views.
  labels   pi = softmax(sg(z2)), y^ = argmax pi (labelled rows: y^ = y). Selected rows: every
           labelled row; an unlabelled row with y^ < K_k if max pi >= 0.95, else if
           max pi >= lambda_n(e) = 0.4 + 0.4 e / E (e = 0-based epoch, E = epochs of the run).
  prior    p = sum_sel pi / sum_sel sum_k pi (soft probabilities of the selected rows, labelled
           rows included); s = KL(u || p) with u uniform over the C outputs; class margins
           m_c = 10 p_c / max p.
  L_AM     CE(z1 + s m_y e_y, y) over labelled rows + (1/U) sum_{unlabelled i} sel_i
           CE(z3_i + s m_y^ e_y^, y^_i): the margin raises the target logit, more for classes
           that are already frequent (learned faster), which slows them down.
  L_PC     over the selected rows, on the logit vectors [z2_sel; z3_sel] (T = 0.4): for each
           row, -log of the mean over its same-label rows of exp(cos/T), divided by the sum of
           exp(cos/T) over all other rows; the row itself is excluded.
  L_UC     NT-Xent (T = 0.4) between z2 and z3 (positive: the other view of the same image),
           mean over all 2B rows with the selected rows counted as zero.
  L_ent    -H(mean_i softmax(z1_i)) over the whole batch.
  total    L_ent + L_AM + L_PC + L_UC (all weights 1).
  predict  argmax of the logits.

K: known -> the true total K (the reference assumes it known; it has no estimator). Unknown ->
`k.estimate` if given, else `unknown_k_factor` x K_known outputs (default 2, the harness rule of
the ORCA family); outputs from K_known on are "novel" for the threshold, and the uniform u of
the margin scale spans all outputs. `k_estimated()` is the number of outputs used: distinct
argmax outputs over the training rows (view x) of the current epoch.

Deliberate deviations from the reference:
  * Backbone: the OW-DFA ResNet (timm) + BNNeck, head on the BNNeck feature, instead of the
    SimCLR ResNet-50 (ImageNet-100) / CIFAR ResNet-18. The default recipe is the shared CAL Adam
    recipe over the whole network; `method.recipe=original` is `lps_imagenet.py`'s (SGD 0.1,
    wd 1e-4, cosine over 90 epochs, batch 512, only `layer4` and the head trainable; the BNNeck,
    which the reference does not have, sits between them and trains with the head).
  * Views: two independent draws of the harness's weak view (flip + resize) and its strong view,
    instead of RandomResizedCrop(0.5-1) + flip draws and RandAugment. The harness weak view only
    flips, so x and x2 are identical for about half the rows.
  * The novel-threshold ramp spans the run (E = the run's epochs) instead of the hard-coded 90
    (ImageNet) or 200 (CIFAR), which are those scripts' epoch counts.
  * Batches come from the harness sampler (weighted: about half labelled) instead of the
    reference's proportional labelled share (`TwoStreamBatchSampler`); rows are selected by a
    mask rather than by their position (labelled rows first).
  * The contrastive terms exclude each row's self-similarity with a mask instead of subtracting
    exp(1/T) (the same value up to rounding of cos_ii = 1) and are computed with log-sum-exp.
  * Guards where the reference would give NaN: no labelled row -> zero labelled AM term; no
    unlabelled row -> zero unlabelled AM term; no selected row -> zero L_PC and p uniform (s = 0).

Under DDP: the class distribution p behind the adaptive margins is over every rank's selected
rows (the global batch's), and so are the usage counts. Not equal to one process: the PC and UC
contrastive sets, the entropy of the mean prediction and batch-norm statistics are over each
rank's share.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.common_losses import cosine_logits, entropy_of_mean, open_world_head_rows
from owdfa_bench.distributed import sum_over_ranks, world_size
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, detach_terms
from owdfa_bench.models import GlobalFeatureEncoder, PrototypeHead, train_only


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (bf16 autocast) in float32; float32 / float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def novel_threshold(epoch: int, total_epochs: int, start: float = 0.4, gain: float = 0.4):
    """lambda_n(e) = start + gain * e / E (the reference: 0.4 + 0.4 e / 90 on ImageNet-100)."""
    return float(start + gain * epoch / max(1, int(total_epochs)))


def lps_pseudo_labels(
    weak_logits: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    num_known: int,
    seen_threshold: float = 0.95,
    novel_threshold: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pi, y^, selected) from the second weak view's logits.

    pi = softmax(sg(z2)); y^ = argmax pi, replaced by y on labelled rows. A row is selected when
    it is labelled, or its y^ is a known id and max pi >= seen_threshold, or its y^ is a novel id
    and max pi >= novel_threshold.
    """
    probs = F.softmax(_wide(weak_logits.detach()), dim=1)
    conf, pseudo = probs.max(dim=1)
    pseudo = torch.where(labelled, y, pseudo)
    seen = pseudo < num_known
    selected = labelled | (seen & (conf >= seen_threshold)) | (~seen & (conf >= novel_threshold))
    return probs, pseudo, selected


def class_distribution(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """p = sum of the selected rows' probabilities, normalised; uniform when none is selected.
    Under DDP, of every rank's selected rows: one distribution (the global batch's) on every
    rank."""
    if world_size() > 1:
        sums = sum_over_ranks(probs[selected].sum(dim=0))
        total = sums.sum()
        if float(total) == 0.0:
            return torch.full_like(sums, 1.0 / sums.numel())
        return sums / total
    if not bool(selected.any()):
        c = probs.shape[1]
        return torch.full((c,), 1.0 / c, dtype=probs.dtype, device=probs.device)
    rows = probs[selected]
    return rows.sum(dim=0) / rows.sum()


def margin_scale(p: torch.Tensor) -> torch.Tensor:
    """s = KL(u || p) = sum_k u_k log(u_k / p_k), u uniform over the C outputs (`DKL(q, p)`)."""
    u = torch.full_like(p, 1.0 / p.numel())
    return (u * (u.log() - p.log())).sum()


def class_margins(p: torch.Tensor, margin_max: float = 10.0) -> torch.Tensor:
    """Per-class margins m_c = margin_max * p_c / max p (`MarginLoss`: `dist * 10 / dist.max()`)."""
    return margin_max * p / p.max()


def adaptive_margin_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    margins: torch.Tensor,
    scale: torch.Tensor | float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE(z + s m_y e_y, y) (`MarginLoss.forward`): mean over the rows, or with `weights` the mean
    of weight x CE over all rows (masked rows count as zero). Zero, attached, for no row."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    shift = (scale * margins)[targets]
    shifted = logits + shift.unsqueeze(1) * F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    ce = F.cross_entropy(shifted, targets, reduction="none")
    if weights is None:
        return ce.mean()
    return (ce * weights.to(ce.dtype)).mean()


def pseudo_label_contrastive(
    z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor, temperature: float = 0.4
) -> torch.Tensor:
    """The PC loss (`pl_contrastive_clustering`) over n selected rows and their two views.

    Rows r of [z_a; z_b] (2n, cosine similarity): -log( (sum_{j != r, same label} e^{cos/T}) /
    (sum_{j != r} e^{cos/T}) / (|same label| - 1) ), mean over the 2n rows. Each row's other view
    is always a positive, so the numerator is never empty. Zero (attached) for n = 0.
    """
    n = labels.shape[0]
    if n == 0:
        return (z_a.sum() + z_b.sum()) * 0.0
    z = F.normalize(_wide(torch.cat([z_a, z_b])), dim=1)
    y = torch.cat([labels, labels])
    sim = z @ z.t() / temperature
    not_self = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    positive = (y[:, None] == y[None, :]) & not_self
    log_num = torch.logsumexp(sim.masked_fill(~positive, float("-inf")), dim=1)
    log_den = torch.logsumexp(sim.masked_fill(~not_self, float("-inf")), dim=1)
    return -(log_num - log_den - positive.sum(dim=1).to(sim.dtype).log()).mean()


def unselected_contrastive(
    z_a: torch.Tensor, z_b: torch.Tensor, weights: torch.Tensor, temperature: float = 0.4
) -> torch.Tensor:
    """The UC loss (`un_contrastive_learning`): NT-Xent between two views over all 2B rows,
    positive = the other view of the same image, denominator = every other row; mean over the
    2B rows of weight x loss (the reference's weight: 1 for unselected rows, 0 for selected)."""
    b = z_a.shape[0]
    z = F.normalize(_wide(torch.cat([z_a, z_b])), dim=1)
    sim = (z @ z.t() / temperature).masked_fill(
        torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf")
    )
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    per_row = F.cross_entropy(sim, positive, reduction="none")
    return (per_row * torch.cat([weights, weights]).to(per_row.dtype)).mean()


def lps_losses(
    z1: torch.Tensor,
    z2: torch.Tensor,
    z3: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    num_known: int,
    seen_threshold: float = 0.95,
    novel_threshold: float = 0.4,
    margin_max: float = 10.0,
    temperature: float = 0.4,
) -> dict[str, torch.Tensor]:
    """Every LPS term of one batch (logits already 10 cos); key "loss" is their sum."""
    z1, z2, z3 = _wide(z1), _wide(z2), _wide(z3)
    probs, pseudo, selected = lps_pseudo_labels(
        z2, y, labelled, num_known, seen_threshold, novel_threshold
    )
    p = class_distribution(probs, selected)
    s = margin_scale(p)
    margins = class_margins(p, margin_max)
    unl = ~labelled
    am_lab = adaptive_margin_cross_entropy(z1[labelled], y[labelled], margins, s)
    am_unl = adaptive_margin_cross_entropy(z3[unl], pseudo[unl], margins, s, selected[unl])
    am = am_lab + am_unl
    pc = pseudo_label_contrastive(z2[selected], z3[selected], pseudo[selected], temperature)
    uc = unselected_contrastive(z2, z3, (~selected).float(), temperature)
    ent = -entropy_of_mean(F.softmax(z1, dim=1))
    return {
        "loss": ent + am + pc + uc,
        "am": am,
        "am_labelled": am_lab,
        "am_unlabelled": am_unl,
        "pc": pc,
        "uc": uc,
        "entropy": ent,
        "margin_scale": s,
        "selected": selected.float().mean(),
    }


class LPS(OWDFAMethod):
    """LPS on the shared runner (IJCAI 2024; yebo0216best/LPS-main @ 6c018d5)."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "weak", "strong")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        scale: float = 10.0,
        seen_threshold: float = 0.95,
        novel_threshold_start: float = 0.4,
        novel_threshold_gain: float = 0.4,
        margin_max: float = 10.0,
        temperature: float = 0.4,
        trainable: str | list[str] = "all",
        unknown_k_factor: float = 2.0,
    ):
        super().__init__(problem, optim)
        self.scale = float(scale)
        self.seen_threshold = float(seen_threshold)
        self.novel_threshold_start = float(novel_threshold_start)
        self.novel_threshold_gain = float(novel_threshold_gain)
        self.margin_max, self.temperature = float(margin_max), float(temperature)
        self.encoder = GlobalFeatureEncoder(backbone)
        self.head = PrototypeHead(self.encoder.dim, open_world_head_rows(problem, unknown_k_factor))
        nn.init.uniform_(self.head.weight, -1.0, 1.0)  # NormedLinear: uniform(-1, 1), renormed
        self.track_usage(self.head.active)
        self.trainable = train_only(self, trainable)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.encoder(x), self.head.weight[: self.head.active], self.scale)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def novel_threshold(self) -> float:
        epoch = int(self.current_epoch)  # 0 before a trainer is attached
        return novel_threshold(
            epoch,
            self.problem.max_epochs,
            self.novel_threshold_start,
            self.novel_threshold_gain,
        )

    def confidence_thresholds(self) -> tuple[float, float]:
        """The pseudo-label thresholds of this epoch: 0.95 (seen), lambda_n(e) (novel)."""
        return (self.seen_threshold, self.novel_threshold())

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        x1, x2, x3 = batch.views[:3]
        # one pass per view, as the reference: own BN batch statistics per view
        z1, z2, z3 = self.logits(x1), self.logits(x2), self.logits(x3)
        lam = self.novel_threshold()
        out = lps_losses(
            z1,
            z2,
            z3,
            batch.y,
            batch.labelled,
            self.problem.num_known,
            self.seen_threshold,
            lam,
            self.margin_max,
            self.temperature,
        )
        self.count_usage(z1)
        out = detach_terms(out)
        out["novel_threshold"] = torch.tensor(lam)
        return out
