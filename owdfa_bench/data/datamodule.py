"""From a composed config to labelled / unlabelled / test rows, and the Lightning DataModule.

data config -> its source (`data._target_`) -> rows of the protocol's splits -> the checks every
source passes -> datasets, samplers and loaders.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from owdfa_bench.data.datasets import EvalRows, TrainRows, find_unreadable, weighted_sampler
from owdfa_bench.data.digest import data_digest
from owdfa_bench.data.resumable import ResumableSampler
from owdfa_bench.data.splits import (
    HIDDEN_LABEL,
    DataSplits,
    Row,
    check_nothing_empty,
    check_splits,
)
from owdfa_bench.data.transforms import build_view
from owdfa_bench.errors import CheckpointError, DataError, as_user_error

log = logging.getLogger(__name__)
LISTED_UNREADABLE = 10  # images named in the error


def drop_unreadable(splits: DataSplits, max_fraction: float) -> DataSplits:
    """Remove rows PIL cannot read; fail with the list when they exceed `max_fraction`."""
    rows = splits.labelled + splits.unlabelled + splits.test
    bad = find_unreadable([p for p, _ in rows])
    if not bad:
        return splits
    fraction = len(bad) / max(1, len(rows))
    if fraction > max_fraction:
        listing = ", ".join(bad[:LISTED_UNREADABLE])
        more = f" and {len(bad) - LISTED_UNREADABLE} more" if len(bad) > LISTED_UNREADABLE else ""
        raise DataError(
            f"{len(bad)} of {len(rows)} images ({fraction:.2%}) cannot be read, more than "
            f"data.max_unreadable_fraction={max_fraction}: {listing}{more}. Fix or remove these "
            "files, or raise data.max_unreadable_fraction to train without them."
        )
    listing = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
    log.warning("skipping %d unreadable images:\n  %s", len(bad), listing)
    bad_set = set(bad)
    keep = lambda rs: [r for r in rs if r[0] not in bad_set]  # noqa: E731
    splits.labelled, splits.unlabelled, splits.test = (
        keep(splits.labelled),
        keep(splits.unlabelled),
        keep(splits.test),
    )
    splits.unreadable = [*splits.unreadable, *bad]
    return splits


def build_splits(data_cfg: DictConfig, protocol_cfg: DictConfig) -> DataSplits:
    """The rows of the configured data source and protocol, checked, unreadable images removed.

    `data._target_` names the source class (owdfa_bench/data/sources.py); whatever it is, its
    rows pass the same disjointness check, face-crop mapping and readability check here. What
    the source raises about its files and rows (FileNotFoundError, FileExistsError, ValueError)
    is a DataError, and so is what the crop cache raises (stale, unreadable crops). The splits
    carry the content digest of their rows (`owdfa_bench.data.digest`), which the run's record
    keeps.
    """
    source = instantiate(data_cfg, _convert_="object")
    where = f"data={source.name} protocol={protocol_cfg.name}"
    # FileExistsError: data=synth's root holds something else than a synth cache
    with as_user_error(
        DataError, where, (ValueError, FileNotFoundError, FileExistsError, KeyError)
    ):
        splits = source.splits(protocol_cfg)
    check_splits(splits, where)
    check_nothing_empty(splits, where, source.split_settings())
    if source.crop_face:
        from owdfa_bench.data.faces import CropCounts, resolve_cached_rows

        # the cache's errors: StaleCacheError, unreadable crops (RuntimeErrors), missing files
        with as_user_error(DataError, where, (RuntimeError, OSError, ValueError)):
            digests, counts = splits.file_digests, CropCounts()
            splits.labelled = resolve_cached_rows(splits.labelled, data_cfg, digests, counts)
            splits.unlabelled = resolve_cached_rows(splits.unlabelled, data_cfg, digests, counts)
            splits.test = resolve_cached_rows(splits.test, data_cfg, digests, counts)
        splits.unreadable = [*splits.unreadable, *counts.unreadable]
        splits.face_crops = counts.summary()
        log.info(
            "face crops: %d images, %d (%s) without a detected face (whole image kept)",
            counts.faces + counts.no_face,
            counts.no_face,
            f"{splits.face_crops['no_face_share'] or 0:.1%}",
        )
    if source.verify_images:
        splits = drop_unreadable(splits, source.max_unreadable_fraction)
    splits.data_digest = data_digest(splits)
    log.info("%s; data digest %s", splits.counts(), splits.data_digest[:12])
    return splits


class OWDFADataModule(pl.LightningDataModule):
    """Train loader (merged labelled + unlabelled, with the method's views and sampler) and the
    test loader used for per-epoch evaluation."""

    def __init__(
        self,
        splits: DataSplits,
        image_size: int,
        train_views: tuple[str, ...],
        batch_size: int,
        sampler: str = "weighted",
        train_on: str = "all",
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        eval_batch_size: int | None = None,
        reveal_unlabelled: bool = False,
        diagnostics: bool = True,
    ):
        super().__init__()
        self.splits, self.image_size = splits, image_size
        # Labels of unlabelled training rows reach only the oracle (reveal_unlabelled) and the
        # base class's diagnostics loader; everything a method can read carries -1 for them.
        self.reveal_unlabelled, self.diagnostics = reveal_unlabelled, diagnostics
        self.train_views, self.sampler_name, self.train_on = train_views, sampler, train_on
        self.batch_size, self.seed = batch_size, seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.train_sampler: ResumableSampler | None = None
        self._sampler_resume: tuple[dict[str, Any], bool] | None = None
        if sampler not in ("weighted", "alternating"):
            raise ValueError(f"method.sampler={sampler!r}: use weighted or alternating")

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def hidden_unlabelled(self) -> list[Row]:
        """The unlabelled rows as a method may see them: label -1 unless it is the oracle."""
        if self.reveal_unlabelled:
            return list(self.splits.unlabelled)
        return [(path, HIDDEN_LABEL) for path, _ in self.splits.unlabelled]

    def train_dataset(self) -> TrainRows:
        unlabelled = [] if self.train_on == "labelled" else self.hidden_unlabelled()
        views = [build_view(v, self.image_size) for v in self.train_views]
        return TrainRows(self.splits.labelled, unlabelled, views)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        self.train_sampler = self.resumable_train_sampler(dataset)
        # The references keep a short last batch; one of size 1 would crash BatchNorm in training.
        # Counted in this rank's draws: under DDP each rank has its share of the rows.
        drop_last = len(self.train_sampler) % self.batch_size == 1
        if self._sampler_resume is not None:  # set by the checkpoint being resumed from
            with as_user_error(CheckpointError, "the checkpoint's train sampler", (ValueError,)):
                self.train_sampler.resume(*self._sampler_resume)
            self._sampler_resume = None
        return self._loader(
            dataset, batch_size=self.batch_size, sampler=self.train_sampler, drop_last=drop_last
        )

    def resumable_train_sampler(self, dataset: TrainRows) -> ResumableSampler:
        """The sampler of `method.sampler` over `dataset`, seeded by `seed` (each rank takes its
        share under DDP), wrapped so that a checkpoint holds its place."""
        n_lab, n_unlab = len(dataset.labelled), len(dataset.unlabelled)
        world, rank = self._world()
        if n_unlab == 0:
            sampler = torch.utils.data.RandomSampler(
                dataset, generator=torch.Generator().manual_seed(self.seed)
            )
        elif self.sampler_name == "alternating":
            from owdfa_bench.data.samplers import AlternatingBalancedSampler

            labels = [y for _, y in dataset.labelled]
            # shards itself: every rank draws the same stream and keeps its pairs
            return ResumableSampler(
                AlternatingBalancedSampler(
                    labels, n_unlab, seed=self.seed, num_replicas=world, rank=rank
                )
            )
        else:
            sampler = weighted_sampler(n_lab, n_unlab, self.seed)
        if world > 1:  # each rank takes its share of the same stream of draws
            wrapped = DistributedSamplerWrapper(
                sampler, num_replicas=world, rank=rank, shuffle=False
            )
            return ResumableSampler(wrapped, stateful=sampler)
        return ResumableSampler(sampler)

    def sampler_state(self, batches_done: int | None) -> dict[str, Any] | None:
        """The train sampler's place for a checkpoint: `batches_done` batches of this epoch
        trained on, or None at the end of an epoch. None before a train loader exists."""
        if self.train_sampler is None:
            return None
        done = None if batches_done is None else batches_done * self.batch_size
        return self.train_sampler.state(done)

    def resume_sampler(self, state: dict[str, Any], at_epoch_boundary: bool) -> None:
        """Make the next train loader continue from `state` (of `sampler_state`, saved between
        epochs when `at_epoch_boundary`)."""
        self._sampler_resume = (state, at_epoch_boundary)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def eval_loader(self, split: str = "test", shard: bool = False) -> DataLoader:
        """Deterministic loader (test transform) over the labelled, unlabelled or test rows;
        with `shard` under DDP, this rank's share of them (`_rows_loader`).

        Unlabelled rows carry label -1 (hidden), as in training.
        """
        if split not in ("labelled", "unlabelled", "test"):
            raise KeyError(f"split must be labelled, unlabelled or test, got {split!r}")
        rows = self.hidden_unlabelled() if split == "unlabelled" else getattr(self.splits, split)
        return self._rows_loader(rows, shard=shard)

    def _rows_loader(self, rows, shard: bool = False) -> DataLoader:
        """Rows in order; with `shard` under DDP, each rank takes every world-th row (the
        sampler repeats rows to even the shares; `OWDFAMethod.gather_eval` drops the repeats)."""
        dataset = EvalRows(rows, build_view("test", self.image_size))
        world, rank = self._world()
        if shard and world > 1:
            sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False
            )
            return self._loader(dataset, batch_size=self.eval_batch_size, sampler=sampler)
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> list[DataLoader]:
        """The test split, then (diagnostics) the unlabelled training rows with their hidden
        labels, which only the base class's diagnostics read (never a method). Under DDP each
        rank evaluates its share of the rows."""
        loaders = [self._rows_loader(self.splits.test, shard=True)]
        if self.diagnostics and self.splits.unlabelled:
            loaders.append(self._rows_loader(self.splits.unlabelled, shard=True))
        return loaders
