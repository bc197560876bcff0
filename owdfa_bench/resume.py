"""Exact resume: what a checkpoint holds beyond Lightning's own state, and when it is put back.

A run interrupted at any point and launched again continues from `<run_dir>/checkpoints/
last.ckpt` and ends with the same metrics, history and confusion matrix as the uninterrupted
run, bit for bit, on the CPU with `trainer.num_workers=0` (the CPU default). Lightning's
checkpoint holds the model, the optimiser and scheduler, the loop counters and the callbacks'
states (`Timing`'s so the throughput covers every segment); `ResumeCheckpoint` adds
`checkpoint["owdfa_resume"]`:

- the global random state (torch CPU and CUDA, NumPy, Python `random`), read when the
  checkpoint is written and put back in `on_train_start`, the last hook before the resumed
  run's next draw: augmentations, dropout and every DataLoader iteration draw from it;
- the train sampler's place (`owdfa_bench/data/resumable.py`): the state its draws started the
  epoch from and how many of them were trained on, replayed on resume;
- the wall time of the earlier segments and the list of resumptions, for the record;
- the run's config hash, method and k, so a checkpoint is never resumed by another config
  and `owdfa-bench evaluate` can say what a checkpoint is.

The method's own state outside its state dict (`OWDFAMethod.carried_state`: CAL's per-epoch
statistics, ORCA's margin, OwMatch's queues, GCD's centres, ...) is saved by the method.

When: every epoch end, after the method's `on_train_epoch_end` (a `Checkpoint` callback runs
its epoch-end hook after the module's), and, with `every_n_steps`, every that many optimizer
steps within an epoch, so an interruption loses at most that many steps. Both restore exactly:
a step checkpoint is written in `on_train_batch_end`, before the next batch draws anything,
and Lightning resumes the epoch at the next batch; the last batch of an epoch is left to the
epoch-end checkpoint, because Lightning treats a checkpoint written at the epoch's last batch as
the finished epoch and would skip its evaluation and epoch-end hooks. Per-step method state
therefore changes inside the training step (`training_losses`, `optimizer_step`), never in
`on_train_batch_end`, which runs after this callback's.
"""

from __future__ import annotations

import datetime
import logging
import random
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from owdfa_bench.checkpoints import RESUME_KEY, START_OVER
from owdfa_bench.distributed import all_ranks
from owdfa_bench.errors import CheckpointError
from owdfa_bench.progress import FILE_ONLY

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """The global random state, in types a weights-only checkpoint reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rank's random state in a checkpoint's resume state (one dict: written by one
    process before multi-process runs were recorded per rank)."""
    rng = state["rng"]
    return list(rng) if isinstance(rng, list) else [rng]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ResumeCheckpoint(Checkpoint):
    """Writes `<dirpath>/<filename>.ckpt` at every epoch end and every `every_n_steps`
    optimizer steps within an epoch (null: epoch ends only), and restores what Lightning does
    not when a run resumes from it (module docstring).

    The runner calls `begin(...)` before fitting; after fitting, `resumed` lists the
    checkpoints this run continued from and `wall_s()` its wall time over every segment.
    """

    def __init__(self, dirpath: str, filename: str = "last", every_n_steps: int | None = None):
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise CheckpointError(
                f"trainer.callbacks.last_checkpoint.every_n_steps={every_n_steps}: must be an "
                "integer >= 1 or null (epoch ends only); e.g. every_n_steps=50"
            )
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.run: dict[str, Any] = {}
        self.resumed: list[dict[str, Any]] = []
        self._started = time.perf_counter()
        self._carried_s = 0.0  # wall time of the earlier segments, up to their checkpoints
        self._saving: dict[str, Any] | None = None
        self._restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the runner's side
    def begin(self, run: dict[str, Any], started: float) -> None:
        """What the checkpoint says about the run (config hash, method, k) and when this
        segment started (`time.perf_counter()`)."""
        self.run, self._started = dict(run), started

    def wall_s(self) -> float:
        return self._carried_s + time.perf_counter() - self._started

    # ------------------------------------------------------------------ writing
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if not n or trainer.global_step % n or batch_idx + 1 >= trainer.num_training_batches:
            return
        self.save(trainer, batches_done=batch_idx + 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer, batches_done=None)

    def save(self, trainer: pl.Trainer, batches_done: int | None) -> None:
        """Write the checkpoint: `batches_done` batches into the epoch, or None at its end."""
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._saving = {"batches_done": batches_done}
        try:
            # the full state; written atomically (owdfa_bench.checkpoints.CheckpointFiles)
            trainer.save_checkpoint(self.path, weights_only=False)
        finally:
            self._saving = None
        if not trainer.is_global_zero:
            return
        log.info(
            "checkpoint %s: epoch %d, step %d%s",
            self.path.name,
            trainer.current_epoch,
            trainer.global_step,
            "" if batches_done is None else f" ({batches_done} batches into the epoch)",
            extra=FILE_ONLY,  # the run's log, not the terminal
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._saving is None:  # a checkpoint written by someone else: no resume state
            return
        done = self._saving["batches_done"]
        datamodule = trainer.datamodule
        checkpoint[RESUME_KEY] = {
            "at_epoch_end": done is None,
            "epoch": int(trainer.current_epoch) + (1 if done is None else 0),  # continues at
            "global_step": int(trainer.global_step),
            # every rank's random state (each draws its own augmentations), rank 0's first;
            # every rank writes its checkpoint dict, rank 0 the file
            "rng": all_ranks(capture_rng()),
            "sampler": datamodule.sampler_state(done) if datamodule is not None else None,
            "wall_s": self.wall_s(),
            "resumed": list(self.resumed),
            "run": dict(self.run),
        }

    # ------------------------------------------------------------------ resuming
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(RESUME_KEY)
        if state is None:  # CheckpointFiles refuses such a file first
            raise CheckpointError(f"resuming: {self.path} holds no resume state; {START_OVER}")
        theirs, ours = state["run"].get("config_hash"), self.run.get("config_hash")
        if theirs and ours and theirs != ours:
            raise CheckpointError(
                f"resuming: {self.path} was written by a run of config {theirs}, this run is "
                f"config {ours}; {START_OVER}"
            )
        entry = {"from_epoch": state["epoch"], "from_step": state["global_step"], "at": now_iso()}
        self.resumed = [*state["resumed"], entry]
        self._carried_s = float(state["wall_s"])
        datamodule = trainer.datamodule
        if state["sampler"] is not None and datamodule is not None:
            datamodule.resume_sampler(state["sampler"], at_epoch_boundary=state["at_epoch_end"])
        ranks = rng_states(state)
        if len(ranks) != trainer.world_size:
            raise CheckpointError(
                f"resuming: {self.path} was written by a run of {len(ranks)} processes, this run "
                f"has {trainer.world_size}; relaunch it with the same trainer.devices and "
                f"trainer.num_nodes, or {START_OVER}"
            )
        self._restore = state
        if trainer.is_global_zero:
            log.info("resuming at epoch %d, step %d", state["epoch"], state["global_step"])

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restore is not None:
            restore_rng(rng_states(self._restore)[trainer.global_rank])
            self._restore = None
