"""Two processes, one run (DDP with gloo on the CPU), through `python run.py trainer=ddp_cpu`
as a user launches it: Lightning starts the second rank itself.

For every method of conf/method/: exit status 0, exactly one record, complete, naming the world
in `device`; at every epoch end each rank's parameters, buffers, optimiser state, method state
and sampler place were equal (`owdfa_bench.distributed.ReplicaCheck` stops a run whose ranks
differ, and lists the epochs it checked); the evaluation counted every test row exactly once;
the run folder's files and log lines were written once. And a 2-rank run killed mid-epoch and
launched again ends with the record of the uninterrupted 2-rank run.

Marked `cluster`: `make test-cluster` runs them (several minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from compare import differences
from conftest import CONF, TINY_SYNTH
from helpers import run_py

pytestmark = pytest.mark.cluster

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
EPOCHS = 2
# 2 epochs of 3 steps per rank, the whole test split evaluated (its rows split between ranks)
SCHEDULE = (
    "trainer=ddp_cpu",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=null",
    "trainer.progress_bar=false",
    "logger=none",
    # also after every step, where a buffer built from one rank's rows still shows
    "trainer.callbacks.replica_check.every_n_steps=1",
)
COMPUTED = ("metrics", "history", "confusion", "per_class_acc", "k_estimated", "num_clusters")
TIMEOUT_S = 400


def ddp_overrides(synth_root: Path, output_root: Path, *extra: str) -> list[str]:
    return [
        "data=synth",
        f"data.root={synth_root}",
        f"output_root={output_root}",
        *TINY_SYNTH,
        *SCHEDULE,
        *extra,
    ]


def launch(args: list[str]) -> subprocess.Popen:
    """`python run.py ARGS` in its own process group (a kill takes every rank, as a node
    failure or a scheduler's kill would)."""
    return run_py(args, {**os.environ, "WANDB_MODE": "offline"}, start_new_session=True)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the 2-rank run did not end in {TIMEOUT_S} s:\n{err[-3000:]}")


def records_under(root: Path) -> list[Path]:
    return sorted(root.rglob("results.json"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_two_ranks_with_equal_replicas(method, synth_root, tmp_path):
    out = tmp_path / "outputs"
    process = launch(ddp_overrides(synth_root, out, f"method={method}"))
    stdout, stderr = finish(process)
    assert process.returncode == 0, stderr[-4000:]
    records = records_under(out)
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    assert record["status"] == "complete"
    assert "x 2 processes" in record["device"] and "gloo" in record["device"]
    world = record["distributed"]
    assert world["world_size"] == 2 and world["strategy"] == "DDPStrategy"
    # the ranks' states were compared (and equal, else the run fails) after every epoch
    assert [c["epoch"] for c in world["replica_checks"]] == list(range(EPOCHS))
    # the evaluation counted each test row once: the confusion matrix holds the whole split
    assert sum(map(sum, record["confusion"])) == record["counts"]["test"]
    assert len(record["history"]) == EPOCHS
    run_dir = records[0].parent
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp-*"))
    assert not (run_dir / "results.attempt.json").exists()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    # log lines once, in the run's log and on the console both ranks share: one evaluation
    # line and one checkpoint line (the log's only) per epoch end
    log = (run_dir / "train.log").read_text()
    for epoch in range(EPOCHS):
        line = f"checkpoint last.ckpt: epoch {epoch}, step"
        assert log.count(line) == 1 and stdout.count(line) == 0, stdout[-2000:]
        line = f"epoch {epoch + 1}/{EPOCHS}: All "
        assert log.count(line) == 1 and stdout.count(line) == 1, stdout[-2000:]


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_record(synth_root, tmp_path):
    """SIGKILL to every rank mid-epoch (after the step-4 checkpoint of epoch 1), then the same
    command again: the record equals an uninterrupted 2-rank run's (floats to 1e-6), with the
    resumption listed."""
    extra = (
        "method=cal",
        "trainer.max_epochs=3",
        "trainer.callbacks.last_checkpoint.every_n_steps=1",
    )
    whole_root, killed_root = tmp_path / "whole", tmp_path / "killed"
    whole = launch(ddp_overrides(synth_root, whole_root, *extra))
    _, err = finish(whole)
    assert whole.returncode == 0, err[-3000:]
    (whole_record,) = [json.loads(p.read_text()) for p in records_under(whole_root)]

    killed = launch(ddp_overrides(synth_root, killed_root, *extra))
    log = killed_root / "single" / "cal" / "p1" / "k-known" / "seed-2025" / "train.log"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and killed.poll() is None:
        if log.is_file() and "checkpoint last.ckpt: epoch 1, step 4 " in log.read_text():
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before the checkpoint to kill it after"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    (interrupted,) = [json.loads(p.read_text()) for p in records_under(killed_root)]
    assert interrupted["status"] == "running"

    again = launch(ddp_overrides(synth_root, killed_root, *extra))
    _, err = finish(again)
    assert again.returncode == 0, err[-3000:]
    (resumed,) = [json.loads(p.read_text()) for p in records_under(killed_root)]
    assert resumed["status"] == "complete"
    assert [(r["from_epoch"], r["from_step"]) for r in resumed["resumed"]] == [(1, 4)]
    computed = lambda r: {k: r.get(k) for k in COMPUTED}  # noqa: E731
    assert not differences(computed(whole_record), computed(resumed))
    epochs = lambda r: [c["epoch"] for c in r["distributed"]["replica_checks"]]  # noqa: E731
    assert epochs(resumed) == epochs(whole_record) == [0, 1, 2]


def test_one_wandb_run_for_two_ranks(synth_root, tmp_path):
    """W&B (offline): rank 0 alone creates the run; the other rank's logger is inert."""
    out = tmp_path / "outputs"
    args = [*ddp_overrides(synth_root, out, "method=lower_bound"), "logger=wandb"]
    process = launch(args)
    _, stderr = finish(process)
    assert process.returncode == 0, stderr[-4000:]
    (record,) = records_under(out)
    runs = list(record.parent.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
