"""What a SLURM job and a second DDP rank cost, measured on the local one-node cluster.

    python benchmarks/cluster.py                 # the tiny synthetic set, 4 cells
    python benchmarks/cluster.py --cells 8 --out outputs/bench_cluster

1. Set-up: `tests/slurm/local_cluster.sh install` (apt-get, where absent) and `start`, timed.
2. Per-job overhead: the same sweep of `--cells` smoke runs (lower bound, seeds 1..N) with the
   basic launcher (one process runs them in turn) and with `hydra/launcher=slurm` (one job per
   cell, as many at once as the node's CPUs allow); per job, SLURM's queue wait (Submit ->
   Start), its elapsed time (Start -> End, from sacct) and the run's own wall time
   (`results.json` `wall_s`): elapsed - wall_s is what a job costs beyond the run (Python start,
   imports, composing the config, building the data).
3. DDP on the CPU: one CAL cell (one epoch of the tiny set) with 1 process and with 2
   (`trainer=ddp_cpu`), one thread each: wall time and training images per second per rank.

Every figure is wall-clock on a shared machine; the script prints CPU seconds beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "slurm" / "local_cluster.sh"
sys.path.insert(0, str(REPO / "tests"))
from conftest import TINY_SYNTH  # noqa: E402  the tests' tiny synthetic set

TINY = ["data=synth", *TINY_SYNTH, "logger=none"]
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the command and its children) of one command, which must succeed."""
    cpu, start = children_cpu_s(), time.perf_counter()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:4])} ... failed:\n{done.stderr[-3000:]}")
    return wall, children_cpu_s() - cpu


def run_py(*overrides: str) -> list[str]:
    return [sys.executable, "run.py", *overrides]


def sacct_jobs(env: dict[str, str]) -> list[dict[str, str]]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State,Submit,Start,End"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [
        dict(zip(("id", "state", "submit", "start", "end"), line.split("|")))
        for line in out.split()
    ]
    return [r for r in rows if "_" in r["id"]]


def seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    synth_root = out / "synth"
    state = out / "cluster_state"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env["OWDFA_SLURM_PORT"] = str(18000 + 4 * (os.getpid() % 1000))
    results: dict[str, object] = {"cells": args.cells}

    wall, cpu = timed(["bash", str(SCRIPT), "install"], env)
    results["install_s"] = round(wall, 1)
    wall, cpu = timed(["bash", str(SCRIPT), "start", str(state)], env)
    results["start_s"], results["start_cpu_s"] = round(wall, 1), round(cpu, 1)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        seeds = ",".join(str(s) for s in range(1, args.cells + 1))
        cell = ["method=lower_bound", f"seed={seeds}", "trainer=smoke", f"data.root={synth_root}"]
        timed(
            run_py(
                "method=lower_bound",
                "trainer=smoke",
                f"data.root={synth_root}",
                f"output_root={out / 'warm'}",
                *TINY,
            ),
            env,
        )  # the data cache, once
        wall, cpu = timed(run_py("-m", *cell, *TINY, f"output_root={out / 'basic'}"), env)
        results["basic_sweep_s"], results["basic_sweep_cpu_s"] = round(wall, 1), round(cpu, 1)
        wall, cpu = timed(
            run_py("-m", *SLURM, *cell, *TINY, f"output_root={out / 'sweep_slurm'}"), env
        )
        results["slurm_sweep_s"], results["slurm_sweep_cpu_s"] = round(wall, 1), round(cpu, 1)
        jobs = sacct_jobs(env)[-args.cells :]
        walls = [
            json.loads(p.read_text())["wall_s"]
            for p in sorted((out / "sweep_slurm").rglob("results.json"))
        ]
        queued = [seconds(j["submit"], j["start"]) for j in jobs]
        elapsed = [seconds(j["start"], j["end"]) for j in jobs]
        overhead = [e - w for e, w in zip(elapsed, walls)]
        results["jobs"] = {
            "states": sorted({j["state"] for j in jobs}),
            "queue_wait_s": round(statistics.median(queued), 1),
            "elapsed_s": round(statistics.median(elapsed), 1),
            "run_wall_s": round(statistics.median(walls), 1),
            "overhead_s": round(statistics.median(overhead), 1),
        }
        ddp = []
        for trainer in ("cpu", "ddp_cpu"):
            folder = out / f"ddp_{trainer}"
            wall, cpu = timed(
                run_py(
                    "method=cal",
                    f"trainer={trainer}",
                    "trainer.threads=1",
                    "trainer.max_epochs=1",
                    "trainer.progress_bar=false",
                    f"data.root={synth_root}",
                    f"output_root={folder}",
                    *TINY,
                ),
                env,
            )
            record = json.loads(next(folder.rglob("results.json")).read_text())
            ddp.append(
                {
                    "trainer": trainer,
                    "wall_s": round(wall, 1),
                    "cpu_s": round(cpu, 1),
                    "train_images_per_s_per_rank": record["train_images_per_s"],
                }
            )
        results["ddp"] = ddp
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, capture_output=True)
    print(json.dumps(results, indent=2))
    (out / "cluster_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
