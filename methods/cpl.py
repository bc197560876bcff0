"""CPL: Contrastive Pseudo Learning for open-world deepfake attribution.

Paper: Z. Sun, S. Chen, T. Yao, B. Yin, R. Yi, S. Ding, L. Ma, "Contrastive Pseudo Learning for
Open-World DeepFake Attribution", ICCV 2023.
Official code: github.com/TencentYoutuResearch/OpenWorld-DeepFakeAttribution
(`owdfa/algorithm/owssl/CPL.py`, `owdfa/encoder/base_net.py: CPLClassifier`,
`configs/train_cpl.yaml`). What the port keeps and changes of the reference is summarised in
`docs/reference-behaviour.md`.

Model: backbone feature map -> global feature (custom pool to 1x1, BNNeck) and 3x3 part
features (the reference's overlapping custom pooling, one frozen-bias BN per part) ->
dropout -> bias-free prototype head on the global feature. Loss on a batch with the labelled
rows first: margin CE (+0.2 on the target logit) + 0.5 Global-Local Voting (pair BCE) + 0.5
confidence-weighted Gumbel soft pseudo-labels - 1.0 entropy of the mean prediction.

Kept reference behaviour: the negative margin (`MarginLoss(m=-0.2)` raises the target logit, so
the CE gets easier), the non-detached confidence factor and stochastic Gumbel targets of CSP,
model selection on the test set (`selection_metric = "all_nmi"`, used only with
`selection=best_on_test`), and the balanced alternating sampler with the reference's bookkeeping
(`sampler: alternating`, `owdfa_bench/data/samplers.py`).

Deliberate deviations from the reference:
  * GLV works for any batch size: the reference returns a hard-coded CUDA zero
    for a batch shorter than `batch_size` (the last one of an epoch) and assumes CUDA; here the
    pair term is computed on every batch. With one row only, that row is its own partner.
  * The batch is reordered labelled-first inside the step, as the reference's `SSLModel` does;
    the sampler's interleaved order is not otherwise used. A batch without labelled rows (only
    possible with `sampler=weighted`) gets zero CE; one without unlabelled rows zero CSP.
  * The labelled partner is drawn with torch's RNG (seeded by the run seed) instead of the
    global NumPy RNG; the distribution is the same (uniform over the other same-class rows).
  * `MarginLoss`'s uint8 mask in `torch.where` is a one-hot addition here: identical values.
  * The part BNs' weights are frozen at one. The parts only feed the detached pair selection,
    so in the reference those weights never receive a gradient and never change either (they
    were trainable but unused, hence DDP's `find_unused_parameters`). Values are unchanged.
  * Cosine similarities use `F.normalize` (eps 1e-12) instead of a raw division, so an all-zero
    feature gives similarity 0 instead of NaN; identical otherwise.
  * The GLV log is clamped at -100 as PyTorch's BCE does, written as `-log` so a pair
    similarity rounded a hair above 1 cannot make BCE raise.
  * Small feature maps: when the map is smaller than the 3x3 part grid (e.g. 64 px synthetic
    images through resnet18 give a 2x2 map), it is first resized bilinearly (align_corners) to
    the grid, so corner parts equal the corner cells and middle parts average their
    neighbours, like the reference's overlapping windows. Maps of at least 3x3 (the paper
    recipe: 256 px, resnet50 -> 8x8) take the reference's pooling unchanged.
  * The unused timm ImageNet `fc` of the reference model is not built (no effect on outputs).
  * Training view: CPL has one train transform (albumentations: flip, RandomResizedCrop(292,
    scale 0.5-1) with p 0.2, RandomBrightnessContrast(0.2, 0.2) with p 0.2, resize to 256).
    The closest shared view is our "strong" one (CAL's: flip, the same p-0.2 crop, else the
    shorter side resized to 292, brightness/contrast jitter 0.4 with p 0.2, resize), used as
    the single view. Differences: jitter range 0.4 instead of 0.2, and torchvision/PIL instead
    of albumentations/cv2 resizing.
  * Under `k=unknown` the reference has no rule (it always uses the oracle K). The head then
    has `k.estimate` rows if given, else `unknown_k_factor` x known rows (CAL's starting size);
    `k_estimated()` reports that head size, not a data-driven estimate.

Under DDP (owdfa_bench/distributed.py): the sampler's draws are shared (every rank draws
the same stream and keeps its pairs). Not equal to one process with the global batch: GLV's
pairs and CSP's entropy of the mean prediction are over each rank's share of the batch, the
labelled partner is drawn within it, and batch-norm statistics are the share's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.common_losses import (
    entropy_of_mean,
    labelled_partners,
    margin_cross_entropy,
    open_world_head_rows,
    pairwise_bce,
)
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch
from owdfa_bench.models import BNNeck, PrototypeHead, build_backbone, custom_avg_pool2d

# ----------------------------------------------------------------------------- model parts


def part_features(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, grid*grid] cells of the reference's overlapping custom pooling.

    A map smaller than the grid along an axis is first resized bilinearly (align_corners) to
    the grid along that axis (deviation, see the module docstring).
    """
    h, w = fmap.shape[-2:]
    if h < grid or w < grid:
        fmap = F.interpolate(
            fmap, size=(max(h, grid), max(w, grid)), mode="bilinear", align_corners=True
        )
    return custom_avg_pool2d(fmap, grid).flatten(2)


class PartNecks(nn.Module):
    """One BNNeck per part cell (the reference's `bnneck0..8`), weights frozen at one."""

    def __init__(self, dim: int, num_parts: int):
        super().__init__()
        self.necks = nn.ModuleList(BNNeck(dim) for _ in range(num_parts))
        for neck in self.necks:
            neck.weight.requires_grad_(False)  # never reached by a gradient (module docstring)

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        return torch.stack([neck(parts[:, :, i]) for i, neck in enumerate(self.necks)], dim=-1)


class CPLHead(nn.Module):
    """The CPL classifier on a final feature map: global BNNeck, part BNs, dropout, fc2."""

    def __init__(self, dim: int, num_rows: int, part_grid: int = 3, dropout: float = 0.2):
        super().__init__()
        self.part_grid = part_grid
        self.neck = BNNeck(dim)
        self.part_necks = PartNecks(dim, part_grid * part_grid)
        self.dropout = nn.Dropout(dropout)
        self.head = PrototypeHead(dim, num_rows)  # bias-free, N(0, 0.001^2)

    def global_feature(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.neck(custom_avg_pool2d(fmap, 1).flatten(1))

    def logits(self, f_g: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(f_g))

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [B, C], global feature [B, D], part features [B, D, grid*grid]."""
        f_g = self.global_feature(fmap)
        f_p = self.part_necks(part_features(fmap, self.part_grid))
        return self.logits(f_g), f_g, f_p


# ----------------------------------------------------------------------------- losses


def labelled_first(labelled: torch.Tensor) -> torch.Tensor:
    """Row order that puts the labelled rows first, each group in its batch order."""
    return torch.cat([torch.nonzero(labelled).flatten(), torch.nonzero(~labelled).flatten()])


def local_similarity(parts: torch.Tensor) -> torch.Tensor:
    """S[i, j] = sum_p w[i, p] cos(parts[i, :, p], parts[j, :, p]) for parts [B, D, P].

    w[i, p] = ||parts[i, :, p]|| / sqrt(sum_q ||parts[i, :, q]||^2): weighted by the row sample,
    so S is not symmetric.
    """
    unit = F.normalize(parts, dim=1)
    cosine = torch.einsum("idp,jdp->ijp", unit, unit)
    weights = F.normalize(parts.norm(dim=1), dim=1)  # [B, P]
    return torch.einsum("ijp,ip->ij", cosine, weights)


def global_similarity(features: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(features, dim=1)
    return unit @ unit.t()


def global_neighbours(g_sim: torch.Tensor, num_labelled: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (n0, n1) of the two largest entries of each unlabelled row of G.

    n0 is normally the row itself and n1 its nearest neighbour. With one row only, n1 = n0.
    """
    rows = g_sim[num_labelled:]
    top = rows.topk(min(2, g_sim.shape[1]), dim=1).indices
    return top[:, 0], top[:, -1]


def second_largest(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2nd largest value along `dim` (the largest when there is only one)."""
    return x.topk(min(2, x.shape[dim]), dim=dim).values.select(dim, -1)


def voting_pass(sim: torch.Tensor, nearest: torch.Tensor, num_labelled: int) -> torch.Tensor:
    """Filter of one similarity S: 2nd largest of row S[u, :] >= 2nd largest of column S[:, n1]."""
    row_value = second_largest(sim[num_labelled:], dim=1)
    column_value = second_largest(sim[:, nearest], dim=0)
    return (row_value - column_value) >= 0


def glv_pairs(
    targets: torch.Tensor,
    f_g: torch.Tensor,
    f_p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-Local Voting partners of every row and the pass mask of the unlabelled rows.

    Batch layout: rows 0..L-1 labelled (`targets`, length L), rows L..B-1 unlabelled. Features
    are detached. Unlabelled row u takes its global nearest neighbour n1(u) when the local
    similarity vote passes, otherwise n0(u) (normally itself).
    Returns (partner index [B] long, mask [U] float).
    """
    num_labelled = targets.shape[0]
    f_g, f_p = f_g.detach(), f_p.detach()
    n0, n1 = global_neighbours(global_similarity(f_g), num_labelled)
    passed = voting_pass(local_similarity(f_p), n1, num_labelled)
    unlabelled = torch.where(passed, n1, n0)
    partners = torch.cat([labelled_partners(targets, generator), unlabelled])
    return partners, passed.float()


def sample_gumbel(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard Gumbel noise, -log(Exp(1)), as `F.gumbel_softmax` draws it."""
    exp = torch.empty(shape).exponential_(generator=generator)
    return -exp.log().to(device)


def soft_pseudo_label_loss(
    logits_u: torch.Tensor, gumbel: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Confidence-weighted Gumbel soft pseudo-label CE of the unlabelled rows (CPL's CSP).

    s = softmax(sg(z) + g) (Gumbel softmax, tau 1), t = argmax s; each row's soft CE
    -sum_c s_c log p_c is weighted by p[t] (not detached) and by `mask` (CPL's vote; MPSL's FCP
    passes None), then averaged over all unlabelled rows, masked ones included.
    """
    if logits_u.shape[0] == 0:
        return logits_u.sum() * 0.0
    soft = torch.softmax(logits_u.detach() + gumbel, dim=1)
    target = soft.argmax(dim=1)
    log_probs = F.log_softmax(logits_u, dim=1)
    confidence = log_probs.exp().gather(1, target[:, None]).squeeze(1)
    weight = confidence if mask is None else confidence * mask
    return (-(soft * log_probs).sum(dim=1) * weight).mean()


def cpl_total(
    ce: torch.Tensor,
    pair: torch.Tensor,
    pseudo: torch.Tensor,
    entropy: torch.Tensor,
    eta_pair: float = 0.5,
    eta_pseudo: float = 0.5,
    eta_entropy: float = 1.0,
) -> torch.Tensor:
    """L = CE + eta1 * pair + eta2 * pseudo - eta3 * H(p_bar) (CPL: 0.5 / 0.5 / 1.0)."""
    return ce + eta_pair * pair + eta_pseudo * pseudo - eta_entropy * entropy


def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Detached mean of a (possibly empty) mask, for logging."""
    return x.detach().mean() if x.numel() else torch.zeros((), device=x.device)


def pair_and_pseudo_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    partners: torch.Tensor,
    gumbel: torch.Tensor,
    pseudo_mask: torch.Tensor | None,
    margin: float = 0.2,
    etas: tuple[float, float, float] = (0.5, 0.5, 1.0),
    names: tuple[str, str] = ("glv", "csp"),
) -> dict[str, torch.Tensor]:
    """{"loss", "ce", pair name, pseudo name, "entropy"} of a labelled-first batch: the terms
    CPL (GLV + CSP) and MPSL (MPV + FCP) share. `partners` is each row's pair partner and
    `pseudo_mask` the unlabelled rows the pseudo-label term keeps (None: all)."""
    num_labelled = targets.shape[0]
    probs = torch.softmax(logits, dim=1)
    ce = margin_cross_entropy(logits[:num_labelled], targets, margin)
    pair = pairwise_bce((probs * probs[partners]).sum(dim=1))  # BCE(<p_i, p_partner(i)>, 1)
    pseudo = soft_pseudo_label_loss(logits[num_labelled:], gumbel, pseudo_mask)
    entropy = entropy_of_mean(probs)
    total = cpl_total(ce, pair, pseudo, entropy, *etas)
    return {"loss": total, "ce": ce, names[0]: pair, names[1]: pseudo, "entropy": entropy}


def cpl_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    f_g: torch.Tensor,
    f_p: torch.Tensor,
    gumbel: torch.Tensor,
    margin: float = 0.2,
    eta_pair: float = 0.5,
    eta_pseudo: float = 0.5,
    eta_entropy: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Every CPL term of a labelled-first batch (`targets` = labels of rows 0..L-1).

    `gumbel` is the Gumbel noise of the unlabelled rows [U, C].
    """
    partners, mask = glv_pairs(targets, f_g, f_p, generator)
    out = pair_and_pseudo_losses(
        logits, targets, partners, gumbel, mask, margin, (eta_pair, eta_pseudo, eta_entropy)
    )
    out["glv_pass_rate"] = mean_or_zero(mask)
    return out


# ----------------------------------------------------------------------------- the method


class CPL(OWDFAMethod):
    """CPL (TencentYoutuResearch/OpenWorld-DeepFakeAttribution) on the shared runner."""

    train_views = ("strong",)  # single view; "strong" is the closest to CPL's train transform
    selection_metric = "all_nmi"  # the reference checkpoints on best test All NMI

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        dropout: float = 0.2,
        margin: float = 0.2,
        eta_glv: float = 0.5,
        eta_csp: float = 0.5,
        eta_entropy: float = 1.0,
        part_grid: int = 3,
        unknown_k_factor: int = 10,
    ):
        super().__init__(problem, optim)
        self.margin = float(margin)
        self.eta_glv, self.eta_csp = float(eta_glv), float(eta_csp)
        self.eta_entropy = float(eta_entropy)
        self.num_rows = open_world_head_rows(problem, unknown_k_factor)
        self.backbone = self.build_feature_extractor(dict(backbone or {}))
        self.classifier = self.build_classifier(self.final_channels(), part_grid, dropout)

    # Overridden by MPSL (multi-scale parts and wavelet bands).
    def build_classifier(self, dim: int, part_grid: int, dropout: float) -> nn.Module:
        return CPLHead(dim, self.num_rows, part_grid, dropout)

    # Overridden by CDAL, whose backbone also returns layer 1.
    def build_feature_extractor(self, backbone: dict[str, Any]) -> nn.Module:
        return build_backbone(**backbone)

    def final_channels(self) -> int:
        return self.backbone.num_features

    def final_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def k_estimated(self) -> int | None:
        return None if self.problem.k_mode == "known" else self.num_rows

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(self.classifier.global_feature(self.final_map(x)))

    def labelled_first_batch(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels of the labelled rows) with the labelled rows first."""
        order = labelled_first(batch.labelled)
        num_labelled = int(batch.labelled.sum())
        return batch.views[0][order], batch.y[order][:num_labelled]

    def cpl_terms(self, fmap: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, f_g, f_p = self.classifier(fmap)
        num_unlabelled = logits.shape[0] - targets.shape[0]
        gumbel = sample_gumbel((num_unlabelled, logits.shape[1]), device=logits.device)
        return cpl_losses(
            logits,
            targets,
            f_g,
            f_p,
            gumbel,
            self.margin,
            self.eta_glv,
            self.eta_csp,
            self.eta_entropy,
        )

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        images, targets = self.labelled_first_batch(batch)
        return self.cpl_terms(self.final_map(images), targets)
