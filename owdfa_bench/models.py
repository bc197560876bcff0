"""Model parts shared by the methods: backbone, the reference's pooling, BNNeck, prototype head,
and the supervised classifier both bounds train.

Every OW-DFA reference (CAL, CPL, CDAL) builds the same blocks (CAL's `CAL/encoder/models.py`,
CPL's and CDAL's `owdfa/encoder/base_net.py`); they live here once so that a method file holds
only what is specific to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
import torch.nn.functional as F
from torch import nn

from owdfa_bench.method import OWDFAMethod, Problem
from owdfa_bench.weights import MissingWeightsError, missing_weights_message, resolve_backbone


def build_backbone(
    name: str = "resnet18", pretrained: bool = False, weights: str | None = None, **kwargs
) -> nn.Module:
    """A timm model without its classifier and global pooling: `forward` returns the feature map.

    `model.num_features` is the channel count of that map. `weights` is a local timm state dict
    (.safetensors or .pth; the synthetic benchmark's pretrained start is one), loaded by timm
    with its classifier dropped. Otherwise `pretrained=True` takes timm's weights from the
    `owdfa-bench fetch-weights` cache, or downloads them through huggingface_hub (real runs
    only; tests always pass False); weights that are neither raise `MissingWeightsError`.
    """
    weights = weights or resolve_backbone({"name": name, "pretrained": pretrained}).get("weights")
    if weights:
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"data.backbone.weights={weights}: no such file; give a local timm state dict "
                "(.safetensors or .pth) or set data.backbone.weights=null"
            )
        overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
        return create_timm_model(name, kwargs, pretrained=True, **overlay)
    if not pretrained:
        return create_timm_model(name, kwargs, pretrained=False)
    try:
        return create_timm_model(name, kwargs, pretrained=True)
    except UnknownBackboneArgument:
        raise
    except Exception as err:  # the Hub's offline / connection / missing-entry errors
        raise MissingWeightsError(missing_weights_message(name, err)) from err


class UnknownBackboneArgument(ValueError):
    """A key of `data.backbone` the timm model does not take (the runner makes it one line)."""


def create_timm_model(name: str, extra: dict[str, Any], **settings: Any) -> nn.Module:
    """timm's `name` without classifier and pooling; `extra`, the other keys of
    `data.backbone`, are its arguments: one it does not take is refused naming the key."""
    try:
        return timm.create_model(name, num_classes=0, global_pool="", **settings, **extra)
    except TypeError as err:
        refused = [key for key in extra if repr(key) in str(err)]
        if not refused:
            raise
        key = refused[0]
        raise UnknownBackboneArgument(
            f"data.backbone.{key}={extra[key]!r}: timm's {name} takes no such argument; remove it"
        ) from err


def custom_pool_geometry(size: int, out: int) -> tuple[int, int]:
    """Kernel and stride of the reference's `AdaptiveAvgPool2dCustom` for one axis.

    stride = floor(n / o), kernel = n - (o - 1) * stride: windows overlap when o does not
    divide n (8 -> 3: kernel 4, stride 2), so it differs from `nn.AdaptiveAvgPool2d`.
    """
    if out < 1 or out > size:
        raise ValueError(f"cannot pool a size-{size} axis to {out} cells")
    stride = size // out
    return size - (out - 1) * stride, stride


def custom_avg_pool2d(x: torch.Tensor, out_size: int | tuple[int, int]) -> torch.Tensor:
    """`AdaptiveAvgPool2dCustom` of CAL and CPL: a plain average pool with derived kernel/stride."""
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    kh, sh = custom_pool_geometry(x.shape[-2], oh)
    kw, sw = custom_pool_geometry(x.shape[-1], ow)
    return F.avg_pool2d(x, kernel_size=(kh, kw), stride=(sh, sw))


def train_only(module: nn.Module, trainable: str | Sequence[str] = "all") -> list[str]:
    """Freeze every parameter of `module` except those under the given name prefixes.

    `trainable="all"` leaves everything as it is. A method's "original" recipe uses this for the
    trainable layers of its reference (e.g. `["encoder.backbone.layer4", "head"]`, the ResNet
    analogue of "last ViT block only"). Returns the names left trainable; a prefix that matches
    no parameter is an error naming it.
    """
    if trainable == "all":
        return [n for n, p in module.named_parameters() if p.requires_grad]
    prefixes = [trainable] if isinstance(trainable, str) else list(trainable)
    names = [n for n, _ in module.named_parameters()]
    unmatched = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unmatched:
        raise ValueError(
            f"method.model.trainable: {unmatched} match no parameter; parameter names start with "
            f"{sorted({n.split('.')[0] for n in names})}"
        )
    kept = []
    for name, param in module.named_parameters():
        keep = any(name == p or name.startswith(p + ".") for p in prefixes)
        if not keep:
            param.requires_grad_(False)
        elif param.requires_grad:
            kept.append(name)
    return kept


@torch.no_grad()
def ema_update(
    ema: nn.Module, model: nn.Module, decay: float = 0.999, student_decay: float = 0.0
) -> None:
    """`WeightEMA.step` of TRSSL (OwMatch's and OpenLDN's teacher) over every float entry of
    the state (weights and BN running statistics): ema <- decay ema + (1 - decay) model; then,
    if `student_decay`, the model's entries are multiplied by (1 - student_decay). Integer
    entries (`num_batches_tracked`) are left as they are."""
    for s, e in zip(model.state_dict().values(), ema.state_dict().values()):
        if not e.dtype.is_floating_point:
            continue
        e.mul_(decay).add_(s.to(e.dtype), alpha=1.0 - decay)
        if student_decay:
            s.mul_(1.0 - student_decay)


class BNNeck(nn.BatchNorm1d):
    """BatchNorm1d with its bias frozen at zero and weight one (the reference's "bottleneck")."""

    def __init__(self, dim: int):
        super().__init__(dim)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.bias.requires_grad_(False)


class PrototypeHead(nn.Module):
    """Bias-free linear head whose first `num_active` rows are the live prototypes.

    The weight keeps all `num_rows` rows (as CAL's `fc2` does); `num_active` is a buffer, so it
    is saved in checkpoints (CAL keeps it as a plain attribute, so its eval-only reload of a
    checkpoint scores every row, pruned ones included).
    """

    def __init__(self, dim: int, num_rows: int, init_std: float = 1e-3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_rows, dim) * init_std)
        self.register_buffer("num_active", torch.tensor(num_rows, dtype=torch.long))

    @property
    def active(self) -> int:
        return int(self.num_active)

    def set_active(self, n: int) -> None:
        if not 1 <= n <= self.weight.shape[0]:
            raise ValueError(f"active prototypes must be in [1, {self.weight.shape[0]}], got {n}")
        self.num_active.fill_(n)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight[: self.active].t()


class GlobalFeatureEncoder(nn.Module):
    """Backbone feature map -> custom pool to 1x1 -> BNNeck: the global feature of CAL and CPL."""

    def __init__(self, backbone: dict | None = None):
        super().__init__()
        self.backbone = build_backbone(**(backbone or {}))
        self.dim = self.backbone.num_features
        self.neck = BNNeck(self.dim)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.neck(custom_avg_pool2d(fmap, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))


class SupervisedClassifier(OWDFAMethod):
    """Encoder + dropout + prototype head trained with cross-entropy on one view: the model of
    the lower and upper bounds (methods/lower_bound.py, methods/upper_bound.py), which differ
    only in their outputs and the rows they learn from."""

    train_views: ClassVar[tuple[str, ...]] = ("weak",)

    def __init__(
        self,
        problem: Problem,
        optim: dict[str, Any],
        backbone: dict[str, Any],
        num_outputs: int,
        dropout: float = 0.2,
    ):
        super().__init__(problem, optim)
        self.encoder = GlobalFeatureEncoder(backbone)
        self.dropout = nn.Dropout(dropout)
        self.head = PrototypeHead(self.encoder.dim, num_outputs)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x)))
