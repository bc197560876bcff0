"""Bad values fail before anything runs, each with one line naming the key, the value and what
to do: types when the config is composed (the structured configs of owdfa_bench/config.py and
owdfa_bench/data/sources.py), ranges in `check_config`, which `run` calls first."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException

from owdfa_bench.checks import ConfigValueError
from owdfa_bench.config import check_config
from owdfa_bench.runner import run


@pytest.mark.parametrize("value", ["1.5", "abc"])
def test_a_seed_that_is_not_an_integer_fails_at_composition_naming_seed(value):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["method=lower_bound", f"seed={value}"])
    assert str(err.value) == f"Error merging override seed={value}"  # one line: key and value
    cause = str(err.value.__cause__)
    assert "could not be converted to Integer" in cause and "full_key: seed" in cause


def test_a_misspelt_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="trainer.thread"):
        compose_config(["method=lower_bound", "trainer.thread=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed=-1: must be an integer >= 0; e.g. seed=2025"),
        ("seed=4294967296", "seed=4294967296: must be at most 4294967295; e.g. seed=2025"),
        ("selection=best", "selection='best': must be one of last, best_on_test;"),
        ("method.batch_size=0", "method.batch_size=0: must be an integer >= 2 (method=cal)"),
        ("method.batch_size=1", "method.batch_size=1: must be an integer >= 2 (method=cal): Bat"),
        ("method.epochs=0", "method.epochs=0: must be an integer >= 1 (method=cal);"),
        ("method.sampler=random", "method.sampler='random': must be one of weighted,"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer >= 1 or null;"),
        ("trainer.threads=-1", "trainer.threads=-1: must be an integer >= 0 or null;"),
        ("trainer.num_workers=-2", "trainer.num_workers=-2: must be an integer >= 0;"),
        ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches=1.5: must be null (all)"),
        (
            "trainer.limit_train_batches=0",
            "trainer.limit_train_batches=0: must be null (all), a batch count >= 1 or a fraction "
            "in (0, 1] (with 0 nothing would train);",
        ),
        ("trainer.limit_val_batches=0.0", "trainer.limit_val_batches=0.0: must be null (all), a"),
        ("method.optim.lr=-1", "method.optim.lr=-1: must be a finite number > 0.0;"),
        ("method.optim.lr=0", "method.optim.lr=0: must be a finite number > 0.0;"),
        (
            "method.optim.name=nosuch",
            "method.optim.name='nosuch': conf/optimizers.yaml offers adam, adamw, sgd;",
        ),
        ("method.optim.scheduler=cos", "method.optim.scheduler='cos': conf/optimizers.yaml offe"),
        ("method.optim.weight_decay=-0.1", "method.optim.weight_decay=-0.1: must be a finite nu"),
        ("method.optim.step_size=0", "method.optim.step_size=0: must be an integer >= 1;"),
        ("k=unknown k.estimate=0", "k.estimate=0: must be an integer >= 1 or null;"),
        ("k.estimate=30", "k.estimate=30: is read only under k=unknown;"),
        ("data.image_size=-1", "data.image_size=-1: must be an integer >= 8;"),
        ("data.image_size=36", "data.image_size=36: data=synth renders a multiple of 8"),
        ("data.test_ratio=1.5", "data.test_ratio=1.5: must be a fraction in (0, 1);"),
        ("data.test_ratio=0", "data.test_ratio=0.0: must be a fraction in (0, 1): 0 leaves no te"),
        ("data.test_ratio=1", "data.test_ratio=1.0: must be a fraction in (0, 1): 1 leaves no tr"),
        ("data.labelled_fraction=-0.1", "data.labelled_fraction=-0.1: must be a fraction in"),
        ("data.labelled_fraction=0", "data.labelled_fraction=0.0: must be a fraction in (0, 1]: 0"),
        ("data.max_unreadable_fraction=2", "data.max_unreadable_fraction=2.0: must be a fraction"),
        ("data.budgets.known=0", "data.budgets.known=0: must be an integer >= 1;"),
        ("data.pretrain.batch_size=1", "data.pretrain.batch_size=1: must be an integer >= 2;"),
        ("data.pretrain.epochs=0", "data.pretrain.epochs=0: must be an integer >= 1;"),
        ("data.generator.strength=-1", "data.generator.strength=-1.0: must be a finite number"),
    ],
)
def test_a_value_out_of_range_fails_with_one_line_naming_it(override, message):
    cfg = compose_config(["method=cal", *override.split()])  # composes: the type is right
    with pytest.raises(ConfigValueError) as err:
        check_config(cfg)
    text = str(err.value)
    assert text.startswith(message), text
    assert "\n" not in text and "; e.g. " in text  # one line, ending in what to set


def test_an_optimiser_name_in_any_case_and_no_scheduler_pass():
    """As build_optimizer reads them."""
    check_config(compose_config(["method=cal", "method.optim.name=SGD"]))
    check_config(compose_config(["method=cal", "method.optim.scheduler=null"]))


def test_real_data_allows_any_image_size_from_8():
    check_config(compose_config(["method=cal", "data=owdfa40", "data.image_size=12"]))
    with pytest.raises(ConfigValueError, match="data.image_size=4: must be an integer >= 8"):
        check_config(compose_config(["method=cal", "data=owdfa40", "data.image_size=4"]))


def test_every_shipped_option_passes_the_checks():
    for group, option in [("trainer", t) for t in ("cpu", "gpu", "ddp", "smoke")] + [
        ("k", "unknown"),
        ("data", "owdfa40"),
    ]:
        check_config(compose_config(["method=cal", f"{group}={option}"]))
    check_config(compose_config(["method=cal", "data=owdfa23", "protocol=owdfa23_p1"]))


def test_run_refuses_a_bad_value_before_writing_anything(make_cfg):
    cfg = make_cfg("method=lower_bound", "method.batch_size=0")
    with pytest.raises(ConfigValueError, match="method.batch_size=0"):
        run(cfg)
    assert not Path(cfg.run_dir).exists()


def test_splits_that_leave_a_split_empty_are_refused_before_training(make_cfg):
    """A labelled fraction above 0 may still draw no row of a small set: counted once split."""
    from owdfa_bench.data.datamodule import build_splits
    from owdfa_bench.errors import DataError

    cfg = make_cfg("method=lower_bound", "data.labelled_fraction=0.01")
    with pytest.raises(DataError) as err:
        build_splits(cfg.data, cfg.protocol)
    text = str(err.value)
    assert text.startswith("the splits of data=synth protocol=p1 leave no row in the labelled ")
    assert "data.labelled_fraction=0.01 (the labelled share" in text and "\n" not in text


@pytest.mark.parametrize(
    ("estimate", "message"),
    [
        (5, "k.estimate=5: must be at least 19, the known classes; e.g. k.estimate=null"),
        (
            100000,
            "k.estimate=100000: must be at most 119: the 19 known classes and one novel class per "
            "unlabelled training row (100), as a class no row is of cannot be found; e.g. "
            "k.estimate=null",
        ),
    ],
)
def test_a_k_estimate_outside_what_the_split_data_holds_is_one_line(estimate, message):
    from owdfa_bench.config import check_k_estimate

    with pytest.raises(ConfigValueError) as err:
        check_k_estimate(estimate, num_known=19, num_unlabelled=100)
    assert str(err.value) == message
    for fits in (None, 19, 119):
        check_k_estimate(fits, num_known=19, num_unlabelled=100)


def test_a_protocol_of_another_benchmark_is_refused(make_cfg):
    from owdfa_bench.data.datamodule import build_splits

    cfg = make_cfg("method=lower_bound", "protocol=owdfa23_p1")
    with pytest.raises(ValueError, match="protocol=owdfa23_p1 is a protocol of owdfa23, but"):
        build_splits(cfg.data, cfg.protocol)


# ----------------------------------------------------------------------------- keys nothing reads
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+method.lr=0.5",
            "method.lr=0.5: nothing reads this key (not a key the harness reads from a method "
            "config); did you mean method.optim.lr? e.g. method.optim.lr=0.5",
        ),
        ("+method.foo=1", "method.foo=1: nothing reads this key (not a key the harness reads"),
        (
            "+method.model.nosuch=1",
            "method.model.nosuch=1: nothing reads this key (methods.lower_bound.LowerBound takes "
            "no such argument); remove it; the keys read there: _target_, dropout",
        ),
        ("+method.model.dropuot=0.1", "did you mean method.model.dropout? e.g."),
        ("+method.model.optim=1", "method.model.optim=1: nothing reads this key (methods."),
        ("+method.optim.momentun=0.9", "conf/optimizers.yaml reads no such key); did you mean"),
        ("+method.display.rank=1", "method.display.rank=1: nothing reads this key"),
        ("+trainer.foo=1", "trainer.foo=1: nothing reads this key (neither a key of TrainerC"),
        ("+trainer.gradient_clip=1", "did you mean trainer.gradient_clip_val?"),
        ("+trainer.num_sanity_val_steps=2", "trainer.num_sanity_val_steps=2: nothing reads"),
        ("+data.foo=1", "data.foo=1: nothing reads this key (not a key of SynthSource)"),
        ("+data.budget.known=3", "data.budget.known=3: nothing reads this key (not a key of Sy"),
        ("+data.pretrain.foo=1", "data.pretrain.foo=1: nothing reads this key (not a key of Syn"),
        ("+k.foo=1", "k.foo=1: nothing reads this key (not a key of KConfig)"),
        ("+protocol.foo=1", "protocol.foo=1: nothing reads this key (not a protocol key"),
        ("+logger.foo=1", "logger.foo=1: nothing reads this key (not a logger key"),
        (
            "+seeds=1",
            "seeds=1: nothing reads this key (not a key of RunConfig); did you mean seed?",
        ),
    ],
)
def test_a_key_nothing_reads_is_refused_naming_it_and_the_nearest_read_key(override, message):
    """`+` adds any key: one that no object reads would leave the run as it was while its
    record said otherwise."""
    cfg = compose_config(["method=lower_bound", override])  # Hydra accepts every one
    with pytest.raises(ConfigValueError) as err:
        check_config(cfg)
    text = str(err.value)
    assert message in text and text.startswith(override.split("=")[0][1:]), text
    assert "\n" not in text


def test_a_target_that_cannot_be_imported_is_one_line_naming_its_key():
    cfg = compose_config(["method=lower_bound", "method.model._target_=methods.cal.Nope"])
    with pytest.raises(ConfigValueError) as err:
        check_config(cfg)
    assert str(err.value) == (
        "method.model._target_='methods.cal.Nope': cannot be imported (module 'methods.cal' has "
        "no attribute 'Nope'); name an importable class"
    )


def test_the_nearest_key_is_the_same_name_nearest_in_the_tree_ties_all_named():
    from owdfa_bench.config_keys import nearest_keys

    read = {"method.optim.lr", "method.reference_optim.lr", "data.pretrain.lr", "method.epochs"}
    assert nearest_keys("method.lr", read) == ["method.optim.lr"]
    assert nearest_keys("pretrain.lr", read) == ["method.optim.lr"]  # none shares a start
    read |= {"method.model.gamma", "method.optim.gamma"}
    assert nearest_keys("method.gamma", read) == ["method.model.gamma", "method.optim.gamma"]
    assert nearest_keys("method.epoch", read) == ["method.epochs"]  # difflib
    assert nearest_keys("method.foo", read | {"method"}) == []  # never the node above


@pytest.mark.parametrize(
    "overrides",
    [
        ["+trainer.gradient_clip_val=1.0"],  # a Lightning Trainer argument, passed on
        ["+data.backbone.drop_rate=0.1"],  # timm.create_model's
        ["+method.optim.momentum=0.5"],  # read by the sgd entry of conf/optimizers.yaml
        ["+method.foo=1", "method.model.dropout=${method.foo}"],  # read by an interpolation
        ["method=orca", "method.optim=${method.reference_optim}"],  # the recipe its YAML shows
        ["logger=wandb"],  # logger.project, .entity, .mode: read by interpolations
    ],
)
def test_a_key_something_reads_passes(overrides):
    check_config(compose_config(["method=lower_bound", *overrides]))


def test_a_backbone_key_timm_does_not_take_is_one_line_when_the_method_is_built(make_cfg):
    """data.backbone's other keys are timm's (`+data.backbone.drop_rate=0.1`), so timm judges."""
    from owdfa_bench.method import Problem
    from owdfa_bench.runner import build_method

    cfg = make_cfg("method=lower_bound", "+data.backbone.nosuch=1")
    check_config(cfg)
    with pytest.raises(ConfigValueError) as err:
        build_method(cfg, Problem(num_known=2, num_classes=3))
    assert str(err.value) == (
        "method=lower_bound: data.backbone.nosuch=1: timm's resnet10t takes no such argument; "
        "remove it"
    )


def test_every_shipped_method_and_recipe_reads_every_key():
    from owdfa_bench.runner import apply_recipe

    for path in sorted((Path(__file__).parent.parent / "conf" / "method").glob("*.yaml")):
        cfg = compose_config([f"method={path.stem}"])
        check_config(cfg)
        for recipe in cfg.method.get("recipes") or {}:
            check_config(
                apply_recipe(compose_config([f"method={path.stem}", f"method.recipe={recipe}"]))
            )


def test_the_trainer_arguments_the_runner_sets_are_those_it_refuses(make_cfg, monkeypatch):
    """A `+trainer.<argument>` the runner also sets would be overridden without a word."""
    from owdfa_bench import runner
    from owdfa_bench.config import TrainerConfig

    passed = {}
    monkeypatch.setattr(runner, "instantiate", lambda config, **kwargs: passed.update(kwargs))
    runner.build_trainer(make_cfg().trainer, Path("unused"), 1)
    assert set(passed) == set(TrainerConfig.SET_BY_RUNNER)
