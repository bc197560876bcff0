"""Training samplers over the merged (labelled + unlabelled) train set.

`AlternatingBalancedSampler` is CPL's `MultilabelBalancedRandomSampler` with `class_choice=
"balance"` (`owdfa/datasets/utils/sampler.py`), the sampler of CPL, MPSL and CDAL. The merged
dataset holds the labelled rows at indices 0..L-1 and the unlabelled rows at L..L+U-1.

Kept from the reference (reproducing its batches needs its bookkeeping):
  * each pool (one per labelled class, one for all unlabelled rows) is permuted once, at
    construction, and then cycled in that order for the whole run;
  * the per-pool draw counters and the labelled/unlabelled alternation persist across epochs;
  * the least-drawn-class search duplicates a newly found minimum in its candidate list (a class
    that lowers the running minimum is appended twice), which slightly favours it in the tie
    break.
Deliberate deviations:
  * the tie break and the permutations use one `numpy.random.Generator` seeded by `seed`
    (the reference mixes the global NumPy RNG with Python's `random`), so a run is reproducible
    from its seed alone;
  * labelled classes are the distinct labelled targets; the reference loops over
    0..max(label) and crashes (modulo by zero) when a class id in that range has no labelled row;
  * multi-process (DDP) runs: every rank builds the same sampler (same seed) and draws the same
    stream of (unlabelled, labelled) pairs; rank r keeps the pairs k with k % num_replicas == r,
    so each rank's batches stay exactly half labelled and the ranks never share a draw. (The
    reference ran one process; Lightning's generic distributed wrapper would give one rank all
    unlabelled and the other all labelled rows, so it must be turned off for this sampler.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class AlternatingBalancedSampler(Sampler[int]):
    """Yields `L + U` indices per epoch: unlabelled, labelled, unlabelled, labelled, ...

    Even draws take the next row of the permuted, cycled unlabelled pool; odd draws take the
    next row (cycled) of the labelled class drawn least so far. A batch of even size that starts
    on an even draw is therefore exactly half labelled, with the labelled half class-balanced.

    Args:
        labelled_targets: class id of each labelled row, in merged-dataset order (row i of this
            sequence is dataset index i).
        num_unlabelled: number of unlabelled rows U (dataset indices L..L+U-1).
        seed: seeds the permutations and the tie break.
        num_replicas, rank: for DDP, the number of processes and this process's rank.
    """

    def __init__(
        self,
        labelled_targets: Sequence[int] | np.ndarray,
        num_unlabelled: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        targets = np.asarray(labelled_targets)
        if targets.ndim != 1 or targets.size == 0:
            raise ValueError(
                "AlternatingBalancedSampler needs a non-empty 1-D sequence of labelled targets; "
                "use method.sampler=weighted for a training set without labelled rows"
            )
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"labelled_targets must be integer class ids, got {targets.dtype}")
        if int(num_unlabelled) < 1:
            raise ValueError(
                f"AlternatingBalancedSampler needs unlabelled rows, got num_unlabelled="
                f"{num_unlabelled}; use method.sampler=weighted for a labelled-only training set"
            )
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_labelled = int(targets.size)
        self.num_unlabelled = int(num_unlabelled)
        self._rng = np.random.default_rng(seed)
        self.classes = np.unique(targets)
        # Pools are permuted once, labelled classes first, as the reference does.
        self._class_rows = [
            self._rng.permutation(np.flatnonzero(targets == c)) for c in self.classes
        ]
        self._unlabelled_rows = self.num_labelled + self._rng.permutation(self.num_unlabelled)
        self.class_draws = np.zeros(len(self.classes), dtype=np.int64)
        self.unlabelled_draws = 0
        self._next_is_unlabelled = True

    def __len__(self) -> int:
        total = self.num_labelled + self.num_unlabelled
        if self.num_replicas == 1:
            return total
        return 2 * math.ceil(total / (2 * self.num_replicas))  # whole pairs, equal on every rank

    def __iter__(self) -> Iterator[int]:
        if self.num_replicas == 1:
            for _ in range(len(self)):
                yield self._draw()
            return
        # One round = one (unlabelled, labelled) pair per rank, drawn whole before this rank's
        # pair is yielded, so ranks that stop after the same number of batches stay in step.
        for _ in range(len(self) // 2):
            pairs = [(self._draw(), self._draw()) for _ in range(self.num_replicas)]
            yield from pairs[self.rank]

    def state_dict(self) -> dict:
        """What the next draws depend on beyond the seed: the generator and the counters (the
        permutations are rebuilt from the seed). Plain types, for a weights-only checkpoint."""
        return {
            "rng": self._rng.bit_generator.state,
            "class_draws": self.class_draws.tolist(),
            "unlabelled_draws": int(self.unlabelled_draws),
            "next_is_unlabelled": bool(self._next_is_unlabelled),
            "pools": [len(rows) for rows in self._class_rows] + [self.num_unlabelled],
        }

    def load_state_dict(self, state: dict) -> None:
        pools = [len(rows) for rows in self._class_rows] + [self.num_unlabelled]
        if list(state["pools"]) != pools:
            raise ValueError(
                f"sampler state of pools {state['pools']} does not fit this training set's pools "
                f"{pools}: the data changed since the checkpoint"
            )
        self._rng.bit_generator.state = state["rng"]
        self.class_draws = np.asarray(state["class_draws"], dtype=np.int64)
        self.unlabelled_draws = int(state["unlabelled_draws"])
        self._next_is_unlabelled = bool(state["next_is_unlabelled"])

    def _draw(self) -> int:
        if self._next_is_unlabelled:
            index = self._unlabelled_rows[self.unlabelled_draws % self.num_unlabelled]
            self.unlabelled_draws += 1
        else:
            pool = self._least_drawn_class()
            rows = self._class_rows[pool]
            index = rows[self.class_draws[pool] % len(rows)]
            self.class_draws[pool] += 1
        self._next_is_unlabelled = not self._next_is_unlabelled
        return int(index)

    def _least_drawn_class(self) -> int:
        """Position (in `classes`) of a least-drawn class, with the reference's tie list."""
        min_count = self.class_draws[0]
        candidates = [0]
        for pool in range(1, len(self.classes)):
            count = self.class_draws[pool]
            if count < min_count:
                min_count = count
                candidates = [pool]
            # Quirk kept: runs after the branch above, so a new minimum is listed twice.
            if count == min_count:
                candidates.append(pool)
        return candidates[int(self._rng.integers(len(candidates)))]
