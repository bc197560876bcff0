"""The content digest of a run's data: what it depends on, that user images are hashed once, that
records carry it and that the aggregate does not average seeds trained on different data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_report import make_record, write_record

from owdfa_bench import cache
from owdfa_bench.data import faces
from owdfa_bench.data.datamodule import build_splits
from owdfa_bench.data.digest import data_digest
from owdfa_bench.data.splits import DataSplits
from owdfa_bench.records import RunRecord
from owdfa_bench.report.collect import load_records
from owdfa_bench.report.validate import validate


def splits_of(root: Path, labels: dict[str, int]) -> DataSplits:
    rows = [(str(root / name), label) for name, label in labels.items()]
    return DataSplits(rows[:2], rows[2:3], rows[3:], num_known=2, classes=[], root=str(root))


def write_images(root: Path) -> dict[str, int]:
    labels = {"1_a/x.png": 0, "1_a/y.png": 0, "2_b/x.png": 1, "2_b/y.png": 1}
    for i, name in enumerate(labels):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(bytes([i]) * 32)
    return labels


def counting_hashes(monkeypatch) -> list[str]:
    hashed, real = [], cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p, a="sha256": hashed.append(p) or real(p, a))
    return hashed


def test_the_digest_follows_bytes_and_labels_not_the_folder(tmp_path):
    labels = write_images(tmp_path / "here")
    here = data_digest(splits_of(tmp_path / "here", labels))
    there = shutil.copytree(tmp_path / "here", tmp_path / "elsewhere")
    assert data_digest(splits_of(there, labels)) == here  # no machine path in it
    assert data_digest(splits_of(there, {**labels, "2_b/y.png": 0})) != here
    a, b = there / "1_a/x.png", there / "2_b/x.png"  # same size: swapped between classes
    a.write_bytes(b.read_bytes() + b"")
    b.write_bytes(bytes([0]) * 32)
    assert data_digest(splits_of(there, labels)) != here


def test_user_images_are_hashed_once_and_known_digests_not_at_all(tmp_path, monkeypatch):
    labels = write_images(tmp_path / "data")
    splits = splits_of(tmp_path / "data", labels)
    hashed = counting_hashes(monkeypatch)
    first = data_digest(splits)
    assert len(hashed) == 4  # once each, then stamped in the cache base's index
    assert data_digest(splits) == first and len(hashed) == 4
    assert list((cache.cache_base() / "digests").glob("*.json"))
    copy = shutil.copytree(tmp_path / "data", tmp_path / "copy")  # in no index yet
    known = splits_of(copy, labels)
    rows = known.labelled + known.test  # all but the unlabelled row
    known.file_digests = {p: cache.content_sha256(Path(p).read_bytes()) for p, _ in rows}
    assert data_digest(known) == first and hashed[4:] == [copy / "2_b/x.png"]


def test_synthetic_rows_take_their_digests_from_the_checked_manifest(make_cfg, monkeypatch):
    cfg = make_cfg()
    build_splits(cfg.data, cfg.protocol)  # the tiny set exists and is stamped
    hashed = counting_hashes(monkeypatch)
    splits = build_splits(cfg.data, cfg.protocol)
    assert hashed == []  # no image read for the digest: the manifest's SHA-256 are used
    recomputed = DataSplits(splits.labelled, splits.unlabelled, splits.test, 0, [])
    assert splits.data_digest == data_digest(recomputed)  # what hashing the files gives


def test_crop_rows_take_their_digests_from_the_checked_crop_manifest(
    make_owdfa40_cfg, tmp_path, monkeypatch
):
    pytest.importorskip("dlib")
    crops = tmp_path / "crops"
    cfg = make_owdfa40_cfg("data.crop_face=true", f"data.cache_dir={crops}")
    settings = faces.settings_from_config(cfg.data)
    sources = faces.list_sources(cfg)
    faces.prepare_face_cache(sources, cfg.data.root, crops, settings, progress=False)
    hashed = counting_hashes(monkeypatch)
    splits = build_splits(cfg.data, cfg.protocol)
    assert hashed == []  # crops checked by their stamps, digests from the manifest
    assert all(p.startswith(str(crops)) for p, _ in splits.test)
    recomputed = DataSplits(splits.labelled, splits.unlabelled, splits.test, 0, [])
    assert splits.data_digest == data_digest(recomputed)


def test_the_aggregate_does_not_average_seeds_trained_on_different_data(tmp_path):
    digests = {2025: "a" * 64, 2026: "a" * 64, 2027: "b" * 64}
    for seed, digest in digests.items():
        write_record(tmp_path, {**make_record("cal", "p1", "known", seed), "data_digest": digest})
        write_record(tmp_path, make_record("cpl", "p1", "known", seed))  # older: no digest
    df = load_records(tmp_path)
    assert df.loc[df["method"] == "cal", "data_digest"].tolist() == list(digests.values())
    assert df.loc[df["method"] == "cpl", "data_digest"].isna().all()
    issues = [i for i in validate(df) if i.kind == "mixed_data_content"]
    assert len(issues) == 1
    assert "aaaaaaaaaaaa: seed(s) 2025, 2026; bbbbbbbbbbbb: seed(s) 2027" in issues[0].detail
    assert "the mean mixes them" in issues[0].detail

    for seed in (2025, 2026, 2027):  # the same data for every seed: nothing to say
        path = tmp_path / f"cal/p1/k-known/seed-{seed}/results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "data_digest": "a" * 64}))
    assert not [i for i in validate(load_records(tmp_path)) if i.kind == "mixed_data_content"]


def test_a_record_without_a_digest_still_loads_and_writes_none():
    old = make_record("cal", "p1", "known", 2025)
    record = RunRecord.from_dict(old)
    assert record.data_digest is None and "data_digest" not in record.extras
    assert "data_digest" not in record.to_dict()
    assert RunRecord.from_dict({**old, "data_digest": "c" * 64}).to_dict()["data_digest"] == (
        "c" * 64
    )


def test_no_test_writes_the_users_cache():
    assert Path(os.environ["OWDFA_BENCH_CACHE"]) == cache.cache_base()
    assert not str(cache.cache_base()).startswith(str(Path.home() / ".cache"))
