"""Helpers the tests share: the tiny backbone, numpy references of softmax, float64 tensors, a
two-view batch, the checks of a smoke fit's record, and reading an offline W&B run log."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from owdfa_bench.method import TrainBatch

REPO = Path(__file__).resolve().parent.parent
TINY_BACKBONE = {"name": "resnet18", "pretrained": False}
SMALL_HEADS = {"proj_hidden_dim": 32, "proj_dim": 16}  # SimGCD-family projection MLP


def run_py(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """`python run.py ARGS` in the checkout as a user runs it: one thread, unbuffered, Hydra's
    own error report off, stdout and stderr piped as text (`env`: default this process's)."""
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def t(x: Any, grad: bool = False) -> torch.Tensor:
    """A float64 tensor of `x` (hand-made inputs compared with numpy to tight tolerances)."""
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def scalar_terms(**values: float) -> dict[str, torch.Tensor]:
    """Loss terms as 0-d tensors, for the checks of a method's weighted total."""
    return {k: torch.tensor(v) for k, v in values.items()}


def two_view_batch(b: int = 8, size: int = 16) -> TrainBatch:
    """Weak and strong views of `b` random images, rows 0-3 labelled (classes 0, 0, 1, 2)."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 2, -1, -1, -1, -1])[:b]
    views = [torch.randn(b, 3, size, size, generator=g) for _ in range(2)]
    return TrainBatch(views=views, y=y, labelled=y >= 0, index=torch.arange(b))


def assert_heads_get_gradients(method: torch.nn.Module) -> None:
    """After a backward pass: every trainable parameter has a finite gradient, and every
    trainable parameter outside the encoder (the heads) a non-zero one."""
    params = dict(method.named_parameters())
    assert not [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert all(torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None)
    heads = [n for n in params if not n.startswith("encoder.") and params[n].requires_grad]
    assert heads and all(params[n].grad.abs().sum() > 0 for n in heads)


def assert_complete_smoke_record(
    record: dict[str, Any],
    k_mode: str,
    cfg: DictConfig | None = None,
    k_bound: str = "num_known",
) -> None:
    """A smoke fit's record: complete (on disk too, given the run's `cfg`), two epochs, finite
    metrics, and a K estimate only under k=unknown, between 1 and twice `record[k_bound]`."""
    if cfg is not None:
        on_disk = json.loads((Path(cfg.run_dir) / "results.json").read_text())
        assert on_disk["status"] == "complete"
    assert record["status"] == "complete"
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert all(v is None or math.isfinite(v) for v in record["metrics"].values())
    k = record["k_estimated"]
    if k_mode == "known":
        assert k is None
    else:
        assert isinstance(k, int) and 1 <= k <= 2 * record[k_bound]


def wandb_log_holding(log_file: Path, *needles: bytes, limit_s: float = 60.0) -> bytes:
    """The bytes of an offline W&B run log once they hold every needle (or at `limit_s`):
    wandb-core may still be writing the log just after `wandb.finish()` returns on a busy
    machine."""
    deadline = time.monotonic() + limit_s
    raw = log_file.read_bytes()
    while not all(n in raw for n in needles) and time.monotonic() < deadline:
        time.sleep(0.2)
        raw = log_file.read_bytes()
    return raw
