"""The shared runner: one composed config in, one `results.json` out.

run(cfg): skip if done -> seed -> data splits -> method -> Lightning Trainer.fit (resumes from
the run folder's last checkpoint) -> the reported evaluation (last epoch by default, or best on
test when `selection=best_on_test`) -> results.json. Any failure is recorded as status "failed"
with its error before it is re-raised, and the logger is always closed.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from owdfa_bench.data.datamodule import DataSplits, OWDFADataModule, build_splits
from owdfa_bench.method import OWDFAMethod, Problem
from owdfa_bench.pretrain import resolve_pretrained_start
from owdfa_bench.records import (
    RESULTS_FILE,
    SCHEMA_VERSION,
    config_hash,
    git_commit,
    is_complete,
    package_versions,
    read_record,
    write_json_atomic,
)

log = logging.getLogger(__name__)
# Lightning's start-up banners (accelerator listing, product tips) say nothing about the run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch pytree notice via Lightning
SELECTIONS = ("last", "best_on_test")


class Timing(pl.Callback):
    """Images per second of training and evaluation steps (data loading included)."""

    def __init__(self) -> None:
        self.train_s = self.eval_s = 0.0
        self.train_images = self.eval_images = 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train_s += time.perf_counter() - self._t0
        self.train_images += len(batch["y"])

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self._t0 = time.perf_counter()

    def on_validation_batch_end(
        self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.eval_s += time.perf_counter() - self._t0
        self.eval_images += len(batch["y"])

    def rates(self) -> tuple[float | None, float | None]:
        rate = lambda n, s: round(n / s, 2) if s > 0 else None  # noqa: E731
        return rate(self.train_images, self.train_s), rate(self.eval_images, self.eval_s)


def apply_recipe(cfg: DictConfig) -> DictConfig:
    """Merge the chosen `method.recipes.<method.recipe>` block over the method's config.

    A method offers its reference's own recipe (optimiser, schedule, epochs, trainable layers)
    as a partial method config under `recipes`; the default recipe `fair` is the method's
    top-level values (the shared harness recipe). Methods without `recipes` are unchanged.
    """
    recipe = cfg.method.get("recipe")
    recipes = cfg.method.get("recipes")
    if recipe is None or recipe == "fair":
        return cfg
    if not recipes or recipe not in recipes:
        offered = ["fair", *(recipes or {})]
        raise ValueError(
            f"method.recipe={recipe!r}: {cfg.method.name} offers {offered}; e.g. "
            f"method.recipe={offered[-1]}"
        )
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)  # a recipe may add keys (e.g. an SGD momentum)
    merged.method = OmegaConf.merge(cfg.method, recipes[recipe])
    OmegaConf.set_struct(merged, True)
    return merged


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(str(cfg.run_dir))


def make_problem(cfg: DictConfig, splits: DataSplits, max_epochs: int) -> Problem:
    estimate = cfg.k.get("estimate")
    real = [c["label"] for c in splits.classes if c.get("code") == "REAL"]
    return Problem(
        num_known=splits.num_known,
        num_classes=splits.num_classes,
        k_mode=str(cfg.k.name),
        k_estimate=None if estimate is None else int(estimate),
        max_epochs=max_epochs,
        real_label=real[0] if real else None,
    )


def build_method(
    cfg: DictConfig, problem: Problem, start: dict[str, Any] | None = None
) -> OWDFAMethod:
    optim = OmegaConf.to_container(cfg.method.optim, resolve=True)
    backbone = OmegaConf.to_container(cfg.data.backbone, resolve=True)
    if start is not None:  # the synthetic benchmark's pretrained start
        backbone["weights"] = start["weights"]
    # partial first: Hydra would turn the Problem dataclass into a config node
    factory = instantiate(cfg.method.model, _partial_=True, _convert_="all")
    method = factory(problem=problem, optim=optim, backbone=backbone)
    if not isinstance(method, OWDFAMethod):
        raise TypeError(f"method.model._target_ must build an OWDFAMethod, got {type(method)}")
    return method


def build_datamodule(cfg: DictConfig, splits: DataSplits, method: OWDFAMethod) -> OWDFADataModule:
    return OWDFADataModule(
        splits,
        image_size=int(cfg.data.image_size),
        train_views=tuple(method.train_views),
        batch_size=int(cfg.method.batch_size),
        sampler=str(cfg.method.sampler),
        train_on=method.train_on,
        seed=int(cfg.seed),
        num_workers=int(cfg.trainer.num_workers),
        pin_memory=bool(cfg.trainer.pin_memory),
        reveal_unlabelled=bool(method.uses_unlabelled_labels),
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    kind = cfg.logger.name
    if kind == "none":
        return []
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        cell = f"{cfg.method.name}-{cfg.protocol.name}-k{cfg.k.name}"
        return [
            WandbLogger(
                project=str(cfg.logger.project),
                entity=cfg.logger.get("entity"),
                mode=str(cfg.logger.mode),
                save_dir=str(run_dir),
                group=cell,
                name=f"{cell}-seed{cfg.seed}",
                tags=[f"seed-{cfg.seed}", str(cfg.data.name)],
                job_type=str(cfg.sweep_name),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        ]
    raise ValueError(f"logger={kind!r}: use wandb, csv or none")


def close_loggers(loggers: list, summary: dict[str, Any] | None, failed: bool) -> None:
    """Always finish W&B runs, so jobs of one multirun never merge into one W&B run."""
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        import wandb

        if summary and wandb.run is not None:
            wandb.run.summary.update(summary)
        wandb.finish(exit_code=1 if failed else 0)


def build_trainer(
    cfg: DictConfig, run_dir: Path, loggers: list, timing: Timing, max_epochs: int
) -> pl.Trainer:
    t = cfg.trainer
    # one rolling checkpoint, rewritten after every epoch's evaluation, to resume from
    latest = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
    )
    callbacks = [timing, latest]
    if t.get("progress_bar", False):
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    return pl.Trainer(
        accelerator=str(t.accelerator),
        devices=t.devices,
        strategy=str(t.strategy),
        num_nodes=int(t.get("num_nodes", 1)),
        precision=str(t.precision),
        max_epochs=max_epochs,
        limit_train_batches=t.get("limit_train_batches"),
        limit_val_batches=t.get("limit_val_batches"),
        deterministic=t.deterministic,
        num_sanity_val_steps=0,
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=bool(t.get("progress_bar", False)),
        default_root_dir=str(run_dir),
        log_every_n_steps=int(t.get("log_every_n_steps", 10)),
        enable_model_summary=False,
        use_distributed_sampler=False,  # the datamodule shards its own samplers (DDP)
    )


def select_evaluation(history: list[dict[str, Any]], selection: str, metric: str) -> dict[str, Any]:
    """The reported evaluation: the last epoch, or (reference behaviour) the best on test."""
    if not history:
        raise RuntimeError("no evaluation was run; check trainer.limit_val_batches")
    if selection == "last":
        return history[-1]
    if selection == "best_on_test":
        score = lambda r: r["metrics"].get(metric, -math.inf)  # noqa: E731
        return max(history, key=score)  # first maximum on ties
    raise ValueError(f"selection={selection!r}: use one of {SELECTIONS}")


def base_record(cfg: DictConfig, cfg_hash: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "error": None,
        "method": str(cfg.method.name),
        "protocol": str(cfg.protocol.name),
        "k": str(cfg.k.name),
        "seed": int(cfg.seed),
        "split_seed": int(cfg.data.split_seed),
        "data": str(cfg.data.name),
        "synthetic": bool(cfg.data.get("synthetic", False)),
        "selection": str(cfg.selection),
        "config_hash": cfg_hash,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "device": device_name(cfg),
    }


def device_name(cfg: DictConfig) -> str:
    if str(cfg.trainer.accelerator) in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int, deterministic: bool) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate one cell; returns the results record (also written to disk)."""
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"selection={cfg.selection!r}: use one of {SELECTIONS}")
    cfg = apply_recipe(cfg)
    run_dir = run_dir_of(cfg)
    cfg_hash = config_hash(cfg)
    previous = read_record(run_dir)
    if not cfg.get("force", False) and is_complete(previous, cfg_hash):
        log.info(
            "skipping %s: results.json is complete for config %s (force=true re-runs)",
            run_dir,
            cfg_hash,
        )
        return previous
    if previous is not None and previous.get("config_hash") not in (None, cfg_hash):
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if ckpt.exists():  # never resume from a checkpoint of a different config
            ckpt.unlink()
    record = base_record(cfg, cfg_hash)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    write_json_atomic(run_dir / RESULTS_FILE, record)
    started = time.perf_counter()
    loggers: list = []
    try:
        set_threads(cfg.trainer.get("threads"))
        seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
        splits = build_splits(cfg)
        max_epochs = int(cfg.trainer.max_epochs or cfg.method.epochs)
        problem = make_problem(cfg, splits, max_epochs)
        start = resolve_pretrained_start(cfg.data)
        if start is not None:
            record["pretrained_start"] = {
                k: start[k] for k in ("key", "weights_sha256", "scores", "settings")
            }
        method = build_method(cfg, problem, start)
        method.channels_last = bool(cfg.trainer.get("channels_last", False))
        datamodule = build_datamodule(cfg, splits, method)
        loggers = build_loggers(cfg, run_dir)
        timing = Timing()
        trainer = build_trainer(cfg, run_dir, loggers, timing, max_epochs)
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = str(last) if last.exists() and not cfg.get("force", False) else None
        if resume:
            log.info("resuming from %s", resume)
        trainer.fit(method, datamodule=datamodule, ckpt_path=resume)
        chosen = select_evaluation(method.eval_history, str(cfg.selection), method.selection_metric)
        train_rate, eval_rate = timing.rates()
        record.update(
            status="complete",
            epochs=max_epochs,
            selected_epoch=chosen["epoch"],
            selection_metric=method.selection_metric if cfg.selection == "best_on_test" else None,
            metrics=chosen["metrics"],
            num_clusters=chosen["num_clusters"],
            k_estimated=chosen.get("k_estimated"),
            num_known=splits.num_known,
            num_classes=splits.num_classes,
            classes=splits.classes,
            per_class_acc=chosen["per_class_acc"],
            confusion=chosen["confusion"],
            history=[{"epoch": h["epoch"], "metrics": h["metrics"]} for h in method.eval_history],
            counts={
                "labelled": len(splits.labelled),
                "unlabelled": len(splits.unlabelled),
                "test": len(splits.test),
            },
            data_warnings=splits.warnings,
            unreadable=splits.unreadable,
            train_images_per_s=train_rate,
            eval_images_per_s=eval_rate,
            wall_s=round(time.perf_counter() - started, 2),
            **method.record_extras(),
        )
        write_json_atomic(run_dir / RESULTS_FILE, record)
        close_loggers(loggers, summary=record["metrics"], failed=False)
        return record
    except BaseException as err:
        record.update(
            status="failed",
            error=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=20),
            wall_s=round(time.perf_counter() - started, 2),
        )
        write_json_atomic(run_dir / RESULTS_FILE, record)
        close_loggers(loggers, summary=None, failed=True)
        raise
