"""Loss terms and small heads shared by the GCD-family baselines (ORCA, SimGCD, GCD, RankStats).

Pure functions on tensors, so each is tested on hand-made inputs. What each computes follows
methods.md Part B; the reference it mirrors is named in each docstring.
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


def pairwise_bce(similarity: torch.Tensor, same: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Pairwise binary cross-entropy on inner products of probability vectors.

    similarity: <p_i, q_j> per pair (any shape); same: bool of the same shape (pseudo label).
    Loss per pair: -log(s + eps) if same else -log(1 - s + eps), the log clamped at -100 as in
    `nn.BCELoss`, then the mean. ORCA uses eps 0 with every pair positive (its `BCELoss` against
    ones); RankStats' `BCE` uses eps 1e-7 with +-1 targets.
    """
    target_prob = torch.where(same, similarity, 1.0 - similarity)
    return -torch.log(target_prob + eps).clamp_min(-100.0).mean()
