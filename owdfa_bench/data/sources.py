"""The data sources the config tree can name: one class per `conf/data/*.yaml`.

Each class is at once the schema of its YAML (a structured config registered in Hydra's
ConfigStore by `owdfa_bench/config.py`: types checked when the config is composed, ranges in
`__post_init__`) and the object `data._target_` builds. Its one method, `splits(protocol)`,
returns the rows of the labelled / unlabelled / test splits with the class table and warnings;
what every source shares (the disjointness check, face crops, unreadable images) runs after it
in `owdfa_bench.data.datamodule.build_splits`.

A new benchmark is one class here (or anywhere importable) and one YAML whose `_target_` names
it; a key added to a YAML is added to its class too (the schema is closed, so a misspelt
override fails at composition). No field has a default: the YAML is the one source of values.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from owdfa_bench.checks import fail, fraction, integer_at_least, number_at_least, one_of
from owdfa_bench.data.owdfa40 import Budgets
from owdfa_bench.data.splits import DataSplits, class_table, relabel

log = logging.getLogger(__name__)
MIN_IMAGE_SIZE = 8  # below this the ResNet stem leaves no feature map
SYNTH_MIN_IMAGE_SIZE = 32  # the renderer's faces and 8-pixel decoder grids need 32 px


@dataclass(kw_only=True)
class Backbone:
    """`data.backbone`: the timm model every method's encoder is built from."""

    # other keys (`+data.backbone.drop_path_rate=0.1`) are arguments of the timm model
    EXTRA_KEYS_READER: ClassVar[str] = "timm.create_model (owdfa_bench.models.build_backbone)"
    name: str
    pretrained: bool  # timm's ImageNet weights, downloaded once through huggingface_hub


@dataclass(kw_only=True)
class SynthBackbone(Backbone):
    weights: str | None  # a local timm state dict; the runner fills in the pretrained start


@dataclass(kw_only=True)
class DataSource:
    """What every `conf/data/*.yaml` holds, and the one method a source implements."""

    benchmark: ClassVar[str]  # the file in protocols/ whose protocols this source reads
    _target_: str = ""  # the YAML names the class; instantiate consumes it before building
    name: str
    synthetic: bool  # tables and records mark synthetic data
    root: str | None
    image_size: int
    split_seed: int  # builds the dataset; the top-level `seed` trains
    crop_face: bool
    verify_images: bool
    max_unreadable_fraction: float
    backbone: Backbone

    def __post_init__(self) -> None:
        integer_at_least("data.image_size", self.image_size, MIN_IMAGE_SIZE, 256)
        integer_at_least("data.split_seed", self.split_seed, 0, 2025)
        fraction("data.max_unreadable_fraction", self.max_unreadable_fraction, 0.001)
        root = Path(self.root).expanduser() if self.root else None
        if root is not None and root.exists() and not root.is_dir():
            # the synthetic set is written there: its default cache rather than a full folder
            example = "null" if self.synthetic else root.parent
            fail("data.root", self.root, f"is a file; data={self.name} needs a folder", example)

    def splits(self, protocol: Mapping[str, Any]) -> DataSplits:
        """The rows of `protocol` (a `conf/protocol/*.yaml` node), labels known classes first."""
        raise NotImplementedError

    def split_settings(self) -> str:
        """What sizes the splits, for a message about an empty one."""
        raise NotImplementedError

    def check_protocol(self, protocol: Mapping[str, Any]) -> None:
        benchmark = protocol.get("benchmark")
        if benchmark != self.benchmark:
            raise ValueError(
                f"protocol={protocol.get('name')} is a protocol of {benchmark}, but data="
                f"{self.name} reads the protocols of {self.benchmark} (protocols/"
                f"{self.benchmark}.yaml); choose one of those protocols or another data source"
            )


@dataclass(kw_only=True)
class FolderSplitsSource(DataSource):
    """Class folders named `<index>_<Type>_<Method>` under a root, sampled and split as CAL."""

    benchmark: ClassVar[str] = "owdfa40"
    test_ratio: float
    labelled_fraction: float  # share of known-class train rows that are labelled
    budgets: Budgets

    def __post_init__(self) -> None:
        super().__post_init__()
        fraction("data.test_ratio", self.test_ratio, 0.2, zero="no test row", one="no training row")
        fraction("data.labelled_fraction", self.labelled_fraction, 0.75, zero="no labelled row")
        for key, value in dataclasses.asdict(self.budgets).items():
            integer_at_least(f"data.budgets.{key}", value, 1, 100)

    def data_root(self) -> str:
        raise NotImplementedError

    def split_settings(self) -> str:
        budgets = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.budgets).items())
        return (
            f"data.test_ratio={self.test_ratio} (each class's test share), "
            f"data.labelled_fraction={self.labelled_fraction} (the labelled share of known-class "
            f"training rows) or data.budgets ({budgets} images a class)"
        )

    def splits(self, protocol: Mapping[str, Any]) -> DataSplits:
        from owdfa_bench.data.owdfa40 import build_owdfa40_splits
        from owdfa_bench.protocols import load_protocol

        self.check_protocol(protocol)
        registry = load_protocol(str(protocol["name"]), self.benchmark)
        log.info(registry.summary())
        root = self.data_root()
        raw = build_owdfa40_splits(
            root,
            registry.known,
            [c.index for c in registry.classes],
            split_seed=self.split_seed,
            budgets=self.budgets,
            test_ratio=self.test_ratio,
            labelled_fraction=self.labelled_fraction,
        )
        mapping = registry.label_of_index()
        return DataSplits(
            relabel(raw.labelled, mapping),
            relabel(raw.unlabelled, mapping),
            relabel(raw.test, mapping),
            registry.num_known,
            class_table(registry),
            str(root),
            raw.warnings,
        )


@dataclass(kw_only=True)
class FaceCropSettings:
    """Where `owdfa-bench prepare` caches the face crops of real data (`crop_face: true`)."""

    cache_dir: str | None  # null: <root>/.owdfa_cache/crops-<image_size>
    cache_format: str
    align: bool  # dlib 320 px face chips (the reference's unused branch) instead of crops
    predictor_path: str | None

    def check_crop_settings(self) -> None:
        one_of("data.cache_format", self.cache_format, ("bmp", "png"))


@dataclass(kw_only=True)
class Owdfa40Source(FaceCropSettings, FolderSplitsSource):
    """`data=owdfa40`: the OWDFA-40 release (CAL, AAAI 2026) under `data.root`."""

    _target_: str = "owdfa_bench.data.sources.Owdfa40Source"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_crop_settings()

    def data_root(self) -> str:
        if not self.root:
            raise ValueError(
                "data=owdfa40 needs data.root=<folder of class folders>; e.g. "
                "python run.py data=owdfa40 data.root=/path/to/OWDFA40"
            )
        return str(Path(self.root).expanduser())


@dataclass(kw_only=True)
class SynthPretrain:
    """`data.pretrain`: the synthetic benchmark's pretrained start (owdfa_bench/pretrain.py)."""

    methods_per_family: int
    images_per_method: int
    real_images: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    threads: int | None  # CPU threads of the pretraining (part of the cache key); null: all cores
    device: str  # cpu | cuda

    def __post_init__(self) -> None:
        integer_at_least("data.pretrain.methods_per_family", self.methods_per_family, 1, 12)
        integer_at_least("data.pretrain.epochs", self.epochs, 1, 5)
        # two images per class and per batch at least: a held-out image, BatchNorm statistics
        integer_at_least("data.pretrain.images_per_method", self.images_per_method, 2, 60)
        integer_at_least("data.pretrain.real_images", self.real_images, 2, 600)
        integer_at_least("data.pretrain.batch_size", self.batch_size, 2, 64)
        number_at_least("data.pretrain.lr", self.lr, 0.0, 1.0e-3, strict=True)
        integer_at_least("data.pretrain.seed", self.seed, 0, 0)
        # 0 or null: all cores, as trainer.threads, which it follows by default
        integer_at_least("data.pretrain.threads", self.threads, 0, 2, optional=True)


@dataclass(kw_only=True)
class SynthGenerator:
    """`data.generator`: what the synthetic benchmark renders (owdfa_bench/data/synth.py)."""

    real_per_folder: int
    fakes_per_class: int
    strength: float  # fingerprint strength: 0 makes the methods of one family identical
    seed: int

    def __post_init__(self) -> None:
        integer_at_least("data.generator.real_per_folder", self.real_per_folder, 1, 100)
        integer_at_least("data.generator.fakes_per_class", self.fakes_per_class, 1, 40)
        number_at_least("data.generator.strength", self.strength, 0.0, 4.0)
        integer_at_least("data.generator.seed", self.seed, 0, 0)


@dataclass(kw_only=True)
class SynthSource(FolderSplitsSource):
    """`data=synth`: the built-in synthetic benchmark, rendered once into a cache folder in the
    OWDFA-40 layout and read like the release."""

    _target_: str = "owdfa_bench.data.sources.SynthSource"
    backbone: SynthBackbone
    pretrain: SynthPretrain | None  # null: every method trains from scratch
    generator: SynthGenerator

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size < SYNTH_MIN_IMAGE_SIZE or self.image_size % 8:
            need = f"data=synth renders a multiple of 8 that is at least {SYNTH_MIN_IMAGE_SIZE}"
            fail("data.image_size", self.image_size, need, 32)

    def data_root(self) -> str:
        from owdfa_bench.data.synth import ensure_synth_dataset

        return str(ensure_synth_dataset(dataclasses.asdict(self)))

    def splits(self, protocol: Mapping[str, Any]) -> DataSplits:
        """The rows, with the SHA-256 of every PNG from the manifest just checked."""
        from pathlib import Path

        from owdfa_bench.data.synth import manifest_digests

        splits = super().splits(protocol)
        splits.file_digests.update(manifest_digests(Path(splits.root)))
        return splits


@dataclass(kw_only=True)
class Owdfa23Source(FaceCropSettings, DataSource):
    """`data=owdfa23`: the original OW-DFA benchmark (CPL, ICCV 2023), read from its meta CSVs."""

    benchmark: ClassVar[str] = "owdfa23"
    _target_: str = "owdfa_bench.data.sources.Owdfa23Source"
    meta_dir: str | None  # the Protocol*_meta.csv files; null: <root>/meta_data

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_crop_settings()

    def split_settings(self) -> str:
        return "the protocol's meta CSV (data.meta_dir, else data.root/meta_data)"

    def splits(self, protocol: Mapping[str, Any]) -> DataSplits:
        from owdfa_bench.data.owdfa23 import build_owdfa23_splits, resolve_meta_dir

        self.check_protocol(protocol)
        lab, unlab, test, num_known, names = build_owdfa23_splits(
            self.meta_dir, protocol, split_seed=self.split_seed, image_root=self.root
        )
        classes = [
            {"label": i, "index": i, "code": n, "family": "", "name": n, "known": i < num_known}
            for i, n in enumerate(names)
        ]
        meta_dir = resolve_meta_dir(self.meta_dir, self.root)
        return DataSplits(lab, unlab, test, num_known, classes, str(meta_dir))
