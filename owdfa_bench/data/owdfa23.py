"""The original OW-DFA benchmark (CPL, ICCV 2023), driven by its meta CSVs.

Reference: TencentYoutuResearch/OpenWorld-DeepFakeAttribution, `owdfa/datasets/dfa.py` (the
`DFA` dataset) and `scripts/preprocess/create_academic_meta.ipynb` (how the CSVs were built).

A meta CSV row is one image: `img_path`, `label` (the protocol's contiguous class id, known classes
first), `tag` (1 labelled, 2 unlabelled, 0 dropped), `image_source` and `method` (a class is one
(image_source, method) pair), plus descriptive columns. The split is the reference's: rows with
tag 0 are dropped; for every (image_source, label) pair, in sorted order, `DataFrame.sample(frac=
0.8, random_state=seed)` is the train part; every other row is test (so the test split holds tag-1
and tag-2 rows of every class). Train rows tagged 1 are labelled, tagged 2 unlabelled.

Deliberate deviations: none in the split. Checks the reference does not make: the known labels
must be exactly 0..K_k-1 (CPL infers K_k as max known label + 1 and would silently mis-evaluate
otherwise), the classes must match `protocols/owdfa23.yaml` by name, and a missing or misnamed
CSV is an error naming the expected files, the folder searched and the closest CSV present.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

from owdfa_bench.data.splits import LABELLED_TAG, UNLABELLED_TAG, Row
from owdfa_bench.protocols import load_registry

DROPPED_TAG = 0  # the meta CSV's third tag: a row the protocol does not use
TRAIN_FRACTION = 0.8  # reference `train_ratio_per_class`
DEFAULT_SPLIT_SEED = 2000
META_SUBDIR = "meta_data"  # where the notebook writes the CSVs, under the release's DATA_ROOT
REQUIRED_COLUMNS = ("img_path", "label", "tag", "image_source", "method")
# The notebook stores images as <DATA_ROOT>/<forgery_type>/<method>/<source folder>/<file>.
PATH_DEPTH_UNDER_ROOT = 4


@dataclass(frozen=True)
class Owdfa23Protocol:
    key: str
    csv: str  # expected meta CSV file name
    num_classes: int
    known: tuple[str, ...]  # class names "<method> (<image_source>)"
    novel: tuple[str, ...]

    @property
    def num_known(self) -> int:
        return len(self.known)


def class_name(method: str, image_source: str) -> str:
    return f"{method} ({image_source})"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def load_owdfa23_protocol(protocol_cfg: Any) -> Owdfa23Protocol:
    """The protocol named by `protocol_cfg.protocol_key` (p1 / p2) in `protocols/owdfa23.yaml`."""
    key = _get(protocol_cfg, "protocol_key") if not isinstance(protocol_cfg, str) else protocol_cfg
    registry = load_registry("owdfa23")
    protocols = registry.get("protocols", {})
    if key not in protocols:
        raise KeyError(
            f"protocol_key={key!r} is not in protocols/owdfa23.yaml; available: {sorted(protocols)}"
        )
    entry = protocols[key]
    known = tuple(class_name(c["method"], c["source"]) for c in entry["known"])
    novel = tuple(class_name(c["method"], c["source"]) for c in entry["novel"])
    protocol = Owdfa23Protocol(key, str(entry["csv"]), int(entry["num_classes"]), known, novel)
    if protocol.num_known != int(entry["num_known"]):
        raise ValueError(
            f"protocols/owdfa23.yaml {key}: num_known={entry['num_known']} but "
            f"{protocol.num_known} known classes are listed"
        )
    if protocol.num_known + len(protocol.novel) != protocol.num_classes:
        raise ValueError(
            f"protocols/owdfa23.yaml {key}: num_classes={protocol.num_classes} but "
            f"{protocol.num_known} known + {len(protocol.novel)} novel are listed"
        )
    return protocol


def resolve_meta_dir(
    meta_dir: str | os.PathLike | None, image_root: str | os.PathLike | None
) -> Path:
    """`meta_dir`, or `<image_root>/meta_data` (the notebook's layout) when it is null."""
    if meta_dir:
        return Path(str(meta_dir)).expanduser()
    if image_root:
        return Path(str(image_root)).expanduser() / META_SUBDIR
    raise ValueError(
        "data=owdfa23 needs data.meta_dir (the folder of the Protocol*_meta.csv "
        "files) or data.root (the release, with its CSVs in meta_data/)"
    )


def find_meta_csv(meta_dir: str | os.PathLike, file_name: str) -> Path:
    """`meta_dir/file_name`, or an error naming what was expected, where, and what is there."""
    folder = Path(meta_dir)
    path = folder / file_name
    if path.is_file():
        return path
    expected_names = [p["csv"] for p in load_registry("owdfa23")["protocols"].values()]
    expected = "\n  ".join(expected_names)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the OW-DFA meta CSV folder {folder} does not exist. It must hold:\n  {expected}\n"
            "(built by CPL's scripts/preprocess/create_academic_meta.ipynb, not distributed); "
            "set data.meta_dir."
        )
    present = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".csv")
    others = [name for name in present if name not in expected_names]  # never the other protocol
    close = difflib.get_close_matches(file_name, others, n=1, cutoff=0.6)
    hint = f"\nDid you mean {close[0]}? Rename it to {file_name}." if close else ""
    listing = "\n  ".join(present) if present else "(no CSV files)"
    raise FileNotFoundError(
        f"meta CSV {file_name} not found in {folder}.\nExpected files:\n  {expected}\n"
        f"CSV files there:\n  {listing}{hint}"
    )


def read_meta_csv(path: str | os.PathLike) -> pd.DataFrame:
    """The meta CSV with its original row index (the split relies on it), validated."""
    df = pd.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: missing columns {missing}; a meta CSV needs "
            f"{list(REQUIRED_COLUMNS)} (columns there: {list(df.columns)})"
        )
    numeric = pd.to_numeric(df["tag"], errors="coerce")
    valid = numeric.isin([LABELLED_TAG, UNLABELLED_TAG, DROPPED_TAG])
    bad_tags = sorted({str(t) for t in df.loc[~valid, "tag"]})
    if bad_tags:
        raise ValueError(
            f"{path}: tag values {bad_tags}; expected 1 (labelled), 2 (unlabelled) or 0 (dropped)"
        )
    if not pd.api.types.is_integer_dtype(df["label"]):
        raise ValueError(f"{path}: the label column must hold integers")
    return df


def split_meta(
    df: pd.DataFrame, split_seed: int = DEFAULT_SPLIT_SEED, train_fraction: float = TRAIN_FRACTION
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reference's split: drop tag 0, 80% per (image_source, label) pair is train.

    Train rows come grouped by sorted image_source, then sorted label, each group in pandas'
    sampled order; test rows keep the CSV order.
    """
    kept = df[df["tag"] != DROPPED_TAG]
    labels = sorted(kept["label"].unique())
    parts = []
    for source in sorted(kept["image_source"].unique()):
        for label in labels:
            group = kept[(kept["image_source"] == source) & (kept["label"] == label)]
            parts.append(group.sample(frac=train_fraction, random_state=split_seed))
    train = pd.concat(parts) if parts else kept.iloc[:0]
    test = kept[~kept.index.isin(train.index)]
    return train, test


def rebase_path(img_path: str, image_root: str | os.PathLike | None) -> str:
    """Where an image lives: the CSV path as is (reference), or re-rooted under `image_root`.

    Relative CSV paths are joined to `image_root`; absolute ones keep their last four components
    (`<forgery_type>/<method>/<source folder>/<file>`, the notebook's layout) under it.
    """
    if not image_root:
        return img_path
    path = PurePath(img_path)
    tail = path.parts[-PATH_DEPTH_UNDER_ROOT:] if path.is_absolute() else path.parts
    return str(Path(str(image_root)).expanduser().joinpath(*tail))


def class_names_by_label(df: pd.DataFrame, path: str | os.PathLike = "") -> list[str]:
    """`<method> (<image_source>)` for labels 0..max; each label must be one such pair."""
    pairs = df.groupby("label")[["method", "image_source"]].apply(
        lambda g: sorted({class_name(m, s) for m, s in zip(g["method"], g["image_source"])})
    )
    mixed = {int(label): names for label, names in pairs.items() if len(names) > 1}
    if mixed:
        raise ValueError(
            f"{path}: a label must be one (image_source, method) pair, but {mixed} mix several"
        )
    by_label = {int(label): names[0] for label, names in pairs.items()}
    missing = [i for i in range(max(by_label) + 1) if i not in by_label]
    if missing or min(by_label) < 0:
        raise ValueError(
            f"{path}: labels must be contiguous from 0; missing {missing}, "
            f"present {sorted(by_label)}"
        )
    return [by_label[i] for i in range(len(by_label))]


def _check_classes(names: list[str], num_known: int, protocol: Owdfa23Protocol, path: Path) -> None:
    if len(names) != protocol.num_classes:
        raise ValueError(
            f"{path}: {len(names)} classes, protocol {protocol.key} expects "
            f"{protocol.num_classes} (see protocols/owdfa23.yaml)"
        )
    problems = []
    for title, got, want in (
        ("known", names[:num_known], protocol.known),
        ("novel", names[num_known:], protocol.novel),
    ):
        extra, absent = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        if extra or absent:
            problems.append(f"{title} classes: unexpected {extra}, missing {absent}")
    if problems:
        raise ValueError(
            f"{path} does not match protocol {protocol.key} of "
            f"protocols/owdfa23.yaml:\n  " + "\n  ".join(problems)
        )


def build_owdfa23_splits(
    meta_dir: str | os.PathLike | None,
    protocol_cfg: Any,
    split_seed: int = DEFAULT_SPLIT_SEED,
    image_root: str | os.PathLike | None = None,
) -> tuple[list[Row], list[Row], list[Row], int, list[str]]:
    """(labelled, unlabelled, test, num_known, class_names) of one OW-DFA protocol.

    `protocol_cfg` has `protocol_key` (p1 or p2); the CSV file name, class count and class sets
    come from `protocols/owdfa23.yaml`. `meta_dir` null means `<image_root>/meta_data`. Rows are
    `(image path, label)` with the CSV's labels (known classes 0..K_k-1, then novel);
    `class_names[label]` is `"<method> (<image_source>)"`.
    """
    protocol = load_owdfa23_protocol(protocol_cfg)
    path = find_meta_csv(resolve_meta_dir(meta_dir, image_root), protocol.csv)
    df = read_meta_csv(path)
    kept = df[df["tag"] != DROPPED_TAG]
    names = class_names_by_label(kept, path)
    known_labels = sorted(int(x) for x in kept.loc[kept["tag"] == LABELLED_TAG, "label"].unique())
    num_known = protocol.num_known
    if known_labels != list(range(num_known)):
        raise ValueError(
            f"{path}: the labels of labelled (tag 1) rows must be exactly 0..{num_known - 1} "
            f"(known classes first, as CPL assumes when it infers K_k = max + 1); found "
            f"{known_labels}"
        )
    _check_classes(names, num_known, protocol, path)
    train, test = split_meta(df, split_seed)

    def rows(frame: pd.DataFrame) -> list[Row]:
        return [
            (rebase_path(str(p), image_root), int(y))
            for p, y in zip(frame["img_path"], frame["label"])
        ]

    labelled = rows(train[train["tag"] == LABELLED_TAG])
    unlabelled = rows(train[train["tag"] == UNLABELLED_TAG])
    return labelled, unlabelled, rows(test), num_known, names


def meta_image_paths(
    meta_dir: str | os.PathLike | None, image_root: str | os.PathLike | None = None
) -> list[str]:
    """Every image (tag 1 or 2) of the protocol CSVs present in the meta folder, for `prepare`."""
    folder = resolve_meta_dir(meta_dir, image_root)
    files = [p["csv"] for p in load_registry("owdfa23")["protocols"].values()]
    present = [folder / f for f in files if (folder / f).is_file()]
    if not present:
        find_meta_csv(folder, files[0])  # raises the descriptive error
    paths: dict[str, None] = {}
    for csv_path in present:
        df = read_meta_csv(csv_path)
        for p in df.loc[df["tag"] != DROPPED_TAG, "img_path"]:
            paths[rebase_path(str(p), image_root)] = None
    return list(paths)
