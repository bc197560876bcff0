"""One launcher per cell: the lock a run folder holds while a process trains it.

Two launches of one sweep into one output folder (a sweep started twice, a SLURM array and a
local rerun) would otherwise each train every cell, and a later one would "resume" from the
other's live checkpoint. Rank 0 of a run takes `run.lock` in the run folder before it reads
the folder's record or checkpoint and keeps it until the run ends; a second launch finds it
held and skips the cell in one line naming the holder.

`fcntl.flock` (not the `filelock` package the caches use): the holder writes who it is into the
lock file, which a failed attempt must not truncate. The kernel releases the lock when its
process exits however it exits (SIGKILL included), so a lock whose process is gone is never
in the way. NFS (v4, or v3 with lockd) supports it; a file system that does not (Lustre
mounted without `-o flock`) gets a warning and no lock.

Rank 0 alone takes the lock: the ranks Lightning starts on one machine are its children and
would find it held. Not handled: a multi-task SLURM job (a DDP cell) whose cell another launch
holds. Its rank 0 skips, and the ranks SLURM started beside it wait at the DDP rendezvous until
its timeout ends them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


def holder_info() -> dict[str, object]:
    """Who holds a lock: this process, its host, its SLURM job (when there is one), since when."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_holder(info: dict[str, Any] | None) -> str:
    """A holder as `read_holder` gives it, for a message ("another process" when None)."""
    if info is None:
        return "another process"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info['pid']} on {info['host']}{job}, since {info.get('since', '?')}"


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[str | None]:
    """Hold `run_dir`'s lock within the block: yields None while this process holds it, or,
    holding nothing, the description of the process that does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield describe_holder(read_holder(run_dir))
                return
            log.warning(
                "cannot lock %s (%s): this file system has no file locks, so a second launch "
                "of this cell is not prevented",
                run_dir / LOCK_FILE,
                err.strerror,
            )
            yield None
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        try:
            yield None
        finally:
            os.ftruncate(fd, 0)  # nobody holds it
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_holder(run_dir: Path) -> dict[str, Any] | None:
    """Who `run_dir`'s lock file names (pid, host, SLURM job, since), read without taking the
    lock: taking it, even shared and at once released, could make a launch starting at that
    moment find it held and skip its cell. None when it names nobody: released (a holder
    empties it as it ends), never taken, or unreadable."""
    try:
        info = json.loads((run_dir / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info and "host" in info else None


def process_alive(pid: Any) -> bool:
    """Whether process `pid` exists on this machine (signal 0 sends nothing; a pid reused since
    by another process reads as alive)."""
    if not isinstance(pid, int) or pid <= 0:  # 0 and negatives name process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True
