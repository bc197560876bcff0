"""The content digest of a run's data (`RunRecord.data_digest`): two runs of one config on
different bytes get different digests, so the report does not average them unawares.

It is the SHA-256 of the run's rows, split by split and sorted: (path relative to the rows'
common folder, label, SHA-256 of the file). No machine path enters it, so the same data in
another folder or on another machine gives the same digest. The file digests come from the
cache that has just checked them where there is one (the synthetic set's and the face crops'
manifests, passed in `DataSplits.file_digests`); images read where the user keeps them are
hashed once and then vouched for by their stamps (`cache.file_digests`), kept under
`<cache base>/digests/`, one file per data folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from owdfa_bench import cache
from owdfa_bench.data.splits import SPLITS, DataSplits

INDEX_FOLDER = "digests"  # under the cache base


def digest_index(folder: str) -> Path:
    """The stamps file of the images under `folder`: `<cache base>/digests/<hash of path>.json`."""
    index = cache.cache_base() / INDEX_FOLDER
    # a read-only cache base: the files are hashed on every run instead
    with contextlib.suppress(OSError):
        index.mkdir(parents=True, exist_ok=True)
    return index / f"{cache.settings_hash(os.path.abspath(folder), 16)}.json"


def file_digests(
    paths: Iterable[str], root: str, known: Mapping[str, str]
) -> dict[str, str | None]:
    """SHA-256 of each (normalised) path: from `known`, else from the stamps of `root`'s index,
    else hashed (and stamped there)."""
    digests: dict[str, str | None] = {p: known.get(p) for p in paths}
    unknown = {os.path.relpath(p, root): p for p, d in digests.items() if d is None}
    if unknown:
        found = cache.file_digests(Path(root), unknown, digest_index(root))
        digests.update({unknown[rel]: digest for rel, digest in found.items()})
    return digests


def data_digest(splits: DataSplits) -> str:
    """SHA-256 (hex) of the rows of every split with their files' SHA-256 (see the module)."""
    rows = {
        name: [(os.path.normpath(p), int(y)) for p, y in getattr(splits, name)] for name in SPLITS
    }
    paths = sorted({p for split in rows.values() for p, _ in split})
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    known = {os.path.normpath(p): d for p, d in splits.file_digests.items()}
    digests = file_digests(paths, root, known)
    body = {
        name: sorted([os.path.relpath(p, root), y, digests[p] or ""] for p, y in split)
        for name, split in rows.items()
    }
    return cache.settings_hash(body, compact=True)
