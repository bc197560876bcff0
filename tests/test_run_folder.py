"""What a run folder holds when the disk fills up or two launches reach one cell: a full disk
ends in one line (the log file's own failure included) and leaves no temporaries, a forced
attempt never writes over the complete record's config (tests/test_resume.py), and one process
at a time trains a cell (owdfa_bench/locks.py)."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_SYNTH
from helpers import run_py

from owdfa_bench import errors, records
from owdfa_bench.checkpoints import RecordingWriter, write_whole
from owdfa_bench.locks import LOCK_FILE, hold_run_folder
from owdfa_bench.records import RESULTS_FILE, read_record
from owdfa_bench.runner import run

SHORT = ("trainer.max_epochs=2", "trainer.limit_train_batches=3")


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A file system of `size` bytes at `path` (a tmpfs: needs root, as CI has); skips where
    none can be mounted."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Write zeros into `folder` until its file system is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def leftovers(run_dir: Path) -> list[str]:
    """Hidden files (temporaries) and empty files in a run folder, Hydra's own folder aside."""
    found = []
    for path in run_dir.rglob("*"):
        if ".hydra" in path.parts or not path.is_file():
            continue
        if path.name.startswith(".") or (path.stat().st_size == 0 and path.name != LOCK_FILE):
            found.append(str(path.relative_to(run_dir)))
    return found


# ------------------------------------------------------------------------------- full disk
def test_a_disk_that_fills_during_a_run_is_one_line_and_leaves_no_temporaries(synth_root, tmp_path):
    """The disk fills once the run folder is prepared: the log, the checkpoint and the failure
    record cannot be written. One line says all three; nothing half-written stays."""
    from test_resume import overrides_of

    run(_tiny_cfg(synth_root, tmp_path / "warm"))  # the synthetic set, built off the tmpfs
    with small_tmpfs(tmp_path / "small", "400k") as output_root:
        run_dir = output_root / "single/lower_bound/p1/k-known/seed-2025"

        def fill_once_prepared() -> None:
            while not (run_dir / RESULTS_FILE).exists():
                time.sleep(0.02)
            fill(output_root)

        filler = threading.Thread(target=fill_once_prepared, daemon=True)
        filler.start()
        process = run_py(overrides_of(synth_root, output_root, "method=lower_bound", *SHORT))
        _, stderr = process.communicate(timeout=240)
        filler.join(timeout=10)
        ours = [line for line in stderr.splitlines() if line.startswith("run.py:")]
        assert process.returncode == 1, stderr
        assert len(ours) == 1 and ours[0].startswith("run.py: error: "), stderr
        assert "Logging error" not in stderr and "Traceback" not in stderr
        line = ours[0]
        assert "No space left on device" in line and "last.ckpt" in line
        assert "the failure could not be recorded" in line and "still says 'running'" in line
        # the log is named as unwritable, or (its last page had room) it holds the traceback
        log_named = "train.log could not be written" in line
        assert log_named or "Traceback" in (run_dir / "train.log").read_text(), line
        assert read_record(run_dir).status == "running"
        assert leftovers(run_dir) == []


def test_a_checkpoint_that_does_not_fit_names_the_full_disk_and_keeps_the_last_one(tmp_path):
    """torch reports a failed write as a RuntimeError ("unexpected pos"); the write names the
    OSError under it, and the checkpoint before stays whole."""
    with small_tmpfs(tmp_path / "small", "256k") as folder:
        last = folder / "last.ckpt"
        write_whole({"step": 1}, last)
        with pytest.raises(OSError) as err:
            write_whole({"step": 2, "weights": torch.zeros(200_000)}, last)
        assert err.value.errno == errno.ENOSPC
        assert torch.load(last)["step"] == 1
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_the_recording_writer_keeps_the_error_torch_hides():
    class FullAfter(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 64:
                raise enospc()
            return super().write(data)

    writer = RecordingWriter(FullAfter())
    with pytest.raises(RuntimeError):
        torch.save({"weights": torch.zeros(1000)}, writer)
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.ENOSPC


def test_a_record_that_cannot_be_written_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / RESULTS_FILE
    records.write_json_atomic(path, {"status": "running"})

    def full(fd):
        raise enospc()

    monkeypatch.setattr(records.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        records.write_json_atomic(path, {"status": "complete"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == [RESULTS_FILE]


def test_an_unwritable_log_file_is_dropped_and_named_once(tmp_path, monkeypatch, capsys):
    logger = logging.getLogger("test_run_folder.full")
    logger.propagate = False
    handler = logging.FileHandler(tmp_path / "train.log")
    logger.addHandler(handler)
    monkeypatch.setattr(errors, "UNWRITABLE_LOGS", [])

    class Full(io.StringIO):
        def write(self, text):
            raise enospc()

    handler.stream = Full()
    errors.drop_unwritable_log_files(logger)
    logger.setLevel(logging.INFO)
    for _ in range(3):  # info: once dropped, no handler is left, and warnings reach lastResort
        logger.info("a line")
    assert handler not in logger.handlers
    assert capsys.readouterr().err == ""  # no "--- Logging error ---" per message
    assert [
        f"the log {tmp_path / 'train.log'} could not be written (No space left on device)"
    ] == errors.UNWRITABLE_LOGS
    with pytest.raises(SystemExit):
        errors.exit_on_user_error(lambda: (_ for _ in ()).throw(enospc()), "run.py")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("(No space left on device)")
    assert "train.log could not be written" in lines[0]


def test_a_log_handler_that_fails_otherwise_is_reported_as_logging_does(
    tmp_path, monkeypatch, capsys
):
    logger = logging.getLogger("test_run_folder.format")
    logger.propagate = False
    handler = logging.FileHandler(tmp_path / "train.log")
    logger.addHandler(handler)
    monkeypatch.setattr(errors, "UNWRITABLE_LOGS", [])
    errors.drop_unwritable_log_files(logger)
    logger.warning("%d", "not a number")  # a programming error: logging's own report
    assert handler in logger.handlers and errors.UNWRITABLE_LOGS == []
    assert "Logging error" in capsys.readouterr().err
    logger.removeHandler(handler)
    handler.close()


# ------------------------------------------------------------------------- one launcher per cell
def _tiny_cfg(synth_root: Path, output_root: Path, *extra: str):
    from conftest import compose_config

    return compose_config(
        [
            "trainer=smoke",
            "logger=none",
            "data=synth",
            f"data.root={synth_root}",
            f"output_root={output_root}",
            *TINY_SYNTH,
            "method=lower_bound",
            *SHORT,
            *extra,
        ]
    )


def test_a_cell_another_process_holds_is_skipped_and_trained_once_it_is_free(synth_root, tmp_path):
    cfg = _tiny_cfg(synth_root, tmp_path / "outputs")
    run_dir = Path(cfg.run_dir)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from owdfa_bench.locks import hold_run_folder\n"
            "with hold_run_folder(Path(sys.argv[1])) as other:\n"
            "    assert other is None; print('held', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        skipped = run(cfg)
        assert skipped["status"] == "skipped" and f"pid {holder.pid}" in skipped["held_by"]
        assert read_record(run_dir) is None and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()  # SIGKILL: nothing releases the lock but the kernel
        holder.wait()
    record = run(cfg)  # the lock of a process that is gone is in nobody's way
    assert record["status"] == "complete" and record["resumed"] == []


def test_a_held_lock_names_its_holder_and_is_free_after_the_block(tmp_path):
    with hold_run_folder(tmp_path) as first:
        assert first is None
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
        with hold_run_folder(tmp_path) as second:  # another open file: flock refuses it
            assert second.startswith(f"pid {os.getpid()} on ")
    with hold_run_folder(tmp_path) as again:
        assert again is None
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_two_launches_of_one_cell_train_it_once(synth_root, tmp_path):
    """The issue's case: a sweep launched twice into one folder at once. Whichever launch
    takes the cell first trains it; the other skips it in one line naming the first."""
    from test_resume import overrides_of

    run(_tiny_cfg(synth_root, tmp_path / "warm"))  # the synthetic set exists before both
    # long enough that the later launch reaches the cell while the first still trains it
    longer = ("trainer.max_epochs=4", "trainer.limit_train_batches=3")
    args = overrides_of(synth_root, tmp_path / "outputs", "method=lower_bound", *longer)
    run_dir = tmp_path / "outputs/single/lower_bound/p1/k-known/seed-2025"
    launches = [run_py(args), run_py(args)]
    outputs = [launch.communicate(timeout=240) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    busy = f"skipping {run_dir}: another launch is training it (pid "
    skipped = [i for i, (out, _) in enumerate(outputs) if busy in out]
    assert len(skipped) == 1, outputs
    trainer = launches[1 - skipped[0]]
    assert f"{busy}{trainer.pid} on " in outputs[skipped[0]][0]
    record = read_record(run_dir)
    assert record.status == "complete" and record.resumed == []
