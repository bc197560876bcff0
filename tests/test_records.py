"""The typed run record: its JSON shape per status and kind, and old records read back."""

from __future__ import annotations

import json

from owdfa_bench.records import (
    SCHEMA_VERSION,
    RunRecord,
    read_record,
    run_precision,
    write_record,
)
from owdfa_bench.report.collect import load_records

RESULT_KEYS = ("metrics", "history", "confusion", "k_estimated", "selection_metric")


def test_a_running_record_holds_provenance_only_and_a_complete_one_every_result_key():
    record = RunRecord(method="cal", protocol="p1", k="known", seed=2025, config_hash="abc")
    running = record.to_dict()
    assert running["status"] == "running" and running["schema_version"] == SCHEMA_VERSION
    assert not set(RESULT_KEYS) & set(running) and "kind" not in running
    record.status, record.metrics, record.extras = "complete", {"all_acc": 0.5}, {"k_curve": [3]}
    complete = record.to_dict()
    assert set(RESULT_KEYS) <= set(complete) and complete["k_estimated"] is None
    assert complete["k_curve"] == [3] and "extras" not in complete  # extras at the top level
    assert "checkpoint" not in complete and "traceback" not in complete


def test_an_evaluation_record_keeps_its_checkpoint_keys():
    record = RunRecord(kind="evaluate", status="complete", checkpoint="last.ckpt").to_dict()
    assert record["kind"] == "evaluate" and record["reference_all_rows"] is None


def test_round_trip_and_an_old_record_with_unknown_and_missing_keys(tmp_path):
    record = RunRecord(status="complete", method="cpl", seed=7, metrics={"all_acc": 0.25})
    record.extras = {"palgcd": {"associations": []}}
    write_record(tmp_path / "results.json", record)
    assert read_record(tmp_path) == record
    old = {"status": "complete", "method": "cal", "seed": 3, "future_key": 1}  # no version
    back = RunRecord.from_dict(old)
    assert back.schema_version is None and back.k is None and back.extras == {"future_key": 1}
    assert back.to_dict()["future_key"] == 1


def test_a_record_carries_the_precision_it_ran_at_and_older_ones_read_their_config():
    from conftest import compose_config

    cfg = compose_config(["trainer=gpu_fp32", "method=lower_bound"])
    record = RunRecord.from_config(cfg, "abc", "cpu")
    assert record.to_dict()["precision"] == "32-true" and run_precision(record) == "32-true"
    cfg.trainer.precision = "bf16"  # Lightning's legacy alias: recorded under the name it runs
    assert RunRecord.from_config(cfg, "abc", "cpu").precision == "bf16-mixed"
    older = RunRecord.from_dict({"status": "complete", "config": {"trainer": {"precision": 32}}})
    assert older.precision is None and run_precision(older) == "32-true"
    assert run_precision(RunRecord.from_dict({"status": "complete", "config": {}})) is None


def test_the_report_reads_records_through_the_type(tmp_path):
    run = tmp_path / "cal" / "p1" / "k-known" / "seed-1"
    run.mkdir(parents=True)
    record = {
        "schema_version": 1,
        "status": "complete",
        "method": "cal",
        "protocol": "p1",
        "k": "known",
        "seed": 1,
        "metrics": {"all_acc": 0.5},
        "k_curve": [20, 9],
        "unreadable": ["a.png"],
    }
    (run / "results.json").write_text(json.dumps(record))
    row = load_records(tmp_path).iloc[0]
    assert row["method"] == "cal" and row["all_acc"] == 0.5 and row["k_curve"] == [20, 9]
    assert row["unreadable_images"] == 1 and row["path"] == "cal/p1/k-known/seed-1/results.json"


def test_the_cell_config_drops_how_the_trainer_is_built_but_keeps_what_the_method_is():
    from owdfa_bench.report.collect import config_without_seed

    config = {
        "seed": 1,
        "trainer": {"_target_": "lightning.pytorch.Trainer", "callbacks": {}, "precision": "32"},
        "method": {"model": {"_target_": "methods.cal.CAL"}},
        "data": {"_target_": "owdfa_bench.data.sources.SynthSource", "name": "synth"},
    }
    assert config_without_seed(config, 1) == {
        "trainer": {"precision": "32"},
        "method": {"model": {"_target_": "methods.cal.CAL"}},
        "data": {"name": "synth"},
    }
