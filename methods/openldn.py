"""OpenLDN: discover novel classes with a meta-learned pairwise similarity, then closed-world SSL.

Paper: M. N. Rizve, N. Kardan, S. Khan, F. S. Khan, M. Shah, "OpenLDN: Learning to Discover
Novel Classes for Open-World Semi-Supervised Learning", ECCV 2022.
Official code: github.com/nayeemrizve/OpenLDN @ 5bf6a6b: `train.py` (runs the two stages as two
scripts; `--cw-ssl mixmatch` is its default), `base/train-base.py` (stage A and the pseudo-labels
it hands over), `base/losses/losses.py` (`entropy`, `symmetric_mse_loss`),
`base/models/resnet.py` (`SimNet`, the MetaModule ResNet-18), `base/utils/utils.py`
(`sim_matrix`), `base/utils/pseudo_labeling_utils.py` (`pseudo_labeling`),
`closed_world_ssl/train-mixmatch.py` and `closed_world_ssl/utils/utils.py` (`SemiLoss`,
`linear_rampup`, `WeightEMA`).

What it computes. Both stages run in one harness run: stage A ("discovery") for the first
`discovery_epochs` epochs, stage B ("closed-world SSL") for the rest.
  model    backbone -> custom pool 1x1 -> BNNeck -> f -> linear head with bias (the reference's
           `classifier`), C outputs; SimNet: MLP(2d -> 100 -> 1) with ReLU and a sigmoid.
  stage A  on the weak view of every row (labelled and unlabelled) and the strong view of the
           unlabelled rows, one forward pass; p = softmax(l) of the weak views;
             S_ij = SimNet([f_j, f_i]) for every ordered pair of the batch's weak-view rows
                    (the reference's `feat_pairs` layout);
             P_ij = cos(p_i, p_j) (`sim_matrix`, norms clamped at 1e-8);
             L    = sum_ij (P_ij - S_ij)^2 / B^2  - H(mean_i p_i)  + CE(l_lab, y)
                    + mean_u 1[max p_u >= 0.5] CE(l_strong_u, argmax p_u).
           Bi-level step per batch (`train`): (1) a copy of the model takes one SGD step,
           theta' = theta - 1e-3 dL/dtheta, keeping the graph through SimNet; (2) SimNet takes
           an Adam step (lr 1e-4) on d CE(l_lab(theta'), y) / d SimNet (second-order: through
           the inner gradient); (3) the model minimises L with the updated SimNet held fixed
           (no gradient reaches the features through S there).
  handover at the first stage-B epoch: the stage-A model (test transform, eval mode) predicts
           every unlabelled row; for each novel output c (K_known..C-1), the rows predicted c
           with the highest confidence, at most n_lab // K_known of them (class-balanced), get
           pseudo-label c (`pseudo_labeling`); then the network restarts from its initial
           weights (the reference trains a new network in stage B), the optimiser state is
           cleared and the schedule restarts; the EMA model starts as a copy.
  stage B  MixMatch (`train-mixmatch.py`): labelled and pseudo-labelled rows are the labelled
           set x (one weak view, one-hot targets); every other unlabelled row u has two weak
           views whose guessed label is sharpen((p(u1) + p(u2)) / 2, T = 0.5), computed in
           train mode without gradient; inputs and targets of [x; u1; u2] are mixed with a
           random permutation of themselves, lam ~ Beta(0.75, 0.75), lam = max(lam, 1 - lam);
           L = -mean_x sum_c t log softmax(l) + w mean_{u,c} (softmax(l) - t)^2, w = 75 x a
           linear ramp over stage B. EMA (0.999) of every float entry of the network's state
           after each step; the EMA model is evaluated. Every `pl_every` stage-B epochs the EMA
           model re-does the pseudo-labels (budget n_lab // K_known, `--pl-freq`).
  predict  argmax of the model's logits (stage A), of the EMA model's (stage B).

K: known -> the true total K (the reference's head has `no_class` outputs). Unknown ->
`k.estimate` if given, else `unknown_k_factor` x K_known (`open_world_head_rows`, the harness
rule of the ORCA family; the paper's unknown-K variant is not in the code); outputs from K_known
on are the novel outputs that receive pseudo-labels. `k_estimated()` is the base rule: the
number of distinct classes predicted on the test split.

Deliberate deviations from the reference:
  * Backbone: the OW-DFA ResNet (timm) + BNNeck instead of the MetaModule ResNet-18, whole
    network trained, in both stages; SimNet reads 2 x the feature dimension. Stage B restarts
    from the same initial weights as stage A (the shared pretrained start and the same head
    draw), where the reference builds a new randomly initialised ResNet; `stage_b_init:
    continue` keeps stage A's weights instead.
  * One harness run for both stages: `discovery_epochs` = 15 of 50 (a choice of the port; the
    reference runs 50 stage-A epochs, then 1024 (CIFAR) or 200 MixMatch epochs of 1024 steps)
    on the shared CAL recipe (Adam 2e-4, weight decay 1e-3, StepLR) restarted at stage B; the
    reference's constant Adam 5e-4 (A) and 2e-3 (B) are `reference_optim` in
    conf/method/openldn.yaml. The lambda_u ramp spans stage B, as `linear_rampup(epoch,
    args.epochs)` spans the whole MixMatch run.
  * The meta step uses `torch.func.functional_call` on detached copies of the parameters and
    of the batch-norm buffers instead of a MetaModule copy: the same three steps, and the
    model's own running statistics move only in step (3), as in the reference. SimNet's
    parameters are frozen for the main optimiser (it updates only the model) and step with
    their own Adam kept by the method and saved in checkpoints. With gradient accumulation
    SimNet still steps at every batch.
  * SimNet's first layer is applied to the two halves separately (W1 [f_j; f_i] = W1a f_j +
    W1b f_i), so the B^2 concatenated pairs are never formed: the same numbers up to rounding.
  * Batches come from the harness sampler (weighted: about half labelled) for both stages; in
    stage B the labelled set of a batch is its labelled and pseudo-labelled rows (the reference
    draws 64 of each set per step). Each of the two stage-B forward passes (the guess on u1
    and u2, the mixed batch) is one pass, instead of one per view and MixMatch's interleaved
    groups: batch-norm statistics are over those passes.
  * Views: the harness's weak view (flip + resize) for the weak and the two MixMatch views,
    its strong view for stage A's FixMatch term (reference: flip + crop, RandAugment).
  * Pseudo-label budget: n_lab // K_known per novel class at the handover and at every
    re-labelling (the stage-B rule, `len(labeled_idx) / no_known`; stage A's
    `lbl_percent x N / (no_class x 100)` is the same number when classes are equally large).
    Ties in confidence keep the lower row first.
  * `pl_every` = 1 stage-B epoch by default (the reference's 10 of 1024 or 200 stage-B epochs
    re-label 100 or 20 times; a harness stage B has 4 (synth) to 35 epochs).
  * `WeightEMA`'s extra decay of the network's state, x (1 - 0.02 lr) after each step, is
    `ema_student_decay` (0 in the shared recipe, whose Adam has its own weight decay).
  * Guards where the reference's fixed batch layout never gets: no labelled row in a batch ->
    zero CE (stage A) or zero L_x (stage B); no unlabelled row -> zero FixMatch / L_u terms.

Under DDP: the pseudo-labels are built from `eval_rows` (every rank predicts its share of the
unlabelled rows and receives all of them), so they are the same on every rank; SimNet's
meta-gradient is averaged over the ranks before its Adam step, so SimNet and its optimiser
stay equal; the EMA follows the (equal) replicas. Not equal to one process with the global
batch: the pairwise and entropy terms, MixMatch's permutation and batch-norm statistics are over
each rank's share.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from methods.common_losses import entropy_of_mean, masked_cross_entropy, open_world_head_rows
from owdfa_bench.distributed import sum_over_ranks, world_size
from owdfa_bench.method import OWDFAMethod, Problem, TrainBatch, build_optimizer, lr_factor
from owdfa_bench.models import GlobalFeatureEncoder, ema_update

log = logging.getLogger(__name__)

STAGE_B_INITS = ("fresh", "continue")
Params = dict[str, torch.Tensor]


# ============================================================================ stage A terms
class SimNet(nn.Module):
    """The reference's `SimNet`: MLP(2d -> hidden -> 1), ReLU, sigmoid, on a pair of features."""

    def __init__(self, dim: int, hidden: int = 100):
        super().__init__()
        self.dim = int(dim)
        self.linear1 = nn.Linear(2 * self.dim, hidden)
        self.linear2 = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """S [n, n] of n feature rows: S_ij = SimNet([f_j, f_i]), the reference's layout
        (`feat_pairs` row i * n + j holds [f_j, f_i]). The first layer is applied to each half
        once, so the n^2 concatenated pairs are never formed."""
        w = self.linear1.weight
        first = features @ w[:, : self.dim].t()  # [n, h]: the half that holds f_j
        second = features @ w[:, self.dim :].t()  # [n, h]: the half that holds f_i
        hidden = F.relu(second[:, None, :] + first[None, :, :] + self.linear1.bias)
        return torch.sigmoid(self.linear2(hidden)).squeeze(-1)


def reference_pair_inputs(features: torch.Tensor) -> torch.Tensor:
    """The reference's SimNet input [n * n, 2d] (`train-base.py`), for checking `SimNet`:
    feats.unsqueeze(0).repeat(n, 1, 1), its transpose, concatenated on the feature axis."""
    n = features.shape[0]
    feats = features.unsqueeze(0).repeat(n, 1, 1)
    feats_t = torch.transpose(feats, 0, 1)
    return torch.cat((feats, feats_t), 2).view(-1, features.shape[1] * 2)


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`sim_matrix`: cos(a_i, b_j) with each norm clamped below at `eps`."""
    a_n = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
    b_n = b / b.norm(dim=1, keepdim=True).clamp_min(eps)
    return a_n @ b_n.t()


def symmetric_pair_mse(sim_prob: torch.Tensor, sim_feat: torch.Tensor) -> torch.Tensor:
    """`symmetric_mse_loss(P, S) / #pairs`: the mean over pairs of (P - S)^2, gradients to both."""
    if sim_prob.shape != sim_feat.shape:
        raise ValueError(f"pair matrices differ in shape: {sim_prob.shape} vs {sim_feat.shape}")
    return ((sim_prob - sim_feat) ** 2).sum() / sim_feat.numel()


def fixmatch_term(
    strong_logits: torch.Tensor, weak_logits: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_u 1[max p_u >= threshold] CE(strong_u, argmax p_u), p = softmax of the detached
    weak logits; the mean is over all unlabelled rows. Returns the term and the mask."""
    if strong_logits.shape[0] == 0:
        return strong_logits.sum() * 0.0, torch.zeros(0, dtype=torch.bool)
    conf, pseudo = F.softmax(weak_logits.detach(), dim=1).max(dim=1)
    mask = conf >= threshold
    ce = F.cross_entropy(strong_logits, pseudo, reduction="none")
    return (ce * mask.to(ce.dtype)).mean(), mask


def discovery_losses(
    weak_logits: torch.Tensor,
    strong_logits: torch.Tensor,
    sim_feat: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Stage A's loss of one batch: pair MSE - H(mean p) + CE(labelled) + FixMatch term.

    weak_logits [B, C]: weak view of every row; strong_logits [U, C]: strong view of the
    unlabelled rows in batch order; sim_feat [B, B]: SimNet's similarities of the weak rows.
    The pair and entropy terms do not depend on the row order (the reference puts the
    labelled rows first)."""
    probs = F.softmax(weak_logits, dim=1)
    pair = symmetric_pair_mse(cosine_similarity_matrix(probs, probs), sim_feat)
    entropy = entropy_of_mean(probs)
    ce = masked_cross_entropy(weak_logits, y, labelled)
    pseudo, mask = fixmatch_term(strong_logits, weak_logits[~labelled], threshold)
    rate = mask.float().mean() if mask.numel() else weak_logits.new_zeros(())
    return {
        "loss": pair - entropy + ce + pseudo,
        "pair": pair,
        "entropy": entropy,
        "ce": ce,
        "pseudo": pseudo,
        "mask_rate": rate,
    }


def simnet_meta_gradients(
    inner_loss: Callable[[Params, Params], torch.Tensor],
    outer_loss: Callable[[Params], torch.Tensor],
    theta: Params,
    phi: Params,
    inner_lr: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Steps (1) and (2)'s gradient of the bi-level update: theta' = theta - inner_lr x
    d inner_loss(theta, phi) / d theta, with the graph kept (`create_graph=True`), then
    d outer_loss(theta') / d phi. `theta` and `phi` hold leaf tensors that require grad.
    Returns (outer_loss(theta') detached, one gradient per entry of `phi`, zeros if unused)."""
    names = list(theta)
    grads = torch.autograd.grad(
        inner_loss(theta, phi), [theta[n] for n in names], create_graph=True, allow_unused=True
    )
    updated = {n: theta[n] if g is None else theta[n] - inner_lr * g for n, g in zip(names, grads)}
    outer = outer_loss(updated)
    meta = torch.autograd.grad(outer, list(phi.values()), allow_unused=True)
    meta = [torch.zeros_like(p) if g is None else g for p, g in zip(phi.values(), meta)]
    return outer.detach(), meta


# ============================================================================ handover
def class_balanced_pseudo_labels(
    probs: torch.Tensor, num_known: int, per_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pseudo_labeling`: for each novel output c (num_known..C-1), the rows whose argmax is c
    with the highest max-probability, at most `per_class` of them (ties: lower row first).
    Returns (rows, targets), class by class."""
    conf, pred = probs.max(dim=1)
    rows, targets = [], []
    for c in range(int(num_known), probs.shape[1]):
        idx = torch.nonzero(pred == c).flatten()
        if idx.numel() == 0 or per_class <= 0:
            continue
        order = torch.sort(conf[idx], descending=True, stable=True).indices[:per_class]
        rows.append(idx[order])
        targets.append(torch.full((order.numel(),), c, dtype=torch.long, device=probs.device))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long, device=probs.device)
        return empty, empty.clone()
    return torch.cat(rows), torch.cat(targets)


# ============================================================================ stage B terms
def sharpen(probs: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """MixMatch's guess sharpening: p^(1/T), renormalised per row."""
    pt = probs ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def mixup_lambda(alpha: float = 0.75) -> float:
    """lam ~ Beta(alpha, alpha), then max(lam, 1 - lam) (drawn from torch's global RNG, which a
    checkpoint saves; the reference draws from NumPy's)."""
    if alpha <= 0:
        return 1.0
    a = torch.tensor(float(alpha), dtype=torch.float64)
    lam = float(torch.distributions.Beta(a, a).sample())
    return max(lam, 1.0 - lam)


def mixup(
    inputs: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """lam x (inputs, targets) + (1 - lam) x the same rows in the order `perm`."""
    return (
        lam * inputs + (1 - lam) * inputs[perm],
        lam * targets + (1 - lam) * targets[perm],
    )


def mixmatch_losses(
    logits_x: torch.Tensor,
    targets_x: torch.Tensor,
    logits_u: torch.Tensor,
    targets_u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`SemiLoss`: L_x = -mean_i sum_c t log softmax(l), L_u = mean over rows and classes of
    (softmax(l) - t)^2. Each is an exact zero (in the graph) without rows."""
    if logits_x.shape[0]:
        lx = -(F.log_softmax(logits_x, dim=1) * targets_x).sum(dim=1).mean()
    else:
        lx = logits_x.sum() * 0.0
    if logits_u.shape[0]:
        lu = ((F.softmax(logits_u, dim=1) - targets_u) ** 2).mean()
    else:
        lu = logits_u.sum() * 0.0
    return lx, lu


def linear_rampup(current: float, length: float) -> float:
    """`linear_rampup`: current / length clipped to [0, 1]; 1 for a zero length."""
    if length <= 0:
        return 1.0
    return float(min(max(current / length, 0.0), 1.0))


# ============================================================================ schedule
def two_stage_lr_factor(
    epoch: int, optim: dict[str, Any], discovery_epochs: int, total_epochs: int, ratio: float = 1.0
) -> float:
    """The method's schedule restarted at each stage: stage A's epochs 0..A-1 over A epochs,
    stage B's from 0 over its own length, x `ratio` (stage B's lr / stage A's)."""
    if epoch < discovery_epochs:
        return lr_factor(epoch, discovery_epochs, optim)
    return ratio * lr_factor(epoch - discovery_epochs, total_epochs - discovery_epochs, optim)


def discovery_length(requested: int, max_epochs: int) -> int:
    """Stage A's epochs in a run of `max_epochs`: the requested count, leaving stage B at least
    one epoch when the run has two or more, and at least one epoch itself."""
    return max(1, min(int(requested), int(max_epochs) - 1))


# ============================================================================ method
class OpenLDN(OWDFAMethod):
    """OpenLDN (nayeemrizve/OpenLDN @ 5bf6a6b) on the shared runner: stage A (discovery with a
    bi-level SimNet), then stage B (MixMatch on class-balanced novel pseudo-labels)."""

    # weak (every row), strong (stage A's FixMatch term), a second weak draw (MixMatch's u2)
    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong", "weak")
    carried_state: ClassVar[tuple[str, ...]] = ("pseudo_labelling",)

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        discovery_epochs: int = 15,
        simnet_hidden: int = 100,
        simnet_lr: float = 1e-4,
        inner_lr: float = 1e-3,
        threshold: float = 0.5,
        stage_b_init: str = "fresh",
        stage_b_lr_ratio: float = 1.0,
        pl_every: int | None = 1,
        alpha: float = 0.75,
        lambda_u: float = 75.0,
        temperature: float = 0.5,
        ema_decay: float | None = 0.999,
        ema_student_decay: float = 0.0,
        unknown_k_factor: float = 2.0,
    ):
        super().__init__(problem, optim)
        if stage_b_init not in STAGE_B_INITS:
            raise ValueError(f"method.model.stage_b_init={stage_b_init!r}: use {STAGE_B_INITS}")
        if int(discovery_epochs) < 1:
            raise ValueError(f"method.model.discovery_epochs={discovery_epochs}: must be >= 1")
        if not 0.0 < temperature <= 1.0:
            raise ValueError(f"method.model.temperature={temperature}: use a value in (0, 1]")
        self.discovery_epochs = discovery_length(discovery_epochs, problem.max_epochs)
        self.simnet_lr, self.inner_lr = float(simnet_lr), float(inner_lr)
        self.threshold = float(threshold)
        self.stage_b_init, self.stage_b_lr_ratio = stage_b_init, float(stage_b_lr_ratio)
        self.pl_every = int(pl_every) if pl_every else 0
        self.alpha, self.lambda_u = float(alpha), float(lambda_u)
        self.temperature = float(temperature)
        self.ema_decay = None if ema_decay in (None, 0, 0.0) else float(ema_decay)
        self.ema_student_decay = float(ema_student_decay)

        self.encoder = GlobalFeatureEncoder(backbone)
        self.head = nn.Linear(self.encoder.dim, open_world_head_rows(problem, unknown_k_factor))
        self.simnet = SimNet(self.encoder.dim, simnet_hidden)
        # stepped by its own Adam on the meta-gradient, never by the main optimiser
        self.simnet.requires_grad_(False)
        self.ema = None
        if self.ema_decay is not None:  # the stage-B model that is evaluated
            self.ema = nn.ModuleDict(
                {"encoder": copy.deepcopy(self.encoder), "head": copy.deepcopy(self.head)}
            )
            self.ema.requires_grad_(False)
        # stage B restarts from these (built under the run's seed, so a resumed run has them too)
        self._initial_state = (
            {k: v.detach().clone() for k, v in self._net_state().items()}
            if stage_b_init == "fresh"
            else None
        )
        self.register_buffer("stage_b_started", torch.tensor(False))
        # pseudo-label of every training row (merged index), -1 for none; set at stage B
        self.register_buffer("pseudo_target", torch.zeros(0, dtype=torch.long), persistent=False)
        self.pseudo_labelling: list[dict[str, Any]] = []
        self._simnet_opt: torch.optim.Optimizer | None = None
        self._simnet_opt_state: dict[str, Any] | None = None  # from a checkpoint, until built
        self._batch_idx = 0

    # ------------------------------------------------------------------ model
    def _net_state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},
            **{f"head.{k}": v for k, v in self.head.state_dict().items()},
        }

    def net(self, x: torch.Tensor, state: Params | None = None):
        """(f, logits) of the network; with `state`, of its parameters and buffers in `state`
        (names `encoder.*`, `head.*`) instead of its own."""
        if state is None:
            f = self.encoder(x)
            return f, self.head(f)
        enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        f = functional_call(self.encoder, enc, (x,))
        return f, functional_call(self.head, head, (f,))

    def use_ema(self) -> bool:
        return self.ema is not None and bool(self.stage_b_started)

    def logits(self, x: torch.Tensor, ema: bool = False) -> torch.Tensor:
        if ema:
            return self.ema["head"](self.ema["encoder"](x))
        return self.net(x)[1]

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, ema=self.use_ema())

    def stage(self, epoch: int | None = None) -> int:
        epoch = int(self.current_epoch if epoch is None else epoch)
        return 1 if epoch < self.discovery_epochs else 2

    def confidence_thresholds(self) -> tuple[float, float]:
        """Stage A's FixMatch threshold; MixMatch (stage B) has none: the base default."""
        if self.stage() == 1:
            return (self.threshold, self.threshold)
        return super().confidence_thresholds()

    # ------------------------------------------------------------------ stage A
    def simnet_optimizer(self) -> torch.optim.Optimizer:
        """SimNet's Adam (`optimizer_simnet`), built at its first use on the model's device."""
        if self._simnet_opt is None:
            self._simnet_opt = torch.optim.Adam(self.simnet.parameters(), lr=self.simnet_lr)
            if self._simnet_opt_state is not None:
                self._simnet_opt.load_state_dict(self._simnet_opt_state)
                self._simnet_opt_state = None
        return self._simnet_opt

    def update_simnet(self, x: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """Steps (1) and (2): the meta-gradient of the labelled CE of a once-updated copy of the
        network with respect to SimNet (averaged over DDP ranks), then SimNet's Adam step.
        Returns that CE. The copy's batch-norm buffers are clones: the model's stay as they are.
        """
        b = batch.y.shape[0]
        own = [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters()]
        own += [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        theta = {n: p.detach().requires_grad_(True) for n, p in own if p.requires_grad}
        fixed = {n: p.detach() for n, p in own if not p.requires_grad}
        fixed.update({f"encoder.{n}": v.detach().clone() for n, v in self.encoder.named_buffers()})
        phi = {n: p.detach().requires_grad_(True) for n, p in self.simnet.named_parameters()}

        def inner(th: Params, ph: Params) -> torch.Tensor:
            f, logits = self.net(x, {**th, **fixed})
            sim = functional_call(self.simnet, ph, (f[:b].float(),))
            logits = logits.float()
            terms = discovery_losses(
                logits[:b], logits[b:], sim, batch.y, batch.labelled, self.threshold
            )
            return terms["loss"]

        def outer(th: Params) -> torch.Tensor:
            _, logits = self.net(x, {**th, **fixed})
            return masked_cross_entropy(logits[:b].float(), batch.y, batch.labelled)

        with torch.enable_grad():
            ce, grads = simnet_meta_gradients(inner, outer, theta, phi, self.inner_lr)
        if world_size() > 1:  # one all-reduce: every rank takes the same SimNet step
            flat = sum_over_ranks(torch.cat([g.reshape(-1) for g in grads])) / world_size()
            grads = list(flat.split([g.numel() for g in grads]))
            grads = [g.view_as(p) for g, p in zip(grads, phi.values())]
        opt = self.simnet_optimizer()
        for p, g in zip(self.simnet.parameters(), grads):
            p.grad = g.detach().to(p.dtype)
        opt.step()
        for p in self.simnet.parameters():
            p.grad = None
        return ce

    def discovery_step(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        b = batch.y.shape[0]
        x = torch.cat([batch.views[0], batch.views[1][~batch.labelled]])
        simnet_ce = self.update_simnet(x, batch)
        f, logits = self.net(x)  # step (3): the model, SimNet fixed
        with torch.no_grad():
            sim = self.simnet(f[:b].float())
        logits = logits.float()
        out = discovery_losses(logits[:b], logits[b:], sim, batch.y, batch.labelled, self.threshold)
        out = {k: (v if k == "loss" else v.detach()) for k, v in out.items()}
        out["simnet_ce"] = simnet_ce
        return out

    # ------------------------------------------------------------------ stage B
    def ramp(self) -> float:
        """Progress through stage B for the lambda_u ramp: (stage-B epoch + batch / batches)
        / stage-B epochs."""
        length = self.problem.max_epochs - self.discovery_epochs
        batches = getattr(self.trainer, "num_training_batches", 1) if self._trainer else 1
        batches = batches if isinstance(batches, int) and batches > 0 else 1
        done = int(self.current_epoch) - self.discovery_epochs + self._batch_idx / batches
        return linear_rampup(done, length)

    def mixmatch_step(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        y = batch.y
        pseudo = (
            self.pseudo_target[batch.index.to(self.pseudo_target.device)].to(y.device)
            if self.pseudo_target.numel()
            else torch.full_like(y, -1)
        )
        is_x = batch.labelled | (pseudo >= 0)
        target = torch.where(batch.labelled, y, pseudo)[is_x]
        c = self.head.out_features
        x_in, u1, u2 = batch.views[0][is_x], batch.views[0][~is_x], batch.views[2][~is_x]
        n_u = u1.shape[0]
        with torch.no_grad():  # the guess, in train mode as the reference's
            guess = torch.zeros(0, c, device=y.device)
            if n_u:
                p = F.softmax(self.net(torch.cat([u1, u2]))[1].float(), dim=1)
                guess = sharpen((p[:n_u] + p[n_u:]) / 2, self.temperature)
        inputs = torch.cat([x_in, u1, u2])
        targets = torch.cat([F.one_hot(target, c).float(), guess, guess])
        lam = mixup_lambda(self.alpha)
        perm = torch.randperm(inputs.shape[0]).to(inputs.device)
        mixed_in, mixed_t = mixup(inputs, targets, lam, perm)
        logits = self.net(mixed_in)[1].float()
        n_x = x_in.shape[0]
        lx, lu = mixmatch_losses(logits[:n_x], mixed_t[:n_x], logits[n_x:], mixed_t[n_x:])
        weight = self.lambda_u * self.ramp()
        return {
            "loss": lx + weight * lu,
            "lx": lx.detach(),
            "lu": lu.detach(),
            "lu_weight": torch.tensor(weight),
            "pseudo_rows": (is_x & ~batch.labelled).float().mean(),
            "lam": torch.tensor(lam),
        }

    # ------------------------------------------------------------------ handover and labels
    def num_labelled_rows(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        splits = getattr(datamodule, "splits", None)
        if splits is None:
            raise RuntimeError("OpenLDN's pseudo-labels need the datamodule's splits")
        return len(splits.labelled)

    @torch.no_grad()
    def pseudo_label(self, epoch: int, source: str) -> None:
        """Class-balanced novel pseudo-labels of the unlabelled rows from the stage-A model
        (`source="stage_a"`) or the EMA model (`"ema"`; the network without an EMA)."""
        ema = source == "ema" and self.ema is not None
        probs, _ = self.eval_rows(
            "unlabelled",
            "OpenLDN's pseudo-labels",
            lambda x: F.softmax(self.logits(x, ema=ema).float(), dim=1),
        )
        n_lab = self.num_labelled_rows()
        per_class = n_lab // max(1, self.problem.num_known)
        rows, targets = class_balanced_pseudo_labels(probs, self.problem.num_known, per_class)
        target = torch.full((n_lab + probs.shape[0],), -1, dtype=torch.long, device=self.device)
        target[n_lab + rows.to(self.device)] = targets.to(self.device)
        self.pseudo_target = target
        entry = {
            "epoch": int(epoch),
            "model": source,
            "per_class": int(per_class),
            "selected": int(rows.numel()),
            "classes": int(targets.unique().numel()),
        }
        self.pseudo_labelling.append(entry)
        log.info("OpenLDN pseudo-labels (epoch %d): %s", epoch, entry)

    def start_stage_b(self) -> None:
        """The network restarts (from its initial weights unless `stage_b_init: continue`), the
        optimiser state is cleared (a new optimiser in the reference) and the EMA copies it."""
        if self._initial_state is not None:
            with torch.no_grad():
                for name, value in self._net_state().items():
                    value.copy_(self._initial_state[name])
        trainer = self._trainer
        for opt in trainer.optimizers if trainer is not None else []:
            opt.state.clear()
        if self.ema is not None:
            self.ema["encoder"].load_state_dict(self.encoder.state_dict())
            self.ema["head"].load_state_dict(self.head.state_dict())
        self.stage_b_started.fill_(True)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        epoch = int(self.current_epoch)
        if self.stage(epoch) == 1:
            return
        if not bool(self.stage_b_started):  # the handover (also after resuming before it)
            self.pseudo_label(epoch, "stage_a")
            self.start_stage_b()
        elif self.pl_every and (epoch - self.discovery_epochs) % self.pl_every == 0:
            self.pseudo_label(epoch, "ema")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._batch_idx = int(batch_idx)  # for the lambda_u ramp
        return super().training_step(batch, batch_idx)

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        stage = self.stage()
        out = self.discovery_step(batch) if stage == 1 else self.mixmatch_step(batch)
        out["stage"] = torch.tensor(float(stage))
        return out

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser's step, then in stage B the EMA's (inside the step, so a step
        checkpoint holds both)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and bool(self.stage_b_started):
            for name, student in (("encoder", self.encoder), ("head", self.head)):
                ema_update(self.ema[name], student, self.ema_decay, self.ema_student_decay)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = build_optimizer({**self.optim, "scheduler": "none"}, params, self.problem.max_epochs)
        total = int(self.problem.max_epochs)

        def factor(epoch: int) -> float:
            return two_stage_lr_factor(
                epoch, self.optim, self.discovery_epochs, total, self.stage_b_lr_ratio
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ bookkeeping
    def record_extras(self) -> dict[str, Any]:
        return {
            "openldn": {
                "discovery_epochs": self.discovery_epochs,
                "stage_b_start_epoch": self.discovery_epochs,
                "stage_b_init": self.stage_b_init,
                "pseudo_labelling": list(self.pseudo_labelling),
            }
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._simnet_opt is not None:
            checkpoint["openldn_simnet_optimizer"] = self._simnet_opt.state_dict()
        elif self._simnet_opt_state is not None:
            checkpoint["openldn_simnet_optimizer"] = self._simnet_opt_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._simnet_opt = None  # rebuilt at its next use, from the saved state
        self._simnet_opt_state = checkpoint.get("openldn_simnet_optimizer")
