"""Upper bound (oracle): supervised training on every training row with its true label.

The same model as the lower bound with K outputs, trained with CE on labelled and unlabelled
rows, using the ground truth of the unlabelled ones (our reading of the "Upper Bound" row of CPL's
README, which does not define it; `docs/reference-behaviour.md`). It always uses the true K, also
under k=unknown.

Under DDP: every term is a per-row mean, so the averaged gradient is the global batch's
(shares are equal); batch-norm statistics are each rank's share's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from owdfa_bench.method import Problem, TrainBatch
from owdfa_bench.models import SupervisedClassifier


class UpperBound(SupervisedClassifier):
    uses_unlabelled_labels: ClassVar[bool] = True

    def __init__(self, problem: Problem, optim: dict, backbone: dict, dropout: float = 0.2):
        super().__init__(problem, optim, backbone, problem.num_classes, dropout)

    def training_losses(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self.predict_logits(batch.views[0]), batch.y_true)
        return {"loss": loss, "ce": loss.detach()}
