"""`owdfa-bench evaluate` of a run of this harness (issue 20, item 5): given the run folder or its
checkpoint, it composes the run's own config.yaml (the attempt's config while an attempt stands
beside a complete record), overrides on top, and writes its record into the run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from owdfa_bench import evaluate
from owdfa_bench.errors import ConfigValueError, RunFolderError
from owdfa_bench.metrics import OWDFA_KEYS
from owdfa_bench.records import (
    ATTEMPT_CONFIG_FILE,
    ATTEMPT_FILE,
    CONFIG_FILE,
    RESULTS_FILE,
    config_hash,
)

# the whole test split in the run's evaluations too (the smoke trainer scores two batches;
# evaluate always scores the whole split)
WHOLE_TEST_SPLIT = "trainer.limit_val_batches=null"


def write_run_config(make_cfg, *overrides: str) -> Path:
    """A run folder holding only the resolved config of `make_cfg(*overrides)`, as a run
    writes it."""
    cfg = make_cfg(*overrides)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def test_a_run_config_composes_back_to_the_run(make_cfg):
    cfg = make_cfg("method=lower_bound", "seed=7")
    run_dir = write_run_config(make_cfg, "method=lower_bound", "seed=7")
    composed = evaluate.compose_run_config(run_dir)
    assert config_hash(composed) == config_hash(cfg)
    resolved = OmegaConf.to_container(composed, resolve=True)
    assert resolved == OmegaConf.to_container(cfg, resolve=True)
    # typed as a composed project config: a value of the wrong type is refused by the schema
    with pytest.raises(RunFolderError, match=r"config.yaml: .*trainer.threads"):
        evaluate.compose_run_config(run_dir, ["trainer.threads=many"])


def test_overrides_go_on_top_of_the_run_config(make_cfg, tmp_path):
    run_dir = write_run_config(make_cfg, "method=lower_bound")
    composed = evaluate.compose_run_config(
        run_dir, ["trainer=cpu", f"data.root={tmp_path / 'moved'}", "method=lower_bound"]
    )
    # trainer=cpu replaces the smoke trainer (2 epochs, 2 batches) as a whole
    assert composed.trainer.max_epochs is None and composed.trainer.limit_train_batches is None
    assert composed.data.root == str(tmp_path / "moved")
    assert composed.data.budgets.known == 5  # the run's own values stay
    assert composed.method.name == "lower_bound"  # naming the run's own method changes nothing
    with pytest.raises(ConfigValueError, match="^method=cal: the run is method=lower_bound"):
        evaluate.compose_run_config(run_dir, ["method=cal"])
    with pytest.raises(ConfigValueError, match="one value per key"):
        evaluate.compose_run_config(run_dir, ["trainer=cpu,smoke"])


def test_the_config_of_an_attempt_is_the_attempts(make_cfg):
    run_dir = write_run_config(make_cfg, "method=lower_bound")
    assert evaluate.compose_run_config(run_dir).selection == "last"
    attempt = make_cfg("method=lower_bound", "selection=best_on_test")
    (run_dir / ATTEMPT_CONFIG_FILE).write_text(OmegaConf.to_yaml(attempt, resolve=True))
    # config.attempt.yaml alone (left by an attempt that completed since) is not the checkpoint's
    assert evaluate.compose_run_config(run_dir).selection == "last"
    (run_dir / ATTEMPT_FILE).write_text(json.dumps({"status": "failed"}))
    assert evaluate.run_config_file(run_dir) == run_dir / ATTEMPT_CONFIG_FILE
    assert evaluate.compose_run_config(run_dir).selection == "best_on_test"


def test_a_run_folder_moved_elsewhere_is_itself(make_cfg, tmp_path):
    run_dir = write_run_config(make_cfg, "method=lower_bound")
    moved = shutil.move(run_dir, tmp_path / "moved")
    assert evaluate.compose_run_config(Path(moved)).run_dir == str(moved)
    assert evaluate.run_folder_of(Path(moved) / "checkpoints" / "last.ckpt") == Path(moved)
    release = tmp_path / "release" / "checkpoints" / "model.ckpt"  # no config beside it
    assert evaluate.run_folder_of(release) is None
    assert evaluate.run_folder_of(Path(moved) / "model.ckpt") is None


def test_a_folder_without_config_is_one_line(tmp_path, capsys):
    assert evaluate.cli_evaluate([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"owdfa-bench evaluate: error: {tmp_path} has no config.yaml: ")
    assert evaluate.cli_evaluate([str(tmp_path / "none")]) == 1
    assert f"{tmp_path / 'none'}: no such folder" in capsys.readouterr().err


def test_a_run_without_checkpoint_is_one_line(make_cfg, capsys):
    run_dir = write_run_config(make_cfg, "method=lower_bound")
    assert evaluate.cli_evaluate([str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run_dir} has no checkpoints/last.ckpt" in err[0], err


def test_one_run_folder_or_a_checkpoint(capsys):
    for argv in ([], ["a", "b"], ["a", "--ckpt", "b.ckpt"]):
        with pytest.raises(SystemExit) as exit_:
            evaluate.cli_evaluate(argv)
        assert exit_.value.code == 2
        assert "give one run folder or --ckpt FILE" in capsys.readouterr().err


def test_evaluating_a_run_reproduces_its_metrics_in_its_folder(make_cfg, tmp_path, capsys):
    from owdfa_bench.runner import run

    cfg = make_cfg("method=lower_bound", WHOLE_TEST_SPLIT)
    record = run(cfg)
    assert record["status"] == "complete" and record["selection"] == "last"
    run_dir = Path(cfg.run_dir)
    # selection "last": the record's metrics are the last epoch's, which the checkpoint holds
    assert record["metrics"] == record["history"][-1]["metrics"]

    def evaluated(argv: list[str], folder: Path) -> dict:
        assert evaluate.cli_evaluate(argv) == 0
        out = folder / "evaluate-last.json"
        assert f"record: {out}" in capsys.readouterr().out
        return json.loads(out.read_text())

    by_folder = evaluated([str(run_dir)], run_dir)
    assert by_folder["kind"] == "evaluate" and by_folder["config_hash"] == record["config_hash"]
    assert by_folder["counts"]["test"] == record["counts"]["test"]
    # every test metric (the run's record adds training diagnostics such as pseudo_noise)
    scored = set(by_folder["metrics"]) & set(record["metrics"])
    assert set(OWDFA_KEYS) <= scored
    for name in scored:
        assert by_folder["metrics"][name] == pytest.approx(record["metrics"][name], abs=1e-6), name
    assert by_folder["confusion"] == record["confusion"]

    moved = Path(shutil.move(run_dir, tmp_path / "moved"))  # the checkpoint's own folder
    by_ckpt = evaluated(["--ckpt", str(moved / "checkpoints" / "last.ckpt")], moved)
    assert by_ckpt["metrics"] == pytest.approx(by_folder["metrics"], abs=1e-6)
    assert json.loads((moved / RESULTS_FILE).read_text()) == record  # the run's record untouched
    assert sorted(p.name for p in tmp_path.rglob("evaluate-*.json")) == ["evaluate-last.json"]
