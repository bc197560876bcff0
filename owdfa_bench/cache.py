"""What every on-disk cache of the harness shares: where it lives, what keys it, when it is
stale, how it is written.

The caches: the synthetic data set (`data/synth.py`), the synthetic pretrained start
(`pretrain.py`), the face crops (`data/faces.py`) and the unpacked release zips
(`data/download.py`). Each keeps its own manifest layout; this module gives them one way to

- find the base folder: `cache_base()` (`$OWDFA_BENCH_CACHE`, else
  `$XDG_CACHE_HOME/owdfa-bench`, else `~/.cache/owdfa-bench`);
- key a cache: `settings_hash` (SHA-256 of canonical JSON), `file_digest`, `content_sha256`;
- decide whether it can be reused: `read_json`, `stale_reason`, `listing_problem`,
  `files_problem`, `FileStamp` and `file_unchanged`;
- check its files by content: `content_mismatches` (against the digests its manifest lists),
  `file_digests` (of files nobody listed) and `stamp_files` (at build time), with the fast path
  and the full check described under "content checks" below;
- write it so a killed process never leaves a partial file or folder under the final name:
  `atomic_path`, `write_json_atomic`, `move_dir_into_place`, `remove_stale_temporaries`;
- let concurrent builders (a joblib sweep) build once: `build_lock`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "OWDFA_BENCH_CACHE"
CACHE_FOLDER = "owdfa-bench"  # under $XDG_CACHE_HOME or ~/.cache
_BLOCK = 1 << 20  # bytes read at a time when hashing a file


# ---------------------------------------------------------------------------------------------
# where


def cache_base() -> Path:
    """`$OWDFA_BENCH_CACHE`, else `$XDG_CACHE_HOME/owdfa-bench`, else `~/.cache/owdfa-bench`."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(xdg) / CACHE_FOLDER)
    return Path(base).expanduser()


def cpu_budget() -> int:
    """The cores a process may use to build a cache: torch's thread count once a run has set it
    (`trainer.threads`; torch's default otherwise), else the machine's. Builders whose output does
    not depend on their worker count (the synthetic set, the corpus) size their workers by it."""
    torch = sys.modules.get("torch")
    return max(1, torch.get_num_threads()) if torch is not None else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# keys


def settings_hash(settings: Any, length: int | None = None, *, compact: bool = False) -> str:
    """SHA-256 hex digest of `settings` as JSON with sorted keys, cut to `length` characters.

    `compact` drops the spaces after `,` and `:`. Both spellings key existing caches (the synth
    folder name uses the spaced one, its manifest hash the compact one), so neither may change.
    """
    separators = (",", ":") if compact else None
    text = json.dumps(settings, sort_keys=True, separators=separators)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def content_sha256(data: bytes) -> str:
    """SHA-256 hex digest of bytes held in memory (a file about to be written)."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (`algorithm`: any hashlib name, or "crc32",
    the checksum a zip records per member, as 8 hex digits)."""
    with open(path, "rb") as f:
        blocks = iter(lambda: f.read(_BLOCK), b"")
        if algorithm == "crc32":
            crc = 0
            for block in blocks:
                crc = zlib.crc32(block, crc)
            return f"{crc:08x}"
        digest = hashlib.new(algorithm)
        for block in blocks:
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """A source file as a cache recorded it: size and mtime (cheap), and a content digest."""

    size: int
    mtime_ns: int
    digest: str = ""  # hex; empty when the cache did not record one

    @classmethod
    def of(cls, path: str | os.PathLike, algorithm: str | None = None) -> FileStamp:
        """The stamp of `path` now; with `algorithm`, its content digest too."""
        st = os.stat(path)
        digest = file_digest(path, algorithm) if algorithm else ""
        return cls(st.st_size, st.st_mtime_ns, digest)

    def matches_stat(self, st: os.stat_result) -> bool:
        return self.size == st.st_size and self.mtime_ns == st.st_mtime_ns


def file_unchanged(path: str | os.PathLike, recorded: FileStamp, algorithm: str = "sha256") -> bool:
    """True when `path` still is the file `recorded` describes: same size, and the same mtime
    or else (a touched or copied file) the same content digest. Hashes only on an mtime change."""
    st = os.stat(path)
    if st.st_size != recorded.size:
        return False
    if st.st_mtime_ns == recorded.mtime_ns:
        return True
    return bool(recorded.digest) and file_digest(path, algorithm) == recorded.digest


# ---------------------------------------------------------------------------------------------
# manifests and staleness


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in `path`; None when it is missing, unreadable, torn or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_reason(manifest: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> str | None:
    """Why a cache whose manifest is `manifest` does not serve a request (None: it does).

    `expected` holds what the request needs, e.g. the version and the settings; the first key
    whose recorded value differs is named in the reason.
    """
    if manifest is None:
        return "no readable manifest"
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            return f"{key}: cache has {have!r}, wanted {want!r}"
    return None


def listing_problem(root: Path, listed: Iterable[str], pattern: str) -> str | None:
    """Why the files matching `pattern` under `root` are not exactly `listed` (relative POSIX
    paths); None when they are. Only names are compared: nothing is opened or stat'ed (and
    hidden names are skipped: a cache's own stamps, temporaries)."""
    # glob.glob with root_dir returns relative names: 5x faster than pathlib's glob here
    on_disk = {p.replace(os.sep, "/") for p in glob.glob(pattern, root_dir=root)}
    listed = set(listed)
    if on_disk != listed:
        missing, extra = listed - on_disk, on_disk - listed
        return f"{len(missing)} listed files missing, {len(extra)} unlisted files present"
    return None


def files_problem(root: Path, sizes: Mapping[str, int], pattern: str) -> str | None:
    """Why the files matching `pattern` under `root` are not exactly those of `sizes`
    (relative POSIX path -> bytes); None when the same files are there with the same sizes."""
    problem = listing_problem(root, sizes, pattern)
    if problem is not None:
        return problem
    for rel, size in sizes.items():
        if (root / rel).stat().st_size != size:
            return f"{rel} has the wrong size"
    return None


# ---------------------------------------------------------------------------------------------
# content checks
#
# A cache's manifest lists a digest per file, computed once when the file was written. On reuse
# the fast path reads no file: a *stamp* (size, mtime, ctime, inode, digest), kept in the
# cache's stamps file, vouches for a file as long as its stat is unchanged. A write changes
# mtime and ctime; a swap by rename or copy gives the path another inode or ctime; ctime cannot
# be set back from user space (git's index trusts a file on the same grounds). The full check
# hashes every file: on demand (`$OWDFA_BENCH_CACHE_CHECK=full`), and automatically as soon as
# one stamp is missing or differs (a copied, restored or edited folder), after which the files
# found intact are stamped again, so a copied but intact cache is hashed once and then reused.


CHECK_ENV = "OWDFA_BENCH_CACHE_CHECK"  # fast (default) | full
STAMPS_FILE = ".stamps.json"  # in the cache folder; hidden, so folder scans skip it
_STAMPS_VERSION = 1


def full_check_requested() -> bool:
    """Whether `$OWDFA_BENCH_CACHE_CHECK` is `full`: every cache hashes all its files on reuse."""
    value = os.environ.get(CHECK_ENV, "").strip().lower() or "fast"
    if value not in ("fast", "full"):
        from owdfa_bench.errors import ConfigValueError  # imports Hydra: only when needed

        raise ConfigValueError(f"{CHECK_ENV}={value!r}: use fast (the default) or full")
    return value == "full"


@dataclass(frozen=True)
class Stamp:
    """A file as it was when its content had `digest`: what the fast path compares."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    digest: str

    @classmethod
    def of(cls, st: os.stat_result, digest: str) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest)

    def vouches_for(self, st: os.stat_result) -> bool:
        """Whether a file with stat `st` is still the one stamped (so its digest holds)."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )


def read_stamps(path: Path, algorithm: str = "sha256") -> dict[str, Stamp]:
    """The stamps in `path` (relative path -> Stamp); empty when missing, torn or of another
    version or algorithm, which only costs a full check."""
    data = read_json(path)
    if not data or data.get("version") != _STAMPS_VERSION or data.get("algorithm") != algorithm:
        return {}
    try:
        return {rel: Stamp(*entry) for rel, entry in dict(data["files"]).items()}
    except (KeyError, TypeError, ValueError):
        return {}


def write_stamps(path: Path, stamps: Mapping[str, Stamp], algorithm: str = "sha256") -> None:
    """Replace the stamps file in one rename (concurrent readers see the old or the new one;
    of two concurrent writers the last wins, and a stamp lost that way only costs a hash).
    A folder that cannot be written (a read-only cache) keeps its old stamps."""
    body = {
        "version": _STAMPS_VERSION,
        "algorithm": algorithm,
        "files": {rel: list(dataclasses.astuple(s)) for rel, s in sorted(stamps.items())},
    }
    try:
        write_json_atomic(path, body, indent=None)
    except OSError as err:
        log.debug("cannot write stamps %s: %s", path, err)


def _hash_and_stamp(path: Path, algorithm: str) -> tuple[str | None, Stamp | None]:
    """(digest, stamp) of a file; (None, None) when it is missing. No stamp when the file
    changed while it was read (its digest then describes neither version for sure)."""
    try:
        before = os.stat(path)
        digest = file_digest(path, algorithm)
        after = os.stat(path)
    except FileNotFoundError:
        return None, None
    stamp = Stamp.of(after, digest)
    return digest, stamp if stamp.vouches_for(before) else None


def _stamped_digest(path: str, stamp: Stamp | None) -> str | None:
    """The stamp's digest when it still vouches for the file at `path`, else None (a plain
    string path: pathlib's joins cost more than the stat on the fast path)."""
    if stamp is None:
        return None
    try:
        return stamp.digest if stamp.vouches_for(os.stat(path)) else None
    except OSError:
        return None


def _rehash(
    root: Path, rels: Iterable[str], stamps_path: Path, stamps: dict[str, Stamp], algorithm: str
) -> dict[str, str | None]:
    """Hash `rels` under `root`, stamp them (merged into `stamps`, written); digest or None."""
    digests: dict[str, str | None] = {}
    for rel in rels:
        digests[rel], stamp = _hash_and_stamp(root / rel, algorithm)
        if stamp is None:
            stamps.pop(rel, None)
        else:
            stamps[rel] = stamp
    write_stamps(stamps_path, stamps, algorithm)
    return digests


def content_mismatches(
    root: Path,
    listed: Mapping[str, str],
    stamps_path: Path,
    *,
    algorithm: str = "sha256",
    full: bool | None = None,
) -> list[str]:
    """The files of `listed` (relative path -> hex digest) under `root` that are missing or
    whose content is not the listed digest, in listing order; [] when all are intact.

    Fast path: every file is vouched for by its stamp in `stamps_path` with the listed digest,
    and nothing is read. Otherwise, or with `full` (default: `full_check_requested()`), every
    listed file is hashed and the stamps file rewritten for what was found.
    """
    full = full_check_requested() if full is None else full
    stamps = read_stamps(stamps_path, algorithm)
    if not full:
        fast = {rel: _stamped_digest(os.path.join(root, rel), stamps.get(rel)) for rel in listed}
        if all(fast[rel] == digest for rel, digest in listed.items()):
            return []
    found = _rehash(root, listed, stamps_path, stamps, algorithm)
    return [rel for rel, digest in listed.items() if found[rel] != digest]


def file_digests(
    root: Path,
    rels: Iterable[str],
    stamps_path: Path,
    *,
    algorithm: str = "sha256",
    full: bool | None = None,
) -> dict[str, str | None]:
    """The content digest of each file `root/rel` (None: missing), for files no manifest
    lists (user data): a stamp that still vouches gives it, any other file is hashed and
    stamped. `full` (default: `full_check_requested()`) hashes every file."""
    full = full_check_requested() if full is None else full
    stamps = read_stamps(stamps_path, algorithm)
    digests: dict[str, str | None] = {}
    for rel in rels:
        digests[rel] = None if full else _stamped_digest(os.path.join(root, rel), stamps.get(rel))
    unknown = [rel for rel, digest in digests.items() if digest is None]
    if unknown:
        digests.update(_rehash(root, unknown, stamps_path, stamps, algorithm))
    return digests


def stamp_files(
    root: Path, digests: Mapping[str, str], stamps_path: Path, algorithm: str = "sha256"
) -> None:
    """Stamp files just written, whose `digests` the builder computed from their bytes (so
    they are hashed once, when built); merged into the stamps already in `stamps_path`."""
    stamps = read_stamps(stamps_path, algorithm)
    for rel, digest in digests.items():
        stamps[rel] = Stamp.of(os.stat(root / rel), digest)
    write_stamps(stamps_path, stamps, algorithm)


# ---------------------------------------------------------------------------------------------
# atomic writes


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside `path`, unique to this process: `.<name>.<tag>-<pid>-<random>`.

    Beside, so the final rename stays on one file system; hidden, so folder scans skip it.
    """
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` in one rename,
    on any failure (KeyboardInterrupt included) it is deleted and `path` is left as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any], indent: int = 1) -> None:
    """`data` as indented JSON with a final newline, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")


def move_dir_into_place(
    tmp: Path, root: Path, keep_theirs: Callable[[Path, Path], bool] | None = None
) -> None:
    """Put the finished folder `tmp` at `root`, replacing an old `root`.

    The old folder is renamed aside first and deleted after, so `root` is never half old, half
    new. When another builder's folder appeared at `root` in between (the rename fails), it is
    kept and `tmp` deleted if `keep_theirs(root, tmp)` says both hold the same data; otherwise
    the error is raised.
    """
    old = None
    if root.exists():
        old = temporary_sibling(root, "old")
        root.rename(old)
    try:
        tmp.rename(root)
    except OSError:
        if keep_theirs is None or not keep_theirs(root, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(
    path: Path, age_s: float = 3600.0, tags: Iterable[str] = ("tmp", "old")
) -> None:
    """Delete the temporaries of `path` left by builders killed more than `age_s` ago (younger
    ones may belong to a build still running in another process)."""
    for tag in tags:
        for leftover in path.parent.glob(f".{path.name}.{tag}-*"):
            try:
                if time.time() - leftover.stat().st_mtime > age_s:
                    _remove(leftover)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# concurrent builders


@contextmanager
def build_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold the file lock `<path>.lock` (beside the cache) while checking and building `path`.

    Concurrent runs that need the same cache wait here; the first builds, the others then find
    it complete. `timeout` in seconds (-1: wait as long as it takes). The lock file stays.
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f"{path.name}.lock"), timeout=timeout):
        yield
