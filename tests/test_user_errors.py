"""A user error ends a command in one line and exit status 1 (owdfa_bench/errors.py): the bad
inputs of issue 12, through `python run.py` and `owdfa-bench evaluate` / `prepare` as a user
types them. The traceback goes to the run's train.log; HYDRA_FULL_ERROR=1 prints it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_SYNTH

from owdfa_bench.errors import CheckpointError, ConfigValueError, is_user_error, one_line


def command(
    *args: str, env: dict | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if env is None:
        environment.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess, prog: str = "run.py") -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one message, no traceback
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("seed=abc", ["seed=abc", "could not be converted to Integer", "full_key: seed"]),
        ("seed=1.5", ["seed=1.5", "could not be converted to Integer", "full_key: seed"]),
        ("trainer.thread=1", ["trainer.thread", "not in 'TrainerConfig'"]),
        ("method=nope", ["method/nope", "cal cdal cpl"]),
    ],
)
def test_a_config_that_does_not_compose_is_one_line_through_run_py(override, names):
    line = one_error_line(command("run.py", override))
    assert all(name in line for name in names), line
    assert "Config search path" not in line


def test_a_bad_value_is_one_line_and_its_traceback_is_in_train_log(tmp_path):
    args = ("run.py", "seed=-1", "logger=none", f"output_root={tmp_path}")
    line = one_error_line(command(*args))
    log_file = tmp_path / "single" / "cal" / "p1" / "k-known" / "seed--1" / "train.log"
    assert "seed=-1: must be an integer >= 0; e.g. seed=2025" in line
    assert f"(traceback in {log_file})" in line
    logged = log_file.read_text()
    assert "Traceback (most recent call last)" in logged and "ConfigValueError" in logged
    full = command(*args, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback (most recent call last)" in full.stderr


def test_a_key_nothing_reads_is_one_line_before_anything_runs(tmp_path):
    """Hydra itself recommends `+method.foo=1` for `method.foo=1`; the run refuses it."""
    args = ("run.py", "+method.lr=0.5", "logger=none", f"output_root={tmp_path}")
    line = one_error_line(command(*args))
    assert "method.lr=0.5: nothing reads this key" in line
    assert "did you mean method.optim.lr? e.g. method.optim.lr=0.5" in line
    assert not list(tmp_path.rglob("results.json"))


def test_a_k_estimate_the_split_data_cannot_hold_is_one_line_before_training(tmp_path, synth_root):
    """Checked once the data is split (the unlabelled rows bound it), before any method is
    built: 100000 classes once asked for a 68 GiB evaluation matrix after training."""
    args = ("method=orca", "k=unknown", "k.estimate=100000", "trainer=smoke", "logger=none")
    result = command(
        "run.py", *args, f"data.root={synth_root}", f"output_root={tmp_path}", *TINY_SYNTH
    )
    line = one_error_line(result)
    assert "k.estimate=100000: must be at most " in line and "unlabelled training row" in line
    assert not list(tmp_path.rglob("last.ckpt"))


def test_a_missing_data_root_is_one_line(tmp_path):
    result = command(
        "run.py",
        "data=owdfa40",
        f"data.root={tmp_path / 'nowhere'}",
        "logger=none",
        f"output_root={tmp_path}",
    )
    line = one_error_line(result)
    assert "data=owdfa40 protocol=p1: data root" in line and "does not exist" in line


@pytest.mark.parametrize(
    ("overrides", "example"),
    [
        (["data=synth"], "null"),  # the synthetic set is written there: its default cache
        (["data=owdfa40"], "{parent}"),
        (["data=owdfa23", "protocol=owdfa23_p1"], "{parent}"),
    ],
)
def test_a_data_root_that_is_a_file_is_one_line_saying_a_folder_is_expected(
    tmp_path, overrides, example
):
    from owdfa_bench.config import check_config, compose_config

    a_file = tmp_path / "OWDFA40.zip"
    a_file.write_bytes(b"PK")
    with pytest.raises(ConfigValueError) as err:
        check_config(compose_config([*overrides, f"data.root={a_file}"]))
    name = overrides[0].split("=")[1]
    assert str(err.value) == (
        f"data.root='{a_file}': is a file; data={name} needs a folder; e.g. data.root="
        + example.format(parent=tmp_path)
    )


def test_a_data_root_of_something_else_than_a_synth_cache_is_one_line(make_cfg, tmp_path):
    from owdfa_bench.data.datamodule import build_splits
    from owdfa_bench.errors import DataError

    (tmp_path / "holiday.jpg").write_bytes(b"")
    cfg = make_cfg(f"data.root={tmp_path}")
    with pytest.raises(DataError) as err:
        build_splits(cfg.data, cfg.protocol)
    message = str(err.value)
    assert message.startswith(f"synth cache folder {tmp_path} holds ") and "holiday.jpg" in message
    assert "not replaced" in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "options"),
    [
        ("data=nosuch", "Available options in 'data': owdfa23 owdfa40 synth synth_paper"),
        (
            "trainer=nosuch",
            "Available options in 'trainer': cpu ddp ddp_cpu gpu gpu_fp32 smoke",
        ),
        ("k=nosuch", "Available options in 'k': known unknown"),
    ],
)
def test_an_unknown_option_lists_the_options_without_the_schemas(override, options):
    """The structured configs are stored beside a group's options; Hydra lists them too."""
    from hydra.errors import MissingConfigException

    from owdfa_bench.config import compose_config

    with pytest.raises(MissingConfigException) as err:
        compose_config([override])
    assert one_line(err.value).endswith(options)


def test_a_programming_error_keeps_its_traceback():
    assert not is_user_error(ZeroDivisionError("division by zero"))
    assert not is_user_error(ValueError("a bug somewhere"))
    assert is_user_error(ConfigValueError("seed=-1: ..."))
    assert is_user_error(PermissionError(13, "Permission denied", "/out/results.json"))
    text = one_line(PermissionError(13, "Permission denied", "/out/results.json"))
    assert text.startswith("cannot write /out/results.json: Permission denied;")


def test_prepare_with_data_align_as_its_docstring_shows_composes(tmp_path):
    """`owdfa-bench prepare data=owdfa40 data.root=DIR data.align=true` (faces.py) composes;
    without the data it ends in one line about the data root, not a composition error."""
    from owdfa_bench.data.faces import compose_config, settings_from_config

    cfg = compose_config(["data=owdfa40", f"data.root={tmp_path}", "data.align=true"])
    assert settings_from_config(cfg.data).align is True
    result = command(
        "-m", "owdfa_bench", "prepare", "data=owdfa40", f"data.root={tmp_path}", "data.align=true"
    )
    assert "ConfigCompositionException" not in result.stderr
    assert "Could not override" not in result.stderr


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture
def lower_bound_checkpoint(make_cfg) -> Path:
    from owdfa_bench.runner import run

    cfg = make_cfg("method=lower_bound")
    assert run(cfg)["status"] == "complete"
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


def evaluate_error(make_cfg, ckpt: Path, *overrides: str) -> str:
    from owdfa_bench.evaluate import evaluate_checkpoint

    with pytest.raises(CheckpointError) as err:
        evaluate_checkpoint(make_cfg(*overrides), ckpt)
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message
    return message


def test_evaluate_refuses_a_random_and_an_unsafe_file_in_one_line(make_cfg, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    random_file = tmp_path / "random.ckpt"
    random_file.write_bytes(random.Random(0).randbytes(2048))
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, unsafe)
    message = evaluate_error(make_cfg, random_file, "method=lower_bound")
    assert "is not a readable torch checkpoint" in message
    message = evaluate_error(make_cfg, unsafe, "method=lower_bound")
    assert "print object" in message and "refused" in message
    assert "code ran" not in capsys.readouterr().out
    missing = evaluate_error(make_cfg, tmp_path / "missing.ckpt", "method=lower_bound")
    assert missing.endswith("missing.ckpt: no such file")


@pytest.mark.parametrize("seed", range(40))
def test_any_bytes_that_are_no_checkpoint_are_one_line(seed, tmp_path):
    """torch's weights-only unpickler fails on arbitrary bytes with many exception types."""
    from owdfa_bench.checkpoints import read_checkpoint

    path = tmp_path / "noise.ckpt"
    generator = random.Random(seed)
    path.write_bytes(generator.randbytes(generator.choice([1, 16, 600, 4096])))
    with pytest.raises(CheckpointError, match="is not a readable torch checkpoint") as err:
        read_checkpoint(path, "resuming: the checkpoint", "delete it")
    assert "\n" not in str(err.value) and str(err.value).endswith("delete it")


def test_evaluate_names_the_keys_and_the_method_of_a_mismatched_checkpoint(
    make_cfg, lower_bound_checkpoint
):
    message = evaluate_error(make_cfg, lower_bound_checkpoint, "method=cpl")
    assert "does not match the model method=cpl builds" in message
    assert "missing (" in message and "unexpected (" in message
    assert "written by a run of method=lower_bound k=known" in message


def test_evaluate_cli_ends_a_user_error_in_one_line(make_cfg, monkeypatch, tmp_path, capsys):
    from owdfa_bench import evaluate

    monkeypatch.setattr(evaluate, "compose_config", lambda overrides: make_cfg(*overrides))
    status = evaluate.cli_evaluate(["--ckpt", str(tmp_path / "none.ckpt"), "method=cal"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1
    assert err[0].startswith("owdfa-bench evaluate: error: --ckpt ") and "no such file" in err[0]
