"""Run records: `results.json` in each run folder, with provenance, and the skip rule of sweeps."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
# Keys that say where and how a run is recorded or shown, not what it computes.
HASH_EXCLUDED_KEYS = ("force", "logger", "output_root", "sweep_name", "run_dir", "hydra")
HASH_EXCLUDED_TRAINER_KEYS = ("progress_bar", "num_workers", "pin_memory")
# Nested keys that only say how a run is shown: a method's printed name and table position.
HASH_EXCLUDED_PATHS = (("method", "display"),)
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
    """Write to a temporary file and rename it, so a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(strict_json(data), f, indent=2, default=_json_default, allow_nan=False)
    os.replace(tmp, path)


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


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(record: dict[str, Any] | None, cfg_hash: str) -> bool:
    return (
        bool(record)
        and record.get("status") == "complete"
        and record.get("config_hash") == cfg_hash
        and bool(record.get("metrics"))
    )
