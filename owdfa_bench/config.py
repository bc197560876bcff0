"""Structured configs: the schema of the top-level keys and of the `data`, `trainer` and `k`
groups, registered in Hydra's ConfigStore, and the one check a composed config passes.

Each YAML of those groups names its schema first in its defaults list (`conf/config.yaml`:
`run_schema`; `conf/trainer/cpu.yaml`: `schema`; `conf/k/*.yaml`: `schema`; `conf/data/<x>.yaml`:
`<x>_schema`), so OmegaConf checks every value's type when the config is composed and a key
that does not exist fails there: `seed=abc` is refused naming `seed`. Ranges a type cannot
express are checked by `__post_init__`, which runs when `check_config` turns the composed
config into these dataclasses, before the runner writes or builds anything; each failure is one
line naming the key, the value and what to do. No field has a default: the YAML is the one
source of values.

The shared keys of a method config (`method.epochs`, `method.batch_size`, `method.sampler`)
are checked by `check_method`; the rest of a method config belongs to its class. A key nothing
reads (one added with `+`) is refused by `owdfa_bench.config_keys`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from owdfa_bench.checks import (
    ConfigValueError,
    batch_limit,
    fail,
    integer_at_least,
    is_int,
    number_at_least,
    one_of,
)

SELECTIONS = ("last", "best_on_test")
K_MODES = ("known", "unknown")
SAMPLERS = ("weighted", "alternating")
MAX_SEED = 2**32 - 1  # numpy and Lightning seeds are unsigned 32-bit
# key, lowest, why, example
SHARED_METHOD_INTEGERS = (
    ("epochs", 1, "", 50),
    # a batch of one row fails in BatchNorm, which every method's backbone trains
    ("batch_size", 2, ": BatchNorm trains on 2 rows a batch at least", 128),
)
# the numbers of an optim block (conf/optimizers.yaml): key -> (lowest, strictly above it, example)
OPTIM_NUMBERS = {
    "lr": (0.0, True, 2.0e-4),
    "weight_decay": (0.0, False, 1.0e-3),
    "momentum": (0.0, False, 0.9),
    "gamma": (0.0, True, 0.1),
    "eta_min_ratio": (0.0, False, 1.0e-3),
}


@dataclass(kw_only=True)
class RunConfig:
    """The top level of `conf/config.yaml`: one run is one cell of the groups below."""

    seed: int  # trains; data.split_seed builds the dataset
    selection: str
    force: bool
    output_root: str
    sweep_name: str
    run_dir: str
    data: Any
    protocol: Any
    method: Any
    k: Any
    trainer: Any
    logger: Any

    def __post_init__(self) -> None:
        integer_at_least("seed", self.seed, 0, 2025)
        if self.seed > MAX_SEED:
            raise ConfigValueError(f"seed={self.seed}: must be at most {MAX_SEED}; e.g. seed=2025")
        one_of("selection", self.selection, SELECTIONS)


@dataclass(kw_only=True)
class TrainerConfig:
    """`conf/trainer/*.yaml`: the Lightning Trainer (`_target_`, built by the runner with
    `instantiate`) and the runner's own settings of how it trains."""

    _target_: str
    accelerator: str
    devices: Any  # a count, -1 (all), "auto" or a list of ids: Lightning checks it
    num_nodes: int
    strategy: str
    precision: str
    deterministic: Any  # true, false or "warn"
    max_epochs: int | None  # null: the method's epochs
    limit_train_batches: Any
    limit_val_batches: Any
    log_every_n_steps: int
    callbacks: dict[str, Any]  # built with instantiate; null entries are left out
    # the runner's, not the Trainer's:
    channels_last: bool
    num_workers: int
    threads: int | None  # torch threads; null or 0: all cores
    pin_memory: bool
    progress_bar: bool

    # keys the runner reads itself; every other key is an argument of the Trainer
    RUNNER_KEYS: ClassVar[tuple[str, ...]] = (
        "max_epochs",
        "callbacks",
        "channels_last",
        "num_workers",
        "threads",
        "pin_memory",
        "progress_bar",
    )
    # Trainer arguments runner.build_trainer sets itself: a `+trainer.<key>` of these would be
    # overridden; any other Trainer argument added with `+` is passed on (owdfa_bench.config_keys)
    SET_BY_RUNNER: ClassVar[tuple[str, ...]] = (
        "max_epochs",
        "logger",
        "callbacks",
        "enable_progress_bar",
        "default_root_dir",
        "num_sanity_val_steps",
        "enable_model_summary",
        "use_distributed_sampler",
        "plugins",
    )

    def __post_init__(self) -> None:
        integer_at_least("trainer.num_nodes", self.num_nodes, 1, 1)
        integer_at_least("trainer.max_epochs", self.max_epochs, 1, 2, optional=True)
        batch_limit("trainer.limit_train_batches", self.limit_train_batches, "nothing would train")
        # every epoch's evaluation is what the record reports
        batch_limit(
            "trainer.limit_val_batches", self.limit_val_batches, "nothing would be evaluated"
        )
        integer_at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1, 10)
        integer_at_least("trainer.num_workers", self.num_workers, 0, 0)
        integer_at_least("trainer.threads", self.threads, 0, 1, optional=True)
        one_of("trainer.deterministic", self.deterministic, (True, False, "warn"))


@dataclass(kw_only=True)
class KConfig:
    """`conf/k/*.yaml`: whether a method may use the true number of classes."""

    name: str
    estimate: int | None  # a total-K estimate under k=unknown (>= known classes: Problem checks)

    def __post_init__(self) -> None:
        one_of("k.name", self.name, K_MODES)
        integer_at_least("k.estimate", self.estimate, 1, 41, optional=True)
        if self.name == "known" and self.estimate is not None:  # heads use the true K then
            fail("k.estimate", self.estimate, "is read only under k=unknown", "null")


def check_k_estimate(estimate: int | None, num_known: int, num_unlabelled: int) -> None:
    """`k.estimate`, a total number of classes, against the split data: at least the known
    classes, at most one novel class more per unlabelled training row (a class no row is of
    cannot be found; GCD's SS-k-means has the same cap, and the heads and the evaluation's
    square matrix are sized by it)."""
    if estimate is None:
        return
    if estimate < num_known:
        fail("k.estimate", estimate, f"must be at least {num_known}, the known classes", "null")
    ceiling = num_known + num_unlabelled
    if estimate > ceiling:
        need = (
            f"must be at most {ceiling}: the {num_known} known classes and one novel class per "
            f"unlabelled training row ({num_unlabelled}), as a class no row is of cannot be found"
        )
        fail("k.estimate", estimate, need, "null")


def epoch_share(value: int, of: int, epochs: int) -> int:
    """`${epoch_share:V,OF,${method.epochs}}`: epoch V of a reference run of OF epochs, placed
    at the same share of this run (rounded half up). A method config writes its epoch-valued
    hyper-parameters this way (e.g. CAL's pseudo-label start, epoch 5 of 50), so they are the
    reference's at the reference length and keep their place in a shorter or longer schedule.
    """
    for name, v in (("value", value), ("of", of)):
        if not is_int(v) or v < (1 if name == "of" else 0):
            raise ConfigValueError(f"epoch_share {name}={v!r}: must be a whole number of epochs")
    if not is_int(epochs) or epochs < 1:
        return 0  # the value checks then name the key: method.epochs must be >= 1
    return int(value * epochs / of + 0.5)


def register_configs() -> None:
    """Put the schemas where the YAML defaults lists name them, and the `epoch_share` resolver
    (both idempotent)."""
    if not OmegaConf.has_resolver("epoch_share"):
        OmegaConf.register_new_resolver("epoch_share", epoch_share)
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="trainer", name="schema", node=TrainerConfig)
    store.store(group="k", name="schema", node=KConfig)
    for name, source in data_source_schemas().items():
        store.store(group="data", name=f"{name}_schema", node=source)


def data_source_schemas() -> dict[str, type]:
    """`<name>` -> the class `conf/data/<name>.yaml`'s `_target_` names: each data source's
    schema, `data/<name>_schema` in its YAML's defaults list. A new source is one class and one
    YAML; YAMLs that extend another (no `_target_` of their own) reuse its schema."""
    import yaml
    from hydra.utils import get_class

    from owdfa_bench.resources import conf_dir

    schemas = {}
    for path in sorted((conf_dir() / "data").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target:
            schemas[path.stem] = get_class(target)
    return schemas


register_configs()


def check_method(method: DictConfig) -> None:
    """The keys every method config shares (the runner and datamodule read them)."""
    name = method.get("name")
    for key, low, why, example in SHARED_METHOD_INTEGERS:
        value = method.get(key)
        if not is_int(value) or value < low:
            raise ConfigValueError(
                f"method.{key}={value!r}: must be an integer >= {low} (method={name}){why}; "
                f"e.g. method.{key}={example}"
            )
    one_of("method.sampler", method.get("sampler"), SAMPLERS)
    check_optim(method.optim)


def check_optim(optim: DictConfig, key: str = "method.optim") -> None:
    """An optim block names an optimiser and a scheduler of conf/optimizers.yaml, and its numbers
    are in range (its `unset` values stand in for the keys the block lacks)."""
    from owdfa_bench.method import optimizer_registry

    registry = optimizer_registry()
    values = {
        **OmegaConf.to_container(registry.unset),
        **OmegaConf.to_container(optim, resolve=True),
    }
    # build_optimizer's reading: the optimiser's name in any case, no scheduler as "none"
    chosen = {"name": str(values["name"]).lower(), "scheduler": str(values["scheduler"] or "none")}
    for name, entries in (("name", registry.optimizers), ("scheduler", registry.schedulers)):
        if chosen[name] not in entries:
            offered = sorted(entries)
            need = f"conf/optimizers.yaml offers {', '.join(offered)}"
            fail(f"{key}.{name}", values[name], need, offered[0])
    for name, (low, strict, example) in OPTIM_NUMBERS.items():
        number_at_least(f"{key}.{name}", values[name], low, example, strict=strict)
    integer_at_least(f"{key}.step_size", values["step_size"], 1, 10)


def check_config(cfg: DictConfig) -> None:
    """Every key read and every value in range, or one ConfigValueError naming the first that
    is not. Runs the schemas' `__post_init__` (types were checked at composition)."""
    from owdfa_bench.config_keys import check_every_key_read

    check_every_key_read(cfg)
    OmegaConf.to_object(cfg.trainer)  # first: other nodes interpolate it (data.pretrain.threads)
    OmegaConf.to_object(cfg)
    check_method(cfg.method)


def compose_config(
    overrides: list[str] | tuple[str, ...] = (), config_name: str = "config"
) -> DictConfig:
    """The project config (or another primary config `config_name` of the config tree or the
    ConfigStore) composed with Hydra's compose API (no run folder, no logging)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from owdfa_bench.resources import conf_dir

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
