"""`owdfa-bench evaluate`: score a checkpoint on a protocol's test split with our metrics.

    owdfa-bench evaluate --ckpt FILE [--num-active N] [--out FILE] [overrides...]
    e.g. owdfa-bench evaluate --ckpt wok_protocol1_seed2025.ckpt --num-active 58 \
             data=owdfa40 data.root=/data/OWDFA40 protocol=p1 method=cal k=unknown

The data, the model and the Trainer come from the same config tree and functions as training
(`owdfa_bench.runner`), and the test split is scored by `trainer.validate` through the method's
own evaluation, so precision, device and channels-last are those of `trainer=...`. Two formats
are accepted: ours (a Lightning checkpoint written by the harness, `<run>/checkpoints/last.ckpt`,
whose state dict matches the model `method=... k=...` builds), and the layout of a method's
official code release when the method can read it (`OWDFAMethod.load_reference_checkpoint`;
CAL's, methods/cal.py). For a prototype head with fewer live rows than rows (an unknown-K
checkpoint that does not record its count, given `--num-active`), the record also holds, under
`reference_all_rows`, the evaluation with every row live (what CAL's own eval script scores).

Checkpoints are read with `torch.load(..., weights_only=True)`: no code in the file runs. An
unreadable file, one that cannot be read that way, or one of another model ends in one line
(exit status 1) saying which keys differ and what the checkpoint was written by. The backbone
is built without downloading ImageNet weights, since the checkpoint replaces them.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from owdfa_bench.checkpoints import RESUME_KEY, read_checkpoint, state_dict_differences
from owdfa_bench.config import check_config, compose_config
from owdfa_bench.errors import CheckpointError, as_user_error, is_user_error, report_user_error

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("metrics", "num_clusters", "k_estimated", "per_class_acc", "confusion")


def _summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {k: evaluation[k] for k in SUMMARY_KEYS if k in evaluation}


def load_checkpoint(model, ckpt_path: Path, num_active: int | None) -> dict[str, Any]:
    """Load `ckpt_path` into `model` (the method's reference layout, else ours); a report.

    Raises CheckpointError in one line for a file that is unreadable, unsafe (not loadable
    weights-only) or of another model, naming the keys that differ and what it looks like.
    """
    from owdfa_bench.method import extract_state_dict

    checkpoint = read_checkpoint(ckpt_path, "--ckpt")
    with as_user_error(CheckpointError, f"--ckpt {ckpt_path}", (ValueError,)):
        state = extract_state_dict(checkpoint)
        report = model.load_reference_checkpoint(state, num_active)
    if report is not None:
        return report
    if num_active is not None:
        raise CheckpointError(
            "--num-active is for an official checkpoint that does not record its active "
            "prototypes; the harness's checkpoints store their count: leave it out"
        )
    differences = state_dict_differences(state, model.state_dict())
    if differences:
        raise CheckpointError(
            f"--ckpt {ckpt_path} does not match the model method={model_name(model)} builds: "
            f"{differences}; {what_it_looks_like(checkpoint)}"
        )
    model.load_state_dict(state)
    return {"format": "owdfa_bench", "mapped_keys": len(state)}


def model_name(model) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def what_it_looks_like(checkpoint: dict[str, Any]) -> str:
    """What a checkpoint says it is (runs of this harness record method, k and config hash)."""
    run = (checkpoint.get(RESUME_KEY) or {}).get("run") or {}
    if run.get("method"):
        return (
            f"it was written by a run of method={run['method']} k={run['k']} (config "
            f"{run.get('config_hash')}): evaluate it with those settings"
        )
    return (
        "it records no run (not written by this version of owdfa-bench): check method=, k= "
        "and data.backbone.name against the run that wrote it"
    )


def evaluate_checkpoint(
    cfg: DictConfig, ckpt_path: str | Path, num_active: int | None = None
) -> dict[str, Any]:
    """Build data, model and Trainer from `cfg`, load the checkpoint, validate on the test
    split; returns the run record (kind "evaluate")."""
    from owdfa_bench.data.datamodule import build_splits
    from owdfa_bench.records import RunRecord, config_hash
    from owdfa_bench.runner import (
        Timing,
        build_datamodule,
        build_method,
        build_trainer,
        device_name,
        make_problem,
        max_epochs_of,
        set_threads,
    )

    check_config(cfg)
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise CheckpointError(f"--ckpt {ckpt_path}: no such file")
    started = time.perf_counter()
    with open_dict(cfg):
        cfg.data.backbone.pretrained = False  # the checkpoint brings the weights
    set_threads(cfg.trainer.threads)
    splits = build_splits(cfg.data, cfg.protocol)
    model = build_method(cfg, make_problem(cfg, splits, max_epochs_of(cfg)))
    model.channels_last = bool(cfg.trainer.channels_last)
    report = load_checkpoint(model, ckpt_path, num_active)

    head = getattr(model, "head", None)
    rows = head.weight.shape[0] if head is not None and hasattr(head, "set_active") else None
    active = head.active if rows is not None else None
    if rows is not None and active < rows:
        # validate with every row live: the first `active` columns are our logits (bias-free
        # linear head), all columns what the reference's eval script scores
        head.set_active(rows)
    timing = Timing()
    trainer = build_trainer(
        cfg.trainer, Path(str(cfg.run_dir)), 1, callbacks=[timing], limit_val_batches=1.0
    )
    datamodule = build_datamodule(cfg, splits, model, diagnostics=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    evaluation, reference_all = model.eval_history[-1], None
    if rows is not None and active < rows:
        reference_all = {**evaluation, "k_estimated": rows}
        reference_all["metrics"] = {**evaluation["metrics"], "k_estimated": rows}
        head.set_active(active)
        outputs, targets = model.gather_eval(0)
        evaluation = model.evaluate_outputs(outputs[:, :active], targets)

    from owdfa_bench.cache import file_digest

    record = RunRecord.from_config(
        cfg,
        config_hash(cfg),
        device_name(cfg),
        kind="evaluate",
        status="complete",
        checkpoint=ckpt_path.name,
        checkpoint_sha256=file_digest(ckpt_path),
        load=report,
        num_known=splits.num_known,
        num_classes=splits.num_classes,
        num_active=active,
        num_prototypes=rows,
        classes=splits.classes,
        counts={"test": len(splits.test)},
        data_warnings=splits.warnings,
        unreadable=splits.unreadable,
        data_digest=splits.data_digest,
        eval_images_per_s=timing.rates()[1],
        **_summary(evaluation),
    )
    record.reference_all_rows = None if reference_all is None else _summary(reference_all)
    record.wall_s = round(time.perf_counter() - started, 2)
    return record.to_dict()


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
    except Exception as err:
        if not is_user_error(err):
            raise
        return report_user_error(err, "owdfa-bench evaluate")
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
