"""Benchmarks as data: the class registry and the known/novel split of every protocol.

The YAML files in `protocols/` are the single source; this module only loads and validates them.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from owdfa_bench.resources import protocols_dir

PROTOCOLS_DIR = protocols_dir()


@dataclass(frozen=True)
class ClassInfo:
    index: int  # folder-name prefix, the class id on disk
    code: str  # REAL, S1, R3, ...
    family: str  # REAL, S (swap), R (reenact), E (edit), G (generate)
    name: str
    folders: tuple[str, ...]


@dataclass(frozen=True)
class Protocol:
    benchmark: str
    name: str
    classes: tuple[ClassInfo, ...]  # every class the protocol trains on, by ascending index
    known: tuple[int, ...]  # class indices, ascending

    @property
    def novel(self) -> tuple[int, ...]:
        known = set(self.known)
        return tuple(c.index for c in self.classes if c.index not in known)

    @property
    def num_known(self) -> int:
        return len(self.known)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_of_index(self) -> dict[int, int]:
        """Class index -> contiguous label: known classes first (ascending), then novel ones.

        The reference orders novel labels by Python set iteration; every metric is invariant to
        that order, so ascending index is used (identical for P1/P2, a relabelling for P3).
        """
        order = list(self.known) + list(self.novel)
        return {index: label for label, index in enumerate(order)}

    def classes_by_label(self) -> list[ClassInfo]:
        by_index = {c.index: c for c in self.classes}
        mapping = self.label_of_index()
        return sorted(by_index.values(), key=lambda c: mapping[c.index])

    def summary(self) -> str:
        return (
            f"{self.benchmark}/{self.name}: {self.num_classes} classes, "
            f"{self.num_known} known, {len(self.novel)} novel"
        )


def load_registry(benchmark: str = "owdfa40") -> dict:
    path = PROTOCOLS_DIR / f"{benchmark}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PROTOCOLS_DIR.glob("*.yaml"))
        raise FileNotFoundError(
            f"no protocol file {path.name} in protocols/; available: {available}"
        )
    with open(path) as f:
        return yaml.safe_load(f)


def load_protocol(name: str, benchmark: str = "owdfa40") -> Protocol:
    """Load and validate one protocol: known codes exist in the registry and REAL is known."""
    registry = load_registry(benchmark)
    classes = tuple(
        ClassInfo(
            int(c["index"]),
            str(c["code"]),
            str(c["family"]),
            str(c["name"]),
            tuple(c.get("folders", ())),
        )
        for c in registry["classes"]
    )
    codes = [c.code for c in classes]
    indices = [c.index for c in classes]
    if len(set(codes)) != len(codes) or len(set(indices)) != len(indices):
        raise ValueError(f"protocols/{benchmark}.yaml: duplicate class code or index")
    protocols = registry.get("protocols", {})
    if name not in protocols:
        raise KeyError(
            f"protocol {name!r} is not in protocols/{benchmark}.yaml; "
            f"available: {sorted(protocols)}"
        )
    by_code = {c.code: c for c in classes}
    known_codes = list(protocols[name]["known"])
    unknown = [c for c in known_codes if c not in by_code]
    if unknown:
        raise ValueError(
            f"protocols/{benchmark}.yaml, protocol {name}: unknown class codes "
            f"{unknown}; valid codes: {codes}"
        )
    if len(set(known_codes)) != len(known_codes):
        raise ValueError(f"protocols/{benchmark}.yaml, protocol {name}: a known code is repeated")
    if "REAL" in by_code and "REAL" not in known_codes:
        raise ValueError(f"protocols/{benchmark}.yaml, protocol {name}: REAL must be a known class")
    known = tuple(sorted(by_code[c].index for c in known_codes))
    if len(known) >= len(classes):
        raise ValueError(
            f"protocol {name}: every class is known; an open-world protocol needs "
            "at least one novel class"
        )
    return Protocol(benchmark, name, tuple(sorted(classes, key=lambda c: c.index)), known)
