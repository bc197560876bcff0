"""Lower bound: supervised training on the labelled known-class rows only.

Same backbone, BNNeck and bias-free head as CAL and CPL (`owdfa_bench/models.py`), with K_k
outputs and cross-entropy on the labelled set. Its predictions are known ids only, so Known ACC is
near the ceiling and Novel ACC comes from the separate Hungarian matching alone. Exact bound
definitions are not given by the references (CPL's README prints the rows without defining them);
this follows the reading that matches CPL's published P1 row (`docs/reference-behaviour.md`).

Under DDP: every term is a per-row mean, so the averaged gradient is the global batch's
(shares are equal); batch-norm statistics are each rank's share's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from owdfa_bench.method import Problem, TrainBatch
from owdfa_bench.models import SupervisedClassifier


class LowerBound(SupervisedClassifier):
    train_on: ClassVar[str] = "labelled"

    def __init__(self, problem: Problem, optim: dict, backbone: dict, dropout: float = 0.2):
        super().__init__(problem, optim, backbone, problem.num_known, dropout)

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        logits = self.predict_logits(batch.views[0])
        loss = F.cross_entropy(logits[batch.labelled], batch.y[batch.labelled])
        return {"loss": loss, "ce": loss.detach()}
