"""The errors a user fixes (a config value, a file, a folder), and how a command ends on one.

A *user error* (`is_user_error`) is an instance of one of `USER_ERRORS`, the types below and
Hydra's compact errors (a config that does not compose: a misspelt key, `seed=abc`, an unknown
option), or an OSError saying a folder cannot be written (`WRITE_ERRNOS`). Its
message says in one line what is wrong and what to do, so a command ends with that line on
stderr and exit status 1 (`exit_on_user_error`); the full traceback goes to the run's log file
(`<run_dir>/train.log`, written by the Hydra job `train`), and `HYDRA_FULL_ERROR=1` shows it on
the console as well. Every other exception is a programming error and keeps its traceback.

Code that reads what a user supplies raises these types where it knows the fix; a boundary
that calls code raising plain `ValueError` / `FileNotFoundError` for such problems (a data
source reading its rows, a method checking its hyper-parameters) converts them with
`as_user_error`, so the set stays closed here.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from hydra.errors import CompactHydraException

T = TypeVar("T")


class UserError(Exception):
    """A problem the user fixes; the message is one line naming the key, file or folder and
    what to do."""


class ConfigValueError(UserError, ValueError):
    """A config value out of its range: the message names the key, the value and the fix."""


class DataError(UserError, ValueError):
    """Data that cannot be trained on as it is: a missing root, a stale face cache, splits that
    leak, unreadable images."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read safely, or does not match the model or the run."""


class RunFolderError(UserError):
    """A run folder that cannot be written (read-only, full): nothing complete-looking is left;
    or one that cannot be read as a run (no config.yaml, a config that no longer composes)."""


class MissingWeightsError(UserError, RuntimeError):
    """Pretrained weights that are neither on this machine nor downloadable: one line."""


# CompactHydraException: ConfigCompositionException, MissingConfigException (an unknown option
# of a group), OverrideParseException (an override that does not parse)
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, CompactHydraException)
# an OSError with one of these is the user's too: a folder that cannot be written (Hydra writes
# the run folder before the runner does)
# the names owdfa_bench/config.py `register_configs` stores the schemas under, beside the options
# of their group (`schema`, `<source>_schema`), as Hydra lists them: never an option to choose
SCHEMA_OPTION = re.compile(r"\t(\w+_)?schema")
WRITE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
)


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno in WRITE_ERRNOS)


class Interrupted(BaseException):
    """SIGTERM or SIGINT during a run: the runner records the run as failed, a relaunch resumes.

    A BaseException, as KeyboardInterrupt, so no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def one_line(err: BaseException) -> str:
    """The message of a user error on one line; a Hydra error with the first line of its cause
    (OmegaConf's reason) and the key it names."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS and not isinstance(err, UserError):
        return (
            f"cannot write {err.filename or 'the output folder'}: {err.strerror}; make the folder "
            "writable and free space there, or set output_root to another folder"
        )
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    cause = err.__cause__
    if isinstance(err, CompactHydraException) and cause is not None:
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        key = next((line for line in lines if line.startswith("full_key:")), None)
        reason = lines[0] if lines else type(cause).__name__
        text = f"{text}: {reason}" + (f" ({key})" if key and key not in reason else "")
    text = text.split("\nConfig search path:")[0]  # Hydra's listing of where it looked
    # Hydra lists a group's structured configs as options (`data=nosuch` listed synth_schema)
    text = "\n".join(line for line in text.splitlines() if not SCHEMA_OPTION.fullmatch(line))
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@contextmanager
def as_user_error(
    kind: type[UserError],
    where: str,
    types: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, KeyError),
) -> Iterator[None]:
    """Re-raise `types` raised inside as `kind`, the message prefixed with `where` (e.g.
    "data=owdfa23"), the original chained; user errors pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except types as err:
        raise kind(f"{where}: {one_line(err)}") from err


def log_traceback_to_files(err: BaseException, logger: logging.Logger | None = None) -> list[str]:
    """Write `err`'s traceback to the log files of the root logger only (Hydra's `<job>.log`),
    not to the console; returns those files."""
    record = logging.LogRecord(
        name=(logger or logging.getLogger(__name__)).name,
        level=logging.ERROR,
        pathname=__file__,
        lineno=0,
        msg="%s: %s",
        args=(type(err).__name__, one_line(err)),
        exc_info=(type(err), err, err.__traceback__),
    )
    root = logging.getLogger()
    files = []
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            if handler in root.handlers:  # still there: not dropped as unwritable
                files.append(handler.baseFilename)
    return files


# log files dropped by `drop_unwritable_log_files`, named once by the process's last line
UNWRITABLE_LOGS: list[str] = []


def drop_unwritable_log_files(logger: logging.Logger | None = None) -> None:
    """A log file of `logger` (the root's: Hydra's `train.log`) that cannot be written, as on a
    full disk, is dropped, instead of the logging module printing a traceback for every
    message; the process's last line says so (`exit_on_user_error`). Other failures of a
    handler (a bad format) are reported as the logging module reports them."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = functools.partial(_drop_if_unwritable, logger, handler)


def _drop_if_unwritable(
    logger: logging.Logger, handler: logging.FileHandler, record: logging.LogRecord
) -> None:
    err = sys.exc_info()[1]
    if not (isinstance(err, OSError) and err.errno in WRITE_ERRNOS):
        logging.Handler.handleError(handler, record)
        return
    logger.removeHandler(handler)
    with suppress(OSError):
        handler.close()
    UNWRITABLE_LOGS.append(f"the log {handler.baseFilename} could not be written ({err.strerror})")


def unwritable_logs_note() -> str:
    """What the final line adds about log files dropped as unwritable ("" when none were)."""
    return "".join(f"; {note}" for note in UNWRITABLE_LOGS)


def full_error_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def report_user_error(err: BaseException, prog: str) -> int:
    """Print a user error (`is_user_error`) as one line on stderr and return the exit status 1;
    with HYDRA_FULL_ERROR=1 re-raise it instead (its traceback on the console). Call it in the
    `except` block of the error."""
    if full_error_requested():
        raise err
    where = getattr(err, "log_file", None)
    hint = f" (traceback in {where})" if where else ""
    notes = "".join(f"; {note}" for note in getattr(err, "__notes__", ()))  # e.g. unrecorded
    notes += unwritable_logs_note()
    rank = process_rank()
    label = f"error (rank {rank})" if rank else "error"  # the other ranks of a DDP run
    print(f"{prog}: {label}: {one_line(err)}{notes}{hint}", file=sys.stderr)
    return 1


def process_rank() -> int:
    """This process's rank in a multi-process run (0 alone, or before the run imported torch)."""
    distributed = sys.modules.get("owdfa_bench.distributed")
    return distributed.global_rank() if distributed is not None else 0


def exit_on_user_error(command: Callable[[], T], prog: str = "owdfa-bench") -> T:
    """Run `command`; a user error ends it with one line and exit status 1, an interrupt with
    one line and 128 + the signal number. With HYDRA_FULL_ERROR=1 both re-raise (traceback
    on the console); programming errors always do."""
    try:
        result = command()
    except Exception as err:
        if not is_user_error(err):
            raise
        raise SystemExit(report_user_error(err, prog)) from None
    except Interrupted as err:
        if full_error_requested():
            raise
        print(
            f"{prog}: interrupted by {err}; the run is marked failed, launch it again to resume "
            f"from its last checkpoint{unwritable_logs_note()}",
            file=sys.stderr,
        )
        raise SystemExit(128 + err.signum) from None
    if UNWRITABLE_LOGS:
        print(f"{prog}: warning: {unwritable_logs_note()[2:]}", file=sys.stderr)
    return result


@contextmanager
def signals_interrupt(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Interrupted` (main thread only; elsewhere
    the handlers cannot be changed and stay as they are)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
