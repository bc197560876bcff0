"""Sweeps on a real SLURM cluster: the one-node cluster of tests/slurm/local_cluster.sh
(slurmctld, slurmd, slurmdbd, munged; started here, stopped at the end), driven exactly as a
user drives theirs: `python run.py -m hydra/launcher=slurm ...` (conf/hydra/launcher/slurm.yaml
through hydra-submitit-launcher), with only the resources of this machine overridden.

- a sweep of 4 cells runs as a job array and ends with 4 complete records and the table;
- a DDP cell runs as one job of 2 tasks, SLURM starting both ranks;
- a job requeued by `scontrol requeue` (a preemption) and a job that reaches its time limit
  (submitit requeues it at the USR2 that SLURM sends before the limit) come back once and end
  with the record of the uninterrupted run, the resumption listed.

Marked `cluster`: `make test-cluster` runs them. The cluster needs root the first time
(apt-get); without the packages and without root the tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from compare import differences
from conftest import REPO, TINY_SYNTH
from helpers import run_py

pytestmark = pytest.mark.cluster

SCRIPT = REPO / "tests" / "slurm" / "local_cluster.sh"
# the launcher config with this machine's resources: no GPU, one CPU and 1 GB per task
LOCAL_RESOURCES = (
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
)
COMPUTED = ("metrics", "history", "confusion", "per_class_acc", "k_estimated", "num_clusters")
# a CAL run long enough to be interrupted: 60 epochs of the tiny set's 9 steps, a checkpoint
# every 4 steps and at every epoch end. About 110 s of training on an idle core here (1.8 s an
# epoch), so the time-limit test's signal, 30 to 60 s into the job, comes mid-training (30
# epochs once finished in 54 s, before the signal)
LONG_RUN = (
    "method=cal",
    "trainer=smoke",
    "trainer.max_epochs=60",
    "trainer.limit_train_batches=null",
    "trainer.callbacks.last_checkpoint.every_n_steps=4",
    "seed=5",
)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment of a client of the running local cluster (SLURM_CONF)."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "OWDFA_SLURM_PORT": str(17000 + 4 * (os.getpid() % 2000))}
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(state)], env=env, capture_output=True, text=True
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env)
        pytest.fail(f"the local SLURM cluster did not start:\n{started.stderr[-3000:]}")
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, capture_output=True)


def overrides(synth_root: Path, output_root: Path, *extra: str) -> list[str]:
    return [
        "logger=none",
        "data=synth",
        f"data.root={synth_root}",
        f"output_root={output_root}",
        *TINY_SYNTH,
        *extra,
    ]


def finish(process: subprocess.Popen, limit_s: float, env: dict[str, str]) -> str:
    try:
        out, err = process.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        jobs = slurm_cmd(env, "squeue", "-h")
        pytest.fail(f"the sweep did not end in {limit_s} s; queue: {jobs}\n{err[-3000:]}")
    assert process.returncode == 0, err[-4000:]
    return out + err


def slurm_cmd(env: dict[str, str], *args: str) -> str:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60).stdout


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


def computed(record: dict) -> dict:
    return {key: record.get(key) for key in COMPUTED}


def wait_for(condition, limit_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"waited {limit_s} s for {what}")


def only_job(env: dict[str, str]) -> str:
    """The id of the one job (array task) in the queue."""
    jobs = slurm_cmd(env, "squeue", "-h", "-o", "%i").split()
    return jobs[0] if len(jobs) == 1 else ""


def runs_of(env: dict[str, str], job: str) -> list[str]:
    """The states of every run of `job` (a requeued job runs again under the same id)."""
    out = slurm_cmd(env, "sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job)
    return out.split()


def test_a_sweep_runs_as_a_job_array_and_is_aggregated(slurm, synth_root, tmp_path):
    out = tmp_path / "sweep"
    args = [
        *LOCAL_RESOURCES,
        "method=lower_bound,cal",
        "seed=1,2",
        "trainer=smoke",
    ]
    started = time.monotonic()
    log = finish(run_py(["-m", *overrides(synth_root, out, *args)], slurm), 600, slurm)
    wall_s = time.monotonic() - started
    done = records(out)
    assert len(done) == 4 and {r["status"] for r in done} == {"complete"}
    assert {(r["method"], r["seed"]) for r in done} == {
        (m, s) for m in ("lower_bound", "cal") for s in (1, 2)
    }
    # four array tasks, each COMPLETED, in SLURM's accounting
    array = slurm_cmd(slurm, "sacct", "-n", "-X", "-P", "-o", "JobID,State")
    tasks = [line.split("|") for line in array.split() if "_" in line.split("|")[0]]
    assert len(tasks) >= 4 and all(state == "COMPLETED" for _, state in tasks[-4:]), array
    # the launching process wrote the sweep's tables when the jobs were done
    tables = out / "single" / "tables"
    assert (tables / "summary.csv").is_file() and "| CAL" in log
    print(f"4-cell sweep on the local cluster: {wall_s:.1f} s wall")


def test_a_ddp_cell_runs_as_one_job_of_two_tasks(slurm, synth_root, tmp_path):
    out = tmp_path / "ddp"
    args = [
        *LOCAL_RESOURCES,
        "hydra.launcher.tasks_per_node=2",
        "method=cal",
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.progress_bar=false",
    ]
    finish(run_py(["-m", *overrides(synth_root, out, *args)], slurm), 600, slurm)
    (record,) = records(out)
    assert record["status"] == "complete"
    # both tasks exited 0 (srun fails the step, and the job, when a task does not)
    state = slurm_cmd(slurm, "sacct", "-n", "-X", "-P", "-o", "State").split()[-1]
    assert state == "COMPLETED"
    world = record["distributed"]
    assert world["world_size"] == 2 and world["cluster_environment"] == "SLURMEnvironment"
    assert [c["epoch"] for c in world["replica_checks"]] == [0, 1]
    run_dir = next(out.rglob("results.json")).parent
    # rank 1 logs to its own file; the run's log holds rank 0's lines once
    assert (run_dir / "train.rank1.log").is_file()
    log = (run_dir / "train.log").read_text()
    assert log.count("checkpoint last.ckpt: epoch 1, step") == 1


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory, slurm) -> subprocess.Popen:
    """The long run, uninterrupted, on this machine (started once, in the background)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    process = run_py(overrides(synth_root, out, *LONG_RUN), slurm)
    process.output_root = out
    yield process
    if process.poll() is None:
        process.kill()


def uninterrupted_record(process: subprocess.Popen) -> dict:
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    (record,) = records(process.output_root)
    return record


def test_a_job_requeued_by_the_scheduler_resumes(slurm, synth_root, tmp_path, uninterrupted):
    out = tmp_path / "requeued"
    sweep = run_py(["-m", *overrides(synth_root, out, *LOCAL_RESOURCES, *LONG_RUN)], slurm)
    job = wait_for(lambda: only_job(slurm), 120, "the job to be queued")
    log = out / "single" / "cal" / "p1" / "k-known" / "seed-5" / "train.log"
    wait_for(
        lambda: log.is_file() and "checkpoint last.ckpt: epoch 2," in log.read_text(),
        300,
        "the job's epoch-2 checkpoint",
    )
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=60)
    finish(sweep, 900, slurm)
    (record,) = records(out)
    assert record["status"] == "complete"
    # from the checkpoint it had reached (mid-epoch 2 or later), not from the start
    assert len(record["resumed"]) == 1 and record["resumed"][0]["from_step"] >= 20
    assert runs_of(slurm, job).count("REQUEUED") == 1, runs_of(slurm, job)
    assert not differences(computed(uninterrupted_record(uninterrupted)), computed(record))


def test_a_job_at_its_time_limit_is_requeued_and_resumes(
    slurm, synth_root, tmp_path, uninterrupted
):
    """Time limit 2 min, USR2 60 s before it (SLURM sends it up to 30 s earlier still): the
    run is mid-training then. Once submitit has requeued the job, the test gives the job
    time to finish (as an admin would; another limit would requeue it again, up to
    max_num_timeout times)."""
    out = tmp_path / "timed_out"
    limits = (
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        "hydra.launcher.max_num_timeout=1",
    )
    args = overrides(synth_root, out, *LOCAL_RESOURCES, *LONG_RUN, *limits)
    sweep = run_py(["-m", *args], slurm)
    job = wait_for(lambda: only_job(slurm), 120, "the job to be queued")
    wait_for(lambda: "REQUEUED" in runs_of(slurm, job), 240, "submitit to requeue the job")
    subprocess.run(
        ["scontrol", "update", f"JobId={job}", "TimeLimit=15"], env=slurm, check=True, timeout=60
    )
    finish(sweep, 900, slurm)
    (record,) = records(out)
    assert record["status"] == "complete"
    assert len(record["resumed"]) == 1 and record["resumed"][0]["from_step"] >= 4
    # the time-limit signal reached the job; that submitit requeued it is SLURM's REQUEUED
    # state above (its own "Requeued job" line can be lost: SLURM cancels the step as soon as
    # the requeue takes effect, at times before the line is written)
    submitit_log = "\n".join(p.read_text() for p in out.rglob("*_log.*"))
    assert "timed-out" in submitit_log
    assert not differences(computed(uninterrupted_record(uninterrupted)), computed(record))
