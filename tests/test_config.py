"""The config tree composes: every group option, launcher and sweep, and methods match configs."""

import importlib
import subprocess
import sys

import pytest
import yaml
from conftest import CONF, REPO, compose_config

METHOD_CONFIGS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))


def test_every_method_config_targets_a_method_class():
    from owdfa_bench.method import OWDFAMethod

    for name in METHOD_CONFIGS:
        cfg = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
        assert cfg["name"] == name
        module, _, cls = cfg["model"]["_target_"].rpartition(".")
        assert module == f"methods.{name}", f"{name}: one method = one file in methods/"
        assert issubclass(getattr(importlib.import_module(module), cls), OWDFAMethod)
        assert {"epochs", "batch_size", "sampler", "optim"} <= set(cfg)


def test_every_method_module_has_a_config():
    helpers = {"__init__", "common_losses", "simgcd_family"}  # shared code, not methods
    modules = {p.stem for p in (REPO / "methods").glob("*.py")} - helpers
    assert modules == set(METHOD_CONFIGS)


@pytest.mark.parametrize("group", ["data", "protocol", "k", "trainer", "logger"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = compose_config([f"{group}={option}", "method=lower_bound"])
        assert cfg[group] is not None


def test_seed_and_split_seed_are_separate():
    cfg = compose_config(["seed=7", "method=lower_bound"])
    assert cfg.seed == 7 and cfg.data.split_seed == 2025
    assert cfg.run_dir.endswith("lower_bound/p1/k-known/seed-7")


@pytest.mark.parametrize("launcher", ["joblib", "submitit_slurm", "slurm"])
def test_launchers_compose(launcher):
    out = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--cfg",
            "hydra",
            f"hydra/launcher={launcher}",
            "method=lower_bound",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    plugin = "joblib" if launcher == "joblib" else "submitit"
    assert f"hydra_plugins.hydra_{plugin}_launcher" in out.stdout
    if launcher == "slurm":  # the project's settings over the plugin's
        assert "max_num_timeout: 3" in out.stdout and "requeue: true" in out.stdout


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweeps_compose(sweep):
    out = subprocess.run(
        [sys.executable, "run.py", "--cfg", "hydra", f"+sweep={sweep}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    hydra_cfg = yaml.safe_load(out.stdout)["hydra"]
    assert hydra_cfg["mode"] == "MULTIRUN" and hydra_cfg["sweeper"]["params"]


def test_gpu_and_ddp_trainers_build_on_cpu():
    """The GPU recipes compose and turn into a Trainer (accelerator swapped for the CPU here)."""
    import lightning.pytorch as pl

    for option in ("gpu", "ddp"):
        t = compose_config([f"trainer={option}", "method=lower_bound"]).trainer
        assert t.precision == "bf16-mixed" and t.channels_last and t.pin_memory
        assert t.num_workers >= 4
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision=t.precision,
            strategy="auto",
            logger=False,
            enable_checkpointing=False,
        )
        assert trainer.precision == "bf16-mixed"
    assert compose_config(["trainer=ddp", "method=lower_bound"]).trainer.strategy.startswith("ddp")


def test_gpu_fp32_is_the_gpu_recipe_at_fp32():
    """The recipe for comparisons with published numbers: trainer=gpu, but 32-true."""
    from omegaconf import OmegaConf

    gpu, fp32 = (
        OmegaConf.to_container(compose_config([f"trainer={name}", "method=lower_bound"]).trainer)
        for name in ("gpu", "gpu_fp32")
    )
    assert fp32.pop("precision") == "32-true" and gpu.pop("precision") == "bf16-mixed"
    assert fp32 == gpu and fp32["accelerator"] == "gpu"


def _cells(sweep: str) -> list[list[str]]:
    """Every cell of a sweep file: the cartesian product of its sweeper params."""
    import itertools

    spec = yaml.safe_load((REPO / "sweeps" / f"{sweep}.yaml").read_text())
    params = spec["hydra"]["sweeper"]["params"]
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_cell_of_every_sweep_builds_its_method(sweep):
    """Recipes never rot: each cell composes and its method is built (tiny backbone input)."""
    from owdfa_bench.method import Problem
    from owdfa_bench.runner import build_method

    built = set()
    for cell in _cells(sweep):
        # a test never downloads: the real-data sweeps' ImageNet weights are switched off
        cfg = compose_config([f"+sweep={sweep}", *cell, "data.backbone.pretrained=false"])
        key = (cfg.method.name, cfg.k.name)
        if key in built:
            continue
        built.add(key)
        problem = Problem(num_known=19, num_classes=41, k_mode=cfg.k.name, max_epochs=2)
        method = build_method(cfg, problem)
        assert method.problem.k_mode == cfg.k.name
    assert built


def test_cpl_table_holds_every_row_of_cpls_published_table_on_the_original_data():
    import pandas as pd

    cells = _cells("cpl_table")
    assert len(cells) == 9 * 2 * 3
    rows, protocols = set(), set()
    for cell in cells:
        if "seed=2025" not in cell:
            continue
        cfg = compose_config(["+sweep=cpl_table", *cell])
        assert cfg.data.name == "owdfa23" and cfg.protocol.benchmark == "owdfa23"
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "32-true"
        assert cfg.k.name == "known"
        rows.add(cfg.method.name)
        protocols.add(cfg.protocol.protocol_key)
    published = pd.read_csv(REPO / "results" / "paper" / "owdfa23_cpl_readme.csv")
    assert rows == set(published["method"])  # every published row, nothing else
    assert protocols == set(published["protocol"]) == {"p1", "p2"}


def test_cal_table2_holds_the_ten_rows_of_the_paper_table_on_real_data():
    cells = _cells("cal_table2")
    assert len(cells) == 10 * 3 * 3
    rows = set()
    for cell in cells:
        if "seed=2025" not in cell or "protocol=p1" not in cell:
            continue
        cfg = compose_config(["+sweep=cal_table2", *cell])
        assert cfg.data.name == "owdfa40" and cfg.trainer.accelerator == "gpu"
        assert cfg.trainer.precision == "32-true"  # as the references train
        rows.add((cfg.method.name, cfg.k.name))
    names = {"simgcd", "owmatch", "lps", "legogcd", "protogcd", "palgcd", "cpl", "cdal", "cal"}
    assert rows == {(m, "known") for m in names} | {("cal", "unknown")}
