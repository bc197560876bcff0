"""`owdfa-bench evaluate`: score a checkpoint on a protocol's test split with our metrics.

    owdfa-bench evaluate RUN_FOLDER [overrides...]
    owdfa-bench evaluate --ckpt FILE [--num-active N] [--out FILE] [overrides...]
    e.g. owdfa-bench evaluate outputs/single/cal/p1/k-known/seed-2025 trainer=cpu
         owdfa-bench evaluate --ckpt wok_protocol1_seed2025.ckpt --num-active 58 \
             data=owdfa40 data.root=/data/OWDFA40 protocol=p1 method=cal k=unknown

A run of this harness is evaluated with its own config: given its folder, or its checkpoint
`<run>/checkpoints/<file>`, the config is the run's `config.yaml` (`config.attempt.yaml` while
the checkpoint belongs to an attempt beside a complete record, `compose_run_config`), the
overrides go on top (`trainer=cpu`, `data.root=DIR` when the data moved), and the record is
written into the run folder, `<run>/evaluate-<checkpoint name>.json`. A checkpoint elsewhere
(an official release) is evaluated with the project config and the overrides, as a run would be
composed, and its record goes to that config's `run_dir`.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from owdfa_bench import config
from owdfa_bench.checkpoints import RESUME_KEY, read_checkpoint, state_dict_differences
from owdfa_bench.config import check_config, compose_config
from owdfa_bench.errors import (
    CheckpointError,
    ConfigValueError,
    RunFolderError,
    as_user_error,
    is_user_error,
    one_line,
    report_user_error,
)
from owdfa_bench.records import ATTEMPT_CONFIG_FILE, ATTEMPT_FILE, CONFIG_FILE

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("metrics", "num_clusters", "k_estimated", "per_class_acc", "confusion")
# What a run is: a group override of these must name the run's own option (and changes nothing)
CELL_GROUPS = ("data", "protocol", "method", "k")
RUN_CONFIG_NAME = "evaluated_run"  # the ConfigStore name of the run's config while composing


def run_folder_of(ckpt_path: Path) -> Path | None:
    """The run folder a checkpoint `<run>/checkpoints/<file>` belongs to, when that folder
    holds a run's config; None for a checkpoint elsewhere (an official release)."""
    from owdfa_bench.runner import CHECKPOINT

    folder = Path(ckpt_path).resolve().parent
    if folder.name != CHECKPOINT.parent.name:
        return None
    run_dir = folder.parent
    has_config = any((run_dir / name).is_file() for name in (CONFIG_FILE, ATTEMPT_CONFIG_FILE))
    return run_dir if has_config else None


def run_config_file(run_dir: Path) -> Path:
    """The config of a run folder's checkpoint: `config.attempt.yaml` while an attempt's record
    (`results.attempt.json`) stands beside a complete one (the checkpoint is the attempt's),
    else `config.yaml`."""
    attempt = run_dir / ATTEMPT_CONFIG_FILE
    if (run_dir / ATTEMPT_FILE).is_file() and attempt.is_file():
        return attempt
    return run_dir / CONFIG_FILE


def data_schema_of(run: dict[str, Any]) -> str | None:
    """The ConfigStore schema of a run's data source (`<source>_schema`), from its `_target_`."""
    target = (run.get("data") or {}).get("_target_")
    for name, source in config.data_source_schemas().items():
        if f"{source.__module__}.{source.__qualname__}" == target:
            return f"{name}_schema"
    return None


def split_group_choices(
    overrides: Sequence[str], run: dict[str, Any]
) -> tuple[dict[str, str], list[str]]:
    """({group: option} of the overrides that choose a config group, the other overrides).

    A choice of a group that makes the cell (`CELL_GROUPS`) is left out when it names the run's
    own option (a repeated training override) and refused otherwise: the evaluation would not
    be of the run. Raises ConfigValueError for a sweep (`a,b`) and Hydra's error for an
    override that does not parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    from owdfa_bench.resources import conf_dir

    choices, keys = {}, []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        group = override.key_or_group
        if override.is_sweep_override():
            raise ConfigValueError(f"{override.input_line}: evaluate takes one value per key")
        value = override.value()
        is_choice = (
            override.type is OverrideType.CHANGE
            and override.package is None
            and isinstance(value, str)
            and group in run
            and (conf_dir() / group).is_dir()
        )
        if not is_choice:
            keys.append(override.input_line)
        elif group not in CELL_GROUPS:
            choices[group] = value
        elif value != run[group].get("name"):
            raise ConfigValueError(
                f"{override.input_line}: the run is {group}={run[group].get('name')} (its config); "
                "a run's data, protocol, method and k are its own: leave the override out, or "
                "override keys (e.g. data.root=DIR)"
            )
    return choices, keys


def compose_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The config the run in `run_dir` trained with (`run_config_file`), composed by Hydra
    against the project's schemas, with `overrides` on top: a group choice (`trainer=cpu`)
    replaces the run's group by that option of the config tree, a key (`data.root=DIR`) sets
    the key. `run_dir` in it is the folder as found now (the run may have moved).

    Raises RunFolderError in one line for a folder without a config, or a config that no
    longer composes (keys this version does not know) with these overrides.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such folder; pass a run folder or --ckpt FILE")
    path = run_config_file(run_dir)
    if not path.is_file():
        raise RunFolderError(
            f"{run_dir} has no {CONFIG_FILE}: pass a run folder "
            "(<sweep>/<method>/<protocol>/k-<k>/seed-<seed>), or --ckpt FILE with the overrides "
            "of the run that wrote it"
        )
    import yaml

    with as_user_error(RunFolderError, str(path), (ValueError, OSError, yaml.YAMLError)):
        run = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(run, dict):
        raise RunFolderError(f"{path}: not a run's config (a YAML mapping of the run's keys)")
    choices, keys = split_group_choices(overrides, run)
    # the schemas first, then the run's values, then the chosen groups in place of the run's
    schemas = {"trainer": "schema", "k": "schema", "data": data_schema_of(run)}
    groups = {group: option for group, option in schemas.items() if option} | choices
    for group in choices:
        run.pop(group)
    defaults = ["run_schema", *({group: option} for group, option in groups.items()), "_self_"]
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=RUN_CONFIG_NAME, node={"defaults": defaults, **run})
    try:
        cfg = config.compose_config(keys, config_name=RUN_CONFIG_NAME)
    except CompactHydraException as err:
        raise RunFolderError(f"{path}: {one_line(err)}") from err
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


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


def checkpoint_of_run(run_dir: Path) -> Path:
    """`<run>/checkpoints/last.ckpt` of a run folder given on the command line."""
    from owdfa_bench.runner import CHECKPOINT

    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise RunFolderError(
            f"{run_dir} has no {CHECKPOINT.as_posix()}: the run wrote no checkpoint yet (its "
            "results.json says how it ended)"
        )
    return ckpt


def split_arguments(extra: list[str]) -> tuple[list[str], list[str]]:
    """(run folders, Hydra overrides) of the positional arguments: an override has `=` or
    starts with `~` (a deletion)."""
    folders = [a for a in extra if "=" not in a and not a.startswith("~")]
    return folders, [a for a in extra if a not in folders]


def cli_evaluate(argv: list[str]) -> int:
    """`owdfa-bench evaluate RUN_FOLDER | --ckpt FILE [--num-active N] [--out FILE]
    [overrides...]`."""
    parser = argparse.ArgumentParser(
        prog="owdfa-bench evaluate",
        usage="%(prog)s (RUN_FOLDER | --ckpt FILE) [--num-active N] [--out FILE] [overrides ...]",
        description="Evaluate a checkpoint on the test split. A run of this harness (its folder, "
        "or --ckpt RUN_FOLDER/checkpoints/last.ckpt) is evaluated with its own config.yaml; "
        "overrides go on top, e.g. trainer=cpu data.root=DIR. Any other checkpoint (an "
        "official CAL release) is evaluated with the project config and the overrides, e.g. "
        "data=owdfa40 data.root=DIR protocol=p1 method=cal k=unknown.",
    )
    parser.add_argument("--ckpt", default=None, help="checkpoint file (.ckpt)")
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
        help="where to write the JSON record (default: <run folder>/evaluate-<checkpoint "
        "name>.json; for a checkpoint outside a run folder, the config's run_dir)",
    )
    args, extra = parser.parse_known_args(argv)
    bad = [o for o in extra if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {bad}; Hydra overrides look like key=value")
    folders, overrides = split_arguments(extra)
    if len(folders) > 1 or (folders and args.ckpt) or not (folders or args.ckpt):
        parser.error(f"give one run folder or --ckpt FILE (got {folders or 'neither'})")
    from owdfa_bench.records import write_json_atomic

    try:
        ckpt = Path(args.ckpt) if args.ckpt else None
        run_dir = Path(folders[0]) if folders else run_folder_of(ckpt)
        if run_dir is not None:
            cfg = compose_run_config(run_dir, overrides)
            ckpt = ckpt or checkpoint_of_run(run_dir)
        else:
            cfg = compose_config(overrides)
        record = evaluate_checkpoint(cfg, ckpt, args.num_active)
    except Exception as err:
        if not is_user_error(err):
            raise
        return report_user_error(err, "owdfa-bench evaluate")
    folder = run_dir if run_dir is not None else Path(str(cfg.run_dir))
    out = Path(args.out) if args.out else folder / f"evaluate-{ckpt.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    _print_summary(record)
    if run_dir is not None:
        given = f" with {' '.join(overrides)}" if overrides else ""
        print(f"  config: {run_config_file(run_dir)}{given}")
    print(f"  record: {out}")
    return 0
