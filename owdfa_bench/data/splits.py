"""The rows of one run: labelled / unlabelled / test, their tags, and the checks every source's
rows pass.

A data source (`owdfa_bench/data/sources.py`) returns a `DataSplits`; `check_splits` runs on it
for every source from one place (`owdfa_bench.data.datamodule.build_splits`), so a source added
later cannot skip it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from owdfa_bench.errors import DataError
from owdfa_bench.protocols import Protocol

Row = tuple[str, int]  # (image path, label)
# Tags of the merged training set, as in the references (CPL's meta CSVs, CAL's MergedDataset).
LABELLED_TAG = 1
UNLABELLED_TAG = 2
HIDDEN_LABEL = -1  # the label every method sees for an unlabelled row
SPLITS = ("labelled", "unlabelled", "test")
LISTED_ROWS = 5  # rows named in an error


@dataclass
class DataSplits:
    """Rows with contiguous labels (known classes 0..K_k-1 first) and what describes them."""

    labelled: list[Row]
    unlabelled: list[Row]
    test: list[Row]
    num_known: int
    classes: list[dict[str, Any]]  # one entry per label: label, index, code, family, known
    root: str = ""
    warnings: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    # SHA-256 of row files a cache has just checked (path -> hex), so they are not hashed again
    file_digests: dict[str, str] = field(default_factory=dict)
    data_digest: str | None = None  # of the rows and their bytes: owdfa_bench/data/digest.py
    # face crops (crop_face): images, those without a detected face, their share
    face_crops: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> str:
        return (
            f"{len(self.labelled)} labelled, {len(self.unlabelled)} unlabelled, "
            f"{len(self.test)} test rows"
        )


def relabel(rows: list[Row], mapping: dict[int, int]) -> list[Row]:
    """(path, class index) rows -> (path, label) rows."""
    return [(path, mapping[index]) for path, index in rows]


def class_table(protocol: Protocol) -> list[dict[str, Any]]:
    """One entry per label of a protocol of the class registry: label, index, code, family."""
    mapping, known = protocol.label_of_index(), set(protocol.known)
    return [
        {
            "label": mapping[c.index],
            "index": c.index,
            "code": c.code,
            "family": c.family,
            "name": c.name,
            "known": c.index in known,
        }
        for c in protocol.classes_by_label()
    ]


def _listing(rows: list[str]) -> str:
    more = f" and {len(rows) - LISTED_ROWS} more" if len(rows) > LISTED_ROWS else ""
    return ", ".join(rows[:LISTED_ROWS]) + more


def check_splits(splits: DataSplits, source: str = "the data") -> None:
    """No image in two of labelled / unlabelled / test; labelled rows of known classes only.

    Raises DataError (a ValueError) naming the rows, so a leaking split never trains silently.
    """
    paths = {name: {p for p, _ in getattr(splits, name)} for name in SPLITS}
    problems = []
    for a, b in (("labelled", "unlabelled"), ("labelled", "test"), ("unlabelled", "test")):
        shared = sorted(paths[a] & paths[b])
        if shared:
            problems.append(f"{a} and {b} share {len(shared)} image(s): {_listing(shared)}")
    novel = sorted({p for p, y in splits.labelled if not 0 <= y < splits.num_known})
    if novel:
        problems.append(
            f"{len(novel)} labelled image(s) not of a known class (labels 0.."
            f"{splits.num_known - 1}): {_listing(novel)}"
        )
    if problems:
        raise DataError(
            f"the splits of {source} leak: " + "; ".join(problems) + ". Remove the duplicated "
            "rows from the source (each image may appear once) and run again."
        )


def empty_parts(splits: DataSplits) -> list[str]:
    """The splits that hold no row, and the classes without a training or a test row."""
    parts = [f"the {name} split" for name in SPLITS if not getattr(splits, name)]
    rows = {
        "training": Counter(y for _, y in splits.labelled + splits.unlabelled),
        "test": Counter(y for _, y in splits.test),
    }
    for c in splits.classes:
        missing = [kind for kind, counts in rows.items() if not counts[c["label"]]]
        if missing:
            name = f"class {c['label']}" + (f" ({c['code']})" if c.get("code") else "")
            parts.append(f"{name} in {' and '.join(missing)}")
    return parts


def check_nothing_empty(splits: DataSplits, source: str, settings: str) -> None:
    """Every split and every class's training and test rows hold a row, or a DataError naming
    what is empty and the `settings` that size the splits (an empty test split fails only
    after the first epoch, an empty labelled split in the sampler)."""
    parts = empty_parts(splits)
    if parts:
        listed = _listing(parts)
        raise DataError(
            f"the splits of {source} leave no row in {listed} ({splits.counts()}); every split "
            f"and every class needs one: change {settings}"
        )
