"""What every on-disk cache of the harness shares: where it lives, what keys it, when it is
stale, how it is written.

The caches: the synthetic data set (`data/synth.py`), the synthetic pretrained start
(`pretrain.py`), the face crops (`data/faces.py`) and the unpacked release zips
(`data/download.py`). Each keeps its own manifest layout; this module gives them one way to

- find the base folder: `cache_base()` (`$OWDFA_BENCH_CACHE`, else
  `$XDG_CACHE_HOME/owdfa-bench`, else `~/.cache/owdfa-bench`);
- key a cache: `settings_hash` (SHA-256 of canonical JSON), `file_digest`, `content_sha256`;
- decide whether it can be reused: `read_json`, `stale_reason`, `files_problem`, `FileStamp`
  and `file_unchanged`;
- write it so a killed process never leaves a partial file or folder under the final name:
  `atomic_path`, `write_json_atomic`, `move_dir_into_place`, `remove_stale_temporaries`;
- let concurrent builders (a joblib sweep) build once: `build_lock`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Hex digest of a file's bytes, read in blocks (`algorithm`: any hashlib name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
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


def files_problem(root: Path, sizes: Mapping[str, int], pattern: str) -> str | None:
    """Why the files matching `pattern` under `root` are not exactly those of `sizes`
    (relative POSIX path -> bytes); None when the same files are there with the same sizes."""
    on_disk = {p.relative_to(root).as_posix() for p in root.glob(pattern)}
    if on_disk != set(sizes):
        missing, extra = set(sizes) - on_disk, on_disk - set(sizes)
        return f"{len(missing)} listed files missing, {len(extra)} unlisted files present"
    for rel, size in sizes.items():
        if (root / rel).stat().st_size != size:
            return f"{rel} has the wrong size"
    return None


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
