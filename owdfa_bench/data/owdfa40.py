"""OWDFA-40 sampling and splits, reproducing CAL's `dataset/owdfa_dataset.py`.

The reference draws from the legacy global NumPy RNG, re-seeded at the start of each
`prepare_owdfa_samples` call; a local `numpy.random.RandomState(seed)` gives the same stream
without touching global state. The one deliberate change: folders and files are listed in sorted
order (the reference uses raw `os.listdir` / `os.walk` order, so the same seed gives a different
split on a different file system). With a sorted listing the selected files are exactly the
reference's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
Row = tuple[str, int]  # (image path, class index)


@dataclass
class Budgets:
    """Per-class sampling budgets (`data.budgets`; the reference hard-codes 20000 / 10000 /
    2000 / 1500, conf/data/owdfa40.yaml)."""

    real: int  # REAL (index 0) when known
    real_per_folder: int  # each REAL folder is first subsampled to this
    known: int  # a known fake class
    novel: int  # a novel class


@dataclass
class Splits:
    labelled: list[Row]
    unlabelled: list[Row]
    test: list[Row]
    warnings: list[str] = field(default_factory=list)


def class_index_of(folder_name: str) -> int | None:
    """`<index>_<Type>_<Method>` -> index; None when the prefix is not an integer (skipped)."""
    prefix = folder_name.split("_")[0]
    return int(prefix) if prefix.isdigit() else None


def list_images(folder: Path) -> list[str]:
    """Every .jpg/.jpeg/.png under `folder`, recursively, in sorted walk order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


def list_class_folders(root: str | Path) -> list[tuple[int, str, list[str]]]:
    """(class index, folder name, image paths) for each class folder, sorted by folder name."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"data root {root} {what}; set data.root to the folder holding the OWDFA-40 "
            "class folders (`owdfa-bench download --root DIR` fetches them)"
        )
    folders = []
    for name in sorted(os.listdir(root)):
        index = class_index_of(name)
        if index is None or not (root / name).is_dir():
            continue
        folders.append((index, name, list_images(root / name)))
    if not folders:
        raise FileNotFoundError(
            f"data root {root} holds no class folders named <index>_<Type>_<Method>; "
            "point data.root at the extracted OWDFA-40 release"
        )
    return folders


def _budget(index: int, known: set[int], budgets: Budgets) -> int:
    if index in known:
        return budgets.real if index == 0 else budgets.known
    return budgets.novel


def select_rows(
    folders: Sequence[tuple[int, str, list[str]]],
    known: Iterable[int],
    train_classes: Iterable[int],
    rng: np.random.RandomState,
    budgets: Budgets,
    test_ratio: float = 0.2,
    warnings: list[str] | None = None,
) -> tuple[list[Row], list[Row]]:
    """One `prepare_owdfa_samples` pass: returns (train rows, test rows), label-grouped.

    Random numbers are drawn in the reference's order: REAL folders subsampled during the scan,
    then per class (first-seen order) a budget draw if over budget, a shuffle, an 80/20 cut.
    """
    known, train_classes = set(known), set(train_classes)
    warnings = warnings if warnings is not None else []
    by_label: dict[int, list[str]] = {}
    for index, name, paths in folders:
        if index == 0:
            if len(paths) < budgets.real_per_folder:
                warnings.append(
                    f"{name}: {len(paths)} images, below the per-folder REAL budget "
                    f"{budgets.real_per_folder}; using all of them"
                )
            else:
                paths = list(rng.choice(paths, budgets.real_per_folder, replace=False))
        by_label.setdefault(index, []).extend(paths)
    train, test = [], []
    for index, paths in by_label.items():
        if index not in train_classes:
            continue
        budget = _budget(index, known, budgets)
        if len(paths) > budget:
            paths = rng.choice(paths, budget, replace=False)
        elif len(paths) < budget:
            warnings.append(
                f"class {index}: {len(paths)} images, below its budget {budget}; using all of them"
            )
        paths = np.asarray(paths, dtype=object)
        rng.shuffle(paths)
        cut = int(len(paths) * (1 - test_ratio))
        train.extend((str(p), index) for p in paths[:cut])
        test.extend((str(p), index) for p in paths[cut:])
    return train, test


def build_owdfa40_splits(
    root: str | Path,
    known_classes: Iterable[int],
    train_classes: Iterable[int] | None = None,
    split_seed: int = 2025,
    *,
    budgets: Budgets,
    test_ratio: float = 0.2,
    labelled_fraction: float = 0.75,
) -> Splits:
    """(labelled, unlabelled, test) rows of `(path, class_index)`, as CAL builds them.

    `train_classes` defaults to every class folder found. The labelled set is drawn from the pooled
    known-class train rows without stratification, as the reference does (so each class's
    labelled share only averages `labelled_fraction`); the unlabelled set is every other train
    row, in order.
    """
    known = sorted(set(known_classes))
    folders = list_class_folders(root)
    present = {index for index, _, _ in folders}
    classes = sorted(present if train_classes is None else set(train_classes))
    missing = [c for c in classes if c not in present]
    if missing:
        raise FileNotFoundError(
            f"data root {root} has no folder for class indices {missing}; each class needs a "
            "folder named <index>_<Type>_<Method> (see protocols/owdfa40.yaml for the names)"
        )
    empty = [name for index, name, paths in folders if index in classes and not paths]
    if empty:
        raise FileNotFoundError(
            f"class folders without .jpg/.jpeg/.png images under {root}: {empty}"
        )
    warnings: list[str] = []
    rng = np.random.RandomState(split_seed)  # the train call and the labelled draw share it
    train, _ = select_rows(folders, known, classes, rng, budgets, test_ratio, warnings)
    known_set = set(known)
    is_known = np.array([label in known_set for _, label in train], dtype=bool)
    known_positions = np.flatnonzero(is_known)
    n_known = len(known_positions)
    drawn = rng.choice(np.arange(n_known), int(n_known * labelled_fraction), replace=False)
    labelled_mask = np.zeros(len(train), dtype=bool)
    labelled_mask[known_positions[drawn]] = True
    labelled = [row for row, m in zip(train, labelled_mask) if m]
    unlabelled = [row for row, m in zip(train, labelled_mask) if not m]
    # The test pass re-seeds, so it draws the same numbers and is the train pass's complement.
    _, test = select_rows(
        folders, known, classes, np.random.RandomState(split_seed), budgets, test_ratio
    )
    for w in warnings:
        log.warning(w)
    # the disjointness check runs on every source's rows: owdfa_bench.data.splits.check_splits
    return Splits(labelled, unlabelled, test, warnings)
