"""The one CPU schedule all methods share on data=synth, and the per-method presets beside it."""

from __future__ import annotations

import pytest
import yaml
from conftest import CONF, compose_config

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
SCHEDULE = yaml.safe_load((CONF / "schedule" / "synth.yaml").read_text())["method"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_the_shared_schedule_on_synth(method):
    cfg = compose_config([f"method={method}"])
    reference = yaml.safe_load((CONF / "method" / f"{method}.yaml").read_text())
    assert cfg.method.epochs == SCHEDULE["epochs"] and cfg.method.batch_size == 32
    if reference["optim"]["name"] == "sgd":  # SGD recipes keep their own lr (cosine schedule)
        assert cfg.method.optim.lr == reference["optim"]["lr"]
    else:
        assert cfg.method.optim.lr == SCHEDULE["optim"]["lr"]


def test_presets_hold_only_what_differs_from_the_schedule():
    for path in (CONF / "preset").glob("synth_*.yaml"):
        preset = yaml.safe_load(path.read_text())["method"]
        assert "epochs" not in preset and "batch_size" not in preset, path.name
        assert preset.get("optim", {}).get("lr") in (None, 0.1), path.name


def test_real_data_keeps_the_reference_schedule():
    cfg = compose_config(["data=owdfa40", "method=cal", "data.root=/nonexistent"])
    assert cfg.method.epochs == 50 and cfg.method.batch_size == 128 and cfg.method.optim.lr == 2e-4
    paper = compose_config(["data=synth_paper", "method=cal"])
    assert paper.method.epochs == 50 and paper.data.image_size == 256


def test_epoch_share_places_a_reference_epoch_at_the_same_share_of_any_run():
    from owdfa_bench.checks import ConfigValueError
    from owdfa_bench.config import epoch_share

    assert [epoch_share(5, 50, e) for e in (50, 6, 24)] == [5, 1, 2]
    assert epoch_share(30, 200, 6) == 1 and epoch_share(100, 200, 6) == 3  # half up: 0.9, 3.0
    assert epoch_share(0, 50, 6) == 0
    with pytest.raises(ConfigValueError, match="epoch_share of=0"):
        epoch_share(5, 0, 6)


@pytest.mark.parametrize(
    ("schedule", "epochs", "cal_start", "simgcd_warmup"),
    [("synth", 6, 1, 1), ("synth_long", 24, 2, 4)],
)
def test_epoch_valued_hyper_parameters_follow_the_schedule(
    schedule, epochs, cal_start, simgcd_warmup
):
    cal = compose_config([f"schedule={schedule}", "method=cal"])
    simgcd = compose_config([f"schedule={schedule}", "method=simgcd"])
    assert cal.method.epochs == simgcd.method.epochs == epochs
    assert cal.method.model.pseudo_start_epoch == cal_start
    assert simgcd.method.model.warmup_teacher_temp_epochs == simgcd_warmup
    reference = compose_config(["data=owdfa40", "data.root=/nonexistent", "method=cal"])
    assert reference.method.model.pseudo_start_epoch == 5  # the reference's, at its 50 epochs


def test_the_cosine_schedule_builds_after_hydra_resets_the_resolvers():
    """Hydra's joblib launcher gives every job the launching process's resolvers
    (hydra.core.singleton.Singleton.set_state): a worker's second job must still resolve
    `${owdfa.product:...}` (a sweep of CAL then SimGCD once failed there)."""
    import copy

    import torch
    from omegaconf.basecontainer import BaseContainer

    from owdfa_bench.method import build_optimizer

    launcher_state = copy.deepcopy(BaseContainer._resolvers)
    launcher_state.pop("owdfa.product", None)
    params = [torch.nn.Parameter(torch.zeros(2))]
    cosine = {"name": "sgd", "lr": 0.1, "scheduler": "cosine", "eta_min_ratio": 1e-3}
    build_optimizer(cosine, params, max_epochs=4)  # the worker's first job
    try:
        BaseContainer._resolvers = copy.deepcopy(launcher_state)  # what the next job starts with
        built = build_optimizer(cosine, params, max_epochs=4)
    finally:
        BaseContainer._resolvers = launcher_state | BaseContainer._resolvers
    assert built["lr_scheduler"]["scheduler"].eta_min == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "optim",
    [
        {"scheduler": "step", "step_size": 3, "gamma": 0.5},
        {"scheduler": "multistep", "milestones": [2, 5], "gamma": 0.1},
        {"scheduler": "cosine", "eta_min_ratio": 1e-3},
        {"scheduler": "none"},
    ],
    ids=lambda optim: optim["scheduler"],
)
def test_the_closed_form_lr_factor_is_the_built_schedulers_lr(optim):
    """`lr_factor` (the methods that restart a schedule within a run) follows the scheduler
    `build_optimizer` makes from the same block, epoch by epoch."""
    import torch

    from owdfa_bench.method import build_optimizer, lr_factor

    block = {"name": "sgd", "lr": 0.1, **optim}
    params = [torch.nn.Parameter(torch.zeros(2))]
    built = build_optimizer(block, params, max_epochs=8)
    opt = built["optimizer"] if isinstance(built, dict) else built
    for epoch in range(8):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(epoch, 8, block))
        opt.step()
        if isinstance(built, dict):
            built["lr_scheduler"]["scheduler"].step()
