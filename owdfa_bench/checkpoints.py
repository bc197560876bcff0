"""Reading and writing checkpoint files: weights-only reads whose failures are one line, and
atomic writes whose failures name the run folder.

Every checkpoint is read with `torch.load(weights_only=True)`, so no code in the file runs; a
file that needs more (it pickles objects other than tensors and plain containers) is refused,
and the message never suggests loading it unsafely. `CheckpointFiles` is the Trainer's
checkpoint IO (`plugins=[CheckpointFiles()]`): resuming reads through it, and writes go through
`write_whole`: a temporary file in the checkpoint's own folder, flushed to disk (fsync), then
renamed over the checkpoint, which is atomic on any POSIX file system (NFS and Lustre included)
because both names are in one folder. `$TMPDIR` is never used (Lightning's own writer goes
through it and, across file systems, copies into the live file). The previous checkpoint is
kept as `<name>.prev.ckpt` (a hard link, no copy) until the next write, and a resume falls back
to it when the checkpoint is unreadable or missing; temporaries a killed write left behind
are removed when the run starts again (`stale_temporaries`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from owdfa_bench.errors import CheckpointError, RunFolderError

# what torch.load raises on a file that is not a checkpoint, or not a whole one
# torch's weights-only unpickler fed arbitrary bytes fails with almost any exception type
# (IndexError, KeyError, struct.error, UnicodeDecodeError, ...): every one means unreadable
UNREADABLE = Exception
log = logging.getLogger(__name__)
RESUME_KEY = "owdfa_resume"  # what owdfa_bench.resume.ResumeCheckpoint adds to a checkpoint
START_OVER = "delete it to start the run over, or set force=true"


def unsafe_global(message: str) -> str | None:
    """The object torch's weights-only unpickler refused to build, if that is why it failed
    (otherwise the bytes are no pickle it reads: a corrupt or foreign file)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


def read_checkpoint(path: str | Path, what: str = "checkpoint", fix: str = "") -> dict[str, Any]:
    """The checkpoint at `path`, read weights-only on the CPU, or a CheckpointError in one line
    (`what` names the file's role, `fix` is appended: what to do)."""
    path = Path(path)
    then = f"; {fix}" if fix else ""
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file{then}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = unsafe_global(str(err))
        if refused:  # never torch's advice to load it unsafely
            raise CheckpointError(
                f"{what} {path} holds a {refused} object, which only an unsafe load could build "
                "(code in the file would run), so it is refused: use a checkpoint written by "
                f"owdfa-bench or a state dict of tensors{then}"
            ) from None
        raise CheckpointError(
            f"{what} {path} is not a readable torch checkpoint (its bytes are no pickle of "
            f"tensors and plain containers); it may be corrupt or not a checkpoint{then}"
        ) from None
    except UNREADABLE as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{what} {path} is not a readable torch checkpoint ({first}); it may be truncated "
            f"or not a checkpoint at all{then}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{what} {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def previous_of(path: str | Path) -> Path:
    """Where the checkpoint before `path` is kept: `last.ckpt` -> `last.prev.ckpt`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporaries of writes of `path` (and of its previous) that never completed."""
    path = Path(path)
    names = (path.name, previous_of(path).name)
    return sorted(p for n in names for p in path.parent.glob(f".{n}.*.tmp"))


def write_whole(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write `checkpoint` to `path` so that `path` is always a whole checkpoint: a temporary
    in the same folder, fsynced, renamed over `path`; the checkpoint it replaces stays as
    `previous_of(path)`. A failed write removes its temporary (a killed one leaves it for
    `stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            writer = RecordingWriter(f)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError as err:  # torch's own message for a failed write ("unexpected pos")
                if writer.error is None:
                    raise
                raise writer.error from err  # the OSError (a full disk): the user's to fix
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            keep_previous(path)
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RecordingWriter:
    """A binary file for `torch.save` that keeps the OSError of a failed write: torch reports
    one (ENOSPC, EDQUOT, EIO) as a RuntimeError that does not say what went wrong."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def keep_previous(path: Path) -> None:
    """`path` also as `previous_of(path)`: a hard link, or (a file system without them) the
    file itself moved there, so that a resume finds it while `path` is being replaced."""
    previous = previous_of(path)
    link = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, previous)


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the file system lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointFiles(TorchCheckpointIO):
    """Lightning's checkpoint IO, reading weights-only with one-line errors and writing
    atomically with errors that name the run folder."""

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        # always weights-only, whatever the caller asks; the map location is the CPU (Lightning
        # moves the restored state to the model's device)
        try:
            checkpoint = read_checkpoint(path, "resuming: the checkpoint", START_OVER)
        except CheckpointError as err:
            previous = previous_of(path)
            if not previous.is_file():
                raise
            log.warning("%s; resuming from the one before it, %s", err, previous.name)
            checkpoint = read_checkpoint(previous, "resuming: the previous checkpoint", START_OVER)
        if RESUME_KEY not in checkpoint:
            raise CheckpointError(
                f"resuming: the checkpoint {path} holds no resume state (written by an older "
                f"owdfa-bench or by hand), so the run would not continue exactly; {START_OVER}"
            )
        return checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        try:
            write_whole(checkpoint, path)
        except OSError as err:
            raise RunFolderError(
                f"cannot write the checkpoint {path}: {err.strerror or err}; make the run folder "
                "writable and free space there, or set output_root to another folder"
            ) from err


def state_dict_differences(
    have: dict[str, torch.Tensor], want: dict[str, torch.Tensor], listed: int = 5
) -> str:
    """How the state dict `have` differs from the model's `want`: missing and unexpected keys,
    shape mismatches, each listed up to `listed` (one line)."""
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(
        f"{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}"
        for k in set(have) & set(want)
        if tuple(have[k].shape) != tuple(want[k].shape)
    )
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            more = f" and {len(keys) - listed} more" if len(keys) > listed else ""
            parts.append(f"{len(keys)} {name} ({', '.join(keys[:listed])}{more})")
    return "; ".join(parts)
