"""Every method the config tree offers (`conf/method/*.yaml`), under both K settings: its config
composes and passes the checks, it builds, one real training step gives finite losses and
gradients, and a smoke fit under k=unknown writes a complete record. A new method is tested
the moment its YAML exists; its own test file checks what is specific to it.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import CONF

from owdfa_bench.config import check_config
from owdfa_bench.data.datamodule import build_splits
from owdfa_bench.method import OWDFAMethod
from owdfa_bench.runner import build_datamodule, build_method, build_trainer, make_problem, run

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
K_MODES = ("known", "unknown")
# two smoke fits of these take tens of seconds on one CPU thread (as in test_label_hiding.py)
SLOW = {"cdal", "mpsl", "gcd"}
# GCD clusters its embeddings with SS-k-means: fewer restarts keep its fits short
FAST = {
    "gcd": [
        "method.model.kmeans_n_init=2",
        "method.model.kmeans_estimate_n_init=2",
        "method.model.proj_out_dim=1024",
    ]
}


def params(*k_modes: str, slow: set[str] = frozenset()):
    return [
        pytest.param(m, k, marks=[pytest.mark.slow] if m in slow else [], id=f"{m}-{k}")
        for m in METHODS
        for k in k_modes
    ]


class StepProbe(pl.Callback):
    """The loss and the gradients of the first optimiser step."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.grads: dict[str, torch.Tensor | None] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.loss = outputs["loss"].detach() if isinstance(outputs, dict) else outputs.detach()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not self.grads:
            self.grads = {
                n: None if p.grad is None else p.grad.detach().clone()
                for n, p in module.named_parameters()
                if p.requires_grad
            }


@pytest.mark.parametrize(("method", "k"), params(*K_MODES))
def test_config_composes_checks_and_builds_the_method(make_cfg, method, k):
    cfg = make_cfg(f"method={method}", f"k={k}")
    check_config(cfg)
    module, _, _ = cfg.method.model._target_.rpartition(".")
    assert module == f"methods.{method}" and cfg.method.name == method
    splits = build_splits(cfg.data, cfg.protocol)
    model = build_method(cfg, make_problem(cfg, splits, max_epochs=2))
    assert isinstance(model, OWDFAMethod) and model.problem.k_mode == k
    model.eval()
    with torch.no_grad():
        logits = model.predict_logits(torch.randn(2, 3, 32, 32))
    assert logits.ndim == 2 and logits.shape[0] == 2 and torch.isfinite(logits).all()


@pytest.mark.parametrize(("method", "k"), params(*K_MODES))
def test_one_training_step_gives_finite_losses_and_gradients(make_cfg, tmp_path, method, k):
    cfg = make_cfg(f"method={method}", f"k={k}", *FAST.get(method, []))
    splits = build_splits(cfg.data, cfg.protocol)
    model = build_method(cfg, make_problem(cfg, splits, max_epochs=2))
    probe = StepProbe()
    trainer = build_trainer(
        cfg.trainer, tmp_path, 1, callbacks=[probe], max_steps=1, limit_val_batches=0
    )
    trainer.fit(model, datamodule=build_datamodule(cfg, splits, model))
    assert probe.loss is not None and torch.isfinite(probe.loss)
    assert probe.grads, f"{method}: no trainable parameter"
    bad = [n for n, g in probe.grads.items() if g is not None and not torch.isfinite(g).all()]
    assert not bad, f"{method}: non-finite gradients in {bad[:3]}"
    # every trainable parameter is in the graph of the loss (timm's zero-initialised last BN
    # of a residual block may still give zeros inside it in the first step)
    unreached = [n for n, g in probe.grads.items() if g is None]
    assert not unreached, f"{method}: parameters the loss does not reach: {unreached[:5]}"
    assert any(g.abs().sum() > 0 for g in probe.grads.values()), f"{method}: nothing learns"


@pytest.mark.parametrize(("method", "k"), params("unknown", slow=SLOW))
def test_smoke_fit_writes_a_complete_record(make_cfg, method, k):
    record = run(make_cfg(f"method={method}", f"k={k}", *FAST.get(method, [])))
    assert record["status"] == "complete"
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    assert all(v is None or math.isfinite(v) for v in record["metrics"].values())
    assert 0.0 <= record["metrics"]["all_acc"] <= 1.0
    estimated = record["k_estimated"]
    assert isinstance(estimated, int) and record["metrics"]["k_estimated"] == estimated
    assert 1 <= record["num_clusters"] <= estimated  # no more classes predicted than estimated
