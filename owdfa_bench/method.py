"""The contract every method implements, and the parts of training all methods share.

A method is a subclass of `OWDFAMethod` in `methods/<name>.py`. It builds its model in
`__init__`, computes its losses in `training_losses` and its test-time class scores in
`predict_logits`; optional hooks (`on_train_epoch_start/end`) hold per-epoch logic such as CAL's
adaptive threshold or prototype pruning. Everything else (batch unpacking, the labelled /
unlabelled tags, logging, the per-epoch evaluation on the test split, metrics, optimiser and
scheduler construction) lives here, so no method re-implements it.

The shared training batch hides the labels of unlabelled rows (`y = -1`). Only a method that
declares `uses_unlabelled_labels = True` (the oracle upper bound) receives them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from owdfa_bench.data.splits import LABELLED_TAG
from owdfa_bench.diagnostics import confidence_skew, pseudo_label_noise
from owdfa_bench.distributed import gather_rows, rows_in_order, sum_over_ranks, world_size
from owdfa_bench.metrics import evaluate_predictions


@dataclass(frozen=True)
class Problem:
    """What a method may know about the task it is trained on."""

    num_known: int  # K_k: known classes are labels 0..K_k-1, novel ones K_k..num_classes-1
    num_classes: int  # true total number of classes in the data (known + novel)
    k_mode: str = "known"  # "known": head size may use num_classes; "unknown": it may not
    k_estimate: int | None = None  # a total-K estimate given by the user under k=unknown
    max_epochs: int = 1
    real_label: int | None = None  # label of the REAL class (for `real_acc`), None if absent

    def __post_init__(self) -> None:
        if self.k_mode not in ("known", "unknown"):
            raise ValueError(f"k must be 'known' or 'unknown', got {self.k_mode!r}")
        if self.k_estimate is not None and self.k_estimate < self.num_known:
            raise ValueError(
                f"k.estimate={self.k_estimate} is below the number of known classes "
                f"({self.num_known}); set k.estimate to at least {self.num_known} or leave it null"
            )


@dataclass
class TrainBatch:
    """One training batch as methods see it."""

    views: list[torch.Tensor]  # one [B, 3, H, W] tensor per name in `train_views`
    y: torch.Tensor  # [B] long: the label of labelled rows, -1 for unlabelled rows
    labelled: torch.Tensor  # [B] bool
    index: torch.Tensor  # [B] row index in the merged (labelled + unlabelled) train set
    y_true: torch.Tensor | None = None  # only for methods with uses_unlabelled_labels


class OWDFAMethod(pl.LightningModule):
    """Base class: subclass it, build the model in `__init__`, implement the two abstract calls.

    Class attributes a method may override:
      train_views: which augmented views each training row carries ("weak", "strong").
      uses_unlabelled_labels: True only for oracles; otherwise unlabelled labels stay hidden.
      selection_metric: what the reference selects its checkpoint by (`selection=best_on_test`).
      train_on: "all" (labelled + unlabelled rows) or "labelled" (lower bound).
      carried_state: attribute names a checkpoint must hold for an exact resume.

    State that changes with every step changes inside the step (`training_losses`, or
    `optimizer_step` for what follows the optimiser, e.g. an EMA model), not in
    `on_train_batch_end`: a step checkpoint is written before that hook runs.
    """

    train_views: ClassVar[tuple[str, ...]] = ("weak", "strong")
    uses_unlabelled_labels: ClassVar[bool] = False
    selection_metric: ClassVar[str] = "all_acc"
    train_on: ClassVar[str] = "all"
    # Attributes (neither parameters nor buffers) the method keeps across steps or epochs, e.g.
    # ORCA's margin: saved in every checkpoint with the non-persistent buffers, so a resumed run
    # continues them (owdfa_bench/resume.py). Values: tensors, numbers, strings, None, and
    # lists / dicts of them; a method with other types overrides carried_state_dict / load.
    carried_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, problem: Problem, optim: dict[str, Any] | None = None):
        super().__init__()
        self.problem = problem
        self.optim = dict(optim or {})
        self.eval_history: list[dict[str, Any]] = []  # one evaluation record per epoch
        self.channels_last = False  # set by the runner from trainer.channels_last
        # per validation loader (0: test split, 1: unlabelled training rows for diagnostics)
        self._eval_outputs: dict[int, list[torch.Tensor]] = {}
        self._eval_targets: dict[int, list[torch.Tensor]] = {}

    # ----------------------------------------------------------------- to implement
    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Every loss term of one step; key "loss" is the total that is back-propagated."""
        raise NotImplementedError

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores [B, C] of a batch of test images (eval mode); prediction is the argmax."""
        raise NotImplementedError

    def k_estimated(self) -> int | None:
        """Total number of classes the method ended with under k=unknown (None when known).

        A method that counts its outputs' usage (`track_usage`) reports the number of outputs
        that were the argmax of a training row this epoch (its head size before any step). A
        method without any estimate reports, under k=unknown, the number of distinct classes
        it predicts on the test split.
        """
        usage = self._buffers.get("usage")
        if usage is None or self.problem.k_mode == "known":
            return None
        used = int((usage > 0).sum())
        return used if used > 0 else int(usage.numel())

    def confidence_thresholds(self) -> tuple[float, float]:
        """(known, novel) confidence above which the method trusts its own prediction of an
        unlabelled row: its pseudo-label threshold, for the `pseudo_noise_confident` diagnostic.

        A row whose argmax is a known id (< K_k) is compared with the first, otherwise the
        second. Methods without a threshold keep the default 0.95 for both.
        """
        return (0.95, 0.95)

    def load_reference_checkpoint(
        self, state_dict: dict[str, torch.Tensor], num_active: int | None = None
    ) -> dict[str, Any] | None:
        """Load a checkpoint in the layout of the method's official code release, if
        `state_dict` is one, and return a report of the load; None when it is not (then
        `owdfa-bench evaluate` loads it as one of ours). `num_active`: live prototypes, for a
        release that does not record them."""
        return None

    def record_extras(self) -> dict[str, Any]:
        """Method-specific entries for results.json (e.g. CAL's active prototypes per epoch)."""
        return {}

    def predictions_from_outputs(self, outputs: torch.Tensor) -> np.ndarray:
        """Turn the concatenated `predict_logits` outputs of the test set into class ids.

        The default is the argmax; a clustering method (GCD) overrides it.
        """
        return outputs.argmax(dim=1).numpy()

    def unlabelled_predictions(self, outputs: torch.Tensor) -> np.ndarray:
        """Class ids of the unlabelled training rows (diagnostics), after the test evaluation.

        The default is `predictions_from_outputs`; a clustering method assigns the rows to the
        clusters it has just computed instead of clustering again.
        """
        return self.predictions_from_outputs(outputs)

    def confidences_from_outputs(self, outputs: torch.Tensor) -> np.ndarray:
        """Confidence of each prediction: the max softmax probability of the class scores."""
        return outputs.float().softmax(dim=1).max(dim=1).values.numpy()

    # ----------------------------------------------------------------- shared training
    def track_usage(self, rows: int) -> None:
        """Count, per epoch, how many training rows each of `rows` outputs is the argmax of
        (`count_usage`), for `k_estimated`. Non-persistent: a checkpoint carries it as state of
        the epoch (`carried_state_dict`), and `on_train_epoch_start` zeroes it."""
        self.register_buffer("usage", torch.zeros(rows, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def count_usage(self, logits: torch.Tensor) -> None:
        """Add this batch's argmax outputs of `logits` [B, rows] to the usage counts (every
        rank's rows under DDP, so all replicas count the same)."""
        winners = gather_rows(logits.detach().argmax(1))
        self.usage += torch.bincount(winners, minlength=self.usage.numel())

    def on_train_epoch_start(self) -> None:
        usage = self._buffers.get("usage")
        if usage is not None:  # the usage counts are per epoch
            usage.zero_()

    @torch.no_grad()
    def eval_rows(
        self, split: str, needed_for: str, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fn(images)` of every row of a training split in row order, and the rows' labels
        (-1 for unlabelled rows), with the test transform and the model in eval mode meanwhile
        (`datamodule.eval_loader`). Under DDP each rank computes its share of the rows and every
        rank receives all of them, so state built from them is the same on every rank.

        `needed_for` names what the pass is for, in the error raised when the datamodule
        cannot give one.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "eval_loader"):
            raise RuntimeError(f"{needed_for}: the datamodule must provide eval_loader({split!r})")
        was_training = self.training
        self.eval()
        outputs, labels, index = [], [], []
        try:
            for batch in datamodule.eval_loader(split, shard=True):
                x = batch["image"].to(self.device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                outputs.append(fn(x))
                labels.append(batch["y"].to(self.device))
                index.append(batch["index"].to(self.device))
        finally:
            self.train(was_training)
        if not outputs:
            return torch.zeros(0, device=self.device), torch.zeros(
                0, dtype=torch.long, device=self.device
            )
        _, out, y = rows_in_order(torch.cat(index), torch.cat(outputs), torch.cat(labels))
        return out, y

    def make_train_batch(self, batch: dict[str, Any]) -> TrainBatch:
        labelled = batch["tag"] == LABELLED_TAG
        y_true = batch["y"].long()
        y = torch.where(labelled, y_true, torch.full_like(y_true, -1))
        views = list(batch["views"])
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return TrainBatch(
            views=views,
            y=y,
            labelled=labelled,
            index=batch["index"],
            y_true=y_true if self.uses_unlabelled_labels else None,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.training_losses(self.make_train_batch(batch))
        bs = len(batch["y"])
        for name, value in logged_terms(losses).items():
            self.log(
                f"train/{name}",
                value,
                batch_size=bs,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "loss",
            )
        return losses["loss"]

    # ----------------------------------------------------------------- shared evaluation
    def on_validation_epoch_start(self) -> None:
        self._eval_outputs.clear()
        self._eval_targets.clear()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0):
        x = batch["image"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = self.predict_logits(x)
        self._eval_outputs.setdefault(dataloader_idx, []).append(outputs.detach().float())
        self._eval_targets.setdefault(dataloader_idx, []).append(
            torch.stack([batch["y"], batch["index"]], 1).detach()
        )

    def gather_eval(self, loader: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and labels of one validation loader this epoch (0: the test split), gathered
        over DDP ranks, one row per image."""
        outputs = torch.cat(self._eval_outputs[loader])
        targets = torch.cat(self._eval_targets[loader])
        # the distributed sampler gives each rank every world-th row, repeating a few
        _, outputs, labels = rows_in_order(targets[:, 1], outputs, targets[:, 0])
        return outputs.cpu(), labels.cpu()

    def on_validation_epoch_end(self) -> None:
        if not self._eval_outputs or self.trainer.sanity_checking:
            return
        outputs, targets = self.gather_eval(0)
        record = self.evaluate_outputs(outputs, targets)
        if 1 in self._eval_outputs:
            record["metrics"].update(self.unlabelled_diagnostics(*self.gather_eval(1)))
        record["epoch"] = int(self.current_epoch)
        self.eval_history.append(record)
        scalars = {
            f"{'unlabelled' if k.startswith(('pseudo_', 'transductive_')) else 'test'}/{k}": v
            for k, v in record["metrics"].items()
            if v is not None
        }
        # computed from every rank's rows, so equal on every rank: nothing to reduce
        self.log_dict({k: float(v) for k, v in scalars.items()}, on_epoch=True)

    def evaluate_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """Metrics of one evaluation of the test split (predictions, metrics, confidence, K)."""
        y_true = targets.numpy().astype(np.int64)
        y_pred = np.asarray(self.predictions_from_outputs(outputs), dtype=np.int64)
        result = evaluate_predictions(y_true, y_pred, self.problem.num_known)
        metrics = result["metrics"]
        metrics["num_clusters"] = int(result["num_clusters"])
        real = self.problem.real_label
        if real is not None and bool((y_true == real).any()):
            metrics["real_acc"] = float((y_pred[y_true == real] == real).mean())
        confidence = self.confidences_from_outputs(outputs)
        metrics.update(confidence_skew(confidence, y_true, self.problem.num_known))
        k_est = self.k_estimated()
        if k_est is None and self.problem.k_mode == "unknown":
            k_est = int(result["num_clusters"])  # no own estimate: the clusters it actually uses
        if k_est is not None:
            metrics["k_estimated"] = k_est
        result["k_estimated"] = k_est
        return result

    def unlabelled_diagnostics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """Pseudo-label noise and transductive accuracy on the unlabelled training rows.

        `targets` are their hidden labels: they come from the datamodule's diagnostics loader
        and are used here only, after the method's predictions are fixed.
        """
        y_pred = np.asarray(self.unlabelled_predictions(outputs), dtype=np.int64)
        return pseudo_label_noise(
            targets.numpy().astype(np.int64),
            y_pred,
            self.confidences_from_outputs(outputs),
            self.confidence_thresholds(),
            self.problem.num_known,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["owdfa_eval_history"] = self.eval_history
        checkpoint["owdfa_method_state"] = self.carried_state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.eval_history = list(checkpoint.get("owdfa_eval_history", []))
        if "owdfa_method_state" in checkpoint:
            self.load_carried_state(checkpoint["owdfa_method_state"])

    def carried_state_dict(self) -> dict[str, Any]:
        """What the state dict lacks for an exact resume: the non-persistent buffers (e.g. the
        per-epoch usage counts, OwMatch's queues) and the `carried_state` attributes."""
        persistent = set(self.state_dict(keep_vars=True))
        buffers = {
            name: buf.detach().cpu().clone()
            for name, buf in self.named_buffers()
            if name not in persistent
        }
        attributes = {name: _detached(getattr(self, name)) for name in self.carried_state}
        return {"buffers": buffers, "attributes": attributes}

    def load_carried_state(self, state: dict[str, Any]) -> None:
        for name, value in state.get("buffers", {}).items():
            owner, _, leaf = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            current = getattr(module, leaf)
            setattr(module, leaf, value.to(current.device))  # may differ in size (queues)
        for name, value in state.get("attributes", {}).items():
            setattr(self, name, value)  # on the CPU until on_fit_start moves it (read first)

    def on_fit_start(self) -> None:
        # a resumed run loads its carried state before the model reaches its device
        for name in self.carried_state:
            setattr(self, name, _to_device(getattr(self, name), self.device))

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        return build_optimizer(
            self.optim, [p for p in self.parameters() if p.requires_grad], self.problem.max_epochs
        )


def logged_terms(losses: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The loss terms of a step as logged: detached float scalars, under DDP their mean over
    the ranks (one all-reduce), so every rank logs the global batch's values.

    Not Lightning's `sync_dist`: that reduces when a metric is first read, and the progress bar
    reads on rank 0 only, which would pair rank 0's reduction with another collective on the
    other ranks."""
    values = {
        name: (v.detach().float().reshape(()) if torch.is_tensor(v) else torch.tensor(float(v)))
        for name, v in losses.items()
    }
    if world_size() == 1:
        return values
    stacked = torch.stack([v.to(values["loss"].device) for v in values.values()])
    mean = sum_over_ranks(stacked) / world_size()
    return dict(zip(values, mean.unbind()))


def detach_terms(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`losses` with every term but the total ("loss") detached: the others are only logged."""
    return {k: (v if k == "loss" else v.detach()) for k, v in losses.items()}


def _detached(value: Any) -> Any:
    """A copy of `value` for a checkpoint: tensors detached on the CPU, containers copied."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, list | tuple):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def extract_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor state dict of a Lightning checkpoint (or of a bare state dict)."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            "the checkpoint holds no tensor state dict (no 'state_dict' entry and "
            "its top level is not one)"
        )
    return state


@lru_cache(maxsize=1)
def optimizer_registry() -> DictConfig:
    """conf/optimizers.yaml: how the names of a `method.optim` block become torch objects."""
    from owdfa_bench.resources import conf_dir

    return OmegaConf.load(conf_dir() / "optimizers.yaml")


def register_product_resolver() -> None:
    """`${owdfa.product:a,b}` of conf/optimizers.yaml (e.g. cosine's eta_min = lr x ratio).
    Checked at every build, never cached: Hydra's joblib launcher resets each job's resolvers
    to the launching process's, so a worker's second job would lose one registered in its first.
    """
    if not OmegaConf.has_resolver("owdfa.product"):
        OmegaConf.register_new_resolver("owdfa.product", lambda a, b: float(a) * float(b))


def build_optimizer(optim: dict[str, Any], params, max_epochs: int):
    """Optimizer and per-epoch scheduler from a method's `optim` block (`method.optim`).

    `optim["name"]` and `optim["scheduler"]` pick entries of conf/optimizers.yaml, which are
    instantiated with the block's values (the file's `unset` values for keys it lacks).
    """
    from hydra.utils import instantiate

    register_product_resolver()
    registry = optimizer_registry()
    values = {**OmegaConf.to_container(registry.unset), **optim}
    scheduler = values["scheduler"] or "none"
    built = OmegaConf.create(
        {
            "optim": values,
            "max_epochs": max(1, int(max_epochs)),
            "optimizer": _registry_entry(registry, "optimizers", str(values["name"]).lower()),
            "scheduler": _registry_entry(registry, "schedulers", str(scheduler)),
        }
    )
    opt = instantiate(built.optimizer, _convert_="all")(params)
    if built.scheduler is None:
        return opt
    lr_scheduler = instantiate(built.scheduler, _convert_="all")(opt)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "epoch"}}


def lr_factor(epoch: int, length: int, optim: dict[str, Any]) -> float:
    """The lr multiplier of `build_optimizer`'s scheduler for `optim`, `epoch` epochs into a
    schedule of `length` epochs, in closed form: for the methods that restart or rescale the
    schedule within a run (stages, rounds). StepLR, MultiStepLR, CosineAnnealingLR(T_max =
    length, eta_min = lr x eta_min_ratio; held at eta_min past T_max) or none; keys `optim`
    lacks take conf/optimizers.yaml's `unset` values, as `build_optimizer` does."""
    values = {**OmegaConf.to_container(optimizer_registry().unset), **optim}
    name = values["scheduler"] or "none"
    gamma = float(values["gamma"])
    if name == "none":
        return 1.0
    if name == "step":
        return float(gamma ** (epoch // max(1, int(values["step_size"]))))
    if name == "multistep":
        return float(gamma ** sum(1 for m in values["milestones"] if epoch >= int(m)))
    if name == "cosine":
        ratio, e = float(values["eta_min_ratio"]), min(epoch, max(1, length))
        return float(ratio + (1 - ratio) * (1 + math.cos(math.pi * e / max(1, length))) / 2)
    raise ValueError(f"method.optim.scheduler={name!r}: use step, multistep, cosine or none")


def _registry_entry(registry: DictConfig, group: str, name: str) -> Any:
    entries = registry[group]
    if name not in entries:
        key = "name" if group == "optimizers" else "scheduler"
        raise ValueError(
            f"method.optim.{key}={name!r}: conf/optimizers.yaml offers {sorted(entries)}; "
            "add an entry there for another torch.optim class"
        )
    entry = entries[name]
    return None if entry is None else OmegaConf.to_container(entry, resolve=False)
