"""GCD: generalized category discovery by contrastive learning and semi-supervised k-means.

Paper: S. Vaze, K. Han, A. Vedaldi, A. Zisserman, "Generalized Category Discovery", CVPR 2022.
Official code: github.com/sgvaze/generalized-category-discovery @ 831a645
(`methods/contrastive_training/contrastive_training.py`,
`methods/clustering/faster_mix_k_means_pytorch.py`, `methods/estimate_k/estimate_k.py`).
The clustering lives in `owdfa_bench/kmeans.py`.

What it computes:
  train   backbone -> custom pool 1x1 -> BNNeck -> f; projection head: MLP (2048-2048-256,
          GELU) -> L2-normalise -> weight-normalised linear layer to `proj_out_dim` (65536) ->
          L2-normalise; L = (1 - lam) InfoNCE(all rows, tau 1.0) + lam SupCon(labelled rows,
          tau 0.07), lam = 0.35 (the script's `sup_con_weight`). Both views form one batch.
  predict semi-supervised k-means on the L2-normalised f of the labelled, unlabelled and test
          rows together (labelled rows pinned to their class, so cluster c is class c and the
          direct Known ACC is defined; k-means++ for the other clusters; `kmeans_n_init`
          restarts, lowest inertia kept); the test rows' clusters are the predictions, so the
          test split is scored like every other method. Unlabelled rows' labels are never read.
  K       known -> the true total K (as the paper's tables). Unknown -> `k.estimate` if given,
          else GCD's estimate: bounded Brent search over [K_known, `k_max`] of the labelled
          rows' Hungarian accuracy of plain k-means over all training features (labelled +
          unlabelled; test rows are not used), recomputed at every full clustering and
          reported by `k_estimated()`. Expect it to collapse towards K_known on OWDFA-40 (CAL's
          project-page poster: 20 / 13 / 35 for P1 / P2 / P3 with ResNet-50, truth 41;
          `results/paper/owdfa40_k_estimation.csv`).

When the clustering runs: the base class evaluates the test split every epoch and calls
`predictions_from_outputs` with the test features. A *full* clustering (feature passes over the
labelled and unlabelled training rows, the K estimate under k=unknown, SS-k-means) runs at the
first evaluation, every `cluster_every` epochs (epochs e with (e + 1) % cluster_every == 0) and
always at the last epoch; `cluster_every: 0` means first and last only. Between full
clusterings the test features are assigned to the nearest centre of the last full clustering
(stale centres: a cheap monitor, not a GCD prediction); every evaluation record says which was
done in `record["gcd"]` together with the clustering time. The reported (last-epoch) number is
always a full clustering.

Deliberate deviations from the reference:
  * Backbone: the OW-DFA ResNet + BNNeck, fine-tuned whole (reference: DINO ViT-B/16, last
    block only). Clustering features are the L2-normalised BNNeck output (reference: the
    normalised CLS feature), the projection head is only trained through.
  * Views: the shared weak and strong views instead of two draws of one contrastive transform.
  * Selection: GCD keeps the checkpoint with the best Old ACC of plain k-means on its test set;
    the harness reports the last epoch by default. `selection_metric = "known_acc"` is used only
    with `selection=best_on_test`, on SS-k-means predictions (stale-centre epochs compete too;
    use `cluster_every: 1` to make every epoch a full clustering).
  * The K search is bounded by `k_max` (default 10 x K_known, CAL's over-provisioning; the
    script searches up to 1000) and uses our seeded k-means (`kmeans_estimate_n_init`
    restarts) instead of scikit-learn's `KMeans(random_state=0)`; see owdfa_bench/kmeans.py.
  * A batch without labelled rows (weighted sampler only) gets zero SupCon.

Under DDP: every rank embeds its share of the training rows, rank 0 runs the (semi-supervised)
k-means on all of them and every rank takes its centres and assignments. Not equal to one
process with the global batch: InfoNCE's and SupCon's contrastive sets and batch-norm statistics
are over each rank's share.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.common_losses import cosine_logits, info_nce_loss, projection_mlp, supcon_loss
from owdfa_bench.distributed import from_rank_zero, is_rank_zero
from owdfa_bench.kmeans import (
    assign_to_centres,
    cluster_confidence,
    estimate_k_brent,
    open_world_assignments,
)
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, detach_terms
from owdfa_bench.models import GlobalFeatureEncoder

log = logging.getLogger(__name__)


class GCDProjection(nn.Module):
    """GCD's `DINOHead`: MLP -> normalise -> weight-normalised (gain 1) linear layer."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        out_dim: int | None,
        num_layers: int = 3,
    ):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, num_layers)
        self.register_parameter("last", None)  # out_dim null: no last layer
        if out_dim:
            self.last = nn.Parameter(torch.empty(int(out_dim), bottleneck_dim))
            nn.init.kaiming_uniform_(self.last, a=5**0.5)  # nn.Linear's default init

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(f), dim=1)
        return z if self.last is None else cosine_logits(z, self.last)


def gcd_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    y_labelled: torch.Tensor,
    labelled: torch.Tensor,
    sup_con_weight: float = 0.35,
    infonce_temp: float = 1.0,
    supcon_temp: float = 0.07,
) -> dict[str, torch.Tensor]:
    """(1 - lam) InfoNCE(all rows) + lam SupCon(labelled rows) on projections of two views."""
    infonce = info_nce_loss(z1, z2, infonce_temp)
    supcon = supcon_loss(z1[labelled], z2[labelled], y_labelled, supcon_temp)
    loss = (1 - sup_con_weight) * infonce + sup_con_weight * supcon
    return {"loss": loss, "infonce": infonce, "supcon": supcon}


class SemiSupervisedKMeansRule:
    """GCD's prediction rule, shared with DNA-Det's port: semi-supervised k-means over the
    labelled, unlabelled and test features with K true, given (`k.estimate`) or Brent-estimated,
    run on rank 0 under DDP and taken by every rank. The LightningModule it is mixed into
    provides `problem`, `device`, `current_epoch` and `split_features(split)` (normalised
    features and labels of a training split); `init_clustering` sets the state used here."""

    clustering_name: ClassVar[str] = "GCD"  # in the log lines

    def init_clustering(
        self,
        problem: Problem,
        kmeans_n_init: int,
        kmeans_max_iter: int,
        kmeans_tol: float,
        kmeans_seed: int,
        cluster_every: int,
        k_max: int | None,
        kmeans_estimate_n_init: int,
    ) -> None:
        self.kmeans = {
            "n_init": int(kmeans_n_init),
            "max_iter": int(kmeans_max_iter),
            "tol": float(kmeans_tol),
            "seed": int(kmeans_seed),
        }
        self.kmeans_estimate_n_init = int(kmeans_estimate_n_init)
        self.cluster_every = int(cluster_every)
        self.k_max = int(k_max) if k_max else 10 * problem.num_known
        self.centres: torch.Tensor | None = None  # of the last full clustering
        self.k_used: int | None = None
        self.k_search: dict[int, float] = {}  # labelled ACC per K tried by the last Brent search
        self.last_clustering: dict[str, Any] = {}

    def k_estimated(self) -> int | None:
        return None if self.problem.k_mode == "known" else self.k_used

    def num_clusters(self, features: torch.Tensor, labels: torch.Tensor) -> int:
        """K of the SS-k-means: true K, the user's estimate, or the Brent estimate."""
        if self.problem.k_mode == "known":
            return self.problem.num_classes
        if self.problem.k_estimate is not None:
            return int(self.problem.k_estimate)
        # SS-k-means needs a row for every cluster without labelled rows: cap the search there
        labels_np = torch.as_tensor(labels).cpu()
        room = int((labels_np < 0).sum()) + int(torch.unique(labels_np[labels_np >= 0]).numel())
        est = estimate_k_brent(
            features,
            labels,
            self.problem.num_known,
            max(self.problem.num_known, min(self.k_max, room)),
            n_init=self.kmeans_estimate_n_init,
            max_iter=self.kmeans["max_iter"],
            tol=self.kmeans["tol"],
            seed=self.kmeans["seed"],
        )
        self.k_search = est.scores
        self.last_clustering["k_search_s"] = round(est.seconds, 3)
        log.info(
            "%s Brent K estimate %d (labelled ACC per K: %s)",
            self.clustering_name,
            est.k,
            est.scores,
        )
        return est.k

    def cluster(
        self,
        labelled: torch.Tensor,
        labelled_y: torch.Tensor,
        unlabelled: torch.Tensor,
        test: torch.Tensor,
    ) -> np.ndarray:
        """SS-k-means over labelled + unlabelled + test features; the test rows' cluster ids."""
        # cluster on the model's device: the k-means is one distance matrix per iteration
        train = torch.cat([labelled, unlabelled]).to(self.device)
        train_y = torch.cat([labelled_y.long(), torch.full((len(unlabelled),), -1)])
        self.k_used = self.num_clusters(train, train_y)
        preds, result = open_world_assignments(
            train, train_y, test.to(self.device), self.k_used, **self.kmeans
        )
        self.centres = result.centres
        self.last_clustering.update(
            kmeans_s=round(result.seconds, 3),
            rows=len(result.assignments),
            inertia=result.inertia,
            n_iter=result.n_iter,
        )
        return preds

    def full_clustering(self, test: torch.Tensor, start: float) -> np.ndarray:
        """Embed the training rows, cluster them with the `test` features, and return the test
        rows' clusters; `start` is when this evaluation's prediction began (for the timings)."""
        labelled, labelled_y = self.split_features("labelled")
        unlabelled, _ = self.split_features("unlabelled")  # their labels are never used
        # DDP: every rank has every row's features; rank 0 clusters (GPU k-means kernels are
        # not bitwise reproducible) and the others take its result
        clustered = None
        if is_rank_zero():
            self.last_clustering["features_s"] = round(time.perf_counter() - start, 3)
            preds = self.cluster(labelled, labelled_y, unlabelled, test)
            self.last_clustering["mode"] = "full"
            self.last_clustering["total_s"] = round(time.perf_counter() - start, 3)
            log.info(
                "%s full clustering (epoch %d): %s",
                self.clustering_name,
                self.current_epoch,
                self.last_clustering,
            )
            clustered = {
                "preds": preds,
                "centres": self.centres.cpu(),
                "k_used": self.k_used,
                "k_search": dict(self.k_search),
                "last_clustering": dict(self.last_clustering),
            }
        clustered = from_rank_zero(clustered)
        self.centres = clustered["centres"].to(self.device)
        self.k_used, self.k_search = clustered["k_used"], clustered["k_search"]
        self.last_clustering = clustered["last_clustering"]
        return clustered["preds"]


class GCD(SemiSupervisedKMeansRule, OWDFAMethod):
    """GCD (sgvaze/generalized-category-discovery @ 831a645) on the shared runner."""

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")
    selection_metric: ClassVar[str] = "known_acc"  # GCD checkpoints on the best Old ACC
    # the last full clustering, which later epochs assign to (cluster_every > 1): for a resume
    carried_state: ClassVar[tuple[str, ...]] = ("centres", "k_used", "k_search", "last_clustering")

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        sup_con_weight: float = 0.35,
        infonce_temp: float = 1.0,
        supcon_temp: float = 0.07,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        proj_out_dim: int | None = 65536,
        proj_layers: int = 3,
        kmeans_n_init: int = 100,
        kmeans_max_iter: int = 200,
        kmeans_tol: float = 1e-4,
        kmeans_seed: int = 0,
        cluster_every: int = 10,
        k_max: int | None = None,
        kmeans_estimate_n_init: int = 10,
    ):
        super().__init__(problem, optim)
        self.sup_con_weight = float(sup_con_weight)
        self.infonce_temp, self.supcon_temp = float(infonce_temp), float(supcon_temp)
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
        self.projector = GCDProjection(
            self.encoder.dim, proj_hidden_dim, proj_dim, proj_out_dim, proj_layers
        )

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        b = batch.y.shape[0]
        z = self.projector(self.encoder(torch.cat(batch.views[:2])))
        lab = batch.labelled
        out = gcd_loss(
            z[:b],
            z[b:],
            batch.y[lab],
            lab,
            self.sup_con_weight,
            self.infonce_temp,
            self.supcon_temp,
        )
        return detach_terms(out)

    # ------------------------------------------------------------------ prediction
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Not class scores: the L2-normalised features that the clustering consumes."""
        return F.normalize(self.encoder(x), dim=1)

    @torch.no_grad()
    def split_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features and labels of a training split (eval transform, eval mode)."""
        feats, ys = self.eval_rows(
            split, "GCD clusters the training rows too", lambda x: self.predict_logits(x).float()
        )
        return feats.cpu(), ys.cpu()

    def full_clustering_due(self) -> bool:
        if self.centres is None or self._trainer is None:
            return True
        epoch = int(self.current_epoch)
        if epoch + 1 >= int(self.trainer.max_epochs or self.problem.max_epochs):
            return True
        return self.cluster_every > 0 and (epoch + 1) % self.cluster_every == 0

    def predictions_from_outputs(self, outputs: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        self.last_clustering = {}
        if not self.full_clustering_due():
            self.last_clustering["mode"] = "stale_centres"
            return assign_to_centres(outputs, self.centres)
        return self.full_clustering(outputs.float(), start)

    def unlabelled_predictions(self, outputs: torch.Tensor) -> np.ndarray:
        """Diagnostics: the unlabelled rows' nearest centre of the clustering just computed for
        the test split (which clustered these rows too), not a second clustering."""
        return assign_to_centres(outputs, self.centres)

    def confidences_from_outputs(self, outputs: torch.Tensor) -> np.ndarray:
        """A cluster confidence for the diagnostics: the max of softmax(cos(f, centre) / tau)
        with the SupCon temperature tau (GCD has no classifier; ours, for Observation 1)."""
        if self.centres is None:
            return np.full(len(outputs), np.nan)
        return cluster_confidence(outputs, self.centres.cpu(), self.supcon_temp)

    def evaluate_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        record = super().evaluate_outputs(outputs, targets)
        record["gcd"] = {**self.last_clustering, "k": self.k_used}
        if self.k_search and self.last_clustering.get("mode") == "full":
            record["gcd"]["k_search"] = {int(k): v for k, v in self.k_search.items()}
        return record

    def record_extras(self) -> dict[str, Any]:
        """The last clustering (mode, timings, K used, Brent search scores) for results.json."""
        gcd = {**self.last_clustering, "k": self.k_used}
        if self.k_search:
            gcd["k_search"] = {int(k): v for k, v in self.k_search.items()}
        return {"gcd": gcd}
