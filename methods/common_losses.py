"""Loss terms, small heads and head-size rules shared by more than one method.

Pure functions on tensors, so each is tested on hand-made inputs; the reference each mirrors is
named in its docstring. A term two methods use lives here, so a method never imports another
method's module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 1.0):
    """`scale * cos(features_i, prototype_c)`: [B, D] x [C, D] -> [B, C].

    SimGCD's weight-normalised last layer with its gain fixed at 1 on the L2-normalised feature
    (scale 1), and ORCA's `NormedLinear` (scale 10), are both this map.
    """
    return scale * F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).t()


def projection_mlp(in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3):
    """The DINO-style projection MLP of GCD and SimGCD: Linear-GELU blocks, no norm layers.

    Weights are truncated-normal with std 0.02 and biases zero, as in their `DINOHead`.
    """
    if num_layers < 1:
        raise ValueError(f"projection head needs at least one layer, got num_layers={num_layers}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(nn.GELU())
    mlp = nn.Sequential(*layers)
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return mlp


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """Mean CE over the rows in `mask`; an exact zero (still in the graph) when no row is in it.

    A weighted sampler can draw a batch without labelled rows; the references would get NaN.
    """
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask], targets[mask])


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Unsupervised InfoNCE (SimCLR) over two views, as GCD's/SimGCD's `info_nce_logits` + CE.

    Rows are L2-normalised; each of the 2B anchors scores every other row by cosine / temperature,
    and its positive is the other view of the same image. Mean over the 2B anchors.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"InfoNCE needs two views of equal shape, got {z1.shape} and {z2.shape}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, positive)


def supcon_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.), `contrast_mode="all"`, two views.

    z1, z2: [L, D] projections of the labelled rows (normalised here). Every one of the 2L rows
    is an anchor; its positives are all other rows with the same label (its own other view
    included). Loss = -(T / T_base) * mean over anchors of the mean log-probability of its
    positives. Zero (in the graph) when there is no labelled row.
    """
    n = labels.shape[0]
    if n == 0:
        return (z1.sum() + z2.sum()) * 0.0
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    y = torch.cat([labels, labels])
    logits = z @ z.t() / temperature
    not_self = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    positives = (y[:, None] == y[None, :]) & not_self
    logits = logits.masked_fill(~not_self, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~not_self, 0.0)  # -inf * 0 would be NaN
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def entropy_of_mean(probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """H(p_bar) with p_bar the mean of the rows of `probs` (natural log, p clamped at eps).

    ORCA's `entropy(mean(prob))` (clamp 1e-8); SimGCD's me-max term is log C - this value.
    """
    p = probs.mean(dim=0).clamp_min(eps)
    return -(p * p.log()).sum()


def pairwise_bce(
    similarity: torch.Tensor, same: torch.Tensor | None = None, eps: float = 0.0
) -> torch.Tensor:
    """Pairwise binary cross-entropy on inner products of probability vectors.

    similarity: <p_i, q_j> per pair (any shape); same: bool of the same shape (pseudo label),
    None when every pair is positive. Loss per pair: -log(s + eps) if same else
    -log(1 - s + eps), the log clamped at -100 as in `nn.BCELoss`, then the mean. ORCA, CPL's
    GLV and MPSL's MPV use eps 0 with every pair positive (a `BCELoss` against ones);
    RankStats' `BCE` uses eps 1e-7 with +-1 targets.
    """
    target_prob = similarity if same is None else torch.where(same, similarity, 1.0 - similarity)
    return -torch.log(target_prob + eps).clamp_min(-100.0).mean()


def margin_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """CE after adding `margin` to each row's target logit (CPL's MarginLoss(m=-0.2); ORCA's
    adaptive margin passes its scaled value).

    Zero (still attached to the graph) when there is no row.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    shifted = logits + margin * F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(shifted, targets)


def labelled_partners(
    targets: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each labelled row a uniformly random other row of its class; itself if it is alone.

    `targets` are the labels of the labelled rows (rows 0..L-1 of the batch). The pairing of
    CPL's GLV and MPSL's MPV, and ORCA's labelled pairs.
    """
    n = targets.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=targets.device)
    same = targets[:, None] == targets[None, :]
    others = same & ~torch.eye(n, dtype=torch.bool, device=targets.device)
    # The argmax of i.i.d. uniform scores over the allowed rows is a uniform pick among them.
    scores = torch.rand(n, n, generator=generator).to(targets.device)
    scores = scores.masked_fill(~others, -1.0)
    pick = scores.argmax(dim=1)
    return torch.where(others.any(dim=1), pick, torch.arange(n, device=targets.device))


def orca_partners(
    features: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Partner index of every row: same-class labelled row or cosine nearest neighbour; ORCA's
    pairwise pseudo-labels (snap-stanford/orca @ 5f33afd), also NACH's pairwise term.

    Labelled rows: a uniformly random other labelled row with the same label (itself if alone).
    Unlabelled rows: the most cosine-similar *other* row of the whole batch (detached features,
    compared in float32).
    """
    b = y.shape[0]
    unit = F.normalize(features.detach().float(), dim=1)
    sim = (unit @ unit.t()).masked_fill(
        torch.eye(b, dtype=torch.bool, device=unit.device), float("-inf")
    )
    partners = sim.argmax(dim=1) if b > 1 else torch.zeros(1, dtype=torch.long, device=unit.device)
    lab_idx = torch.nonzero(labelled).flatten()
    if lab_idx.numel():
        partners[lab_idx] = lab_idx[labelled_partners(y[lab_idx], generator)]
    return partners


# ----------------------------------------------------------------------------- head sizes
def open_world_head_rows(problem, unknown_k_factor: float = 2.0) -> int:
    """Head size of the open-world methods without an estimator of their own (CPL, CDAL, MPSL,
    ORCA, RankStats, OwMatch, LPS).

    k=known: the true total K, as their references assume. k=unknown: the user's `k.estimate`
    when given, else `unknown_k_factor` x K_known (a rule of the harness; none of the references
    has an estimator), at least one row more than the known classes. It never reads the true
    total under k=unknown.
    """
    if problem.k_mode == "known":
        return int(problem.num_classes)
    if problem.k_estimate is not None:
        return int(problem.k_estimate)
    return max(problem.num_known + 1, int(round(float(unknown_k_factor) * problem.num_known)))


# ----------------------------------------------------------------------------- SimGCD family
# SimGCD's terms (github.com/CVMI-Lab/SimGCD @ f843f27, `model.py`: `DistillLoss`,
# `get_params_groups`; `train.py`: me-max), for SimGCD and the ports built on it (LegoGCD,
# ProtoGCD, PAL-GCD).
def simgcd_head_rows(problem, unknown_k_factor: float = 2.0) -> int:
    """Prototype count of the SimGCD family: true K (k=known); under k=unknown the user's
    `k.estimate`, else `unknown_k_factor` x the true total (SimGCD's appendix over-estimate,
    which uses the truth as an upper bound)."""
    if problem.k_mode == "known":
        return int(problem.num_classes)
    if problem.k_estimate is not None:
        return int(problem.k_estimate)
    return max(problem.num_known + 1, int(round(unknown_k_factor * problem.num_classes)))


def teacher_temperature(epoch: int, warmup_epochs: int, start: float = 0.07, end: float = 0.04):
    """SimGCD's teacher schedule: `np.linspace(start, end, warmup_epochs)[epoch]`, then `end`."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(end)
    if warmup_epochs == 1:
        return float(start)
    return float(start + (end - start) * epoch / (warmup_epochs - 1))


def self_distillation_loss(
    logits_v1: torch.Tensor,
    logits_v2: torch.Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """SimGCD's `DistillLoss` for two views: mean of the two cross-view terms -sum q log p, with
    the student log_softmax(l / student_temp) and the detached teacher softmax(l' / teacher_temp)
    of the other view."""
    terms = []
    for student, teacher in ((logits_v1, logits_v2), (logits_v2, logits_v1)):
        q = F.softmax(teacher.detach() / teacher_temp, dim=1)
        terms.append(-(q * F.log_softmax(student / student_temp, dim=1)).sum(1).mean())
    return (terms[0] + terms[1]) / 2


def mean_entropy_gap(probs: torch.Tensor) -> torch.Tensor:
    """SimGCD's me-max term: log C - H(mean of the rows); >= 0, zero for a uniform mean."""
    import math

    return math.log(probs.shape[1]) - entropy_of_mean(probs)


def decay_groups(module: nn.Module) -> list[dict]:
    """SimGCD's `get_params_groups`: no weight decay on biases and 1-d (norm) parameters;
    frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
