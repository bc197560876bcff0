"""CAL: Confidence-Aware Asymmetric Learning (open-world deepfake attribution, AAAI 2026).

Paper: "Open-World Deepfake Attribution via Confidence-Aware Asymmetric Learning" (Zheng et al.).
Official code: https://github.com/HaiyangZheng/OWDFA-CAL (`CAL/algorithm/CAL.py`,
`CAL/encoder/models.py`, `train.py`, `scripts/train*.sh`). What the port keeps and changes of the
reference is summarised in `docs/reference-behaviour.md`.

What it computes (`CAL_Classifier` in `CAL/encoder/models.py`; `training_step` and the epoch-end
hooks of `CAL_OWDFA` in `CAL/algorithm/CAL.py`):
  model     backbone feature map * DCT frequency attention -> custom pool 1x1 -> BNNeck ->
            dropout -> bias-free prototype head (first `num_active` rows live);
  losses    L = L_cls + L_reg + L_acr + 0.2 L_ccr (supervised CE on both views, marginal-entropy
            regulariser, asymmetric confidence reinforcement with an adaptive novel threshold,
            confidence-aware consistency regularisation);
  epoch end log, novel-threshold update, then (k=unknown only) Dynamic Prototype Pruning from
            10 x K_k prototypes. Lightning >= 2.0 runs the epoch's validation inside the training
            epoch loop, *before* `on_train_epoch_end` (checked in the installed Lightning 2.6.6:
            `_TrainingEpochLoop.on_advance_end` runs `val_loop.run()`, then
            `_FitLoop.on_advance_end` calls `on_train_epoch_end`; `tests/test_cal.py` pins it).
            So the evaluation of epoch e uses the prototypes before epoch e's pruning, and the
            threshold updated at the end of epoch e is first used in epoch e+1, as in the reference.

Kept reference behaviour: confidence statistics over all rows with a T=1 softmax, theta_novel
starting at 0 and allowed above 1; ACR trains the weak view on its own argmax; known-K heads use
the true total number of classes, an oracle; DPP from epoch 0 on dropout-noisy train logits of
all rows, merged anchors L2-normalised while the other prototypes are not, pruned rows zeroed but
left in the parameter where Adam momentum still moves them, Adam state not permuted; evaluation
of epoch e before its pruning.

Deliberate deviations from the reference, and harness choices:
  1. The active prototype count is a buffer (`head.num_active`) saved in the state dict; the
     reference keeps a plain attribute, so its eval-only reload scores all 10 x K_k rows.
     `owdfa_bench.evaluate` reports that reference figure beside ours.
  2. theta_novel is a buffer too, so a resumed run continues with the threshold it had (the
     reference loses it on resume; an uninterrupted run is unaffected).
  3. Usage ties in DPP are broken by prototype index (stable sort); the reference's
     `torch.sort` leaves their order unspecified.
  4. The DCT attention is pooled to the backbone feature map's size, not a hard-coded 8x8:
     identical for the reference's 256 px input with a stride-32 ResNet-50, and it avoids the
     bilinear resize (non-deterministic on CUDA) for other resolutions such as 64 px synth
     images (64 -> 2x2, kernel 32). Bilinear resize remains the fallback when the map cannot be
     reached by pooling, as in the reference.
  5. The DCT is a precomputed cosine basis applied as two matmuls (torch-dct is not a
     dependency); it equals `scipy.fft.dctn(type=2)` / `idctn(type=2)` (tests) and is 5-12x
     faster than a `torch.fft` formulation on CPU (`benchmarks/dct.py`). The attention runs in
     float32 with autocast disabled, so mixed precision does not degrade the transform.
  6. Under DDP every step's confidence statistics are summed over the ranks and the cached
     weak logits are every rank's rows, so the threshold and the pruning are those of one
     process seeing the global batch, identical on every rank (the reference is single-GPU).
     Not equal to one process: batch-norm statistics and the marginal-entropy regulariser
     L_reg are over each rank's share of the batch. With one process nothing changes.
  7. The weak logits are cached only when pruning is on (k=unknown); the reference also caches
     them under known K and throws them away, which changes no number.
CAL's fixed dataset seed (`get_dataset` never forwards `--seed`, so the split is always built
with 2025) and its misspelt `--pseudo_epohcs` flag are config values (`data.split_seed`,
`pseudo_start_epoch`), not handled here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from owdfa_bench.distributed import gather_rows, sum_over_ranks, world_size
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, extract_state_dict
from owdfa_bench.models import GlobalFeatureEncoder, PrototypeHead, custom_avg_pool2d

# ----------------------------------------------------------------------------- DCT


@functools.lru_cache(maxsize=16)
def dct_basis(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n, n] matrix of the unnormalised DCT-II: row k holds 2 cos(pi k (2i+1) / (2n))."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    return (2.0 * torch.cos(math.pi * k * (2 * i + 1) / (2 * n))).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def idct_basis(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n, n] inverse of `dct_basis` (a scaled DCT-III): column k weighted 1/(2n), 2/(2n), ..."""
    i = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    weight = torch.full((n,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    basis = weight * torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) / (2 * n)
    return basis.to(dtype=dtype, device=device)


def dct_2d(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised 2-D DCT-II over the last two axes (= `scipy.fft.dctn(x, type=2)` there)."""
    h, w = x.shape[-2:]
    return dct_basis(h, x.dtype, x.device) @ x @ dct_basis(w, x.dtype, x.device).t()


def idct_2d(y: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `dct_2d` (= `scipy.fft.idctn(y, type=2)` over the last two axes)."""
    h, w = y.shape[-2:]
    return idct_basis(h, y.dtype, y.device) @ y @ idct_basis(w, y.dtype, y.device).t()


class DCTAttention(nn.Module):
    """CAL's frequency attention (FFE): a spatial map in (0, 1) computed from the input image.

    D = DCT(x); g = sigmoid(conv(relu(conv(D)))); a = sigmoid(mean_c IDCT(D * g)), then pooled
    to the feature map's size with the reference's custom average pooling. 593 parameters for
    3 input channels. `freq_attn_net` keeps the reference's layer indices (0 and 2), so released
    checkpoints map onto it key by key.
    """

    def __init__(self, in_channels: int = 3, hidden: int = 16):
        super().__init__()
        self.freq_attn_net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        out_h, out_w = int(out_size[0]), int(out_size[1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            coeffs = dct_2d(x.float())
            spatial = idct_2d(coeffs * self.freq_attn_net(coeffs))
            attn = torch.sigmoid(spatial.mean(dim=1, keepdim=True))  # [B, 1, H, W]
            if out_h <= attn.shape[-2] and out_w <= attn.shape[-1]:
                attn = custom_avg_pool2d(attn, (out_h, out_w))
            if attn.shape[-2:] != (out_h, out_w):
                attn = F.interpolate(
                    attn, size=(out_h, out_w), mode="bilinear", align_corners=False
                )
        return attn


# ----------------------------------------------------------------------------- losses


def supervised_ce(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    student_temp: float = 1.0,
) -> torch.Tensor:
    """Mean CE of the labelled rows over both views, logits / tau_s; 0 without labelled rows."""
    if not bool(labelled.any()):
        return logits_weak.new_zeros(())
    logits = torch.cat([logits_weak[labelled], logits_strong[labelled]]) / student_temp
    targets = torch.cat([y[labelled], y[labelled]])
    return F.cross_entropy(logits, targets)


def marginal_entropy_regulariser(
    logits_views: Sequence[torch.Tensor], student_temp: float = 1.0
) -> torch.Tensor:
    """(log C - H(p_bar)) / V, p_bar = mean softmax(z / tau_s) over all rows of the V views.

    Equals KL(p_bar || uniform) / V: zero when the batch uses every prototype equally.
    """
    probs = (torch.cat(list(logits_views)) / student_temp).softmax(dim=1)
    p_bar = probs.mean(dim=0)
    entropy = -torch.special.xlogy(p_bar, p_bar).sum()
    return (math.log(p_bar.numel()) - entropy) / len(logits_views)


def ccr_weight_schedule(epoch: int, max_epochs: int) -> float:
    """lambda_e = (e + 1) / E: CCR moves from confident rows (early) to unconfident rows (late)."""
    return (epoch + 1) / max_epochs


def ccr_loss(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    lam: float,
    teacher_temp: float = 0.1,
    student_temp: float = 1.0,
) -> torch.Tensor:
    """Confidence-aware consistency: sharpened weak targets, confidence-weighted soft CE.

    q = sg(softmax(z_w / tau_t)), r = max q, w = sg((1 - lam) r + lam (1 - r)),
    L = mean_i w_i * (-sum_c q_ic log softmax(z_s / tau_s)_ic).
    """
    q = (logits_weak.detach() / teacher_temp).softmax(dim=1)
    r = q.max(dim=1).values
    weight = (1.0 - lam) * r + lam * (1.0 - r)
    soft_ce = -(q * F.log_softmax(logits_strong / student_temp, dim=1)).sum(dim=1)
    return (weight * soft_ce).mean()


def acr_loss(
    logits_weak_unlabelled: torch.Tensor,
    num_known: int,
    known_threshold: float,
    novel_threshold: float | torch.Tensor,
    student_temp: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """Asymmetric confidence reinforcement on unlabelled rows: (loss, number of pseudo-labels).

    A row's argmax of softmax(z_w / tau_s) is its pseudo-label when its confidence reaches the
    known threshold (argmax < K_k) or the novel threshold (argmax >= K_k). The loss is the mean
    CE of the *weak* logits (no temperature, not detached) on those labels; 0 if none pass.
    """
    z = logits_weak_unlabelled
    if z.shape[0] == 0:
        return z.new_zeros(()), 0
    conf, pseudo = (z.detach() / student_temp).softmax(dim=1).max(dim=1)
    is_known = pseudo < num_known
    valid = (is_known & (conf >= known_threshold)) | (~is_known & (conf >= novel_threshold))
    n_valid = int(valid.sum())
    if n_valid == 0:
        return z.new_zeros(()), 0
    return F.cross_entropy(z[valid], pseudo[valid]), n_valid


# ----------------------------------------------------------------------------- threshold


@dataclass
class ConfidenceStats:
    """Sums and counts of weak-view confidences of agreeing rows, split by predicted side."""

    sum_known: float = 0.0
    count_known: int = 0
    sum_novel: float = 0.0
    count_novel: int = 0

    def add(self, other: ConfidenceStats) -> None:
        self.sum_known += other.sum_known
        self.count_known += other.count_known
        self.sum_novel += other.sum_novel
        self.count_novel += other.count_novel

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.sum_known, self.count_known, self.sum_novel, self.count_novel],
            dtype=torch.float64,
        )

    def summed_over_ranks(self, device: torch.device | str = "cpu") -> ConfidenceStats:
        """These statistics summed over the ranks of a DDP run (themselves in one process)."""
        if world_size() == 1:
            return self
        return ConfidenceStats.from_tensor(sum_over_ranks(self.as_tensor().to(device)))

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> ConfidenceStats:
        s_k, c_k, s_n, c_n = (float(v) for v in t.cpu())
        return cls(s_k, int(round(c_k)), s_n, int(round(c_n)))


def confidence_statistics(
    logits_weak: torch.Tensor, logits_strong: torch.Tensor, num_known: int
) -> ConfidenceStats:
    """One batch's statistics: all rows (labelled too), T=1 softmax of the weak logits, rows
    whose weak and strong argmax agree, split by weak argmax < K_k (known) or >= K_k (novel)."""
    conf, pred = logits_weak.detach().softmax(dim=1).max(dim=1)
    agree = pred == logits_strong.detach().argmax(dim=1)
    known = agree & (pred < num_known)
    novel = agree & (pred >= num_known)
    return ConfidenceStats(
        sum_known=conf[known].sum().item(),
        count_known=int(known.sum()),
        sum_novel=conf[novel].sum().item(),
        count_novel=int(novel.sum()),
    )


def updated_novel_threshold(stats: ConfidenceStats, gamma: float, previous: float) -> float:
    """theta_novel = gamma * clip(mean novel conf / mean known conf, 0.1, 10); unchanged when
    either side had no agreeing row. The ratio passes through float32, as in the reference."""
    if stats.count_known == 0 or stats.count_novel == 0:
        return previous
    ratio = (stats.sum_novel / stats.count_novel) / (stats.sum_known / stats.count_known)
    ratio = float(torch.tensor(ratio, dtype=torch.float32).clamp(0.1, 10.0))
    return gamma * ratio


# ----------------------------------------------------------------------------- pruning


def prototype_usage(logits: torch.Tensor, num_prototypes: int) -> torch.Tensor:
    """How many rows pick each prototype as their softmax argmax (`bincount`, length C)."""
    return torch.bincount(logits.softmax(dim=1).argmax(dim=1), minlength=num_prototypes)


def num_unlabelled_to_keep(
    usage: Sequence[float] | np.ndarray | torch.Tensor, coverage: float = 0.9544
) -> int:
    """How many unlabelled prototypes DPP keeps (`_select_num_unlabeled_prototypes_to_keep`).

    The fewest most-used prototypes whose usage reaches `coverage` of the total, extended down
    the sorted tail while a count is at least the tail's mean or its drop from the previous count
    is at least the tail's mean absolute drop. All-zero usage keeps everything.
    """
    counts = np.asarray(usage.cpu() if torch.is_tensor(usage) else usage, dtype=np.float32)
    n = len(counts)
    if n == 0:
        return 0
    ranked = np.sort(counts)[::-1]
    cumulative = np.cumsum(ranked)
    total = float(cumulative[-1])
    if total <= 0:
        return n
    k_min = int(np.searchsorted(cumulative / total, coverage, side="left"))
    if k_min >= n:
        return n
    tail = ranked[k_min:]
    tail_mean = float(np.mean(tail))
    tail_mean_drop = float(np.mean(np.abs(np.diff(tail)))) if len(tail) > 1 else 0.0
    last_kept = k_min
    for i in range(k_min, n):
        drop = abs(float(ranked[i] - ranked[i - 1])) if i > k_min else 0.0
        if float(ranked[i]) >= tail_mean or drop >= tail_mean_drop:
            last_kept = i
        else:
            break
    return last_kept + 1


def merge_unlabelled_prototypes(
    weight: torch.Tensor, usage: torch.Tensor, num_known: int, keep: int
) -> torch.Tensor:
    """Known rows unchanged, then the `keep` most-used unlabelled prototypes with the rest merged
    into them (`_merge_unlabeled_prototypes`). Returns [num_known + keep, D].

    Each low-usage prototype is assigned once, before any update, to the anchor of highest
    cosine similarity (first on ties); an anchor with assignees becomes the L2-normalised
    unweighted mean of itself and them; an anchor without keeps its raw value.
    """
    weight = weight.detach()
    unlabelled, usage_u = weight[num_known:], usage[num_known:]
    order = torch.sort(usage_u, descending=True, stable=True).indices
    anchors = unlabelled[order[:keep]].clone()
    low = unlabelled[order[keep:]]
    if keep > 0 and low.shape[0] > 0:
        sims = F.cosine_similarity(low.unsqueeze(1), anchors.unsqueeze(0), dim=-1, eps=1e-8)
        nearest = sims.argmax(dim=1)
        merged = anchors.clone()
        for a in range(keep):
            assigned = low[nearest == a]
            if assigned.shape[0] > 0:
                mean = torch.cat([anchors[a : a + 1], assigned]).mean(dim=0)
                merged[a] = F.normalize(mean, dim=0)
        anchors = merged
    return torch.cat([weight[:num_known], anchors])


def prune_prototypes(
    weight: torch.Tensor, usage: torch.Tensor, num_known: int, coverage: float = 0.9544
) -> torch.Tensor:
    """Dynamic Prototype Pruning of the active rows `weight` [C, D] given their `usage` [C]."""
    keep = num_unlabelled_to_keep(usage[num_known:], coverage)
    return merge_unlabelled_prototypes(weight, usage, num_known, keep)


# ----------------------------------------------------------------------------- method


class CAL(OWDFAMethod):
    """CAL on the shared harness: two views, four losses, adaptive threshold, optional DPP."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")
    selection_metric: ClassVar[str] = "all_acc"  # the reference's ModelCheckpoint(monitor=all_acc)
    # this epoch's weak logits (DPP) and confidence statistics (theta_novel): a resumed epoch
    # continues them (conf_stats, a dataclass, is saved as a dict: carried_state_dict)
    carried_state: ClassVar[tuple[str, ...]] = ("_weak_logits",)

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        dropout: float = 0.2,
        student_temp: float = 1.0,
        teacher_temp: float = 0.1,
        ccr_weight: float = 0.2,
        pseudo_start_epoch: int = 5,
        gamma: float = 0.9,
        coverage: float = 0.9544,
        prototypes_per_known: int = 10,
    ):
        super().__init__(problem, optim)
        self.student_temp = float(student_temp)
        self.teacher_temp = float(teacher_temp)
        self.ccr_weight = float(ccr_weight)
        self.pseudo_start_epoch = int(pseudo_start_epoch)
        self.gamma = float(gamma)
        self.coverage = float(coverage)
        self.prune = problem.k_mode == "unknown"
        # known K: the true total (the reference's oracle --model_num_classes 41);
        # unknown K: 10 x K_k prototypes, pruned by DPP (train.py --enable_proto_pruning)
        rows = prototypes_per_known * problem.num_known if self.prune else problem.num_classes
        if rows < problem.num_known:
            raise ValueError(
                f"CAL needs at least {problem.num_known} prototypes, got {rows}; "
                "raise method.model.prototypes_per_known"
            )

        self.encoder = GlobalFeatureEncoder(backbone)
        self.freq_attention = DCTAttention(in_channels=3)
        self.dropout = nn.Dropout(dropout)
        self.head = PrototypeHead(self.encoder.dim, rows)
        self.register_buffer("novel_threshold", torch.tensor(0.0))  # theta_novel starts at 0

        self.conf_stats = ConfidenceStats()
        self._weak_logits: list[torch.Tensor] = []
        self.k_curve: list[int] = []  # active prototypes after each epoch's DPP

    # ------------------------------------------------------------------ model
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """BNNeck feature [B, D] of the attention-weighted feature map."""
        fmap = self.encoder.feature_map(x)
        attn = self.freq_attention(x, fmap.shape[-2:])
        return self.encoder.pool(fmap * attn.to(fmap.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def k_estimated(self) -> int | None:
        return self.head.active if self.prune else None

    def confidence_thresholds(self) -> tuple[float, float]:
        """ACR's thresholds: gamma for known-id predictions, the adaptive theta_novel else."""
        return (self.gamma, float(self.novel_threshold))

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        weak, strong = batch.views
        # two passes, as the reference: own dropout masks and own BN batch statistics per view
        z_w, z_s = self(weak), self(strong)
        if self.prune:  # every rank's rows (DDP), so every rank prunes the same prototypes
            self._weak_logits.append(gather_rows(z_w.detach()))
        k_known = self.problem.num_known
        self.conf_stats.add(confidence_statistics(z_w, z_s, k_known).summed_over_ranks(z_w.device))

        l_cls = supervised_ce(z_w, z_s, batch.y, batch.labelled, self.student_temp)
        l_reg = marginal_entropy_regulariser([z_w, z_s], self.student_temp)
        lam = ccr_weight_schedule(self.current_epoch, self.problem.max_epochs)
        l_ccr = ccr_loss(z_w, z_s, lam, self.teacher_temp, self.student_temp)
        if self.current_epoch >= self.pseudo_start_epoch:
            l_acr, n_pseudo = acr_loss(
                z_w[~batch.labelled],
                k_known,
                self.gamma,
                float(self.novel_threshold),
                self.student_temp,
            )
        else:
            l_acr, n_pseudo = z_w.new_zeros(()), 0
        total = l_cls + l_reg + l_acr + self.ccr_weight * l_ccr
        return {
            "loss": total,
            "cls": l_cls,
            "reg": l_reg,
            "acr": l_acr,
            "ccr": l_ccr,
            "pseudo_labels": torch.tensor(float(n_pseudo)),
        }

    def on_train_epoch_start(self) -> None:
        self.conf_stats = ConfidenceStats()
        self._weak_logits.clear()

    def on_train_epoch_end(self) -> None:
        # hook order of the reference: log, threshold update, DPP
        self.update_threshold()
        self.log("train/novel_threshold", float(self.novel_threshold))
        self.log("train/known_threshold", self.gamma)
        self.dynamic_prototype_pruning()
        self.log("train/active_prototypes", float(self.head.active))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["cal_k_curve"] = list(self.k_curve)

    def record_extras(self) -> dict:
        # the report draws the K curve from here (owdfa_bench/report/plots.py)
        return {"k_curve": list(self.k_curve)} if self.k_curve else {}

    def load_reference_checkpoint(
        self, state_dict: dict[str, torch.Tensor], num_active: int | None = None
    ) -> dict[str, Any] | None:
        """An official CAL checkpoint (section below) loaded into this model, or None."""
        if not is_cal_reference_state_dict(state_dict):
            return None
        return load_cal_reference_state_dict(self, state_dict, num_active)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.k_curve = list(checkpoint.get("cal_k_curve", []))

    def carried_state_dict(self) -> dict[str, Any]:
        state = super().carried_state_dict()
        state["attributes"]["conf_stats"] = asdict(self.conf_stats)
        return state

    def load_carried_state(self, state: dict[str, Any]) -> None:
        attributes = dict(state.get("attributes", {}))
        stats = attributes.pop("conf_stats", None)
        super().load_carried_state({**state, "attributes": attributes})
        if stats is not None:
            self.conf_stats = ConfidenceStats(**stats)

    def update_threshold(self) -> None:
        """theta_novel from this epoch's confidence statistics (of every rank's rows)."""
        new = updated_novel_threshold(self.conf_stats, self.gamma, float(self.novel_threshold))
        self.novel_threshold.fill_(new)

    @torch.no_grad()
    def dynamic_prototype_pruning(self) -> None:
        """DPP on this epoch's cached weak logits (k=unknown only); always clears the cache."""
        try:
            if not self.prune or not self._weak_logits:
                return
            active = self.head.active
            usage = prototype_usage(torch.cat(self._weak_logits), active)
            new = prune_prototypes(
                self.head.weight[:active], usage, self.problem.num_known, self.coverage
            )
            if new.shape[0] < active:  # write back only if it shrinks
                self.head.weight[: new.shape[0]].copy_(new)
                self.head.weight[new.shape[0] : active].zero_()
                self.head.set_active(new.shape[0])
        finally:
            self._weak_logits.clear()
            if self.prune:
                self.k_curve.append(self.head.active)


# ----------------------------------------------------------------------------- official checkpoints
# The official CAL release (https://huggingface.co/hyzheng/OWDFA_CAL, Lightning 2.2.5) stores
# `encoder.encoder.<timm resnet50>`, `encoder.fft_attn_module.*`, `encoder.bottleneck.*` and
# `encoder.fc2`; these map them onto the attributes of `CAL` (k=known for the 41-prototype
# checkpoints, k=unknown for the 10 x K_k DPP ones). The reference does not save how many
# prototypes DPP left active, so its own eval-only script scores all rows; `num_active` (the
# count its training log reports) restores ours. `owdfa-bench evaluate` reaches this through
# `CAL.load_reference_checkpoint`.
# reference key prefix -> our key prefix (CAL attributes above)
REFERENCE_PREFIXES = (
    ("encoder.encoder.", "encoder.backbone."),
    ("encoder.fft_attn_module.", "freq_attention."),
    ("encoder.bottleneck.", "encoder.neck."),
)
REFERENCE_HEAD = ("encoder.fc2", "head.weight")
REFERENCE_IGNORED_PREFIX = "encoder.encoder.fc."  # timm's ImageNet classifier, never used by CAL
# our state that the reference does not store: filled by the loader, not read from the file
OURS_NOT_IN_REFERENCE = ("head.num_active", "novel_threshold")


def is_cal_reference_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """True for the official CAL layout (with or without the LightningModule's `encoder.`)."""
    return "encoder.fc2" in state or (
        "fc2" in state and "fft_attn_module.freq_attn_net.0.weight" in state
    )


def _with_lightning_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare `CAL_Classifier.state_dict()` gets the `encoder.` prefix of the LightningModule."""
    if "encoder.fc2" in state:
        return state
    return {f"encoder.{k}": v for k, v in state.items()}


def map_cal_reference_keys(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(state under our key names, ignored reference keys, unexpected reference keys)."""
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, value in _with_lightning_prefix(state).items():
        if key.startswith(REFERENCE_IGNORED_PREFIX):
            ignored.append(key)
        elif key == REFERENCE_HEAD[0]:
            mapped[REFERENCE_HEAD[1]] = value
        else:
            for ref, ours in REFERENCE_PREFIXES:
                if key.startswith(ref):
                    mapped[ours + key[len(ref) :]] = value
                    break
            else:
                unexpected.append(key)
    return mapped, ignored, unexpected


def _reference_name(our_key: str) -> str:
    if our_key == REFERENCE_HEAD[1]:
        return REFERENCE_HEAD[0]
    for ref, ours in REFERENCE_PREFIXES:
        if our_key.startswith(ours):
            return ref + our_key[len(ours) :]
    return our_key


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_cal_reference_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], num_active: int | None = None
) -> dict[str, Any]:
    """Load an official CAL checkpoint's state dict into `methods.cal.CAL`; returns a report.

    Raises ValueError naming every missing, unexpected or mis-shaped key. `num_active`: how many
    prototypes are live (unknown-K checkpoints do not record it); None keeps all rows, which is
    what the reference's own evaluation script scores.
    """
    state_dict = extract_state_dict(state_dict)
    mapped, ignored, unexpected = map_cal_reference_keys(state_dict)
    ours = model.state_dict()
    missing = sorted(k for k in ours if k not in mapped and k not in OURS_NOT_IN_REFERENCE)
    unexpected += sorted(k for k in mapped if k not in ours)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                "missing reference keys: " + _listing([_reference_name(k) for k in missing])
            )
        if unexpected:
            parts.append("unexpected keys: " + _listing(unexpected))
        raise ValueError(
            "the checkpoint does not match the CAL model built from the config ("
            + "; ".join(parts)
            + "); check method=cal and data.backbone.name "
            "(the release uses resnet50)"
        )
    rows = mapped[REFERENCE_HEAD[1]].shape[0]
    expected_rows = ours[REFERENCE_HEAD[1]].shape[0]
    if rows != expected_rows:
        raise ValueError(
            f"encoder.fc2 has {rows} prototypes but the model built from the config has "
            f"{expected_rows}: the released known-K checkpoints have 41 rows (k=known on "
            "OWDFA-40), the unknown-K (DPP) ones 10 x the known classes (k=unknown)"
        )
    wrong = [
        f"{_reference_name(k)} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
        for k, v in mapped.items()
        if v.shape != ours[k].shape
    ]
    if wrong:
        raise ValueError("shape mismatch: " + "; ".join(wrong))
    if num_active is not None and not getattr(model, "prune", False):
        raise ValueError(
            "--num-active is for unknown-K (DPP) checkpoints; with k=known every "
            f"one of the {rows} prototypes is live"
        )
    if num_active is None:
        active, source = rows, "all rows (the checkpoint does not record the active count)"
    else:
        num_known = int(model.problem.num_known)
        if not num_known <= num_active <= rows:
            raise ValueError(
                f"--num-active={num_active} must lie in [{num_known}, {rows}] "
                f"(known classes .. prototypes in the checkpoint)"
            )
        active, source = int(num_active), "user (--num-active)"
    full = dict(mapped)
    for key in OURS_NOT_IN_REFERENCE:
        full[key] = ours[key]
    model.load_state_dict(full, strict=True)
    model.head.set_active(active)
    return {
        "format": "cal_reference",
        "mapped_keys": len(mapped),
        "ignored_keys": ignored,
        "num_prototypes": rows,
        "num_active": active,
        "num_active_source": source,
    }
