"""The shared cache module: base folder, keys that existing caches depend on, stale reasons,
atomic writes that leave nothing behind on failure, and the lock concurrent builders share."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from filelock import Timeout

from owdfa_bench import cache, pretrain
from owdfa_bench.data import synth
from owdfa_bench.pretrain import PretrainSettings


def test_cache_base_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OWDFA_BENCH_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_base() == tmp_path / "explicit"
    monkeypatch.delenv("OWDFA_BENCH_CACHE")
    assert cache.cache_base() == tmp_path / "xdg" / "owdfa-bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_base() == tmp_path / "home" / ".cache" / "owdfa-bench"


def test_keys_of_existing_caches_do_not_change():
    """Pinned synth values: a change here orphans every synth cache on users' disks (bump
    synth.GENERATOR_VERSION instead, on purpose). The pretrain key is pinned by its formula,
    since a new PretrainSettings field rightly changes it."""
    params = synth.SynthParams(
        image_size=32, real_per_folder=3, fakes_per_class=3, strength=1.0, seed=0
    )
    assert synth.default_cache_root(params).name == "synth-3059a5fc2f"
    files = [("b/1.png", "ff"), ("a/0.png", "ee")]
    assert synth.manifest_hash(params.to_dict(), files) == (
        "76ea6d9f802922558fa6960956f043962d460356d5da2cb375e1fb3c73e4cd37"
    )
    settings = PretrainSettings(image_size=32, methods_per_family=1, epochs=1)
    text = json.dumps(
        {
            "pretrain_version": pretrain.PRETRAIN_VERSION,
            "generator_version": synth.GENERATOR_VERSION,
            **asdict(settings),
        },
        sort_keys=True,
    )
    assert settings.key() == hashlib.sha256(text.encode()).hexdigest()[:10]
    assert pretrain.default_pretrain_root(settings).name == f"pretrain-{settings.key()}"


def test_settings_hash_is_order_free_and_spells_json_two_ways():
    a = cache.settings_hash({"b": 1, "a": [1, 2]})
    assert a == cache.settings_hash({"a": [1, 2], "b": 1})
    assert a == hashlib.sha256(b'{"a": [1, 2], "b": 1}').hexdigest()
    compact = cache.settings_hash({"b": 1, "a": [1, 2]}, compact=True)
    assert compact == hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()
    assert cache.settings_hash({"a": 1}, length=10) == cache.settings_hash({"a": 1})[:10]


def test_file_digests(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(3 << 20)  # several read blocks
    path.write_bytes(data)
    assert cache.file_digest(path) == hashlib.sha256(data).hexdigest() == cache.content_sha256(data)
    assert cache.file_digest(path, "sha1") == hashlib.sha1(data).hexdigest()


def test_file_unchanged_hashes_only_when_the_mtime_moved(tmp_path, monkeypatch):
    path = tmp_path / "zip"
    path.write_bytes(b"abc")
    stamp = cache.FileStamp.of(path, "sha256")
    assert stamp.size == 3 and stamp.digest == hashlib.sha256(b"abc").hexdigest()
    assert stamp.matches_stat(path.stat())

    def no_hashing(*args):
        raise AssertionError("hashed although size and mtime match")

    with monkeypatch.context() as m:
        m.setattr(cache, "file_digest", no_hashing)
        assert cache.file_unchanged(path, stamp)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert not stamp.matches_stat(path.stat()) and cache.file_unchanged(path, stamp)
    assert not cache.file_unchanged(path, cache.FileStamp(stamp.size, stamp.mtime_ns))  # no digest
    path.write_bytes(b"abd")  # same size, new bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert not cache.file_unchanged(path, stamp)
    path.write_bytes(b"abcd")
    assert not cache.file_unchanged(path, stamp)


def test_read_json_refuses_what_is_not_a_whole_object(tmp_path):
    assert cache.read_json(tmp_path / "missing.json") is None
    (tmp_path / "torn.json").write_text('{"a": 1')
    assert cache.read_json(tmp_path / "torn.json") is None
    (tmp_path / "list.json").write_text("[1]")
    assert cache.read_json(tmp_path / "list.json") is None
    cache.write_json_atomic(tmp_path / "ok.json", {"a": 1})
    assert cache.read_json(tmp_path / "ok.json") == {"a": 1}
    assert (tmp_path / "ok.json").read_text() == '{\n "a": 1\n}\n'


def test_stale_reason_names_the_first_differing_key():
    manifest = {"version": "1", "settings": {"size": 32}, "extra": True}
    assert cache.stale_reason(manifest, {"version": "1", "settings": {"size": 32}}) is None
    reason = cache.stale_reason(manifest, {"version": "2", "settings": {"size": 64}})
    assert reason == "version: cache has '1', wanted '2'"
    reason = cache.stale_reason(manifest, {"version": "1", "settings": {"size": 64}})
    assert reason.startswith("settings:") and "32" in reason and "64" in reason
    assert cache.stale_reason(manifest, {"missing": 1}) == "missing: cache has None, wanted 1"
    assert cache.stale_reason(None, {"version": "1"}) == "no readable manifest"


def test_files_problem_reports_missing_extra_and_resized_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(b"12")
    (tmp_path / "a" / "1.png").write_bytes(b"345")
    sizes = {"a/0.png": 2, "a/1.png": 3}
    assert cache.files_problem(tmp_path, sizes, "*/*.png") is None
    assert cache.files_problem(tmp_path, {"a/0.png": 2}, "*/*.png") == (
        "0 listed files missing, 1 unlisted files present"
    )
    assert cache.files_problem(tmp_path, {**sizes, "a/2.png": 1}, "*/*.png").startswith("1 listed")
    assert cache.files_problem(tmp_path, {**sizes, "a/1.png": 4}, "*/*.png") == (
        "a/1.png has the wrong size"
    )


def test_atomic_write_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "weights.bin"
    cache.write_bytes_atomic(target, b"old")
    with pytest.raises(KeyboardInterrupt), cache.atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise KeyboardInterrupt  # killed mid-write
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]

    with pytest.raises(RuntimeError), cache.atomic_path(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "x").write_text("x")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]

    with cache.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".weights.bin.tmp-")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the rename
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_move_dir_into_place_replaces_or_keeps_an_equal_concurrent_result(tmp_path):
    root = tmp_path / "data"
    for content in ("one", "two"):
        tmp = cache.temporary_sibling(root)
        tmp.mkdir()
        (tmp / "f").write_text(content)
        cache.move_dir_into_place(tmp, root)
        assert (root / "f").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the old folder is gone

    class Racing(type(root)):  # another builder finishes between our two renames
        def rename(self, target):
            if Path(target) == root and not root.exists():
                root.mkdir()
                (root / "f").write_text("theirs")
            return super().rename(target)

    ours = Racing(cache.temporary_sibling(root))
    ours.mkdir()
    (ours / "f").write_text("ours")
    cache.move_dir_into_place(ours, root, keep_theirs=lambda theirs, mine: True)
    assert (root / "f").read_text() == "theirs" and not ours.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_remove_stale_temporaries_spares_young_ones(tmp_path):
    root = tmp_path / "synth-x"
    old, young = cache.temporary_sibling(root), cache.temporary_sibling(root, "old")
    old.mkdir()
    young.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (tmp_path / "unrelated").mkdir()
    cache.remove_stale_temporaries(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, "unrelated"])


def test_build_lock_excludes_a_second_holder(tmp_path):
    target = tmp_path / "sub" / "cache"
    with cache.build_lock(target):
        assert (tmp_path / "sub" / "cache.lock").is_file()
        waited = {}

        def other_builder():
            try:
                with cache.build_lock(target, timeout=0.2):
                    waited["got"] = True
            except Timeout:
                waited["timeout"] = True

        thread = threading.Thread(target=other_builder)
        thread.start()
        thread.join()
    assert waited == {"timeout": True}
    with cache.build_lock(target, timeout=0.2):  # released
        pass


def test_concurrent_builders_build_once(tmp_path):
    target, builds = tmp_path / "entry", []

    def ensure():
        with cache.build_lock(target):
            if not target.is_file():
                builds.append(threading.get_ident())
                time.sleep(0.2)
                cache.write_bytes_atomic(target, b"built")

    threads = [threading.Thread(target=ensure) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and target.read_bytes() == b"built"
