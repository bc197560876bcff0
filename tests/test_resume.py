"""Fault injection: a run killed, terminated or interrupted at any point resumes from its last
checkpoint and ends with the metrics, history and confusion matrix of the uninterrupted run
(counts exactly, floats to 1e-6: tests/compare.py); a run folder that cannot be written ends
in one line and never in a complete-looking record (owdfa_bench/resume.py, records.py)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from compare import differences
from conftest import REPO, TINY_SYNTH
from helpers import run_py

from owdfa_bench.errors import CheckpointError, RunFolderError
from owdfa_bench.method import OWDFAMethod
from owdfa_bench.records import (
    ATTEMPT_CONFIG_FILE,
    ATTEMPT_FILE,
    CONFIG_FILE,
    RESULTS_FILE,
    read_record,
)
from owdfa_bench.runner import run

# 3 epochs of 3 steps, a checkpoint after every step: step checkpoints within each epoch and
# one at each epoch end (steps 3, 6, 9)
SCHEDULE = (
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=3",
    "trainer.callbacks.last_checkpoint.every_n_steps=1",
)
STEPS = 9
COMPUTED = ("metrics", "history", "confusion", "per_class_acc", "k_estimated", "num_clusters")
CHECKPOINT_LINE = "checkpoint last.ckpt: epoch {epoch}, step {step}"


def computed(record: dict) -> dict:
    return {key: record.get(key) for key in COMPUTED}


def assert_same_results(resumed: dict, whole: dict, context: str = "") -> None:
    """Counts, clusters and confusion identical; floats (losses, confidences) to 1e-6 relative:
    a resumed run rebuilds its model from the checkpoint, and two separately built models may
    differ in the last bits of a forward pass on some CPUs."""
    assert not differences(computed(whole), computed(resumed)), context


def crash_before_step(monkeypatch, step: int, error: BaseException) -> None:
    """The run stops when it is about to train optimizer step `step + 1`."""
    original = OWDFAMethod.training_step

    def step_or_stop(self, batch, batch_idx):
        if self.trainer.global_step == step:
            raise error
        return original(self, batch, batch_idx)

    monkeypatch.setattr(OWDFAMethod, "training_step", step_or_stop)


def overrides_of(synth_root: Path, output_root: Path, *extra: str) -> list[str]:
    return [
        "trainer=smoke",
        "logger=none",
        "data=synth",
        f"data.root={synth_root}",
        f"output_root={output_root}",
        *TINY_SYNTH,
        *SCHEDULE,
        *extra,
    ]


def wait_for_line(log_file: Path, line: str, process: subprocess.Popen, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        if log_file.is_file() and line in log_file.read_text():
            return True
        time.sleep(0.02)
    return False


def epoch_of(step: int) -> int:
    """The epoch a checkpoint after `step` names (an epoch-end one names the epoch it ends)."""
    return (step - 1) // (STEPS // 3)


@pytest.mark.parametrize(
    "method", [("method=cal", "k=unknown"), ("method=cpl",)], ids=["cal-unknown-k", "cpl"]
)
def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    method, make_cfg, synth_root, tmp_path
):
    """CAL under unknown K carries its pruning state and per-epoch statistics, CPL its
    sampler's draw counters; killed at a random step, each resumes exactly."""
    from conftest import compose_config

    step = random.randint(1, STEPS - 2)  # leaves steps, evaluations and the record to do
    killed_root = tmp_path / "killed"
    overrides = overrides_of(synth_root, killed_root, *method)
    cfg = compose_config(overrides)
    log_file = Path(cfg.run_dir) / "train.log"
    process = run_py(overrides)
    line = CHECKPOINT_LINE.format(epoch=epoch_of(step), step=step)
    reached = wait_for_line(log_file, line, process, limit_s=240)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert reached, f"the run never wrote its checkpoint after step {step}"
    assert read_record(Path(cfg.run_dir)).status == "running"  # nothing complete-looking

    resumed = run(cfg)
    uninterrupted = run(compose_config(overrides_of(synth_root, tmp_path / "whole", *method)))
    assert resumed["status"] == uninterrupted["status"] == "complete"
    assert_same_results(resumed, uninterrupted, f"killed after step {step}")
    [entry] = resumed["resumed"]
    assert entry["from_step"] >= step and set(entry) == {"from_epoch", "from_step", "at"}
    assert uninterrupted["resumed"] == []
    assert resumed["wall_s"] > 0 and resumed["train_images_per_s"] > 0
    assert resumed["device"] == "cpu (1 threads)"  # trainer.threads=1, read after it is set


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_mark_the_run_failed_and_it_resumes(
    signum, make_cfg, synth_root, tmp_path
):
    from conftest import compose_config

    overrides = overrides_of(synth_root, tmp_path / "out", "method=lower_bound")
    cfg = compose_config(overrides)
    process = run_py(overrides)
    reached = wait_for_line(
        Path(cfg.run_dir) / "train.log", CHECKPOINT_LINE.format(epoch=0, step=2), process, 240
    )
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert reached
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum
    assert stderr.strip().splitlines()[-1].startswith(f"run.py: interrupted by {name};")
    record = read_record(Path(cfg.run_dir))
    assert record.status == "failed" and record.error == f"Interrupted: {name}"
    resumed = run(cfg)
    assert resumed["status"] == "complete" and resumed["resumed"][0]["from_step"] >= 2
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]


def test_a_crash_at_a_step_or_an_epoch_end_resumes_exactly_in_process(
    make_cfg, monkeypatch, tmp_path
):
    """The same for a crash (not a signal) right after a step checkpoint and right after an
    epoch-end one, for the lower bound (labelled rows only: the RandomSampler path)."""
    base = ("method=lower_bound", *SCHEDULE)
    whole = run(make_cfg(*base, f"output_root={tmp_path / 'whole'}"))
    for step in (2, 3):
        cfg = make_cfg(*base, f"output_root={tmp_path / f'crash-{step}'}")
        with monkeypatch.context() as patch:
            crash_before_step(patch, step, RuntimeError("simulated crash"))
            with pytest.raises(RuntimeError, match="simulated crash"):
                run(cfg)
        assert read_record(Path(cfg.run_dir)).status == "failed"
        resumed = run(cfg)
        assert_same_results(resumed, whole, f"crashed after step {step}")
        assert resumed["resumed"][0]["from_step"] == step


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    + ["cal k=unknown", "simgcd k=unknown", "orca k=unknown", "owmatch k=unknown"]
    + ["gcd k=unknown method.model.cluster_every=2"]
    # NACH with a tau the tiny run's rows reach and no warm-up: its learning status then sets
    # the thresholds (a checkpoint without it fails here; the default case does not see it)
    + ["nach k=unknown method.model.threshold=0.2 method.model.threshold_warmup=false"],
)
def test_every_method_resumes_exactly_from_a_step_and_an_epoch_checkpoint(
    method, make_cfg, monkeypatch, tmp_path
):
    name, *extra = method.split()
    base = (f"method={name}", *extra, *SCHEDULE)
    whole = run(make_cfg(*base, f"output_root={tmp_path / 'whole'}"))
    for step in (2, 3, 5):  # within epoch 0, at the end of epoch 0, within epoch 1
        cfg = make_cfg(*base, f"output_root={tmp_path / f'crash-{step}'}")
        with monkeypatch.context() as patch:
            crash_before_step(patch, step, RuntimeError("simulated crash"))
            with pytest.raises(RuntimeError, match="simulated crash"):
                run(cfg)
        assert_same_results(run(cfg), whole, f"{method}: crashed after step {step}")


def test_no_method_changes_state_in_on_train_batch_end():
    """A step checkpoint is written before the module's on_train_batch_end runs, so per-step
    state must change inside the step (owdfa_bench/method.py)."""
    import importlib

    import yaml

    for path in sorted((REPO / "conf" / "method").glob("*.yaml")):
        target = yaml.safe_load(path.read_text())["model"]["_target_"]
        module, _, name = target.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        owners = [c for c in cls.__mro__ if "on_train_batch_end" in vars(c)]
        assert all(not issubclass(c, OWDFAMethod) for c in owners), (target, owners)


# ----------------------------------------------------------------------------- records
def test_a_forced_rerun_that_dies_leaves_the_previous_complete_record(make_cfg, monkeypatch):
    cfg = make_cfg("method=lower_bound")
    first = run(cfg)
    results = Path(cfg.run_dir) / RESULTS_FILE
    seen_during_rerun = []
    original = OWDFAMethod.training_step

    def look_then_die(self, batch, batch_idx):
        seen_during_rerun.append(json.loads(results.read_text())["status"])
        raise RuntimeError("the rerun dies")

    config = Path(cfg.run_dir) / CONFIG_FILE
    first_config = config.read_bytes()
    monkeypatch.setattr(OWDFAMethod, "training_step", look_then_die)
    with pytest.raises(RuntimeError, match="the rerun dies"):
        run(make_cfg("method=lower_bound", "force=true"))
    monkeypatch.setattr(OWDFAMethod, "training_step", original)
    assert seen_during_rerun == ["complete"]  # not overwritten by "running" at the start
    # the complete record's config stays; the attempt's is beside the attempt's record
    assert config.read_bytes() == first_config and b"force: false" in first_config
    assert b"force: true" in (Path(cfg.run_dir) / ATTEMPT_CONFIG_FILE).read_bytes()
    assert json.loads(results.read_text()) == json.loads(json.dumps(first))
    attempt = json.loads((Path(cfg.run_dir) / ATTEMPT_FILE).read_text())
    assert attempt["status"] == "failed" and "the rerun dies" in attempt["error"]
    written = results.stat().st_mtime_ns
    assert run(cfg)["wall_s"] == first["wall_s"]  # a sweep still skips the complete cell
    assert results.stat().st_mtime_ns == written
    rerun = run(make_cfg("method=lower_bound", "force=true"))
    assert rerun["status"] == "complete" and results.stat().st_mtime_ns != written
    assert json.loads(results.read_text())["wall_s"] == rerun["wall_s"]
    assert not (Path(cfg.run_dir) / ATTEMPT_FILE).exists()
    assert b"force: true" in config.read_bytes()  # the completed attempt's config replaced it
    assert not (Path(cfg.run_dir) / ATTEMPT_CONFIG_FILE).exists()


def test_a_changed_config_resumes_its_own_attempt_not_the_complete_record(make_cfg, monkeypatch):
    first = run(make_cfg("method=lower_bound"))
    changed = ("method=lower_bound", "method.optim.lr=3e-4", *SCHEDULE)
    cfg = make_cfg(*changed)
    with monkeypatch.context() as patch:
        crash_before_step(patch, 4, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError):
            run(cfg)
    assert read_record(Path(cfg.run_dir)).config_hash == first["config_hash"]  # still complete
    record = run(cfg)
    assert record["config_hash"] != first["config_hash"] and record["resumed"][0]["from_step"] == 4


# ----------------------------------------------------------------------------- run folder
def fail_writes(monkeypatch, code: int, when=lambda path, data: True) -> None:
    from owdfa_bench import records

    original = records.write_json_atomic

    def write(path, data):
        if when(path, data):
            raise OSError(code, os.strerror(code), str(path))
        original(path, data)

    monkeypatch.setattr(records, "write_json_atomic", write)


def test_a_read_only_run_folder_fails_in_one_line_before_training(make_cfg, monkeypatch):
    fail_writes(monkeypatch, errno.EROFS)
    cfg = make_cfg("method=lower_bound")
    with pytest.raises(RunFolderError) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message and str(Path(cfg.run_dir)) in message
    assert "Read-only file system" in message and "output_root" in message
    assert read_record(Path(cfg.run_dir)) is None


def test_a_full_disk_at_the_checkpoint_or_the_record_never_leaves_a_complete_record(
    make_cfg, monkeypatch
):
    from owdfa_bench import checkpoints

    def full(checkpoint, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    cfg = make_cfg("method=lower_bound")
    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "write_whole", full)
        with pytest.raises(RunFolderError, match="No space left on device") as err:
            run(cfg)
    assert "\n" not in str(err.value) and "last.ckpt" in str(err.value)
    record = read_record(Path(cfg.run_dir))
    assert record.status == "failed" and "No space left" in record.error
    with monkeypatch.context() as patch:  # the checkpoint fits, the complete record does not
        fail_writes(patch, errno.ENOSPC, lambda path, data: data.get("status") == "complete")
        with pytest.raises(RunFolderError, match="No space left on device"):
            run(make_cfg("method=lower_bound", "force=true"))
    assert read_record(Path(cfg.run_dir)).status == "failed"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_root_through_run_py_is_one_line(synth_root, tmp_path):
    root = tmp_path / "read-only"
    root.mkdir(mode=0o555)
    process = run_py(overrides_of(synth_root, root, "method=lower_bound"))
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 1
    assert len(stderr.strip().splitlines()) == 1 and "Permission denied" in stderr


# ----------------------------------------------------------------------------- checkpoints
def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    class Payload:  # what a malicious file would hold: loading it builds an object
        def __reduce__(self):
            return (print, ("code ran",))

    files = {"random": tmp_path / "random.ckpt", "unsafe": tmp_path / "unsafe.ckpt"}
    files["random"].write_bytes(random.Random(1).randbytes(4096))
    torch.save({"state_dict": {}, "payload": Payload()}, files["unsafe"])
    return files


@pytest.mark.parametrize("kind", ["random", "unsafe", "no_resume_state"])
def test_resuming_from_a_bad_checkpoint_is_one_line_and_never_unsafe(
    kind, make_cfg, tmp_path, capsys
):
    cfg = make_cfg("method=lower_bound")
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    if kind == "no_resume_state":
        torch.save({"state_dict": {}, "loops": {}}, last)
    else:
        last.write_bytes(bad_checkpoints(tmp_path)[kind].read_bytes())
    with pytest.raises(CheckpointError) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message and str(last) in message and "weights_only" not in message
    assert "code ran" not in capsys.readouterr().out
    assert ("force=true" in message) or kind != "no_resume_state"
    assert read_record(Path(cfg.run_dir)).status == "failed"


# ----------------------------------------------------------------------------- atomic writes
class KilledMidWrite(BaseException):
    """What a kill during a checkpoint write leaves: a partly written file (raised, not
    caught by `except Exception`, as an interrupt)."""


def kill_during_save(monkeypatch, save_number: int) -> None:
    """The `save_number`-th checkpoint write stops halfway through its bytes."""
    from owdfa_bench import checkpoints

    original, calls = torch.save, {"n": 0}

    def torn(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != save_number:
            return original(obj, f, *args, **kwargs)
        import io

        buffer = io.BytesIO()
        original(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise KilledMidWrite

    monkeypatch.setattr(checkpoints.torch, "save", torn)


def test_a_write_killed_midway_leaves_the_checkpoint_whole_and_the_run_resumes(
    make_cfg, monkeypatch, tmp_path
):
    """The write goes to a temporary beside the checkpoint and is renamed when whole, so a
    kill during it leaves the last checkpoint as it was; the relaunch resumes from it (and
    removes the temporaries a SIGKILL would have left) and ends with the uninterrupted run's
    record. The previous checkpoint is kept, and a torn or missing last one falls back to it."""
    from owdfa_bench.checkpoints import previous_of, stale_temporaries

    base = ("method=lower_bound", *SCHEDULE)
    whole = run(make_cfg(*base, f"output_root={tmp_path / 'whole'}"))
    cfg = make_cfg(*base, f"output_root={tmp_path / 'killed'}")
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    with monkeypatch.context() as patch:
        kill_during_save(patch, 5)  # the write after step 5
        with pytest.raises(KilledMidWrite):
            run(cfg)
    assert torch.load(last, weights_only=True)["global_step"] == 4  # whole, the one before
    assert torch.load(previous_of(last), weights_only=True)["global_step"] == 3
    leftover = last.with_name(".last.ckpt.99999.tmp")  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"partial")
    resumed = run(cfg)
    assert_same_results(resumed, whole, "killed while writing the checkpoint after step 5")
    assert resumed["resumed"][0]["from_step"] == 4
    assert not stale_temporaries(last) and not previous_of(last).exists()  # complete: dropped

    # a last checkpoint torn by something else (a copy across file systems, a disk fault)
    cfg = make_cfg(*base, f"output_root={tmp_path / 'torn'}")
    with monkeypatch.context() as patch:
        crash_before_step(patch, 5, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError):
            run(cfg)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    resumed = run(cfg)
    assert_same_results(resumed, whole, "resumed from the previous checkpoint")
    assert resumed["resumed"][0]["from_step"] == 4  # the previous one: step 5's was torn


def test_checkpoints_never_go_through_tmpdir(make_cfg, monkeypatch):
    """A cluster's $TMPDIR is node-local and small; Lightning's writer put every checkpoint
    there first. Ours writes beside the checkpoint: with no usable temporary folder at all the
    run completes."""
    import tempfile

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "$TMPDIR")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_space)
    record = run(make_cfg("method=lower_bound", *SCHEDULE))
    assert record["status"] == "complete"
