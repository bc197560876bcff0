"""The shared runner on a tiny OWDFA-40 tree: records, determinism, skipping, failures, resume."""

import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from methods.lower_bound import LowerBound
from owdfa_bench.errors import DataError
from owdfa_bench.metrics import OWDFA_KEYS
from owdfa_bench.runner import run, select_evaluation

REQUIRED = [
    "schema_version",
    "status",
    "method",
    "protocol",
    "k",
    "seed",
    "split_seed",
    "selection",
    "epochs",
    "metrics",
    "num_clusters",
    "k_estimated",
    "per_class_acc",
    "confusion",
    "train_images_per_s",
    "eval_images_per_s",
    "wall_s",
    "config_hash",
    "git_commit",
    "versions",
    "device",
    "classes",
    "history",
]
METRICS = [*OWDFA_KEYS, "gcd_v2_all_acc", "gcd_v1_all_acc"]


def test_lower_bound_writes_a_complete_record(make_owdfa40_cfg):
    cfg = make_owdfa40_cfg("method=lower_bound", "trainer.limit_val_batches=null")
    record = run(cfg)
    path = cfg.run_dir + "/results.json"
    assert path.endswith("single/lower_bound/p1/k-known/seed-2025/results.json")
    on_disk = json.loads(Path(path).read_text())
    assert on_disk["status"] == "complete"
    assert set(REQUIRED) <= set(on_disk)
    assert set(METRICS) <= set(on_disk["metrics"])
    # ARI is chance-adjusted: slightly below 0 for a near-random clustering
    assert all(
        (-1.0 if m.endswith("_ari") else 0.0) <= on_disk["metrics"][m] <= 1.0 for m in METRICS
    )
    assert on_disk["k_estimated"] is None and on_disk["split_seed"] == 2025
    assert on_disk["counts"]["test"] == 42 == sum(map(sum, on_disk["confusion"]))
    # the lower bound only ever predicts known ids
    assert on_disk["num_clusters"] <= 19
    assert [h["epoch"] for h in on_disk["history"]] == [0, 1]
    assert record["metrics"] == on_disk["metrics"]


def test_same_config_and_seed_give_identical_metrics(make_owdfa40_cfg, tmp_path):
    a = run(make_owdfa40_cfg("method=upper_bound", f"output_root={tmp_path / 'a'}", "force=true"))
    b = run(make_owdfa40_cfg("method=upper_bound", f"output_root={tmp_path / 'b'}", "force=true"))
    assert a["metrics"] == b["metrics"]
    assert a["config_hash"] == b["config_hash"]  # the output folder is not part of the hash
    assert a["data_digest"] == b["data_digest"] and len(a["data_digest"]) == 64


def test_complete_cell_is_skipped_and_force_reruns(make_owdfa40_cfg, caplog):
    cfg = make_owdfa40_cfg("method=lower_bound")
    first = run(cfg)
    caplog.set_level("INFO")
    second = run(cfg)
    assert "skipping" in caplog.text and second["wall_s"] == first["wall_s"]
    forced = run(make_owdfa40_cfg("method=lower_bound", "force=true"))
    assert forced["status"] == "complete" and "resuming" not in caplog.text.split("skipping")[-1]


def test_changed_config_is_not_skipped(make_owdfa40_cfg):
    first = run(make_owdfa40_cfg("method=lower_bound"))
    second = run(make_owdfa40_cfg("method=lower_bound", "method.optim.lr=1e-3"))
    assert second["config_hash"] != first["config_hash"]


def test_failure_is_recorded_then_raised(make_owdfa40_cfg, tmp_path):
    cfg = make_owdfa40_cfg("method=lower_bound", f"data.root={tmp_path / 'missing'}")
    with pytest.raises(DataError, match="data.root"):
        run(cfg)
    record = json.loads(Path(cfg.run_dir, "results.json").read_text())
    assert record["status"] == "failed" and "data.root" in record["error"]


def test_interrupted_run_resumes_from_last_checkpoint(make_owdfa40_cfg, monkeypatch, caplog):
    def crash_at_epoch_1(self):
        if self.current_epoch == 1:
            raise RuntimeError("simulated preemption")

    monkeypatch.setattr(LowerBound, "on_train_epoch_start", crash_at_epoch_1, raising=False)
    cfg = make_owdfa40_cfg("method=lower_bound")
    with pytest.raises(RuntimeError, match="preemption"):
        run(cfg)
    monkeypatch.undo()
    caplog.set_level("INFO")
    record = run(cfg)
    assert "resuming" in caplog.text
    assert record["status"] == "complete"
    assert [h["epoch"] for h in record["history"]] == [0, 1]  # epoch 0 restored, not re-run


def test_k_estimate_below_known_is_an_error(make_owdfa40_cfg):
    with pytest.raises(ValueError, match="at least 19"):
        run(make_owdfa40_cfg("method=lower_bound", "k=unknown", "k.estimate=5"))


def test_unknown_method_lists_the_options(make_owdfa40_cfg):
    with pytest.raises(ConfigCompositionException, match="lower_bound"):
        make_owdfa40_cfg("method=nope")


def test_selection_rules():
    history = [{"epoch": e, "metrics": {"all_acc": a}} for e, a in enumerate([0.2, 0.6, 0.4])]
    assert select_evaluation(history, "last", "all_acc")["epoch"] == 2
    assert select_evaluation(history, "best_on_test", "all_acc")["epoch"] == 1
    with pytest.raises(ValueError, match="selection"):
        select_evaluation(history, "best", "all_acc")


def test_every_unknown_k_record_has_k_estimated(make_owdfa40_cfg):
    record = run(make_owdfa40_cfg("method=upper_bound", "k=unknown"))
    assert record["k_estimated"] == record["num_clusters"] >= 1


def test_in_a_slurm_job_lightnings_auto_requeue_is_off(monkeypatch):
    """One requeue mechanism: submitit's (conf/hydra/launcher/slurm.yaml). In a SLURM job the
    Trainer gets SLURM's environment with auto_requeue off, so Lightning registers no USR1
    handler that would requeue the job a second way."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from owdfa_bench.runner import trainer_plugins

    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert not any(isinstance(p, SLURMEnvironment) for p in trainer_plugins())
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (environment,) = [p for p in trainer_plugins() if isinstance(p, SLURMEnvironment)]
    assert environment.auto_requeue is False
