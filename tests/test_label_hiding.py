"""No method sees the labels of unlabelled rows, while the diagnostics that need them compute.

Each method is trained twice on the tiny synthetic set: once as is, once with the hidden labels
of the unlabelled training rows all replaced by one label (a permutation would not do: Hungarian
metrics of a degenerate predictor do not change under it). If a method read those labels
anywhere (batch, datamodule, loaders), its training would change. It must not: the same test
metrics every epoch and the same final weights, bit for bit (the same computation, repeated).
The diagnostics, which do read them, must change. The oracle upper bound is the control: its
training must change.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CONF

import owdfa_bench.runner as runner_module
from owdfa_bench.runner import run

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
# heavier models: two smoke fits each take tens of seconds on one CPU thread
SLOW = {"cdal", "mpsl", "gcd"}
TEST_KEYS = ("all_acc", "known_acc", "novel_acc", "all_nmi", "conf_known", "conf_novel")


def relabel_unlabelled_rows(monkeypatch) -> None:
    """Make the runner build splits whose unlabelled rows all carry the label 0."""
    build = runner_module.build_splits

    def relabelled(data_cfg, protocol_cfg):
        splits = build(data_cfg, protocol_cfg)
        assert len({y for _, y in splits.unlabelled}) > 1
        splits.unlabelled = [(p, 0) for p, _ in splits.unlabelled]
        return splits

    monkeypatch.setattr(runner_module, "build_splits", relabelled)


def final_weights(cfg) -> dict[str, torch.Tensor]:
    ckpt = torch.load(f"{cfg.run_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def fit_twice(make_cfg, tmp_path, monkeypatch, method: str):
    overrides = [f"method={method}", "trainer.limit_val_batches=null", "force=true"]
    plain_cfg = make_cfg(*overrides, f"output_root={tmp_path / 'plain'}")
    plain = run(plain_cfg)
    relabel_unlabelled_rows(monkeypatch)
    shuffled_cfg = make_cfg(*overrides, f"output_root={tmp_path / 'shuffled'}")
    shuffled = run(shuffled_cfg)
    assert plain["status"] == shuffled["status"] == "complete"
    return plain, shuffled, final_weights(plain_cfg), final_weights(shuffled_cfg)


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in METHODS]
)
def test_training_ignores_unlabelled_labels_but_diagnostics_read_them(
    make_cfg, tmp_path, monkeypatch, method
):
    plain, shuffled, w_plain, w_shuffled = fit_twice(make_cfg, tmp_path, monkeypatch, method)
    diag = ("pseudo_noise", "transductive_all_acc", "transductive_novel_acc")
    for h in plain["history"]:
        assert set(diag) <= set(h["metrics"]), "every epoch carries the diagnostics"
    if method == "upper_bound":  # the oracle trains on them: the control must see a change
        assert any(not torch.equal(w_plain[k], w_shuffled[k]) for k in w_plain)
        return
    for a, b in zip(plain["history"], shuffled["history"]):
        assert {k: a["metrics"][k] for k in TEST_KEYS} == {k: b["metrics"][k] for k in TEST_KEYS}
    assert w_plain.keys() == w_shuffled.keys()
    changed = [k for k in w_plain if not torch.equal(w_plain[k], w_shuffled[k])]
    assert not changed, f"{method}: training depended on hidden labels via {changed[:3]}"
    assert any(
        a["metrics"][k] != b["metrics"][k]
        for a, b in zip(plain["history"], shuffled["history"])
        for k in diag
    ), "the diagnostics must read the hidden labels"
