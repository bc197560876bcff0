"""Run records: the typed `RunRecord` a run folder's `results.json` holds, its provenance, the
config hash and the skip rule of sweeps.

The runner writes one `RunRecord` per run (`kind` "train"), `owdfa-bench evaluate` one per
checkpoint it scores (`kind` "evaluate"), and the report reads every `results.json` back through
`RunRecord.from_dict`, which keeps records of older versions readable: a key it does not know
goes to `extras`, a key a record lacks keeps the field's empty value.

Nothing complete is overwritten by something incomplete (`write_run_record`): while
`results.json` holds a complete record, the running or failed record of a new attempt (a
forced rerun, a changed config) goes to `results.attempt.json` and its config to
`config.attempt.yaml`, and `results.json` and `config.yaml` are replaced only once the attempt
is complete. Records and configs are written to a temporary beside them, fsynced and renamed, so
a full disk leaves the previous file whole and no temporary behind.

Schema versions: 2 added `resumed` (the checkpoints a run continued from) and made `wall_s` and
the throughputs cover every segment of a resumed run; version 1 records read as before. Added
later within version 2: `precision` (the Trainer's numeric precision, Lightning's name; a record
without it reads its config's `trainer.precision`, `run_precision`, else unknown) and
`data_digest` (the content digest of the run's rows, `owdfa_bench/data/digest.py`; a record
without it reads with None).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from owdfa_bench.cache import atomic_path

SCHEMA_VERSION = 2  # bump when a field changes meaning; from_dict reads every version up to it
RESULTS_FILE = "results.json"
ATTEMPT_FILE = "results.attempt.json"  # an attempt's record while results.json is complete
CONFIG_FILE = "config.yaml"  # the resolved config of the record in results.json
ATTEMPT_CONFIG_FILE = "config.attempt.yaml"  # ... and of the attempt in results.attempt.json
# Keys that say where and how a run is recorded or shown, not what it computes.
HASH_EXCLUDED_KEYS = ("force", "logger", "output_root", "sweep_name", "run_dir", "hydra")
# ... how it is shown, checkpointed and fed, and which class builds the Trainer
HASH_EXCLUDED_TRAINER_KEYS = ("progress_bar", "num_workers", "pin_memory", "_target_", "callbacks")
# Nested keys that only say how a run is shown (a method's printed name and table position) or
# which class builds an object whose settings are hashed (the data source: data.name is hashed).
HASH_EXCLUDED_PATHS = (("method", "display"), ("data", "_target_"))
# Field metadata: when a field is left out of the JSON while it is None.
OMIT_WHEN_EMPTY = {"omit": "when_none"}  # always
RESULT = {"omit": "unless_complete"}  # unless the run is complete (then null says "none")
EVALUATION = {"omit": "unless_evaluate"}  # unless the record is of an evaluated checkpoint
# Lightning's legacy precision names and the ones it turns them into (Trainer(precision=...)).
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


@dataclass
class RunRecord:
    """What one run (or one evaluation of a checkpoint) computed, and how.

    `to_dict` is the JSON of `results.json`: the fields in order, `extras` (method-specific
    entries such as CAL's `k_curve`) merged at the top level; a None field marked
    OMIT_WHEN_EMPTY is left out, one marked RESULT unless the run is complete, one marked
    EVALUATION unless the record is of an evaluated checkpoint. A record is
    written when a run starts (`status` "running"), and again when it completes or fails.
    """

    schema_version: int = SCHEMA_VERSION
    status: str = "running"  # running | complete | failed
    error: str | None = None
    method: str | None = None
    protocol: str | None = None
    k: str | None = None
    seed: int | None = None
    split_seed: int | None = None
    data: str | None = None
    synthetic: bool | None = None
    # SHA-256 of the rows and their bytes: one config on other data gets another digest
    data_digest: str | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    selection: str | None = None
    config_hash: str | None = None
    config: dict[str, Any] | None = None
    git_commit: str | None = None
    versions: dict[str, str] | None = None
    device: str | None = None
    precision: str | None = None  # the Trainer's, e.g. "32-true" or "bf16-mixed"
    # a multi-process run: world size, strategy, backend, and the per-epoch replica checks
    distributed: dict[str, Any] | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    kind: str | None = field(default=None, metadata=OMIT_WHEN_EMPTY)  # None: a training run
    pretrained_start: dict[str, Any] | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    # seconds before training, apart from wall_s: the data (built or checked) and the pretrained
    # start (built, or waited for while another run built it)
    setup_s: dict[str, float] | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    # the evaluation (complete runs)
    epochs: int | None = field(default=None, metadata=RESULT)
    selected_epoch: int | None = field(default=None, metadata=RESULT)
    selection_metric: str | None = field(default=None, metadata=RESULT)
    metrics: dict[str, Any] | None = field(default=None, metadata=RESULT)
    num_clusters: int | None = field(default=None, metadata=RESULT)
    k_estimated: int | None = field(default=None, metadata=RESULT)
    num_known: int | None = field(default=None, metadata=RESULT)
    num_classes: int | None = field(default=None, metadata=RESULT)
    classes: list[dict[str, Any]] | None = field(default=None, metadata=RESULT)
    per_class_acc: list[Any] | None = field(default=None, metadata=RESULT)
    confusion: list[list[int]] | None = field(default=None, metadata=RESULT)
    history: list[dict[str, Any]] | None = field(default=None, metadata=RESULT)
    counts: dict[str, int] | None = field(default=None, metadata=RESULT)
    data_warnings: list[str] | None = field(default=None, metadata=RESULT)
    unreadable: list[str] | None = field(default=None, metadata=RESULT)
    # crop_face: images, how many without a detected face (whole image kept), their share
    face_crops: dict[str, Any] | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    # of an evaluated checkpoint (kind "evaluate")
    checkpoint: str | None = field(default=None, metadata=EVALUATION)
    checkpoint_sha256: str | None = field(default=None, metadata=EVALUATION)
    load: dict[str, Any] | None = field(default=None, metadata=EVALUATION)
    num_active: int | None = field(default=None, metadata=EVALUATION)
    num_prototypes: int | None = field(default=None, metadata=EVALUATION)
    reference_all_rows: dict[str, Any] | None = field(default=None, metadata=EVALUATION)
    # resumptions: {from_epoch, from_step, at} per checkpoint the run continued from ([]: none)
    resumed: list[dict[str, Any]] | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    # timings (of every segment of a resumed run, up to the checkpoint each continued from)
    train_images_per_s: float | None = field(default=None, metadata=RESULT)
    eval_images_per_s: float | None = field(default=None, metadata=RESULT)
    wall_s: float | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    traceback: str | None = field(default=None, metadata=OMIT_WHEN_EMPTY)
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific, at the top level

    @classmethod
    def from_config(cls, cfg: DictConfig, cfg_hash: str, device: str, **fields: Any) -> RunRecord:
        """The provenance of a run of `cfg`: cell, seeds, data, the resolved config, versions."""
        return cls(
            method=str(cfg.method.name),
            protocol=str(cfg.protocol.name),
            k=str(cfg.k.name),
            seed=int(cfg.seed),
            split_seed=int(cfg.data.split_seed),
            data=str(cfg.data.name),
            synthetic=bool(cfg.data.synthetic),
            selection=str(cfg.selection),
            config_hash=cfg_hash,
            config=OmegaConf.to_container(cfg, resolve=True),
            git_commit=git_commit(),
            versions=package_versions(),
            device=device,
            precision=lightning_precision(cfg.trainer.precision),
            **fields,
        )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extras"]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """A record read back from JSON, of this or an older schema version: values as written
        (the report's validation judges them), None where a key is absent, and the keys it does
        not know in `extras`."""
        names = cls.field_names()
        extras = {k: v for k, v in data.items() if k not in set(names)}
        return cls(**{name: data.get(name) for name in names}, extras=extras)

    def to_dict(self) -> dict[str, Any]:
        complete = self.status == "complete"
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value, omit = getattr(self, f.name), f.metadata.get("omit")
            kept_when_none = {
                None: True,
                "unless_complete": complete,
                "unless_evaluate": self.kind == "evaluate",
            }.get(omit, False)
            if f.name == "extras" or (value is None and not kept_when_none):
                continue
            out[f.name] = value
        clash = set(self.extras) & set(out)
        if clash:
            raise ValueError(f"record extras {sorted(clash)} would overwrite record fields")
        return {**out, **self.extras}

    def is_complete(self, cfg_hash: str) -> bool:
        """Complete for this config: a sweep skips the run."""
        return self.status == "complete" and self.config_hash == cfg_hash and bool(self.metrics)


def lightning_precision(value: Any) -> str | None:
    """The name Lightning runs a `precision` setting under ("32" -> "32-true"); None if unset."""
    if value is None:
        return None
    return PRECISION_ALIASES.get(str(value), str(value))


def run_precision(record: RunRecord) -> str | None:
    """The precision a run trained at: its `precision` field, else (records written before the
    field) its stored config's `trainer.precision`; None when neither says."""
    if record.precision is not None:
        return lightning_precision(record.precision)
    config = record.config if isinstance(record.config, dict) else {}
    trainer = config.get("trainer")
    return lightning_precision(trainer.get("precision")) if isinstance(trainer, dict) else None


VERSIONED_PACKAGES = (
    "torch",
    "torchvision",
    "lightning",
    "timm",
    "numpy",
    "scipy",
    "scikit-learn",
    "hydra-core",
    "pandas",
)


def config_hash(cfg: DictConfig) -> str:
    """SHA-256 (16 hex) of the resolved config without the keys that do not change results."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in HASH_EXCLUDED_KEYS:
        data.pop(key, None)
    for key in HASH_EXCLUDED_TRAINER_KEYS:
        data.get("trainer", {}).pop(key, None)
    for *parents, key in HASH_EXCLUDED_PATHS:
        node = data
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        commit = out.stdout.strip() if out.returncode == 0 else None
        if commit:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            commit += "-dirty" if dirty else ""
        return commit
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, fsync it and rename it, so a reader never sees
    half a record; a write that fails (a full disk) removes its temporary."""
    text = json.dumps(strict_json(data), indent=2, default=_json_default, allow_nan=False)
    write_text_atomic(Path(path), text)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def strict_json(obj: Any) -> Any:
    """NaN and infinities become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_record(path: Path, record: RunRecord) -> None:
    write_json_atomic(path, record.to_dict())


def write_run_record(run_dir: Path, record: RunRecord) -> Path:
    """Write a training run's record where it overwrites nothing complete; returns the file.

    A complete record replaces `results.json` (and the attempt file goes); any other goes to
    `results.json` unless that holds a complete record, else to `results.attempt.json`.
    """
    run_dir = Path(run_dir)
    results, attempt = run_dir / RESULTS_FILE, run_dir / ATTEMPT_FILE
    if record.status == "complete":
        write_record(results, record)
        attempt.unlink(missing_ok=True)
        return results
    previous = read_record(run_dir)
    path = attempt if previous is not None and previous.status == "complete" else results
    write_record(path, record)
    return path


def config_file_of(run_dir: Path, record: RunRecord) -> Path:
    """Where a run writes its resolved config: `config.yaml`, or `config.attempt.yaml` beside
    the attempt's record while `results.json` holds a complete record (whose config stays)."""
    run_dir = Path(run_dir)
    previous = read_record(run_dir)
    keep = record.status != "complete" and previous is not None and previous.status == "complete"
    return run_dir / (ATTEMPT_CONFIG_FILE if keep else CONFIG_FILE)


def write_run_config(run_dir: Path, cfg: DictConfig, record: RunRecord) -> Path:
    """The resolved config, atomically, where `config_file_of` says; returns the file."""
    path = config_file_of(run_dir, record)
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def promote_attempt_config(run_dir: Path) -> None:
    """A completed attempt's config replaces the config of the record it replaced."""
    attempt = Path(run_dir) / ATTEMPT_CONFIG_FILE
    if attempt.exists():
        os.replace(attempt, Path(run_dir) / CONFIG_FILE)


def read_latest_attempt(run_dir: Path) -> RunRecord | None:
    """The record of the run folder's latest attempt (the one its checkpoint belongs to): the
    attempt file when there is one, else `results.json`."""
    return read_record(run_dir, ATTEMPT_FILE) or read_record(run_dir)


def read_record(run_dir: Path, name: str = RESULTS_FILE) -> RunRecord | None:
    """The record in a run folder; None when there is none or it does not parse."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return RunRecord.from_dict(data) if isinstance(data, dict) else None
