"""Every key of a composed config is read by something, or the run is refused before it starts.

Hydra adds any key given with `+` (`+method.lr=0.5`), and suggests that form when a key does
not exist; a key nothing reads would leave the run as it is while its record says otherwise.
`check_every_key_read` (called by `owdfa_bench.config.check_config`) refuses the first such key
in one line naming the nearest key that is read: one with the same last name, nearest in the
tree, else difflib's closest.

What reads a node's keys:
  a structured config (the dataclasses of owdfa_bench/config.py and data/sources.py): its
    fields; where its `_target_` is another class (the Trainer), that class's arguments too,
    less those the runner sets itself (`SET_BY_RUNNER`); one with `EXTRA_KEYS_READER` passes
    every other key on (data.backbone: timm.create_model);
  `method`: `METHOD_KEYS`; each `method.recipes.<name>` is a partial method config, checked as
    one; an optim block (`OPTIM_BLOCKS`): the keys conf/optimizers.yaml reads (`unset`);
    `method.model`: the arguments of the class its `_target_` names, less `RUNNER_ARGUMENTS`;
  `protocol`, `logger`, `method.display`: `GROUP_KEYS`;
  any key an interpolation of the config refers to (`${logger.project}`) is read.
Other nodes (trainer.callbacks, logger.loggers) are passed on whole.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from owdfa_bench.errors import ConfigValueError, one_line

# The keys of a method config the harness reads, and who reads them; every other setting of a
# method is an argument of its class, under `model`. A new shared key is one line here.
METHOD_KEYS = {
    "name": "the run folder, the record and the report",
    "display": "the report tables (owdfa_bench/report/naming.py)",
    "epochs": "the Trainer's max_epochs (trainer.max_epochs null) and epoch_share",
    "batch_size": "the datamodule's loaders",
    "sampler": "the datamodule's train sampler",
    "optim": "owdfa_bench.method.build_optimizer, through conf/optimizers.yaml",
    "model": "runner.build_method: the method's class (_target_) and its arguments",
    "recipe": "runner.apply_recipe: which block of recipes is merged over the method",
    "recipes": "runner.apply_recipe: partial method configs",
    "reference_optim": "a reference's own optim block: method.optim='${method.reference_optim}'",
}
OPTIM_BLOCKS = ("method.optim", "method.reference_optim")
# runner.build_method passes these to the method's class; a config cannot set them
RUNNER_ARGUMENTS = ("problem", "optim", "backbone")
GROUP_KEYS = {
    "protocol": ("name", "benchmark", "protocol_key"),  # data sources; protocol_key: owdfa23
    "logger": ("name", "loggers"),  # loggers: built by runner.build_loggers
    "method.display": ("name", "order"),  # owdfa_bench/report/naming.py
}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${a.b}, also inside a resolver's call


@dataclasses.dataclass(frozen=True)
class Readers:
    """The keys read below one node (None: every key), and why another is not, for a message."""

    keys: frozenset[str] | None
    refusal: str = ""


def check_every_key_read(cfg: DictConfig) -> None:
    """Refuse the first key of `cfg` nothing reads, in one line naming the nearest read key."""
    unread, read = survey_keys(cfg)
    if unread:
        key, value, refusal = unread[0]
        raise ConfigValueError(unread_message(key, value, refusal, read))


def unread_message(key: str, value: Any, refusal: str, read: set[str]) -> str:
    # `+data.budget.known=3` adds the node data.budget: name the leaf the user typed
    while is_node(value) and len(value) > 0:
        leaf, value = next(iter(value.items_ex(resolve=False)))
        key = f"{key}.{leaf}"
    shown = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
    nearest = nearest_keys(key, read)
    if nearest:
        fix = f"did you mean {' or '.join(nearest)}? e.g. {nearest[0]}={shown}"
    else:
        parent = key.rpartition(".")[0]
        siblings = sorted(k.rpartition(".")[2] for k in read if k.rpartition(".")[0] == parent)
        fix = "remove it" + (f"; the keys read there: {', '.join(siblings)}" if siblings else "")
    return f"{key}={shown!r}: nothing reads this key ({refusal}); {fix}"


def nearest_keys(key: str, read: set[str]) -> list[str]:
    """The read keys a user most likely meant by `key`: those with its last name, sharing the
    longest start with it and shortest (ties all named), else difflib's closest whose part
    after the shared start is close too (`data.foo` is not `data.root`); never a node above
    `key`."""
    candidates = sorted(k for k in read if not key.startswith(f"{k}.") and k != key)
    leaf = key.rpartition(".")[2]
    same_leaf = [k for k in candidates if k.rpartition(".")[2] == leaf]
    if not same_leaf:
        close = difflib.get_close_matches(key, candidates, n=5)
        return [k for k in close if tails_close(k, key)][:1]
    rank = {k: (-shared_depth(k, key), len(k)) for k in same_leaf}
    best = min(rank.values())
    return [k for k in same_leaf if rank[k] == best]


def tails_close(a: str, b: str) -> bool:
    """Whether what follows the dotted names `a` and `b` share is alike (difflib ratio)."""
    depth = shared_depth(a, b)
    tail = lambda k: ".".join(k.split(".")[depth:])  # noqa: E731
    return difflib.SequenceMatcher(None, tail(a), tail(b)).ratio() >= 0.6


def shared_depth(a: str, b: str) -> int:
    """How many leading dotted names `a` and `b` share."""
    depth = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        depth += 1
    return depth


def survey_keys(cfg: DictConfig) -> tuple[list[tuple[str, Any, str]], set[str]]:
    """(key, value, refusal) of every key nothing reads, in config order; and every key that is
    read, present or not (the arguments a class takes, the optimiser keys)."""
    referenced = interpolated_keys(OmegaConf.to_container(cfg, resolve=False))
    unread: list[tuple[str, Any, str]] = []
    read: set[str] = set()
    for key, value, readers in walk(cfg, "", cfg):
        if readers.keys is not None:
            parent = key.rpartition(".")[0]
            read.update(f"{parent}.{k}" if parent else k for k in readers.keys)
        if readers.keys is None or key.rpartition(".")[2] in readers.keys or key in referenced:
            read.add(key)
        else:
            unread.append((key, value, readers.refusal))
    return unread, read


def walk(node: DictConfig, path: str, root: DictConfig) -> Iterator[tuple[str, Any, Readers]]:
    """(key, value, the readers of its node) of every key below `node`, depth first; a key
    nothing reads is not entered."""
    readers = readers_of(node, path, root)
    for key, value in node.items_ex(resolve=False):
        full = f"{path}.{key}" if path else str(key)
        yield full, value, readers
        if is_node(value) and (readers.keys is None or key in readers.keys):
            yield from walk(value, full, root)


def is_node(value: Any) -> bool:
    """A config node with keys (a structured node set to null is a DictConfig of None)."""
    return isinstance(value, DictConfig) and not value._is_none()


def readers_of(node: DictConfig, path: str, root: DictConfig) -> Readers:
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        return structured_readers(schema, node, path)
    path = re.sub(r"^method\.recipes\.[^.]+", "method", path)  # a recipe is a partial method
    if path == "method":
        return Readers(frozenset(METHOD_KEYS), "not a key the harness reads from a method config")
    if path in OPTIM_BLOCKS:
        return Readers(frozenset(optimizer_keys()), "conf/optimizers.yaml reads no such key")
    if path == "method.model":
        target = str(root.method.model.get("_target_"))
        arguments = class_arguments(target, "method.model._target_")
        if arguments is None:
            return Readers(None)
        keys = arguments - set(RUNNER_ARGUMENTS) | {"_target_"}
        return Readers(keys, f"{target} takes no such argument")
    if path in GROUP_KEYS:
        return Readers(frozenset(GROUP_KEYS[path]), f"not a {path} key the harness reads")
    return Readers(None)


def structured_readers(schema: type, node: DictConfig, path: str) -> Readers:
    """A structured config's fields; plus its `_target_` class's arguments not set by the
    runner, or every key where its class says who reads the others (`EXTRA_KEYS_READER`)."""
    fields = frozenset(f.name for f in dataclasses.fields(schema))
    if getattr(schema, "EXTRA_KEYS_READER", None):
        return Readers(None)
    target = node.get("_target_") if "_target_" in fields else None
    if not target or target == f"{schema.__module__}.{schema.__qualname__}":
        return Readers(fields, f"not a key of {schema.__name__}")
    arguments = class_arguments(str(target), f"{path}._target_" if path else "_target_")
    if arguments is None:
        return Readers(None)
    passed = arguments - set(getattr(schema, "SET_BY_RUNNER", ()))
    return Readers(fields | passed, f"neither a key of {schema.__name__} nor one {target} takes")


def class_arguments(target: str, key: str) -> frozenset[str] | None:
    """The keyword arguments of the class (or function) `target` (the value of `key`) names;
    None (any) when it takes **kwargs."""
    import importlib

    module, _, name = target.rpartition(".")
    try:  # not hydra.utils.get_object: it logs the error on the console as well
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:  # ValueError: no module at all
        raise ConfigValueError(
            f"{key}={target!r}: cannot be imported ({one_line(err)}); name an importable class"
        ) from err
    parameters = inspect.signature(obj).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def optimizer_keys() -> list[str]:
    """Every key an entry of conf/optimizers.yaml reads from an optim block (its `unset`)."""
    from owdfa_bench.method import optimizer_registry

    return list(optimizer_registry().unset)


def interpolated_keys(container: Any) -> set[str]:
    """The keys the interpolations `${a.b}` in the strings of `container` refer to."""
    if isinstance(container, dict):
        return set().union(*(interpolated_keys(v) for v in container.values()))
    if isinstance(container, list):
        return set().union(*(interpolated_keys(v) for v in container))
    return set(INTERPOLATION.findall(container)) if isinstance(container, str) else set()
