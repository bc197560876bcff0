"""`owdfa-bench evaluate`: score a checkpoint on a protocol's test split with our metrics.

    owdfa-bench evaluate --ckpt FILE [--num-active N] [--out FILE] [overrides...]
    e.g. owdfa-bench evaluate --ckpt wok_protocol1_seed2025.ckpt --num-active 58 \
             data=owdfa40 data.root=/data/OWDFA40 protocol=p1 method=cal k=unknown

Two checkpoint formats are accepted:
  * ours: a Lightning checkpoint written by the harness (`<run>/checkpoints/last.ckpt`); its
    state dict matches the model `method=... k=...` builds, prototype count included;
  * an official CAL release (https://huggingface.co/hyzheng/OWDFA_CAL, Lightning 2.2.5): its
    `state_dict` keys are `encoder.encoder.<timm resnet50>`, `encoder.fft_attn_module.*`,
    `encoder.bottleneck.*` and `encoder.fc2`; `load_cal_reference_state_dict` maps them onto
    `methods.cal.CAL` (`method=cal`; `k=known` for the 41-prototype checkpoints, `k=unknown` for
    the 10 x K_k DPP ones).

The reference does not save how many prototypes DPP left active (methods.md quirk 19), so its
own eval-only script scores all 10 x K_k rows, zeroed and drifted pruned rows included. For such
a checkpoint give `--num-active` (the count the training log reports); the record then holds our
evaluation with that many prototypes and, beside it under `reference_all_rows`, what the
reference's script computes. Without `--num-active` only the all-rows figure can be computed.

Checkpoints are read with `torch.load(..., weights_only=True)`: no code in the file runs. The
data come from the same functions as training (`owdfa_bench.runner`, `owdfa_bench.data`); the
backbone is built without downloading ImageNet weights, since the checkpoint replaces them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from owdfa_bench.resources import conf_dir

log = logging.getLogger(__name__)

CONF_DIR = conf_dir()

# reference key prefix -> our key prefix (methods/cal.py: CAL attributes)
REFERENCE_PREFIXES = (
    ("encoder.encoder.", "encoder.backbone."),
    ("encoder.fft_attn_module.", "freq_attention."),
    ("encoder.bottleneck.", "encoder.neck."),
)
REFERENCE_HEAD = ("encoder.fc2", "head.weight")
REFERENCE_IGNORED_PREFIX = "encoder.encoder.fc."  # timm's ImageNet classifier, never used by CAL
# our state that the reference does not store: filled by the loader, not read from the file
OURS_NOT_IN_REFERENCE = ("head.num_active", "novel_threshold")


def extract_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor state dict of a Lightning checkpoint (or of a bare state dict)."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            "the checkpoint holds no tensor state dict (no 'state_dict' entry and "
            "its top level is not one)"
        )
    return state


def is_cal_reference_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """True for the official CAL layout (with or without the LightningModule's `encoder.`)."""
    return "encoder.fc2" in state or (
        "fc2" in state and "fft_attn_module.freq_attn_net.0.weight" in state
    )


def _with_lightning_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare `CAL_Classifier.state_dict()` gets the `encoder.` prefix of the LightningModule."""
    if "encoder.fc2" in state:
        return state
    return {f"encoder.{k}": v for k, v in state.items()}


def map_cal_reference_keys(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(state under our key names, ignored reference keys, unexpected reference keys)."""
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, value in _with_lightning_prefix(state).items():
        if key.startswith(REFERENCE_IGNORED_PREFIX):
            ignored.append(key)
        elif key == REFERENCE_HEAD[0]:
            mapped[REFERENCE_HEAD[1]] = value
        else:
            for ref, ours in REFERENCE_PREFIXES:
                if key.startswith(ref):
                    mapped[ours + key[len(ref) :]] = value
                    break
            else:
                unexpected.append(key)
    return mapped, ignored, unexpected


def _reference_name(our_key: str) -> str:
    if our_key == REFERENCE_HEAD[1]:
        return REFERENCE_HEAD[0]
    for ref, ours in REFERENCE_PREFIXES:
        if our_key.startswith(ours):
            return ref + our_key[len(ours) :]
    return our_key


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_cal_reference_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], num_active: int | None = None
) -> dict[str, Any]:
    """Load an official CAL checkpoint's state dict into `methods.cal.CAL`; returns a report.

    Raises ValueError naming every missing, unexpected or mis-shaped key. `num_active`: how many
    prototypes are live (unknown-K checkpoints do not record it); None keeps all rows, which is
    what the reference's own evaluation script scores.
    """
    state_dict = extract_state_dict(state_dict)
    mapped, ignored, unexpected = map_cal_reference_keys(state_dict)
    ours = model.state_dict()
    missing = sorted(k for k in ours if k not in mapped and k not in OURS_NOT_IN_REFERENCE)
    unexpected += sorted(k for k in mapped if k not in ours)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                "missing reference keys: " + _listing([_reference_name(k) for k in missing])
            )
        if unexpected:
            parts.append("unexpected keys: " + _listing(unexpected))
        raise ValueError(
            "the checkpoint does not match the CAL model built from the config ("
            + "; ".join(parts)
            + "); check method=cal and data.backbone.name "
            "(the release uses resnet50)"
        )
    rows = mapped[REFERENCE_HEAD[1]].shape[0]
    expected_rows = ours[REFERENCE_HEAD[1]].shape[0]
    if rows != expected_rows:
        raise ValueError(
            f"encoder.fc2 has {rows} prototypes but the model built from the config has "
            f"{expected_rows}: the released known-K checkpoints have 41 rows (k=known on "
            "OWDFA-40), the unknown-K (DPP) ones 10 x the known classes (k=unknown)"
        )
    wrong = [
        f"{_reference_name(k)} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
        for k, v in mapped.items()
        if v.shape != ours[k].shape
    ]
    if wrong:
        raise ValueError("shape mismatch: " + "; ".join(wrong))
    if num_active is not None and not getattr(model, "prune", False):
        raise ValueError(
            "--num-active is for unknown-K (DPP) checkpoints; with k=known every "
            f"one of the {rows} prototypes is live"
        )
    if num_active is None:
        active, source = rows, "all rows (the checkpoint does not record the active count)"
    else:
        num_known = int(model.problem.num_known)
        if not num_known <= num_active <= rows:
            raise ValueError(
                f"--num-active={num_active} must lie in [{num_known}, {rows}] "
                f"(known classes .. prototypes in the checkpoint)"
            )
        active, source = int(num_active), "user (--num-active)"
    full = dict(mapped)
    for key in OURS_NOT_IN_REFERENCE:
        full[key] = ours[key]
    model.load_state_dict(full, strict=True)
    model.head.set_active(active)
    return {
        "format": "cal_reference",
        "mapped_keys": len(mapped),
        "ignored_keys": ignored,
        "num_prototypes": rows,
        "num_active": active,
        "num_active_source": source,
    }


# ----------------------------------------------------------------------------- evaluation


def compose_config(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@torch.no_grad()
def predict(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of `model.predict_logits` and labels over a loader, model in eval mode."""
    model.eval()
    outputs, targets = [], []
    for batch in loader:
        outputs.append(model.predict_logits(batch["image"]).float().cpu())
        targets.append(batch["y"].cpu())
    return torch.cat(outputs), torch.cat(targets)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    keep = ("metrics", "num_clusters", "k_estimated", "per_class_acc", "confusion")
    return {k: evaluation[k] for k in keep if k in evaluation}


def evaluate_checkpoint(
    cfg: DictConfig, ckpt_path: str | Path, num_active: int | None = None
) -> dict[str, Any]:
    """Build data and model from `cfg`, load the checkpoint, evaluate the test split."""
    from owdfa_bench.records import config_hash, git_commit, package_versions
    from owdfa_bench.runner import build_datamodule, build_method, device_name, make_problem

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt_path}: no such file")
    started = time.perf_counter()
    with open_dict(cfg):
        cfg.data.backbone.pretrained = False  # the checkpoint brings the weights
    from owdfa_bench.data.datamodule import build_splits

    splits = build_splits(cfg)
    problem = make_problem(cfg, splits, int(cfg.trainer.max_epochs or cfg.method.epochs))
    model = build_method(cfg, problem)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = extract_state_dict(checkpoint)
    reference = is_cal_reference_state_dict(state)
    if reference:
        if cfg.method.name != "cal":
            raise ValueError(
                f"{ckpt_path.name} is an official CAL checkpoint: use method=cal "
                f"(got method={cfg.method.name})"
            )
        report = load_cal_reference_state_dict(model, state, num_active)
    else:
        if num_active is not None:
            raise ValueError(
                "--num-active is only for official unknown-K CAL checkpoints; "
                "the harness's checkpoints store their active prototype count"
            )
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{ckpt_path.name} does not match method={cfg.method.name} k={cfg.k.name}: "
                f"missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}"
            )
        report = {"format": "owdfa_bench", "mapped_keys": len(state)}

    datamodule = build_datamodule(cfg, splits, model)
    head = getattr(model, "head", None)
    rows = head.weight.shape[0] if head is not None and hasattr(head, "set_active") else None
    active = head.active if rows is not None else None
    if rows is not None and active < rows:
        # one pass with every row live: the first `active` columns are our logits (bias-free
        # linear head), all columns are what the reference's eval script scores
        head.set_active(rows)
        outputs, targets = predict(model, datamodule.eval_loader("test"))
        reference_all = model.evaluate_outputs(outputs, targets)
        reference_all["k_estimated"] = rows
        reference_all["metrics"]["k_estimated"] = rows
        head.set_active(active)
        ours = model.evaluate_outputs(outputs[:, :active], targets)
    else:
        outputs, targets = predict(model, datamodule.eval_loader("test"))
        ours, reference_all = model.evaluate_outputs(outputs, targets), None

    record: dict[str, Any] = {
        "kind": "evaluate",
        "status": "complete",
        "method": str(cfg.method.name),
        "protocol": str(cfg.protocol.name),
        "k": str(cfg.k.name),
        "data": str(cfg.data.name),
        "synthetic": bool(cfg.data.get("synthetic", False)),
        "split_seed": int(cfg.data.split_seed),
        "checkpoint": ckpt_path.name,
        "checkpoint_sha256": _file_sha256(ckpt_path),
        "load": report,
        "num_known": splits.num_known,
        "num_classes": splits.num_classes,
        "num_active": active,
        "num_prototypes": rows,
        **_summary(ours),
        "reference_all_rows": None if reference_all is None else _summary(reference_all),
        "classes": splits.classes,
        "counts": {"test": len(splits.test)},
        "config_hash": config_hash(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "device": device_name(cfg),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    return record


def _print_summary(record: dict[str, Any]) -> None:
    names = ("all_acc", "known_acc", "novel_acc", "all_nmi", "all_ari")
    tag = " (synthetic data)" if record["synthetic"] else ""
    print(
        f"{record['checkpoint']}: {record['method']} {record['protocol']} k={record['k']} "
        f"on {record['data']}{tag}, {record['counts']['test']} test images"
    )
    rows = [("ours", record, record.get("num_active"))]
    if record.get("reference_all_rows"):
        rows.append(
            ("reference eval (all rows)", record["reference_all_rows"], record["num_prototypes"])
        )
    for label, result, protos in rows:
        metrics = result["metrics"]
        values = "  ".join(f"{n} {100 * metrics[n]:.2f}" for n in names if n in metrics)
        extra = f"  prototypes {protos}" if protos is not None else ""
        print(f"  {label:<26} {values}  clusters {result['num_clusters']}{extra}")


def cli_evaluate(argv: list[str]) -> int:
    """`owdfa-bench evaluate --ckpt FILE [--num-active N] [--out FILE] [overrides...]`."""
    parser = argparse.ArgumentParser(
        prog="owdfa-bench evaluate",
        description="Evaluate a checkpoint (ours or an official CAL release) on the test split "
        "of the configured data and protocol. Extra arguments are Hydra overrides, "
        "e.g. data=owdfa40 data.root=DIR protocol=p1 method=cal k=unknown.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint file (.ckpt)")
    parser.add_argument(
        "--num-active",
        type=int,
        default=None,
        help="live prototypes of an official unknown-K CAL checkpoint (its "
        "training log's last DPP count); default: all rows, as the "
        "reference's eval script",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where to write the JSON record (default: <run_dir>/evaluate-<checkpoint name>.json)",
    )
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {bad}; Hydra overrides look like key=value")
    from owdfa_bench.records import write_json_atomic

    try:
        cfg = compose_config(overrides)
        record = evaluate_checkpoint(cfg, args.ckpt, args.num_active)
    except (FileNotFoundError, ValueError) as err:
        print(f"owdfa-bench evaluate: {err}", file=sys.stderr)
        return 2
    out = (
        Path(args.out)
        if args.out
        else Path(str(cfg.run_dir)) / (f"evaluate-{Path(args.ckpt).stem}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    _print_summary(record)
    print(f"  record: {out}")
    return 0
