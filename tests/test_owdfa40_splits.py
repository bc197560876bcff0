"""OWDFA-40 sampling reproduces CAL's `dataset/owdfa_dataset.py` on a sorted listing."""

import os

import numpy as np
import pytest

from owdfa_bench.data.owdfa40 import Budgets, build_owdfa40_splits
from owdfa_bench.data.splits import DataSplits, check_splits
from owdfa_bench.errors import DataError

BUDGETS = Budgets(real=6, real_per_folder=4, known=4, novel=3)
KNOWN = [0, 1, 3, 6]


def reference_prepare(root, train, known, train_classes, seed, b=BUDGETS, test_ratio=0.2):
    """The reference's `prepare_owdfa_samples`, legacy global RNG, with sorted listings."""
    np.random.seed(seed)
    samples = {}
    for folder in sorted(os.listdir(root)):
        try:
            label = int(folder.split("_")[0])
        except ValueError:
            continue
        paths = []
        for dirpath, dirnames, files in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            paths += [
                os.path.join(dirpath, f)
                for f in sorted(files)
                if f.lower().endswith((".jpg", ".jpeg", ".png"))
            ]
        if label == 0:
            paths = list(np.random.choice(paths, b.real_per_folder, replace=False))
        samples.setdefault(label, []).extend(paths)
    rows = []
    for label, paths in samples.items():
        if label not in train_classes:
            continue
        budget = (b.real if label == 0 else b.known) if label in known else b.novel
        if len(paths) > budget:
            paths = np.random.choice(paths, budget, replace=False)
        paths = np.array(paths)
        np.random.shuffle(paths)
        split = int(len(paths) * (1 - test_ratio))
        part = paths[:split] if train else paths[split:]
        rows += [(str(p), label) for p in part]
    return rows


def reference_datasets(root, known, train_classes, seed):
    np.random.seed(seed)
    train = reference_prepare(root, True, known, train_classes, seed)
    known_rows = [i for i, (_, y) in enumerate(train) if y in known]
    chosen = np.random.choice(
        np.arange(len(known_rows)), int(len(known_rows) * 0.75), replace=False
    )
    mask = np.zeros(len(train), bool)
    mask[np.array(known_rows)[chosen]] = True
    labelled = [r for r, m in zip(train, mask) if m]
    unlabelled = [r for r, m in zip(train, mask) if not m]
    test = reference_prepare(root, False, known, train_classes, seed)
    return labelled, unlabelled, test


@pytest.mark.parametrize("seed", [2025, 7])
def test_same_files_as_the_reference(owdfa40_root, seed):
    classes = list(range(41))
    ours = build_owdfa40_splits(owdfa40_root, KNOWN, classes, split_seed=seed, budgets=BUDGETS)
    lab, unlab, test = reference_datasets(str(owdfa40_root), set(KNOWN), set(classes), seed)
    assert ours.labelled == lab and ours.unlabelled == unlab and ours.test == test
    # global NumPy state is left alone (a local RandomState draws the same stream)
    np.random.seed(1)
    before = np.random.rand()
    np.random.seed(1)
    build_owdfa40_splits(owdfa40_root, KNOWN, classes, split_seed=seed, budgets=BUDGETS)
    assert np.random.rand() == before


def test_sizes_labelled_fraction_and_disjointness(owdfa40_root):
    s = build_owdfa40_splits(owdfa40_root, KNOWN, list(range(41)), budgets=BUDGETS)
    # REAL: 2 folders x 4 -> 6 (budget) -> 4 train / 2 test; known fakes 4 -> 3/1; novel 3 -> 2/1
    n_known_train = 4 + 3 * 3
    assert len(s.labelled) == int(n_known_train * 0.75)
    assert len(s.labelled) + len(s.unlabelled) == n_known_train + 37 * 2
    assert len(s.test) == 2 + 3 * 1 + 37 * 1
    assert {y for _, y in s.labelled} <= set(KNOWN)
    paths = [p for p, _ in s.labelled + s.unlabelled + s.test]
    assert len(paths) == len(set(paths))
    assert all(p.startswith(str(owdfa40_root)) for p in paths)


def test_split_seed_changes_the_selection(owdfa40_root):
    a = build_owdfa40_splits(owdfa40_root, KNOWN, list(range(41)), split_seed=1, budgets=BUDGETS)
    b = build_owdfa40_splits(owdfa40_root, KNOWN, list(range(41)), split_seed=2, budgets=BUDGETS)
    assert a.test != b.test


def test_check_splits_names_the_leaking_rows():
    classes = [{"label": 0}, {"label": 1}]
    with pytest.raises(ValueError, match="labelled and unlabelled share 1 image"):
        check_splits(DataSplits([("a.png", 0)], [("a.png", 0)], [], 1, classes))
    with pytest.raises(ValueError, match=r"not of a known class .*: b.png"):
        check_splits(DataSplits([("b.png", 1)], [], [], 1, classes))
    check_splits(DataSplits([("a.png", 0)], [("b.png", 1)], [("c.png", 1)], 1, classes))


def test_an_empty_split_or_class_is_named_with_the_settings_that_size_them():
    from owdfa_bench.data.splits import check_nothing_empty

    classes = [{"label": 0, "code": "REAL"}, {"label": 1}]
    whole = DataSplits([("a.png", 0)], [("b.png", 1)], [("c.png", 0), ("d.png", 1)], 1, classes)
    check_nothing_empty(whole, "data=x", "data.test_ratio")
    no_test = DataSplits([("a.png", 0)], [("b.png", 1)], [("c.png", 0)], 1, classes)
    with pytest.raises(DataError) as err:
        check_nothing_empty(no_test, "data=x protocol=p1", "data.test_ratio=0.01")
    assert str(err.value) == (
        "the splits of data=x protocol=p1 leave no row in class 1 in test (1 labelled, "
        "1 unlabelled, 1 test rows); every split and every class needs one: change "
        "data.test_ratio=0.01"
    )
    no_labelled = DataSplits([], [("b.png", 1)], [("c.png", 0), ("d.png", 1)], 1, classes)
    with pytest.raises(DataError, match=r"no row in the labelled split, class 0 \(REAL\) in "):
        check_nothing_empty(no_labelled, "data=x", "data.labelled_fraction=0.01")


def test_missing_root_and_missing_class_are_clear(tmp_path, owdfa40_root):
    with pytest.raises(FileNotFoundError, match="nope does not exist; set data.root"):
        build_owdfa40_splits(tmp_path / "nope", KNOWN, budgets=BUDGETS)
    (tmp_path / "a.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="a.zip is a file, not a folder; set data.root"):
        build_owdfa40_splits(tmp_path / "a.zip", KNOWN, budgets=BUDGETS)
    (tmp_path / "a.zip").unlink()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        build_owdfa40_splits(tmp_path, KNOWN, budgets=BUDGETS)
    with pytest.raises(FileNotFoundError, match=r"class indices \[41\]"):
        build_owdfa40_splits(owdfa40_root, KNOWN, list(range(42)), budgets=BUDGETS)


def test_class_below_budget_warns_and_uses_what_exists(owdfa40_root):
    big = Budgets(real=6, real_per_folder=4, known=50, novel=3)
    s = build_owdfa40_splits(owdfa40_root, KNOWN, list(range(41)), budgets=big)
    assert any("class 1: 5 images, below its budget 50" in w for w in s.warnings)
