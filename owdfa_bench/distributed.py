"""One run over several processes (DDP): what the runner and the methods share across ranks.

Lightning's DDP gives every rank a replica of the method, a share of each batch, and the
average of the ranks' gradients. What a method builds from data outside the gradient (CAL's
thresholds, OwMatch's queues, usage counts, k-means centres, class priors) is its own: the rule
of this harness is that such state is built from every rank's rows, so that after every step
each replica holds the state one process would hold after seeing the same rows. The helpers
below are identities in one process, so a one-process run is unchanged bit for bit.

- `gather_rows(t)`: every rank's rows of `t`, rank 0's first (the row counts may differ).
- `sum_over_ranks(t)`: the element-wise sum over ranks (counts, sums of a mean).
- `from_rank_zero(value)`: rank 0's value on every rank, for what is computed once (a
  clustering whose GPU kernels are not bitwise reproducible).
- `ReplicaCheck`: at every epoch end a digest of each rank's parameters, buffers, optimiser
  state, method state and sampler place is gathered; ranks that differ stop the run, naming
  what differs. The record lists the digests (`distributed.replica_checks`).

What DDP cannot make equal to one process with the same global batch, and no helper here
changes: batch-norm statistics are computed over each rank's share of the batch (the running
statistics are rank 0's: DDP broadcasts buffers before every forward), and any term defined
over "the batch" (a contrastive set, a batch mean such as SimGCD's mean-entropy regulariser)
is over the rank's share, and a mean over a part of the batch whose size differs between ranks
(the labelled rows under the weighted sampler) is each rank's mean, averaged with equal weights
by DDP. Methods name theirs in their docstring.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes in the run's process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_rank() -> int:
    """This process's rank: the process group's, else what Lightning read from the launcher's
    environment (LOCAL_RANK, RANK, SLURM_PROCID) before any group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    """True in the process that writes the run folder (global rank 0)."""
    return global_rank() == 0


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` [N_r, ...] concatenated in rank order (detached; the row counts may
    differ between ranks, the other dimensions may not). `rows` itself in one process."""
    if world_size() == 1:
        return rows
    rows = rows.detach().contiguous()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    longest = max(counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def gather_rows_and_start(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`gather_rows(rows)` and where this rank's rows start in it."""
    if world_size() == 1:
        return rows, 0
    counts = all_ranks(int(rows.shape[0]))
    return gather_rows(rows), sum(counts[: global_rank()])


def rows_in_order(index: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's share of a split, put back in row order: `index` [N_r] (row numbers) and
    `values` (rows aligned with it) gathered from every rank, sorted by row number, rows that
    a distributed sampler repeated to even the shares dropped. As given in one process."""
    if world_size() == 1:
        return (index, *values)
    index = gather_rows(index)
    gathered = [gather_rows(v) for v in values]
    order = torch.argsort(index, stable=True)
    index = index[order]
    first = torch.ones(len(index), dtype=torch.bool, device=index.device)
    first[1:] = index[1:] != index[:-1]
    return (index[first], *(v[order][first] for v in gathered))


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over ranks (a new tensor; `values` in one process)."""
    if world_size() == 1:
        return values
    total = values.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` (any picklable object; the other ranks may pass None) on every rank.
    Send tensors on the CPU and move them where they are used. `value` itself in one process."""
    if world_size() == 1:
        return value
    box = [value if global_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; `[value]` in one process."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------------------- replica digests
def value_digest(value: Any) -> str:
    """A short SHA-256 of a tensor or a plain value (numbers, strings, lists, dicts of them),
    equal for equal contents whatever the device."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:16]


def _feed(h: Any, value: Any) -> None:
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(str(key).encode() + b":")
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif hasattr(value, "tobytes"):  # numpy arrays and scalars
        h.update(repr((getattr(value, "shape", ()), str(getattr(value, "dtype", "")))).encode())
        h.update(value.tobytes())
    else:
        h.update(repr(value).encode())


def replica_digests(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, str]:
    """Digest of everything a replica must share with the others after an epoch: each
    parameter and buffer, the optimisers' state, the method's carried state (its attributes and
    non-persistent buffers, `OWDFAMethod.carried_state_dict`), its evaluation history and the
    train sampler's place."""
    digests = {f"parameter {n}": value_digest(p) for n, p in module.named_parameters()}
    digests.update({f"buffer {n}": value_digest(b) for n, b in module.named_buffers()})
    for i, optimizer in enumerate(trainer.optimizers):
        state = optimizer.state_dict()
        digests[f"optimizer {i}"] = value_digest({"state": state["state"]})
    carried = getattr(module, "carried_state_dict", None)
    if carried is not None:
        for name, value in carried().get("attributes", {}).items():
            digests[f"method state {name}"] = value_digest(value)
    history = getattr(module, "eval_history", None)
    if history is not None:
        digests["evaluation history"] = value_digest(history)
    datamodule = trainer.datamodule
    if datamodule is not None and getattr(datamodule, "train_sampler", None) is not None:
        digests["train sampler"] = value_digest(datamodule.sampler_state(None))
    return digests


class ReplicaDivergence(RuntimeError):
    """Ranks of one DDP run hold different states: a method built state from its own rows."""


class ReplicaCheck(Checkpoint):
    """At every epoch end of a multi-process run, gather a digest of each rank's state
    (`replica_digests`) and stop the run if any rank differs from rank 0, naming what differs.
    Nothing in one process.

    A `Checkpoint` subclass so that Lightning runs its epoch-end hook after the method's own
    (where CAL updates its thresholds, GCD clusters); list it before the resume checkpoint so a
    diverged state is never saved. `checks` holds one {epoch, digest} per epoch checked (the
    digest of rank 0's digests), for the record.

    `every_n_steps` (tests) also checks after every that many optimizer steps, where DDP has
    not yet overwritten the buffers a step changed in place with rank 0's (it does so at the
    next forward, which would hide a buffer built from one rank's rows). Batch-norm running
    statistics are left out there: each rank updates them from its own rows by design.
    """

    PER_RANK_BY_DESIGN = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, every_n_steps: int | None = None, listed: int = 6) -> None:
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.listed = listed
        self.checks: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"checks": list(self.checks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.checks = list(state_dict.get("checks", []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if trainer.world_size < 2 or not n or trainer.global_step % n:
            return
        digests = {
            k: v
            for k, v in replica_digests(trainer, pl_module).items()
            if not k.endswith(self.PER_RANK_BY_DESIGN)
        }
        self.compare(trainer, digests, f"step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size < 2 or trainer.sanity_checking:
            return
        epoch = int(trainer.current_epoch)
        every = self.compare(trainer, replica_digests(trainer, pl_module), f"epoch {epoch}")
        self.checks.append({"epoch": epoch, "digest": value_digest(every[0])})
        log.debug("replicas equal after epoch %d (%d ranks)", epoch, trainer.world_size)

    def compare(self, trainer: pl.Trainer, ours: dict[str, str], when: str) -> list[dict]:
        """Every rank's `ours`; a ReplicaDivergence naming what differs from rank 0."""
        every = all_ranks(ours)
        problems = []
        for rank, theirs in enumerate(every[1:], start=1):
            differ = sorted(k for k in set(ours) | set(theirs) if every[0].get(k) != theirs.get(k))
            if differ:
                more = f" and {len(differ) - self.listed} more" if len(differ) > self.listed else ""
                problems.append(f"rank {rank}: {', '.join(differ[: self.listed])}{more}")
        if problems:
            raise ReplicaDivergence(
                f"after {when} the {trainer.world_size} ranks hold different states "
                f"({'; '.join(problems)} differ from rank 0): a method's state must be built "
                "from every rank's rows (owdfa_bench/distributed.py)"
            )
        return every


def describe_world(trainer: pl.Trainer) -> dict[str, Any]:
    """World size, strategy and backend of a Trainer's run, for the record."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return {
        "world_size": int(trainer.world_size),
        "num_nodes": int(trainer.num_nodes),
        "strategy": type(trainer.strategy).__name__,
        "backend": str(dist.get_backend()) if world_size() > 1 else None,
        "cluster_environment": type(environment).__name__ if environment is not None else None,
    }


def quiet_console_unless_rank_zero() -> None:
    """On ranks other than 0: console log handlers show warnings and errors only (every rank
    runs the same code, so its info lines would repeat rank 0's), and a log file shared with
    rank 0 (SLURM starts every rank as the same Hydra job, `train.log`) is left for
    `train.rank<N>.log` beside it. Lightning's own launcher names its ranks' files apart."""
    rank = global_rank()
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename)
            if "ddp_process" in path.stem or ".rank" in path.stem:
                continue
            own = logging.FileHandler(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))
            own.setFormatter(handler.formatter)
            own.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(own)
        elif isinstance(handler, logging.StreamHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
