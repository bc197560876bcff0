"""NACH: FixMatch with pairwise similarity for unseen classes and learning-pace synchronisation.

Paper: L.-Z. Guo, Y.-G. Zhang, Z.-F. Wu, J.-J. Shao, Y.-F. Li, "Robust Semi-Supervised Learning
when Not All Classes have Labels", NeurIPS 2022 (abstract: papers.neurips.cc/paper_files/paper/
2022/hash/15dce910311b9bd82ca24f634148519a-Abstract-Conference.html; OpenReview lDohSFOHr0).

What was searched and found: no official or author code. The stored code, issue and web-page
indexes were searched for the title, "NACH", the paper's hash and OpenReview id, and the
authors' group (LAMDA, Nanjing University): they hold the abstract page, the NeurIPS poster
page (nips.cc/virtual/2022/poster/54178), the OpenReview forum id (in a paper list) and the
PDF's address (proceedings.neurips.cc/.../15dce910311b9bd82ca24f634148519a-Paper-Conference.pdf,
in a survey's table), but not the PDF's text; the group's LAMDA-SSL toolkit (YGZWQZD/LAMDA-SSL)
and the RE-SSL benchmark built on it (rundonghe/RESSLFinal2) have no NACH. So this is an
implementation of the abstract's two modules, "unseen class classification by exploiting
pairwise similarity between examples" and "learning pace synchronisation by an adaptive
threshold with distribution alignment", assembled from the methods those words name: FixMatch
(Sohn et al. 2020), ORCA's pairwise objective (methods/orca.py), FlexMatch's class-wise
thresholds and ReMixMatch's distribution alignment, the last two as in USB
(microsoft/Semi-supervised-learning: `semilearn/algorithms/flexmatch/utils.py`
`FlexMatchThresholdingHook` @ 36b7d08, `semilearn/algorithms/hooks/dist_align.py`
`DistAlignEMAHook` @ 48de4bf). Its numbers are not the paper's method's numbers.

What it computes, per batch (view w = weak, view s = strong, one forward pass per view):
  model    encoder (ResNet + BNNeck) -> f -> dropout -> cosine head x 10 (ORCA's `NormedLinear`),
           z = 10 cos(f, w_c) over C outputs, p = softmax(z).
  L_sup    CE(z_w, y) over the labelled rows (FixMatch's supervised term; no margin).
  DA       on the unlabelled rows' q = sg(p_w): the running mean p_model <- m p_model + (1 - m)
           mean_i q_i (every rank's rows; the first batch sets it), then
           q~ = normalise(q (u + 1e-6) / (p_model + 1e-6)) with u uniform over the C outputs.
  status   FlexMatch's learning status: a label per unlabelled training row, -1 until the row's
           q~ first reaches tau = 0.95, then the class of its latest confident prediction;
           sigma_c = rows whose label is c; beta_c = sigma_c / max(max_c' sigma_c', #rows
           still -1) (warm-up; without it the max over classes only).
  L_u      FixMatch over the unlabelled rows with class-wise thresholds T_c = tau beta_c /
           (2 - beta_c) (FlexMatch's convex map), read before this batch updates the status:
           (1/U) sum_i 1[max q~_i >= T(y^_i)] CE(z_s,i, y^_i), y^ = argmax q~. A class the model
           has learned less (few confident rows: the novel ones, early) gets a lower threshold,
           so it is pseudo-labelled at the pace of the seen classes.
  L_pair   ORCA's pairwise term over all rows: BCE(<p_w,i, p_s,pi(i)>, 1) with pi(i) a random
           other labelled row of the same class (labelled i; itself when alone) or the most
           cosine-similar other row of the batch by the detached weak-view feature (unlabelled
           i).
  L_ent    -H(mean_i p_w,i) over the batch (ORCA's regulariser against one-cluster collapse).
  total    L_sup + lambda_u L_u + lambda_p L_pair + lambda_e L_ent (all weights 1).
  predict  argmax of the logits over all C outputs.

K: known -> the true total K. Unknown -> `k.estimate` if given, else `unknown_k_factor` x
K_known outputs (default 2: `open_world_head_rows`, the harness rule of the ORCA family; the
paper's experiments assume K known as far as the abstract tells). The uniform DA target and the
thresholds span every output. `k_estimated()` is the number of outputs used: distinct argmax
outputs of the weak view over the training rows of the current epoch.

Choices not fixed by the paper (its text and code were not available; see above):
  * The SSL base is FixMatch (hard pseudo-labels of the weak view train the strong view), the
    method the abstract's "SSL methods" most likely means and the base of FlexMatch's
    thresholds; lambda_u = 1 and tau = 0.95 are FixMatch's.
  * Pairwise similarity is ORCA's objective (nearest neighbour by cosine of the detached
    features, same-class partners for labelled rows, BCE on the inner product of the two
    views' probabilities) with its entropy-of-the-mean regulariser and its 10 cos head: the
    pairwise method the abstract's wording and its OW-SSL setting point to. ORCA's uncertainty
    margin is left out: learning-pace synchronisation is NACH's answer to the same imbalance.
  * The adaptive threshold is FlexMatch's: per-row latest confident label, warm-up denominator,
    convex map, tau = 0.95, `>=`, read before the batch's update. One edge differs from USB:
    when a single class holds every row's label, USB keeps its previous thresholds, here that
    class's beta is 1 and the others' 0. With the warm-up, thresholds stay near 0 until many
    rows have reached tau, so a short run pseudo-labels nearly every unlabelled row (data=synth,
    6 epochs: 45 of 1,780 rows had a status at the end, every threshold below 0.01).
  * Distribution alignment is ReMixMatch's, in USB's form (first batch sets p_model, eps 1e-6,
    update then align), on the pseudo-labelling probabilities only (thresholds, labels and the
    learning status all read the aligned q~). The target is uniform over the C outputs: the
    unlabelled class distribution is unknown and the labelled rows cover the seen classes
    only. Momentum 0.99 (horizon about 100 batches, ReMixMatch's mean over the last 128
    batches) instead of USB's 0.999, so that the alignment follows the model within the short
    synthetic schedule too.
  * The learning status counts the unlabelled rows only (FlexMatch's), sized from the
    datamodule's unlabelled split at the first step.
  * Loss weights lambda_p = lambda_e = 1 (ORCA's).

Port to OW-DFA (as ORCA's row): the harness's ResNet + BNNeck encoder, dropout 0.2 before the
head (CPL's drop_rate), and CPL's recipe (Adam 2e-4, 50 epochs, batch 128, alternating
balanced sampler: half of each batch labelled); CPL's OW-DFA table lists NACH, but with which
settings it ran is not known here. Views: the harness's weak (flip + resize) and strong views.
Guards: a batch without labelled rows gets zero L_sup, one without unlabelled rows zero L_u and
no DA / status update.

Under DDP: the DA running mean is updated with every rank's unlabelled rows (summed over
ranks), and the learning status with every rank's confident rows (gathered, rank 0's first; a
row seen twice keeps its last label), so both, and the thresholds read from them, are equal on
every rank after every step; so are the usage counts. Not equal to one process with the global
batch: the nearest-neighbour partners, the entropy of the mean prediction, the mean over each
rank's unlabelled rows of L_u (DDP averages the ranks' gradients with equal weights) and
batch-norm statistics are over each rank's share.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.common_losses import (
    cosine_logits,
    entropy_of_mean,
    masked_cross_entropy,
    open_world_head_rows,
    orca_partners,
    pairwise_bce,
)
from owdfa_bench.distributed import gather_rows, sum_over_ranks
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, detach_terms
from owdfa_bench.models import GlobalFeatureEncoder, PrototypeHead

MAPPINGS = ("convex", "linear")
UNUSED = -1  # the learning-status label of a row never predicted confidently


# ----------------------------------------------------------------------------- learning pace
def learning_status(row_labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, int]:
    """(sigma, unused): rows whose latest confident label is c, for each of the C classes, and
    rows still without one (label -1)."""
    used = row_labels[row_labels >= 0]
    sigma = torch.bincount(used, minlength=num_classes)[:num_classes]
    return sigma, int(row_labels.numel() - used.numel())


def learning_effect(sigma: torch.Tensor, unused: int, warmup: bool = True) -> torch.Tensor:
    """FlexMatch's normalised learning effect beta_c = sigma_c / max(max sigma, unused) with
    warm-up, sigma_c / max sigma without; all zero when the denominator is zero."""
    top = int(sigma.max()) if sigma.numel() else 0
    denominator = max(top, unused) if warmup else top
    if denominator == 0:
        return torch.zeros(sigma.shape, dtype=torch.float32, device=sigma.device)
    return sigma.float() / denominator


def class_thresholds(beta: torch.Tensor, tau: float = 0.95, mapping: str = "convex"):
    """T_c = tau M(beta_c); M(x) = x / (2 - x) (FlexMatch's convex map) or x (linear)."""
    if mapping == "convex":
        return tau * beta / (2.0 - beta)
    if mapping == "linear":
        return tau * beta
    raise ValueError(f"method.model.threshold_mapping={mapping!r}: use one of {MAPPINGS}")


def update_row_labels(
    row_labels: torch.Tensor,
    rows: torch.Tensor,
    pseudo: torch.Tensor,
    confidence: torch.Tensor,
    tau: float = 0.95,
) -> torch.Tensor:
    """A copy of `row_labels` where each row whose confidence reaches tau takes its pseudo-label
    (FlexMatch's `selected_label` update). A row listed twice keeps its last confident label,
    so the result does not depend on the order of a scatter."""
    out = row_labels.clone()
    sure = confidence >= tau
    rows, pseudo = rows[sure], pseudo[sure]
    if rows.numel() == 0:
        return out
    order = torch.sort(rows, stable=True).indices
    sorted_rows = rows[order]
    last = torch.ones_like(sorted_rows, dtype=torch.bool)
    last[:-1] = sorted_rows[1:] != sorted_rows[:-1]
    keep = order[last]
    out[rows[keep]] = pseudo[keep].to(out.dtype)
    return out


# ----------------------------------------------------------------------------- distribution
def update_class_mean(
    running: torch.Tensor, batch_mean: torch.Tensor, momentum: float = 0.99
) -> torch.Tensor:
    """p_model <- m p_model + (1 - m) batch mean; the first batch (p_model all zero) sets it."""
    if float(running.sum()) == 0.0:
        return batch_mean.clone()
    return momentum * running + (1.0 - momentum) * batch_mean


def align_distribution(
    probs: torch.Tensor, running: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """ReMixMatch's distribution alignment (USB's form): normalise(p (target + 1e-6) /
    (p_model + 1e-6)) row by row; `target` defaults to uniform over the C columns."""
    if target is None:
        target = torch.full_like(running, 1.0 / running.numel())
    aligned = probs * (target + 1e-6) / (running + 1e-6)
    return aligned / aligned.sum(dim=1, keepdim=True)


def select_pseudo_labels(
    aligned: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y^, confidence, mask): argmax and max of the aligned probabilities, and whether each
    row's confidence reaches the threshold of its own pseudo-class (`>=`, FlexMatch's)."""
    confidence, pseudo = aligned.max(dim=1)
    return pseudo, confidence, confidence >= thresholds[pseudo]


def consistency_loss(
    strong_logits: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """FixMatch's (1/U) sum_i mask_i CE(z_s,i, y^_i) over the U given rows (masked rows count as
    zero); zero, attached, for U = 0."""
    if strong_logits.shape[0] == 0:
        return strong_logits.sum() * 0.0
    ce = F.cross_entropy(strong_logits, pseudo, reduction="none")
    return (ce * mask.to(ce.dtype)).mean()


# ----------------------------------------------------------------------------- pairwise
def pairwise_term(
    probs_w: torch.Tensor, probs_s: torch.Tensor, partners: torch.Tensor
) -> torch.Tensor:
    """mean_i BCE(<p_w,i, p_s,pi(i)>, 1): each row and its partner in the same class."""
    return pairwise_bce((probs_w * probs_s[partners]).sum(dim=1))


# ----------------------------------------------------------------------------- method
class NACH(OWDFAMethod):
    """NACH (NeurIPS 2022) from its abstract, on the shared runner (no code released)."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        scale: float = 10.0,
        dropout: float = 0.2,
        threshold: float = 0.95,
        threshold_warmup: bool = True,
        threshold_mapping: str = "convex",
        da_momentum: float = 0.99,
        unlabelled_weight: float = 1.0,
        pair_weight: float = 1.0,
        entropy_weight: float = 1.0,
        unknown_k_factor: float = 2.0,
    ):
        super().__init__(problem, optim)
        if threshold_mapping not in MAPPINGS:
            raise ValueError(
                f"method.model.threshold_mapping={threshold_mapping!r}: use one of {MAPPINGS}"
            )
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"method.model.threshold={threshold}: use a probability in (0, 1]")
        if not 0.0 <= da_momentum < 1.0:
            raise ValueError(f"method.model.da_momentum={da_momentum}: use a value in [0, 1)")
        self.scale, self.tau = float(scale), float(threshold)
        self.threshold_warmup, self.threshold_mapping = bool(threshold_warmup), threshold_mapping
        self.da_momentum = float(da_momentum)
        self.unlabelled_weight = float(unlabelled_weight)
        self.pair_weight, self.entropy_weight = float(pair_weight), float(entropy_weight)
        self.encoder = GlobalFeatureEncoder(backbone)
        self.dropout = nn.Dropout(dropout)
        self.head = PrototypeHead(self.encoder.dim, open_world_head_rows(problem, unknown_k_factor))
        c = self.head.active
        # DA's running mean of the unlabelled predictions (zero: not yet set)
        self.register_buffer("da_mean", torch.zeros(c))
        # learning status: latest confident label of each unlabelled row (-1: none yet); sized
        # at the first step from the data, so non-persistent and carried by checkpoints
        self.register_buffer("row_labels", torch.zeros(0, dtype=torch.long), persistent=False)
        self.track_usage(c)

    # ------------------------------------------------------------------ model
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(
            self.dropout(features), self.head.weight[: self.head.active], self.scale
        )

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(x))

    # ------------------------------------------------------------------ learning pace
    def thresholds(self) -> torch.Tensor:
        """The class-wise thresholds T_c of the current learning status."""
        sigma, unused = learning_status(self.row_labels, self.head.active)
        beta = learning_effect(sigma, unused, self.threshold_warmup)
        return class_thresholds(beta, self.tau, self.threshold_mapping)

    def confidence_thresholds(self) -> tuple[float, float]:
        """Mean class-wise threshold of the known and of the novel outputs (the diagnostics
        compare the raw max-softmax with them; NACH compares the aligned one)."""
        t = self.thresholds()
        k = min(self.problem.num_known, t.numel())
        seen = float(t[:k].mean()) if k else 1.0
        novel = float(t[k:].mean()) if t.numel() > k else 1.0
        return (seen, novel)

    def _unlabelled_layout(self) -> tuple[int, int]:
        """(first unlabelled row index, unlabelled rows) of the merged train set."""
        splits = getattr(getattr(self.trainer, "datamodule", None), "splits", None)
        if splits is None:
            raise RuntimeError(
                "NACH's learning status needs the datamodule's splits (one label per "
                "unlabelled training row)"
            )
        return len(splits.labelled), len(splits.unlabelled)

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        first_unlabelled, num_unlabelled = self._unlabelled_layout()
        if self.row_labels.numel() != num_unlabelled:  # first step of a fresh run
            self.row_labels = torch.full(
                (num_unlabelled,), UNUSED, dtype=torch.long, device=self.device
            )
        f_w = self.encoder(batch.views[0])
        f_s = self.encoder(batch.views[1])
        z_w, z_s = self.logits(f_w).float(), self.logits(f_s).float()
        p_w, p_s = F.softmax(z_w, dim=1), F.softmax(z_s, dim=1)
        unl = ~batch.labelled

        with torch.no_grad():
            q = p_w[unl].detach()
            # DA: the running mean over every rank's unlabelled rows, then align
            sums = sum_over_ranks(torch.cat([q.sum(dim=0), q.new_tensor([q.shape[0]])]))
            if float(sums[-1]) > 0:
                self.da_mean.copy_(
                    update_class_mean(self.da_mean, sums[:-1] / sums[-1], self.da_momentum)
                )
            aligned = align_distribution(q, self.da_mean)
            thresholds = self.thresholds()  # before this batch updates the status
            pseudo, confidence, mask = select_pseudo_labels(aligned, thresholds)
            rows = batch.index[unl].to(self.row_labels.device) - first_unlabelled
            self.row_labels = update_row_labels(
                self.row_labels,
                gather_rows(rows),
                gather_rows(pseudo.to(self.row_labels.device)),
                gather_rows(confidence),
                self.tau,
            )

        sup = masked_cross_entropy(z_w, batch.y, batch.labelled)
        unsup = consistency_loss(z_s[unl], pseudo, mask)
        partners = orca_partners(f_w, batch.y, batch.labelled)
        pair = pairwise_term(p_w, p_s, partners)
        entropy = entropy_of_mean(p_w)
        loss = (
            sup
            + self.unlabelled_weight * unsup
            + self.pair_weight * pair
            - self.entropy_weight * entropy
        )
        self.count_usage(z_w)
        k = min(self.problem.num_known, thresholds.numel())
        one = thresholds.new_ones(())  # an empty group (k=unknown with k.estimate = K_known)
        out = detach_terms(
            {"loss": loss, "sup": sup, "unsup": unsup, "pair": pair, "entropy": entropy}
        )
        out.update(
            mask_rate=mask.float().mean() if mask.numel() else one * 0.0,
            thr_seen=thresholds[:k].mean() if k else one,
            thr_novel=thresholds[k:].mean() if thresholds.numel() > k else one,
        )
        return out
