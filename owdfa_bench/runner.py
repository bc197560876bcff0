"""The shared runner: one composed config in, one `results.json` out.

run(cfg): check the config -> skip if done -> seed -> data splits -> method -> Lightning
Trainer.fit (resumes from the run folder's last checkpoint, exactly: owdfa_bench/resume.py) ->
the reported evaluation (last epoch by default, or best on test when `selection=best_on_test`)
-> results.json. Every object that can be swapped is built from its config group with Hydra's
instantiate: the data source (`data._target_`), the method (`method.model._target_`), the
Trainer and its callbacks (`trainer`), the loggers (`logger.loggers`); the optimiser and
scheduler are built by the method (`owdfa_bench.method.build_optimizer`).

Any failure, SIGTERM and SIGINT included, is recorded as status "failed" with its error before
it is re-raised, and the loggers are always closed; a complete `results.json` is never
overwritten by an incomplete record (`owdfa_bench.records.write_run_record`). A run folder that
cannot be written ends in a RunFolderError and leaves no complete-looking record.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import string
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from owdfa_bench.cache import remove_stale_temporaries
from owdfa_bench.checkpoints import CheckpointFiles, previous_of, stale_temporaries
from owdfa_bench.config import SELECTIONS, TrainerConfig, check_config, check_k_estimate
from owdfa_bench.data.datamodule import OWDFADataModule, build_splits
from owdfa_bench.data.splits import DataSplits
from owdfa_bench.distributed import (
    ReplicaCheck,
    all_ranks,
    describe_world,
    is_rank_zero,
    quiet_console_unless_rank_zero,
)
from owdfa_bench.errors import (
    ConfigValueError,
    RunFolderError,
    as_user_error,
    one_line,
    signals_interrupt,
)
from owdfa_bench.locks import hold_run_folder
from owdfa_bench.method import OWDFAMethod, Problem
from owdfa_bench.pretrain import resolve_pretrained_start
from owdfa_bench.progress import header_line, result_line
from owdfa_bench.records import (
    ATTEMPT_CONFIG_FILE,
    ATTEMPT_FILE,
    CONFIG_FILE,
    RESULTS_FILE,
    RunRecord,
    config_hash,
    promote_attempt_config,
    read_latest_attempt,
    read_record,
    write_run_config,
    write_run_record,
    write_text_atomic,
)
from owdfa_bench.resume import ResumeCheckpoint

log = logging.getLogger(__name__)
progress_log = logging.getLogger("owdfa_bench.progress")
# Lightning's start-up banners (accelerator listing, product tips) say nothing about the run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch pytree notice via Lightning
# DDP: logged values are already equal on every rank (owdfa_bench.method.logged_terms)
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
# in the run folder, written by trainer.callbacks.last_checkpoint
CHECKPOINT = Path("checkpoints") / "last.ckpt"


class Timing(pl.Callback):
    """Images per second of training and evaluation steps (data loading included), over every
    segment of a resumed run (the totals are in the checkpoint)."""

    TOTALS = ("train_s", "eval_s", "train_images", "eval_images")

    def __init__(self) -> None:
        self.train_s = self.eval_s = 0.0
        self.train_images = self.eval_images = 0
        self._t0 = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.TOTALS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in self.TOTALS:
            setattr(self, name, state_dict[name])

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
        raise ConfigValueError(
            f"method.recipe={recipe!r}: {cfg.method.name} offers {offered}; e.g. "
            f"method.recipe={offered[-1]}"
        )
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)  # a recipe may add keys (e.g. an SGD momentum)
    merged.method = OmegaConf.merge(cfg.method, recipes[recipe])
    OmegaConf.set_struct(merged, True)
    return merged


# the files of a run folder that are written atomically (through hidden temporaries)
RUN_FOLDER_RECORDS = (RESULTS_FILE, ATTEMPT_FILE, CONFIG_FILE, ATTEMPT_CONFIG_FILE)


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(str(cfg.run_dir))


def max_epochs_of(cfg: DictConfig) -> int:
    """`trainer.max_epochs` (e.g. the smoke trainer's 2), else the method's epochs."""
    return int(cfg.trainer.max_epochs or cfg.method.epochs)


def make_problem(cfg: DictConfig, splits: DataSplits, max_epochs: int) -> Problem:
    check_k_estimate(cfg.k.estimate, splits.num_known, len(splits.unlabelled))
    real = [c["label"] for c in splits.classes if c.get("code") == "REAL"]
    return Problem(
        num_known=splits.num_known,
        num_classes=splits.num_classes,
        k_mode=str(cfg.k.name),
        k_estimate=cfg.k.estimate,
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
    # a method refuses hyper-parameters with ValueError; a missing weights file is the user's
    with as_user_error(ConfigValueError, f"method={cfg.method.name}", (ValueError,)):
        method = factory(problem=problem, optim=optim, backbone=backbone)
    if not isinstance(method, OWDFAMethod):
        raise TypeError(f"method.model._target_ must build an OWDFAMethod, got {type(method)}")
    return method


def build_datamodule(
    cfg: DictConfig, splits: DataSplits, method: OWDFAMethod, diagnostics: bool = True
) -> OWDFADataModule:
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
        diagnostics=diagnostics,
    )


WANDB_ID_FILE = "wandb_run_id"  # in the run folder: the W&B run a resumed run continues


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of this run: the one kept in the run folder when the run resumes (one
    W&B run however often it is interrupted), else a new one, kept there by rank 0."""
    kept = run_dir / WANDB_ID_FILE
    if resuming and kept.is_file() and kept.read_text().strip():
        return kept.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # W&B's own ids: 8 of these
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    if is_rank_zero():
        with run_folder_writes(run_dir):
            write_text_atomic(kept, run_id)
    return run_id


def wandb_node(node: DictConfig, run_dir: Path, resuming: bool) -> DictConfig:
    """A WandbLogger's settings for this run: the run id (`wandb_run_id`), resumed with
    resume="allow", and WANDB_MODE, when set, over `logger.mode` (W&B's own rule: the
    environment wins)."""
    node = node.copy()
    with open_dict(node):
        node.id = wandb_run_id(run_dir, resuming)
        node.resume = "allow"
        if os.environ.get("WANDB_MODE"):
            node.mode = os.environ["WANDB_MODE"]
    return node


def build_loggers(cfg: DictConfig, run_dir: Path | None = None, resuming: bool = False) -> list:
    """The Lightning loggers of `logger.loggers`, each given the resolved config; a W&B
    logger continues the run's W&B run when the run resumes (`wandb_node`)."""
    nodes = [node for node in cfg.logger.loggers.values() if node is not None]
    if run_dir is not None:
        nodes = [
            wandb_node(node, run_dir, resuming)
            if node.get("_target_", "").endswith("WandbLogger")
            else node
            for node in nodes
        ]
    loggers = [instantiate(node) for node in nodes]
    if loggers:
        config = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(config)
    return loggers


def close_loggers(loggers: list, summary: dict[str, Any] | None, failed: bool) -> None:
    """Always finish W&B runs, so jobs of one multirun never merge into one W&B run."""
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        import wandb

        if summary and wandb.run is not None:
            wandb.run.summary.update(summary)
        wandb.finish(exit_code=1 if failed else 0)


def build_callbacks(trainer_cfg: DictConfig) -> list[pl.Callback]:
    """The callbacks of `trainer.callbacks` (null entries left out; progress bars only with
    `trainer.progress_bar`)."""
    callbacks = [instantiate(node) for node in trainer_cfg.callbacks.values() if node is not None]
    if not trainer_cfg.progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def build_trainer(
    trainer_cfg: DictConfig,
    run_dir: Path,
    max_epochs: int,
    loggers: list | None = None,
    callbacks: list[pl.Callback] | None = None,
    **overrides: Any,
) -> pl.Trainer:
    """The Lightning Trainer of `trainer` (`_target_` and its arguments; the runner's own keys
    left out), with the settings every run of this harness shares."""
    arguments = {k: v for k, v in trainer_cfg.items() if k not in TrainerConfig.RUNNER_KEYS}
    return instantiate(
        arguments,
        max_epochs=max_epochs,
        logger=loggers or False,
        callbacks=callbacks or [],
        enable_progress_bar=bool(trainer_cfg.progress_bar),
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,  # a sanity pass would count as an evaluation of the method
        enable_model_summary=False,
        use_distributed_sampler=False,  # the datamodule shards its own samplers (DDP)
        plugins=trainer_plugins(),
        **overrides,
    )


def trainer_plugins() -> list:
    """The checkpoint IO (weights-only reads, atomic writes, one-line errors) and, in a SLURM
    job, SLURM's cluster environment with Lightning's auto-requeue off: the one requeue
    mechanism is submitit's (conf/hydra/launcher/slurm.yaml), which relaunches the Hydra job,
    and the job resumes from the run folder's checkpoint."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    plugins: list = [CheckpointFiles()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


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


@contextmanager
def run_folder_writes(run_dir: Path) -> Iterator[None]:
    """An OSError while writing the run folder (read-only, full) becomes one line naming it."""
    try:
        yield
    except OSError as err:
        raise RunFolderError(
            f"cannot write the run folder {run_dir} ({err.strerror or err}: "
            f"{err.filename or run_dir}); make it writable and free space there, or set "
            "output_root to another folder"
        ) from err


def resume_decision(run_dir: Path, cfg_hash: str, force: bool) -> tuple[str | None, bool]:
    """(the checkpoint to resume from or None, whether the folder's checkpoint is stale): read
    only, so that every rank of a run decides from the same files (rank 0 changes them later,
    in `RunFolder.setup`). A checkpoint of another config is never resumed; force starts over."""
    last = run_dir / CHECKPOINT
    # a write killed between keeping the previous checkpoint and renaming the new one leaves
    # only the previous (owdfa_bench/checkpoints.py)
    found = next((p for p in (last, previous_of(last)) if p.exists()), None)
    if found is None:
        return None, False
    latest = read_latest_attempt(run_dir)  # the attempt the checkpoint belongs to
    stale = latest is not None and latest.config_hash not in (None, cfg_hash)
    return (None if stale or force else str(found)), stale


class RunFolder(pl.Callback):
    """Prepares the run folder on global rank 0 once the Trainer's processes exist (its `setup`
    runs after the process group is up, before a checkpoint is restored): the resolved
    `config.yaml`, the running record (`device` names the world), and a stale checkpoint
    removed. Every rank decided what to resume from the files as they were before any rank
    changed them (`resume_decision`); the decisions are compared here, so ranks that see
    different folders (a run folder not on a shared file system) stop before training."""

    def __init__(
        self, cfg: DictConfig, run_dir: Path, record: RunRecord, resume: str | None, stale: bool
    ):
        self.cfg, self.run_dir, self.record = cfg, run_dir, record
        self.resume, self.stale = resume, stale
        self.prepared = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            world = describe_world(trainer)
            self.record.device = f"{self.record.device} x {world['world_size']} processes " + (
                f"({world['strategy']}, {world['backend']})"
            )
            self.record.distributed = world
            decisions = all_ranks(self.resume)
            if len(set(decisions)) > 1:
                raise RunFolderError(
                    f"the ranks of this run see different run folders at {self.run_dir} "
                    f"(resume from: {decisions}); put output_root on a file system every node "
                    "shares"
                )
        if trainer.is_global_zero:
            self.write()

    def write(self) -> None:
        """The folder as a run starts: config, running record, no stale checkpoint."""
        with run_folder_writes(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            last = self.run_dir / CHECKPOINT
            for leftover in stale_temporaries(last):  # of a write that was killed
                leftover.unlink(missing_ok=True)
            if self.stale:  # never resume from a checkpoint of a different config
                last.unlink(missing_ok=True)
                previous_of(last).unlink(missing_ok=True)
            for name in RUN_FOLDER_RECORDS:  # of a record write that was killed
                remove_stale_temporaries(self.run_dir / name, age_s=0.0)
            write_run_config(self.run_dir, self.cfg, self.record)  # never over a complete one's
            write_run_record(self.run_dir, self.record)  # never over a complete record
        self.prepared = True


def unrecorded_failure(run_dir: Path, write_error: OSError) -> str:
    """What the one-line error adds when the failure record could not be written."""
    previous = read_latest_attempt(run_dir)
    says = f"still says {previous.status!r}" if previous is not None else "is not there"
    return (
        f"the failure could not be recorded in {run_dir} "
        f"({write_error.strerror or write_error}): its record {says}"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate one cell; returns the results record as written to results.json
    (on every rank of a multi-process run; only global rank 0 writes the run folder). A cell
    that another launch is training (its run folder's lock is held, `owdfa_bench/locks.py`)
    is skipped: the result is `{"status": "skipped", "held_by": ...}`."""
    cfg = apply_recipe(cfg)
    check_config(cfg)
    quiet_console_unless_rank_zero()
    run_dir = run_dir_of(cfg)
    if not is_rank_zero():  # rank 0 of this run holds the folder's lock for every rank
        return run_held(cfg, run_dir)
    with ExitStack() as held:
        with run_folder_writes(run_dir):
            holder = held.enter_context(hold_run_folder(run_dir))
        if holder is None:
            return run_held(cfg, run_dir)
    log.warning(
        "skipping %s: another launch is training it (%s); its record will be there when it ends",
        run_dir,
        holder,
    )
    return {"status": "skipped", "run_dir": str(run_dir), "held_by": holder}


def run_held(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`run` once the run folder's lock is held (by rank 0 of this run)."""
    cfg_hash = config_hash(cfg)
    if is_rank_zero():
        progress_log.info(header_line(cfg, run_dir))
    previous = read_record(run_dir)
    if not cfg.force and previous is not None and previous.is_complete(cfg_hash):
        log.info(
            "skipping %s: results.json is complete for config %s (force=true re-runs)",
            run_dir,
            cfg_hash,
        )
        return previous.to_dict()
    resume, stale = resume_decision(run_dir, cfg_hash, bool(cfg.force))
    set_threads(cfg.trainer.threads)
    record = RunRecord.from_config(cfg, cfg_hash, device_name(cfg))  # threads set: device right
    started = time.perf_counter()
    folder = RunFolder(cfg, run_dir, record, resume, stale)
    trained = Trained()
    try:
        with signals_interrupt():
            train_cell(cfg, record, run_dir, started, resume, trained, folder)
            complete_record(record, trained, cfg, started)
            if is_rank_zero():
                with run_folder_writes(run_dir):
                    write_run_record(run_dir, record)
                    promote_attempt_config(run_dir)
                    # complete: never resumed again, so the checkpoint before the last goes
                    previous_of(run_dir / CHECKPOINT).unlink(missing_ok=True)
        close_loggers(trained.loggers, summary=record.metrics, failed=False)
        if is_rank_zero():
            progress_log.info(result_line(record.to_dict()))
        return record.to_dict()
    except BaseException as err:
        record.status = "failed"
        record.error = f"{type(err).__name__}: {one_line(err)}"
        record.traceback = traceback.format_exc(limit=20)
        record.resumed, record.wall_s = trained.resumed(), trained.wall_s(started)
        if is_rank_zero():  # the failure is recorded once
            try:
                if not folder.prepared:  # failed before the Trainer set up
                    write_run_config(run_dir, cfg, record)
                write_run_record(run_dir, record)
            except OSError as write_error:  # a full or read-only folder: nothing more to write
                err.add_note(unrecorded_failure(run_dir, write_error))
                log.error("%s", err.__notes__[-1])
        close_loggers(trained.loggers, summary=None, failed=True)
        raise


@dataclass
class Trained:
    """What `train_cell` built, for the record (and for the failure record, as far as it got)."""

    splits: DataSplits | None = None
    method: OWDFAMethod | None = None
    timing: Timing | None = None
    checkpoints: ResumeCheckpoint | None = None
    replicas: ReplicaCheck | None = None
    loggers: list = field(default_factory=list)

    def resumed(self) -> list[dict[str, Any]]:
        return list(self.checkpoints.resumed) if self.checkpoints is not None else []

    def wall_s(self, started: float) -> float:
        """Wall seconds of every segment (the earlier ones up to the checkpoint resumed)."""
        if self.checkpoints is not None:
            return round(self.checkpoints.wall_s(), 2)
        return round(time.perf_counter() - started, 2)


def train_cell(
    cfg: DictConfig,
    record: RunRecord,
    run_dir: Path,
    started: float,
    resume: str | None,
    trained: Trained,
    folder: RunFolder,
) -> None:
    """Seed, build the data, the method, the loggers and the Trainer, and fit (from `resume`,
    a checkpoint, when given); what it builds goes into `trained` as it goes. `folder` prepares
    the run folder once the Trainer's processes exist."""
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    setup_started = time.perf_counter()
    trained.splits = splits = build_splits(cfg.data, cfg.protocol)
    record.data_digest = splits.data_digest
    record.setup_s = {"data": round(time.perf_counter() - setup_started, 2)}
    max_epochs = max_epochs_of(cfg)
    problem = make_problem(cfg, splits, max_epochs)
    start_started = time.perf_counter()
    start = resolve_pretrained_start(cfg.data)
    if start is not None:
        record.pretrained_start = {
            k: start[k] for k in ("key", "weights_sha256", "scores", "settings")
        }
        # built here or waited for (another run of a sweep building it): not training time
        record.setup_s["pretrained_start"] = round(time.perf_counter() - start_started, 2)
    trained.method = method = build_method(cfg, problem, start)
    method.channels_last = bool(cfg.trainer.channels_last)
    datamodule = build_datamodule(cfg, splits, method)
    trained.loggers = build_loggers(cfg, run_dir, resuming=resume is not None)
    trained.timing = Timing()
    callbacks = [folder, trained.timing, *build_callbacks(cfg.trainer)]
    trained.checkpoints = next((c for c in callbacks if isinstance(c, ResumeCheckpoint)), None)
    trained.replicas = next((c for c in callbacks if isinstance(c, ReplicaCheck)), None)
    if trained.checkpoints is not None:
        identity = {"config_hash": record.config_hash, "method": record.method, "k": record.k}
        # wall_s: training and evaluation; the data and the pretrained start are in setup_s
        trained.checkpoints.begin(identity, time.perf_counter())
    trainer = build_trainer(cfg.trainer, run_dir, max_epochs, trained.loggers, callbacks)
    refuse_relaunch_in_a_sweep(trainer)
    if resume and is_rank_zero():
        log.info("resuming from %s", resume)
    trainer.fit(method, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    wait_for_launched_ranks(trainer)


def refuse_relaunch_in_a_sweep(trainer: pl.Trainer) -> None:
    """Lightning starts the other ranks of a DDP run on one machine by running this process's
    command again; in a multirun that command is the whole sweep. Such cells run one at a
    time, or through a launcher that starts every rank itself (SLURM)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    environment = getattr(trainer.strategy, "cluster_environment", None)
    relaunches = (
        trainer.world_size > 1
        and environment is not None
        and not environment.creates_processes_externally
    )
    if relaunches and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigValueError(
            f"trainer.devices={trainer.num_devices} in a multirun on one machine: Lightning "
            "would start the other ranks by running the whole sweep again; run DDP cells one "
            "at a time (python run.py ... trainer=ddp), or submit the sweep with "
            "hydra/launcher=slurm hydra.launcher.tasks_per_node=<devices>, where SLURM starts "
            "every rank"
        )


def wait_for_launched_ranks(trainer: pl.Trainer, timeout_s: float = 300.0) -> None:
    """Rank 0 of processes Lightning launched itself (DDP on one machine) waits for the other
    ranks to exit, so the run succeeds only when every rank exited 0. Ranks started by SLURM or
    torchrun are their launcher's to watch."""
    import subprocess

    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    for local_rank, proc in enumerate(procs, start=1):
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = None
        if status != 0:
            raise RuntimeError(
                f"DDP rank {local_rank} (pid {proc.pid}) "
                + ("did not exit" if status is None else f"exited with status {status}")
                + f" after training; its log is in {trainer.default_root_dir}"
            )


def complete_record(record: RunRecord, trained: Trained, cfg: DictConfig, started: float) -> None:
    """Fill the record of a finished fit: the reported evaluation, history, counts, timings."""
    method, splits = trained.method, trained.splits
    chosen = select_evaluation(method.eval_history, str(cfg.selection), method.selection_metric)
    train_rate, eval_rate = trained.timing.rates()
    record.status = "complete"
    record.epochs = max_epochs_of(cfg)
    record.selected_epoch = chosen["epoch"]
    record.selection_metric = method.selection_metric if cfg.selection == "best_on_test" else None
    record.metrics = chosen["metrics"]
    record.num_clusters = chosen["num_clusters"]
    record.k_estimated = chosen.get("k_estimated")
    record.num_known, record.num_classes = splits.num_known, splits.num_classes
    record.classes = splits.classes
    record.per_class_acc, record.confusion = chosen["per_class_acc"], chosen["confusion"]
    record.history = [{"epoch": h["epoch"], "metrics": h["metrics"]} for h in method.eval_history]
    record.counts = {
        "labelled": len(splits.labelled),
        "unlabelled": len(splits.unlabelled),
        "test": len(splits.test),
    }
    record.data_warnings, record.unreadable = splits.warnings, splits.unreadable
    record.face_crops = splits.face_crops
    record.train_images_per_s, record.eval_images_per_s = train_rate, eval_rate
    record.resumed = trained.resumed()
    record.wall_s = trained.wall_s(started)
    record.extras = method.record_extras()
    if record.distributed is not None and trained.replicas is not None:
        record.distributed["replica_checks"] = list(trained.replicas.checks)
