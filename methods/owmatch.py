"""OwMatch: conditional self-labelling and open-world hierarchical thresholds.

Paper: S. Niu, L. Lin, J. Huang, C. Wang, "OwMatch: Conditional Self-Labeling with Consistency
for Open-World Semi-Supervised Learning", NeurIPS 2024 (arXiv 2411.01833).
Official code: github.com/niusj03/OwMatch @ 09b0658: `owmatch.py` (`train`, l.86-199; model and
optimiser, l.311-368), `utils.py` (`TransformTwice`, `LogitQueue`, `sinkhorn`,
`OpenFreeThreshold`, `AdaptiveThreshold`), `models/resnet_s.py` (`NormedLinear`) and
`fold_sh/*.sh` (run settings). Its README says the code was re-written after the original was
lost; the EMA helper comes from TRSSL (`utils/utils.py`, `WeightEMA`).

What it computes, per batch (views: x1 and x2 two weak draws, xs the strong view, and n_crop
multi-crops cut from x1):
  model    backbone -> 1x1 pool -> BNNeck -> f -> cosine head x 10 (the reference's
           `NormedLinear`, weights drawn uniform(-1, 1)); z = 10 cos(f, w_c), p = softmax(z).
  codes    sg(z2), with each labelled row's true-class logit set to 10 (the largest a 10 cos
           logit can be: "conditional" self-labelling), is pushed into a FIFO logit queue of
           about `queue_len` rows; Sinkhorn-Knopp runs on the whole queue (Q = exp(z/10/eps),
           eps 0.05, 10 iterations, uniform class marginal, each column normalised to 1 at the
           end) and the batch's own columns are its codes Q2. With n_crop = 0 a second queue of
           z1 gives Q1.
  L_clu    swapped prediction: [CE(Q2, p1) + sum_m CE(Q2, p_mc_m)] / (n_crop + 1), or
           (CE(Q2, p1) + CE(Q1, p2)) / 2 when n_crop = 0; CE(Q, p) = -mean_i sum_k Q_ik log p_ik.
  L_conf   FixMatch consistency over all rows, labelled rows with their pseudo-label:
           mean_i 1[max p2_i > t(y^_i)] CE(zs_i, y^_i), y^ = argmax p2. The open-world
           hierarchical thresholds keep two FreeMatch-style trackers, one for the seen columns
           (0..K_k-1) and one for the novel ones; a row belongs to the group of its argmax:
             tau_G <- a tau_G + (1 - a) mean max p2,   mu_G <- a mu_G + (1 - a) mean p2[:, G],
             t_c = max(floor, tau_G mu_G,c / max mu_G),  a = 0.99, start 0.5, floor 0.3,
           read before this batch updates them.
  L_sup    CE(z1, y) on labelled rows.
  total    L_conf + L_sup + L_clu (all weights 1).
  predict  argmax of the EMA model's logits: an EMA (0.999) of every float entry of the
           student's state (weights and BN running statistics), as TRSSL's `WeightEMA`.

K: known -> the true total K (the reference assumes it known; it has no estimator). Unknown ->
`k.estimate` if given, else `unknown_k_factor` x K_known outputs (default 2, the harness rule of
the ORCA family); the novel threshold group is every output from K_known on, and the uniform
Sinkhorn marginal spreads mass over all of them. `k_estimated()` is the number of outputs used:
distinct argmax outputs of the student over the training rows (view x1) of the current epoch.

Deliberate deviations from the reference:
  * Backbone: the OW-DFA ResNet (timm) + BNNeck, head on the BNNeck feature, instead of the CIFAR
    ResNet-18 from ORCA's SimCLR checkpoint (the harness's common backbone). The default recipe
    is the shared CAL Adam recipe over the whole network; `method.recipe=original` is the
    reference's SGD 0.1 / cosine recipe (conf/method/owmatch.yaml).
  * Views: x1, x2 are two independent draws of the harness's weak view (flip + resize), xs its
    strong view, instead of the CIFAR RandomCrop/flip and RandAugment views. The harness weak
    view only flips, so x1 and x2 are identical for about half the rows.
  * Multi-crops are cut in the method from the first weak view tensor (the data layer has no
    multi-crop view): RandomResizedCrop with scale (0.3, 0.75) to `crop_ratio` = 18/32 of the
    image side (the reference's 18 px crops of 32 px CIFAR images; 144 px at 256), flip, and the
    colour distortion of strength s = 0.5 (jitter with p 0.8, solarise p 0.2, equalise p 0.2;
    the jitter strengths (0.8s, 0.8s, 0.8s, 0.2s) are SimCLR's colour distortion, not checked
    against `utils.py`). The jitter runs in a fixed order (brightness, contrast, saturation,
    hue) and shifts hue by a YIQ rotation, so it is vectorised over the batch. n_crop = 2 (the
    reference: 4 on CIFAR, 2 on Tiny-ImageNet), to limit cost at 256 px.
  * One forward pass per view (own BN batch statistics); x2 runs without gradient when n_crop > 0
    because no loss then differentiates its logits.
  * Batches come from the harness sampler (weighted: about half labelled) instead of the
    reference's proportional labelled share; an epoch is one pass over all training rows.
  * Guards: a batch without labelled rows gets zero L_sup; a threshold group with no row in the
    batch keeps its tracker unchanged; Sinkhorn raises on NaN (the reference enters `pdb`) and
    subtracts the largest scaled logit before the exponential (same codes, no overflow).
  * The EMA helper's extra decay of the student's state (x (1 - 2e-5) after each step) is an
    optimiser effect: `ema_student_decay` is 2e-5 in the original recipe and 0 in the fair one.
  * The threshold start is always 0.5 (the scripts' `--adathres-init 0.5`; the argparse default
    -1 would make every threshold the 0.3 floor). The `--adjust-prior` flag is a no-op in the
    reference and has no counterpart here: the class marginal is uniform.
  * The logit queues are not saved in checkpoints: after a resume they refill from empty.

Under DDP: the Sinkhorn queues receive every rank's rows (rank 0's first) at every step, so
they are equal on every rank and each rank takes the codes of its own rows; the hierarchical
threshold trackers and the usage counts are updated with every rank's rows. Not equal to one
process with the global batch: batch-norm statistics (and so the EMA model's running
statistics, copied from the student's) are over each rank's share.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import equalize

from methods.common_losses import cosine_logits, masked_cross_entropy, open_world_head_rows
from owdfa_bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from owdfa_bench.distributed import gather_rows, gather_rows_and_start
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch
from owdfa_bench.models import GlobalFeatureEncoder, PrototypeHead, ema_update, train_only

# ----------------------------------------------------------------------------- self-labelling


def pin_labelled_logits(
    logits: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor, value: float = 10.0
) -> torch.Tensor:
    """Detached copy of `logits` with each labelled row's true-class entry set to `value`.

    The reference's "hard logit" (`owmatch.py` l.118-131): 10 is the largest a 10 cos logit can
    be, so Sinkhorn-Knopp sends a labelled row's code to its own class.
    """
    out = logits.detach().clone()
    rows = torch.nonzero(labelled).flatten()
    if rows.numel():
        out[rows, y[rows]] = value
    return out


def push_queue(queue: torch.Tensor, rows: torch.Tensor, queue_len: int) -> torch.Tensor:
    """FIFO of logit rows as the reference's `LogitQueue`: the batch is appended; once the queue
    held at least `queue_len` rows before this batch, its oldest `len(rows)` rows are dropped.

    So it grows by whole batches until it first reaches `queue_len` (it may overshoot it) and
    keeps that length afterwards; the batch's own rows are always the last ones.
    """
    out = torch.cat([queue.to(rows.dtype), rows])
    if out.shape[0] - rows.shape[0] >= queue_len:
        out = out[rows.shape[0] :]
    return out


def sinkhorn_codes(
    logits: torch.Tensor, scale: float = 10.0, epsilon: float = 0.05, iters: int = 10
) -> torch.Tensor:
    """Sinkhorn-Knopp codes [N, C] of N logit rows with a uniform class marginal (`utils.py`
    `sinkhorn`): Q = exp(z / scale / eps)^T normalised to total mass 1; `iters` times the class
    rows are scaled to sum 1/C and the sample columns to 1/N; finally each column sums to 1.

    Computed without gradient, in at least float32. The largest exponent is subtracted first,
    which the first normalisation cancels exactly.
    """
    z = logits.detach()
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    scores = z / scale / epsilon
    q = torch.exp(scores - scores.max()).t()  # [C, N]
    q = q / q.sum()
    c, n = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / c
        q = q / q.sum(dim=0, keepdim=True) / n
    q = q / q.sum(dim=0, keepdim=True)
    if not bool(torch.isfinite(q).all()):
        raise FloatingPointError(
            "OwMatch Sinkhorn-Knopp produced non-finite codes; check the logits (10 cos) and "
            "method.model.sk_epsilon"
        )
    return q.t()


def soft_cross_entropy(codes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """CE(Q, p) = -mean_i sum_k Q_ik log softmax(z)_ik (targets `codes` are constants)."""
    return -(codes.detach() * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clustering_loss(
    codes2: torch.Tensor,
    logits1: torch.Tensor,
    crop_logits: list[torch.Tensor] | tuple[torch.Tensor, ...] = (),
    codes1: torch.Tensor | None = None,
    logits2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swapped prediction (`owmatch.py` l.175-180).

    With multi-crops: [CE(Q2, p1) + sum_m CE(Q2, p_mc_m)] / (n_crop + 1): the view-2 codes
    supervise view 1 and every crop. Without: (CE(Q2, p1) + CE(Q1, p2)) / 2.
    """
    if len(crop_logits):
        terms = [soft_cross_entropy(codes2, logits1)]
        terms += [soft_cross_entropy(codes2, z) for z in crop_logits]
        return torch.stack(terms).sum() / len(terms)
    if codes1 is None or logits2 is None:
        raise ValueError("without multi-crops the swapped prediction needs codes1 and logits2")
    return (soft_cross_entropy(codes2, logits1) + soft_cross_entropy(codes1, logits2)) / 2


# ----------------------------------------------------------------------------- thresholds


def group_thresholds(tau: torch.Tensor, mu: torch.Tensor, floor: float = 0.3) -> torch.Tensor:
    """Per-class thresholds of one group: t_c = max(floor, tau * mu_c / max_c' mu_c')."""
    if mu.numel() == 0:
        return mu.clone()
    return torch.clamp(tau * mu / mu.max(), min=floor)


def class_thresholds(
    tau: torch.Tensor,
    mu_seen: torch.Tensor,
    mu_novel: torch.Tensor,
    floor: float = 0.3,
) -> torch.Tensor:
    """Thresholds [C] of every output: the seen group's for 0..K_k-1, the novel group's after."""
    return torch.cat(
        [group_thresholds(tau[0], mu_seen, floor), group_thresholds(tau[1], mu_novel, floor)]
    )


def update_group_tracker(
    tau: torch.Tensor,
    mu: torch.Tensor,
    probs: torch.Tensor,
    members: torch.Tensor,
    columns: slice,
    momentum: float = 0.99,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One `AdaptiveThreshold` step of a group: EMA of the members' mean max-probability (tau)
    and of their mean probabilities on the group's own columns (mu; not renormalised).

    A batch with no member leaves the tracker unchanged.
    """
    if not bool(members.any()):
        return tau, mu
    rows = probs[members]
    tau = momentum * tau + (1 - momentum) * rows.max(dim=1).values.mean()
    mu = momentum * mu + (1 - momentum) * rows[:, columns].mean(dim=0)
    return tau, mu


def confidence_loss(
    strong_logits: torch.Tensor, weak_probs: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch term over all rows: (1/B) sum_i 1[max p_i > t(y^_i)] CE(zs_i, y^_i), y^ = argmax p.

    Returns the loss and the bool mask of the rows that passed.
    """
    conf, pseudo = weak_probs.detach().max(dim=1)
    mask = conf > thresholds[pseudo]
    ce = F.cross_entropy(strong_logits, pseudo, reduction="none")
    return (ce * mask.to(ce.dtype)).mean(), mask


# ----------------------------------------------------------------------------- multi-crops


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma [N, 1, H, W] of RGB images in [0, 1] (torchvision's weights)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def hue_rotation(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift the hue of each image by `hue` (in turns, [N]) as a rotation of the IQ plane."""
    to_yiq, to_rgb = _RGB_TO_YIQ.to(x.device), _YIQ_TO_RGB.to(x.device)
    theta = 2 * math.pi * hue.to(torch.float64)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(hue), 3, 3, dtype=torch.float64, device=x.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    matrix = (to_rgb @ rot @ to_yiq).to(x.dtype)
    return torch.einsum("nij,njhw->nihw", matrix, x)


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator=None):
    return low + (high - low) * torch.rand(n, device=like.device, generator=generator)


def random_resized_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    like: torch.Tensor,
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes [n, 4] (x0, y0, x1, y1) in pixels, ratio in (3/4, 4/3).

    As torchvision: up to `tries` draws of (area, log-ratio) per crop, the first that fits is
    used, else the whole image.
    """
    area = height * width
    w = torch.full((n,), float(width), device=like.device)
    h = torch.full((n,), float(height), device=like.device)
    found = torch.zeros(n, dtype=torch.bool, device=like.device)
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(tries):
        target = area * _uniform(n, scale[0], scale[1], like, generator)
        ratio = torch.exp(_uniform(n, log_lo, log_hi, like, generator))
        cw, ch = torch.sqrt(target * ratio), torch.sqrt(target / ratio)
        fits = (~found) & (cw <= width) & (ch <= height)
        w, h = torch.where(fits, cw, w), torch.where(fits, ch, h)
        found |= fits
    x0 = _uniform(n, 0.0, 1.0, like, generator) * (width - w)
    y0 = _uniform(n, 0.0, 1.0, like, generator) * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def color_distortion(
    x: torch.Tensor,
    strength: float = 0.5,
    jitter_p: float = 0.8,
    solarize_p: float = 0.2,
    equalize_p: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image colour distortion of images in [0, 1]: jitter (brightness, contrast,
    saturation 0.8s, hue 0.2s) with probability `jitter_p`, then solarise (threshold 128/255) and
    equalise, each with its own probability."""
    n = x.shape[0]

    def pick(p: float) -> torch.Tensor:
        return (torch.rand(n, device=x.device, generator=generator) < p).view(n, 1, 1, 1)

    j = 0.8 * strength
    lo = max(0.0, 1.0 - j)
    jitter = pick(jitter_p)
    b, c, s = (_uniform(n, lo, 1.0 + j, x, generator).view(n, 1, 1, 1) for _ in range(3))
    hue = _uniform(n, -0.2 * strength, 0.2 * strength, x, generator)
    y = (x * b).clamp(0, 1)
    y = (c * y + (1 - c) * _grayscale(y).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    y = (s * y + (1 - s) * _grayscale(y)).clamp(0, 1)
    y = hue_rotation(y, hue).clamp(0, 1)
    x = torch.where(jitter, y, x)
    x = torch.where(pick(solarize_p) & (x >= 128 / 255), 1.0 - x, x)
    eq = pick(equalize_p).flatten()
    if bool(eq.any()):
        x = x.clone()
        x[eq] = equalize(x[eq].contiguous())
    return x


def multi_crops(
    images: torch.Tensor,
    n_crop: int,
    size: int,
    scale: tuple[float, float] = (0.3, 0.75),
    color_strength: float = 0.5,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`n_crop` small crops of every normalised image: [n_crop * B, 3, size, size], crop m of
    image i at row m * B + i. RandomResizedCrop (bilinear, `roi_align`), horizontal flip and
    colour distortion, then the same normalisation as the input."""
    b, _, height, width = images.shape
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    x = (images.float() * sd + m).clamp(0, 1)
    n = n_crop * b
    boxes = random_resized_boxes(n, height, width, scale, x, generator)
    index = torch.arange(b, device=x.device, dtype=x.dtype).repeat(n_crop).unsqueeze(1)
    crops = roi_align(x.contiguous(), torch.cat([index, boxes], dim=1), (size, size), aligned=True)
    flip = (torch.rand(n, device=x.device, generator=generator) < 0.5).view(n, 1, 1, 1)
    crops = torch.where(flip, crops.flip(-1), crops)
    crops = color_distortion(crops, color_strength, generator=generator)
    return ((crops - m) / sd).to(images.dtype)


# ----------------------------------------------------------------------------- method


class OwMatch(OWDFAMethod):
    """OwMatch on the shared runner (NeurIPS 2024; niusj03/OwMatch @ 09b0658)."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "weak", "strong")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        scale: float = 10.0,
        hard_logit: float = 10.0,
        sk_epsilon: float = 0.05,
        sk_iters: int = 10,
        queue_len: int = 1024,
        n_crop: int = 2,
        crop_ratio: float = 18 / 32,
        crop_scale: tuple[float, float] | list[float] = (0.3, 0.75),
        color_strength: float = 0.5,
        threshold_init: float = 0.5,
        threshold_momentum: float = 0.99,
        threshold_floor: float = 0.3,
        ema_decay: float | None = 0.999,
        ema_student_decay: float = 0.0,
        trainable: str | list[str] = "all",
        unknown_k_factor: float = 2.0,
    ):
        super().__init__(problem, optim)
        if n_crop < 0:
            raise ValueError(f"method.model.n_crop must be >= 0, got {n_crop}")
        if not 0.0 < threshold_init <= 1.0:
            raise ValueError(
                f"method.model.threshold_init={threshold_init}: use a probability in (0, 1] "
                "(the reference scripts pass 0.5)"
            )
        self.scale, self.hard_logit = float(scale), float(hard_logit)
        self.sk_epsilon, self.sk_iters = float(sk_epsilon), int(sk_iters)
        self.queue_len = int(queue_len)
        self.n_crop, self.crop_ratio = int(n_crop), float(crop_ratio)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.color_strength = float(color_strength)
        self.threshold_momentum = float(threshold_momentum)
        self.threshold_floor = float(threshold_floor)
        self.ema_decay = None if ema_decay in (None, 0, 0.0) else float(ema_decay)
        self.ema_student_decay = float(ema_student_decay)

        self.encoder = GlobalFeatureEncoder(backbone)
        self.head = PrototypeHead(self.encoder.dim, open_world_head_rows(problem, unknown_k_factor))
        nn.init.uniform_(self.head.weight, -1.0, 1.0)  # NormedLinear: uniform(-1, 1), renormed
        k_known, c = problem.num_known, self.head.active
        # hierarchical thresholds (saved in checkpoints): tau per group, mu per output
        self.register_buffer("thr_tau", torch.full((2,), float(threshold_init)))
        self.register_buffer("thr_mu_seen", torch.full((min(k_known, c),), float(threshold_init)))
        self.register_buffer(
            "thr_mu_novel", torch.full((c - min(k_known, c),), float(threshold_init))
        )
        self.register_buffer("queue2", torch.zeros(0, c), persistent=False)
        self.register_buffer("queue1", torch.zeros(0, c), persistent=False)
        self.track_usage(c)
        self.trainable = train_only(self, trainable)
        self.ema = None
        if self.ema_decay is not None:  # the evaluated model; a copy, updated after each step
            self.ema = nn.ModuleDict(
                {"encoder": copy.deepcopy(self.encoder), "head": copy.deepcopy(self.head)}
            )
            self.ema.requires_grad_(False)

    # ------------------------------------------------------------------ model
    def logits(self, x: torch.Tensor, ema: bool = False) -> torch.Tensor:
        encoder, head = (
            (self.ema["encoder"], self.ema["head"]) if ema else (self.encoder, self.head)
        )
        return cosine_logits(encoder(x), head.weight[: head.active], self.scale)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, ema=self.ema is not None)

    def class_thresholds(self) -> torch.Tensor:
        return class_thresholds(
            self.thr_tau, self.thr_mu_seen, self.thr_mu_novel, self.threshold_floor
        )

    def confidence_thresholds(self) -> tuple[float, float]:
        """Mean per-class threshold of the seen and of the novel group (the current trackers)."""
        t = self.class_thresholds()
        k = self.thr_mu_seen.numel()
        seen = float(t[:k].mean()) if k else 1.0
        novel = float(t[k:].mean()) if t.numel() > k else 1.0
        return (seen, novel)

    def crop_size(self, image_size: int) -> int:
        return max(1, int(round(self.crop_ratio * image_size)))

    # ------------------------------------------------------------------ training
    def _codes(self, name: str, logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Sinkhorn codes of this batch's rows, computed over the queue they were pushed on.
        Under DDP every rank pushes every rank's rows (rank 0's first), so the queues stay
        equal, and takes the codes of its own rows."""
        pinned = pin_labelled_logits(logits, batch.y, batch.labelled, self.hard_logit).float()
        pushed, start = gather_rows_and_start(pinned.detach())
        queue = push_queue(getattr(self, name), pushed, self.queue_len)
        setattr(self, name, queue)
        codes = sinkhorn_codes(queue, self.scale, self.sk_epsilon, self.sk_iters)[-len(pushed) :]
        return codes[start : start + len(pinned)]

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        x1, x2, xs = batch.views[:3]
        z1 = self.logits(x1)
        if self.n_crop > 0:
            with torch.no_grad():  # only its codes and pseudo-labels are used
                z2 = self.logits(x2)
        else:
            z2 = self.logits(x2)
        zs = self.logits(xs)
        p2 = F.softmax(z2.detach().float(), dim=1)

        # hierarchical thresholds: read, then update with this batch
        thresholds = self.class_thresholds()
        conf_loss, mask = confidence_loss(zs.float(), p2, thresholds)
        k = self.thr_mu_seen.numel()
        with torch.no_grad():  # the trackers see every rank's rows (DDP)
            p2 = gather_rows(p2)
            seen = p2.argmax(dim=1) < k
            tau_s, mu_s = update_group_tracker(
                self.thr_tau[0], self.thr_mu_seen, p2, seen, slice(0, k), self.threshold_momentum
            )
            tau_n, mu_n = update_group_tracker(
                self.thr_tau[1],
                self.thr_mu_novel,
                p2,
                ~seen,
                slice(k, p2.shape[1]),
                self.threshold_momentum,
            )
            self.thr_tau.copy_(torch.stack([tau_s, tau_n]))
            self.thr_mu_seen.copy_(mu_s)
            self.thr_mu_novel.copy_(mu_n)

        codes2 = self._codes("queue2", z2, batch)
        if self.n_crop > 0:
            crops = multi_crops(
                x1, self.n_crop, self.crop_size(x1.shape[-1]), self.crop_scale, self.color_strength
            )
            if self.channels_last:
                crops = crops.contiguous(memory_format=torch.channels_last)
            z_mc = self.logits(crops).float().chunk(self.n_crop)
            clu = clustering_loss(codes2, z1.float(), z_mc)
        else:
            codes1 = self._codes("queue1", z1, batch)
            clu = clustering_loss(codes2, z1.float(), codes1=codes1, logits2=z2.float())
        sup = masked_cross_entropy(z1.float(), batch.y, batch.labelled)
        loss = conf_loss + sup + clu
        self.count_usage(z1)
        one = thresholds.new_ones(())  # an empty group (k=unknown with k.estimate = K_known)
        return {
            "loss": loss,
            "sup": sup.detach(),
            "conf": conf_loss.detach(),
            "clu": clu.detach(),
            "mask_rate": mask.float().mean(),
            "thr_seen": thresholds[:k].mean() if k else one,
            "thr_novel": thresholds[k:].mean() if thresholds.numel() > k else one,
        }

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser's step, then the EMA model's (in the step, so a step checkpoint holds
        both; owdfa_bench/resume.py)."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        if self.ema is not None:
            for name, student in (("encoder", self.encoder), ("head", self.head)):
                ema_update(self.ema[name], student, self.ema_decay, self.ema_student_decay)
