"""Datasets over `(path, label)` rows and the shared labelled/unlabelled sampler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from owdfa_bench.data.splits import LABELLED_TAG, UNLABELLED_TAG, Row


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def find_unreadable(paths: Sequence[str], workers: int = 4) -> list[str]:
    """Paths PIL cannot open and verify (header and structure check, no full decode)."""

    def bad(path: str) -> bool:
        try:
            with Image.open(path) as img:
                img.verify()
            return False
        except Exception:
            return True

    with ThreadPoolExecutor(max_workers=workers) as pool:
        flags = list(pool.map(bad, paths, chunksize=64))
    return [p for p, f in zip(paths, flags) if f]


class EvalRows(Dataset):
    """`{"image", "y", "index"}` items with one deterministic transform."""

    def __init__(
        self,
        rows: Sequence[Row],
        transform: Callable,
        loader: Callable[[str], Image.Image] = load_rgb,
    ):
        self.rows, self.transform, self.loader = list(rows), transform, loader

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, label = self.rows[i]
        return {"image": self.transform(self.loader(path)), "y": label, "index": i}


class TrainRows(Dataset):
    """Labelled rows (tag 1) followed by unlabelled rows (tag 2), each with its augmented views.

    Index i < len(labelled) is labelled, as in CAL's `MergedDataset`. Every view comes from the
    same decoded image.
    """

    def __init__(
        self,
        labelled: Sequence[Row],
        unlabelled: Sequence[Row],
        views: Sequence[Callable],
        loader: Callable[[str], Image.Image] = load_rgb,
    ):
        self.labelled, self.unlabelled = list(labelled), list(unlabelled)
        self.views, self.loader = list(views), loader

    def __len__(self) -> int:
        return len(self.labelled) + len(self.unlabelled)

    def __getitem__(self, i: int) -> dict:
        n_lab = len(self.labelled)
        path, label = self.labelled[i] if i < n_lab else self.unlabelled[i - n_lab]
        img = self.loader(path)
        return {
            "views": [view(img) for view in self.views],
            "y": label,
            "tag": LABELLED_TAG if i < n_lab else UNLABELLED_TAG,
            "index": i,
        }


def weighted_sampler(num_labelled: int, num_unlabelled: int, seed: int) -> WeightedRandomSampler:
    """CAL's sampler: labelled weight 1, unlabelled N_lab / N_unlab, N draws with replacement.

    Each draw is labelled with probability 1/2 in expectation (not exactly half per batch).
    """
    w_unlab = num_labelled / num_unlabelled if num_unlabelled else 0.0
    weights = torch.tensor([1.0] * num_labelled + [w_unlab] * num_unlabelled, dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        weights, num_samples=len(weights), replacement=True, generator=generator
    )
