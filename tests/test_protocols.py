"""The protocol YAML holds CAL's `dataset/owdfa_protocols.py` as data; loading validates it."""

import pytest
import yaml

from owdfa_bench import protocols
from owdfa_bench.protocols import load_protocol

P1_KNOWN = [0, 1, 3, 6, 8, 11, 14, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39]
P2_KNOWN = [0, 1, 3, 6, 8, 11, 14, 21, 23, 25, 27, 29, 31]
P3_EXTRA = [5, 24, 7, 10, 26, 13, 38, 18, 20, 36]  # S5 S9 R2 R5 R6 E3 E6 G3 G5 G10


def test_registry_has_41_classes_with_families():
    p = load_protocol("p1")
    assert [c.index for c in p.classes] == list(range(41))
    families = {c.family for c in p.classes}
    assert families == {"REAL", "S", "R", "E", "G"}
    assert p.classes[0].folders == ("0_Real_CelebDF", "0_Real_FF++")
    assert p.classes[33].code == "G7" and p.classes[33].name == "SD2.1"


@pytest.mark.parametrize(
    "name,known,n_known",
    [("p1", P1_KNOWN, 19), ("p2", P2_KNOWN, 13), ("p3", sorted(P1_KNOWN + P3_EXTRA), 29)],
)
def test_protocol_known_sets(name, known, n_known):
    p = load_protocol(name)
    assert list(p.known) == known
    assert p.num_known == n_known and len(p.novel) == 41 - n_known


def test_labels_put_known_classes_first():
    p = load_protocol("p1")
    mapping = p.label_of_index()
    assert [mapping[i] for i in P1_KNOWN] == list(range(19))
    assert mapping[2] == 19 and mapping[40] == 40  # S2 is the first novel class (CAL's P1)
    by_label = p.classes_by_label()
    assert by_label[19].code == "S2" and not any(c.index in P1_KNOWN for c in by_label[19:])


def _with_protocol(tmp_path, monkeypatch, known):
    registry = yaml.safe_load((protocols.PROTOCOLS_DIR / "owdfa40.yaml").read_text())
    registry["protocols"] = {"bad": {"known": known}}
    (tmp_path / "owdfa40.yaml").write_text(yaml.safe_dump(registry))
    monkeypatch.setattr(protocols, "PROTOCOLS_DIR", tmp_path)


def test_unknown_code_is_a_clear_error(tmp_path, monkeypatch):
    _with_protocol(tmp_path, monkeypatch, ["REAL", "S1", "X99"])
    with pytest.raises(ValueError, match="X99"):
        load_protocol("bad")


def test_real_must_be_known(tmp_path, monkeypatch):
    _with_protocol(tmp_path, monkeypatch, ["S1", "S2"])
    with pytest.raises(ValueError, match="REAL must be a known"):
        load_protocol("bad")


def test_missing_protocol_lists_available():
    with pytest.raises(KeyError, match="p1"):
        load_protocol("p9")
