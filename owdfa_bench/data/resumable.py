"""The train sampler's place in its stream of draws, so a resumed run draws what the
uninterrupted run drew next.

`ResumableSampler` wraps the sampler the train DataLoader iterates. It remembers the state its
draws started the current epoch from; `state(batches_done)` is that state and the number of
indices already trained on (or, between epochs, the state the next epoch starts from), and
`resume(state)` puts the sampler back there: the next epoch's iteration starts from the saved
state and skips the indices already trained on, which replays the draws exactly. A sampler's
state is its own: CPL's `AlternatingBalancedSampler` has `state_dict`, the torch samplers
(`WeightedRandomSampler`, `RandomSampler`) their `generator`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


def sampler_state(sampler: Any) -> dict[str, Any]:
    """The state a sampler's next draw depends on."""
    if hasattr(sampler, "state_dict"):
        return {"state_dict": sampler.state_dict()}
    generator = getattr(sampler, "generator", None)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{type(sampler).__name__} has neither state_dict() nor a torch.Generator: a run "
            "could not resume its draws"
        )
    return {"generator": generator.get_state()}


def load_sampler_state(sampler: Any, state: dict[str, Any]) -> None:
    if "state_dict" in state:
        sampler.load_state_dict(state["state_dict"])
    else:
        sampler.generator.set_state(state["generator"])


class ResumableSampler(Sampler[int]):
    """`sampler`'s indices, from a saved place in its stream when resumed.

    Args:
        sampler: what the DataLoader iterates (e.g. a DDP wrapper around `stateful`).
        stateful: the sampler whose state decides the draws (default: `sampler`).
    """

    def __init__(self, sampler: Sampler[int], stateful: Any | None = None):
        self.sampler = sampler
        self.stateful = sampler if stateful is None else stateful
        self._epoch_start: dict[str, Any] | None = None
        self._skip = 0
        self._owes_loader_draw = False

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        # a generator: this runs at the epoch's first draw, as the wrapped sampler's own
        if self._owes_loader_draw:
            # A DataLoader draws its base seed (one int64) from the global generator when an
            # iterator is made. Resuming at an epoch boundary, Lightning reuses the iterator it
            # made before the random state was restored, so this draw is made here, where the
            # uninterrupted run made it (after on_train_epoch_start, before the first batch).
            torch.empty((), dtype=torch.int64).random_()
            self._owes_loader_draw = False
        self._epoch_start = sampler_state(self.stateful)
        skip, self._skip = self._skip, 0
        indices = iter(self.sampler)
        for _ in itertools.islice(indices, skip):  # drawn again, already trained on
            pass
        yield from indices

    def state(self, indices_done: int | None) -> dict[str, Any]:
        """Where a resumed run continues: `indices_done` of this epoch already trained on, or
        None between epochs (the next epoch starts from the sampler's current state)."""
        if indices_done is None or self._epoch_start is None:
            return {"start": sampler_state(self.stateful), "skip": 0}
        return {"start": self._epoch_start, "skip": int(indices_done)}

    def resume(self, state: dict[str, Any], owes_loader_draw: bool = False) -> None:
        """Continue from `state` (of `state`); `owes_loader_draw`: resuming at an epoch boundary
        (see `__iter__`)."""
        load_sampler_state(self.stateful, state["start"])
        self._skip = int(state["skip"])
        self._owes_loader_draw = bool(owes_loader_draw)
