"""DNA-Det: patch-wise supervised contrastive learning and classification on random crops.

Paper: T. Yang, Z. Huang, J. Cao, L. Li, X. Li, "Deepfake Network Architecture Attribution",
AAAI 2022. Official code: github.com/ICTMCG/DNA-Det @ d811395 (`main.py`: model, optimiser,
loss weighting; `trainer.py`: the training step; `models/models.py`: `Simple_CNN`,
`SupConNet`; `utils/loss.py`: `SupConLoss`, `AutomaticWeightedLoss`; `data/dataset.py`:
`ImageMultiCropDataset`; `data/transforms.py`: the pretraining transformations; `configs/*.py`).
A closed-set method: CPL (ICCV 2023) reports it on OW-DFA without saying how it predicted novel
classes; the open-world rule below is this port's.

What it computes, per batch (labelled rows only: `train_on = "labelled"`):
  crops   `num_crops` (16) random `crop_size` x `crop_size` (64 px) crops of each image (the
          weak view), each at its own offset (`ImageMultiCropDataset`: one `RandomCrop` per crop);
  model   crop -> backbone -> custom pool 1x1 -> BNNeck -> f; logits l = Linear(dropout 0.2 (f))
          over the K_known classes (with bias, as `Simple_CNN`'s head); projection z =
          normalise(Linear-ReLU-Linear(f)) to 128-d (`SupConNet`'s MLP head);
  losses  L_cls = CE over every crop with its image's label. The official `Simple_CNN` returns
          softmax(l) and `nn.CrossEntropyLoss` is applied to it (a second softmax);
          `ce_on_probabilities: true` keeps that, false gives plain CE on l.
          L_con = SupCon (`contrast_mode="all"`, T = base T = 0.07) over the B x V crops: every
          crop is an anchor, its positives are all other crops of images of the same class (its
          own image's other crops included): the patch-wise contrastive term.
          L = sum_i 0.5 / s_i^2 L_i + log(1 + s_i^2) over (L_cls, L_con), s learnable, init 1,
          own Adam group at lr 0.01 without weight decay (`AutomaticWeightedLoss`, main.py);
  predict (not in the reference: the open-world rule of this port) semi-supervised k-means
          (owdfa_bench/kmeans.py, GCD's SS-k-means) on the L2-normalised f of the whole test-view
          images of the labelled, unlabelled and test rows together, labelled rows pinned to
          their class, so cluster c < K_known *is* known class c; the test rows' clusters are the
          predictions. Unlabelled rows' labels are never read. Between clusterings (below) the
          evaluation is the closed-set classifier's argmax (known ids only), as the reference
          predicts: a cheap monitor, recorded as `mode: classifier` in `record["dna_det"]`.
K: known -> the true total K. Unknown -> `k.estimate` if given, else GCD's estimate
(`owdfa_bench.kmeans.estimate_k_brent`: Brent search over [K_known, `k_max`] of the labelled
rows' Hungarian ACC of plain k-means on the training features), reported by `k_estimated()`.

When the clustering runs: at the evaluation of every epoch e with (e + 1) % cluster_every == 0
and always at the last epoch (`cluster_every: 0`: the last only) and in a validate-only run
(`owdfa-bench evaluate`); the reported (last-epoch) prediction is always a full clustering.

Deliberate deviations from the reference:
  * No image-transformation pretraining. The reference first trains the same network in a
    separate run (configs/pretrain.py: 50 epochs) on another corpus of real images to classify
    170 JPEG / blur / resize / noise transformations (albumentations), then loads it minus the
    classifier. Here every method starts from the shared backbone weights (`data.backbone`:
    ImageNet on real data; synth: its pretrained start), which take that stage's place.
  * Backbone: the OW-DFA ResNet + BNNeck (reference: an 8-conv DCGAN/VGG-style `Simple_CNN`,
    no neck), as every method of the harness.
  * Crops are cut from the shared weak view (flip, resized to `data.image_size`) in the step
    instead of from the image resized to 512 px without flip; `crop_size` is clamped to the
    image side. All crops go through the network in one batch (the reference runs one forward
    per crop index), so batch-norm statistics pool the B x V crops: one running-stat update per
    step instead of V.
  * Sampler: labelled rows drawn uniformly (the harness's labelled-only sampler, as the lower
    bound) instead of class-balanced batches of one image per class per index.
  * Recipe: the shared CAL recipe (conf/method/dna_det.yaml); the reference's Adam with a
    per-step StepLR is its `reference_optim` block (per epoch here).
  * A batch without labelled rows gets zero losses; an anchor crop without positives (only with
    `num_crops: 1`) is left out of the SupCon mean instead of giving NaN.

Under DDP: every rank embeds its share of the training rows, rank 0 runs the (semi-supervised)
k-means on all of them and every rank takes its centres and assignments. Not equal to one
process with the global batch: SupCon's contrast set and batch-norm statistics are each rank's
crops; CE is a per-crop mean and the uncertainty weights are parameters (gradients averaged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from methods.gcd import SemiSupervisedKMeansRule
from owdfa_bench.kmeans import assign_to_centres, cluster_confidence
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, build_optimizer
from owdfa_bench.models import GlobalFeatureEncoder

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure terms
def random_crops(
    images: torch.Tensor, num_crops: int, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`num_crops` random `size` x `size` crops of every image of [B, C, H, W], each at its own
    uniformly drawn offset; crop-major [V * B, C, s, s] (row v * B + b: crop v of image b), the
    order in which the reference concatenates its per-crop batches. `size` is clamped to the
    image. Offsets come from `generator` (torch's global one when None)."""
    b, _, h, w = images.shape
    s = min(int(size), h, w)
    top = torch.randint(h - s + 1, (num_crops, b), generator=generator).to(images.device)
    left = torch.randint(w - s + 1, (num_crops, b), generator=generator).to(images.device)
    steps = torch.arange(s, device=images.device)
    rows = (top[..., None] + steps)[..., :, None]  # [V, B, s, 1]
    cols = (left[..., None] + steps)[..., None, :]  # [V, B, 1, s]
    image = torch.arange(b, device=images.device)[None, :, None, None]
    crops = images.permute(0, 2, 3, 1)[image, rows, cols]  # [V, B, s, s, C]
    return crops.permute(0, 1, 4, 2, 3).reshape(num_crops * b, -1, s, s)


def multi_crop_supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """The reference's `SupConLoss` (contrast_mode "all") on `z` [B, V, D] (rows already
    L2-normalised, as `SupConNet` returns them) with image labels [B].

    Every one of the B x V crops is an anchor; its contrast set is every other crop, its
    positives those of images with the same label. Loss = -(T / T_base) x the mean over
    anchors of the mean log-probability of their positives. Anchors without a positive are left
    out; zero (in the graph) when none is left.
    """
    b, v, _ = z.shape
    feats = z.transpose(0, 1).reshape(b * v, -1)  # crop-major, as torch.cat(torch.unbind(z, 1))
    y = labels.repeat(v)
    logits = feats @ feats.t() / temperature
    not_self = ~torch.eye(b * v, dtype=torch.bool, device=z.device)
    positives = (y[:, None] == y[None, :]) & not_self
    logits = logits.masked_fill(~not_self, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(~not_self, 0.0)  # -inf * 0 would be NaN
    count = positives.sum(1)
    has = count > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    mean_log_prob_pos = (log_prob * positives).sum(1)[has] / count[has]
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, on_probabilities: bool = True
) -> torch.Tensor:
    """Mean CE over the rows. `on_probabilities`: CE of softmax(logits), the reference's
    `nn.CrossEntropyLoss` applied to `Simple_CNN`'s softmax output; otherwise plain CE."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.softmax(dim=1) if on_probabilities else logits, targets)


def uncertainty_weighted_sum(losses: Sequence[torch.Tensor], params: torch.Tensor) -> torch.Tensor:
    """`AutomaticWeightedLoss`: sum_i 0.5 / s_i^2 L_i + log(1 + s_i^2)."""
    total = losses[0].new_zeros(())
    for i, loss in enumerate(losses):
        total = total + 0.5 / params[i] ** 2 * loss + torch.log(1 + params[i] ** 2)
    return total


def dna_det_losses(
    logits: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor,
    num_crops: int,
    weights: torch.Tensor,
    temperature: float = 0.07,
    ce_on_probabilities: bool = True,
) -> dict[str, torch.Tensor]:
    """Every term of one step. `logits` [V * B, C] and `z` [V * B, D] are crop-major
    (`random_crops`); `labels` [B] the images' classes; `weights` the two uncertainty weights."""
    b = labels.shape[0]
    ce = classification_loss(logits, labels.repeat(num_crops), ce_on_probabilities)
    supcon = multi_crop_supcon(z.view(num_crops, b, -1).transpose(0, 1), labels, temperature)
    total = uncertainty_weighted_sum([ce, supcon], weights)
    return {"loss": total, "ce": ce, "supcon": supcon}


def clustering_due(epoch: int, max_epochs: int, cluster_every: int, fitting: bool = True) -> bool:
    """Whether the evaluation after 0-based `epoch` runs the full clustering: always outside a
    fit (validate-only) and at the last epoch; else every `cluster_every` epochs (0: never)."""
    if not fitting or epoch + 1 >= max_epochs:
        return True
    return cluster_every > 0 and (epoch + 1) % cluster_every == 0


# ----------------------------------------------------------------------------- the method
class DNADet(SemiSupervisedKMeansRule, OWDFAMethod):
    """DNA-Det (ICTMCG/DNA-Det @ d811395) with GCD's SS-k-means for the open world."""

    clustering_name: ClassVar[str] = "DNA-Det"

    train_views: ClassVar[tuple[str, ...]] = ("weak",)
    train_on: ClassVar[str] = "labelled"
    selection_metric: ClassVar[str] = "known_acc"  # the reference keeps its best val accuracy
    # the last clustering's K and summary, for a record written after a resume
    carried_state: ClassVar[tuple[str, ...]] = ("k_used", "k_search", "last_clustering")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        num_crops: int = 16,
        crop_size: int = 64,
        temperature: float = 0.07,
        dropout: float = 0.2,
        proj_dim: int = 128,
        ce_on_probabilities: bool = True,
        awl_lr: float = 0.01,
        kmeans_n_init: int = 100,
        kmeans_max_iter: int = 200,
        kmeans_tol: float = 1e-4,
        kmeans_seed: int = 0,
        cluster_every: int = 10,
        k_max: int | None = None,
        kmeans_estimate_n_init: int = 10,
    ):
        super().__init__(problem, optim)
        if int(num_crops) < 1 or int(crop_size) < 1:
            raise ValueError(
                f"method.model.num_crops={num_crops} and crop_size={crop_size} must be >= 1"
            )
        self.num_crops, self.crop_size = int(num_crops), int(crop_size)
        self.temperature = float(temperature)
        self.ce_on_probabilities = bool(ce_on_probabilities)
        self.awl_lr = float(awl_lr)
        self.init_clustering(
            problem,
            kmeans_n_init,
            kmeans_max_iter,
            kmeans_tol,
            kmeans_seed,
            cluster_every,
            k_max,
            kmeans_estimate_n_init,
        )
        self.encoder = GlobalFeatureEncoder(backbone)
        dim = self.encoder.dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, problem.num_known)  # closed set: the known classes only
        self.projector = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim)
        )
        self.awl = nn.Parameter(torch.ones(2))  # uncertainty weights of (CE, SupCon)

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        x, y = batch.views[0][batch.labelled], batch.y[batch.labelled]
        crops = random_crops(x, self.num_crops, self.crop_size)
        if self.channels_last:  # indexing gives contiguous crops
            crops = crops.contiguous(memory_format=torch.channels_last)
        f = self.encoder(crops)
        logits = self.head(self.dropout(f))
        z = F.normalize(self.projector(f), dim=1)
        out = dna_det_losses(
            logits, z, y, self.num_crops, self.awl, self.temperature, self.ce_on_probabilities
        )
        logged = {k: v.detach() for k, v in out.items() if k != "loss"}
        weights = self.awl.detach()
        return {
            "loss": out["loss"],
            **logged,
            "weight_ce": 0.5 / weights[0] ** 2,
            "weight_supcon": 0.5 / weights[1] ** 2,
        }

    def configure_optimizers(self):
        """One optimiser over two groups, as main.py: the network with `method.optim`, the
        uncertainty weights at `awl_lr` without weight decay (the reference's Adam has none)."""
        net = [p for n, p in self.named_parameters() if p.requires_grad and n != "awl"]
        groups = [{"params": net}, {"params": [self.awl], "lr": self.awl_lr, "weight_decay": 0.0}]
        return build_optimizer(self.optim, groups, self.problem.max_epochs)

    # ------------------------------------------------------------------ prediction
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[normalised f | classifier logits]: the clustering reads the first `encoder.dim`
        columns, the between-clusterings monitor the last K_known."""
        f = self.encoder(x)
        return torch.cat([F.normalize(f, dim=1), self.head(self.dropout(f))], dim=1)

    def split_outputs(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.encoder.dim
        return outputs[:, :d], outputs[:, d:]

    @torch.no_grad()
    def split_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features and labels of a training split (eval transform, eval mode)."""
        feats, ys = self.eval_rows(
            split,
            "DNA-Det's open-world rule clusters the training rows too",
            lambda x: self.split_outputs(self.predict_logits(x).float())[0],
        )
        return feats.cpu(), ys.cpu()

    def clustering_now(self) -> bool:
        if self._trainer is None:
            return True
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        max_epochs = int(self.trainer.max_epochs or self.problem.max_epochs)
        return clustering_due(int(self.current_epoch), max_epochs, self.cluster_every, fitting)

    def predictions_from_outputs(self, outputs: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        features, logits = self.split_outputs(outputs)
        self.centres = None
        if not self.clustering_now():
            self.last_clustering = {"mode": "classifier"}
            return logits.argmax(dim=1).numpy()
        self.last_clustering = {}
        return self.full_clustering(features.float(), start)

    def unlabelled_predictions(self, outputs: torch.Tensor) -> np.ndarray:
        """Diagnostics: the nearest centre of the clustering just computed (which clustered
        these rows too), or the classifier's argmax between clusterings."""
        features, logits = self.split_outputs(outputs)
        if self.centres is None:
            return logits.argmax(dim=1).numpy()
        return assign_to_centres(features, self.centres)

    def confidences_from_outputs(self, outputs: torch.Tensor) -> np.ndarray:
        """The classifier's max softmax between clusterings; after one, max softmax(cos(f,
        centre) / T) with the SupCon temperature (as GCD's port; the reference has none)."""
        features, logits = self.split_outputs(outputs)
        if self.centres is None:
            return logits.float().softmax(dim=1).max(dim=1).values.numpy()
        return cluster_confidence(features, self.centres.cpu(), self.temperature)

    def evaluate_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        record = super().evaluate_outputs(outputs, targets)
        record["dna_det"] = self.record_extras()["dna_det"]
        return record

    def record_extras(self) -> dict[str, Any]:
        """The last evaluation's prediction mode, timings, K used and K search scores."""
        out = {**self.last_clustering, "k": self.k_used}
        if self.k_search and self.last_clustering.get("mode") == "full":
            out["k_search"] = {int(k): v for k, v in self.k_search.items()}
        return {"dna_det": out}
