"""The shared cache module: base folder, keys that existing caches depend on, stale reasons,
atomic writes that leave nothing behind on failure, and the lock concurrent builders share."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest
from filelock import Timeout

from owdfa_bench import cache, pretrain
from owdfa_bench.data import synth
from owdfa_bench.errors import ConfigValueError
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


# ---------------------------------------------------------------------------------------------
# content checks


def write_files(root: Path, contents: dict[str, bytes]) -> dict[str, str]:
    """Write `contents` under `root`; their SHA-256 digests, as a builder lists them."""
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {rel: cache.content_sha256(data) for rel, data in contents.items()}


def counting_hashes(monkeypatch) -> list[str]:
    """Record every file the cache module hashes."""
    hashed, real = [], cache.file_digest

    def counted(path, algorithm="sha256"):
        hashed.append(Path(path).name)
        return real(path, algorithm)

    monkeypatch.setattr(cache, "file_digest", counted)
    return hashed


@pytest.fixture
def stamped(tmp_path) -> tuple[Path, dict[str, str]]:
    """Three same-size files, listed and stamped when built."""
    root = tmp_path / "c"
    listed = write_files(root, {f"a/{i}.png": bytes([i]) * 64 for i in range(3)})
    cache.stamp_files(root, listed, root / cache.STAMPS_FILE)
    return root, listed


def test_the_fast_path_reads_no_file(stamped, monkeypatch):
    root, listed = stamped
    hashed = counting_hashes(monkeypatch)
    assert cache.content_mismatches(root, listed, root / cache.STAMPS_FILE) == []
    assert hashed == []
    assert cache.read_stamps(root / cache.STAMPS_FILE)["a/1.png"].digest == listed["a/1.png"]


def test_a_same_size_rewrite_with_its_mtime_restored_is_caught(stamped, monkeypatch):
    root, listed = stamped
    victim = root / "a/1.png"
    st = victim.stat()
    victim.write_bytes(b"\xff" + victim.read_bytes()[1:])  # one byte flipped, same size
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back; ctime moves
    hashed = counting_hashes(monkeypatch)
    assert cache.content_mismatches(root, listed, root / cache.STAMPS_FILE) == ["a/1.png"]
    assert sorted(hashed) == ["0.png", "1.png", "2.png"]  # one miss: every file is hashed


def test_two_files_swapped_by_rename_are_caught(stamped):
    root, listed = stamped
    a, b, tmp = root / "a/0.png", root / "a/2.png", root / "a/swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    assert cache.content_mismatches(root, listed, root / cache.STAMPS_FILE) == [
        "a/0.png",
        "a/2.png",
    ]
    assert cache.content_mismatches(root, listed, root / "none.json") == ["a/0.png", "a/2.png"]


def test_a_copied_folder_is_hashed_once_then_stamped(stamped, tmp_path, monkeypatch):
    root, listed = stamped
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # mtimes kept, inodes and ctimes new: no stamp vouches
    hashed = counting_hashes(monkeypatch)
    assert cache.content_mismatches(copy, listed, copy / cache.STAMPS_FILE) == []
    assert len(hashed) == 3
    assert cache.content_mismatches(copy, listed, copy / cache.STAMPS_FILE) == []
    assert len(hashed) == 3  # re-stamped: the second check reads nothing
    (copy / "a/2.png").unlink()
    assert cache.content_mismatches(copy, listed, copy / cache.STAMPS_FILE) == ["a/2.png"]


def test_a_full_check_hashes_every_time_on_request(stamped, monkeypatch):
    root, listed = stamped
    hashed = counting_hashes(monkeypatch)
    monkeypatch.setenv(cache.CHECK_ENV, "full")
    assert cache.content_mismatches(root, listed, root / cache.STAMPS_FILE) == []
    assert cache.content_mismatches(root, listed, root / cache.STAMPS_FILE) == []
    assert len(hashed) == 6
    monkeypatch.setenv(cache.CHECK_ENV, "always")
    with pytest.raises(ConfigValueError, match="OWDFA_BENCH_CACHE_CHECK='always'") as err:
        cache.full_check_requested()
    assert "\n" not in str(err.value)


def test_a_torn_stamps_file_costs_one_full_check(stamped, monkeypatch):
    root, listed = stamped
    stamps = root / cache.STAMPS_FILE
    stamps.write_text(stamps.read_text()[:40])
    hashed = counting_hashes(monkeypatch)
    assert cache.content_mismatches(root, listed, stamps) == [] and len(hashed) == 3
    assert set(cache.read_stamps(stamps)) == set(listed)
    assert cache.read_stamps(stamps, "crc32") == {}  # stamps of another algorithm: none


def test_file_digests_hash_only_what_no_stamp_vouches_for(tmp_path, monkeypatch):
    root = tmp_path / "user-data"
    listed = write_files(root, {"x/0.jpg": b"zero", "x/1.jpg": b"one"})
    index = tmp_path / "index" / "stamps.json"
    index.parent.mkdir()
    hashed = counting_hashes(monkeypatch)
    assert cache.file_digests(root, [*listed, "x/gone.jpg"], index) == {
        **listed,
        "x/gone.jpg": None,
    }
    assert sorted(hashed) == ["0.jpg", "1.jpg"]
    (root / "x/1.jpg").write_bytes(b"ONE")
    assert cache.file_digests(root, listed, index)["x/1.jpg"] == cache.content_sha256(b"ONE")
    assert sorted(hashed) == ["0.jpg", "1.jpg", "1.jpg"]


def test_crc32_digest_is_the_zip_checksum(tmp_path):
    path = tmp_path / "member"
    data = os.urandom((1 << 20) + 5)
    path.write_bytes(data)
    assert cache.file_digest(path, "crc32") == f"{zlib.crc32(data):08x}"


def test_stamps_are_left_alone_in_a_folder_that_cannot_be_written(stamped, monkeypatch):
    root, listed = stamped

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache, "write_json_atomic", read_only)
    (root / cache.STAMPS_FILE).unlink()
    assert cache.content_mismatches(root, listed, root / cache.STAMPS_FILE) == []


def test_builders_size_their_workers_by_the_runs_threads():
    """trainer.threads (set on torch by the runner) bounds the workers that render a cache."""
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cache.cpu_budget() == 1
        torch.set_num_threads(2)
        assert cache.cpu_budget() == 2
    finally:
        torch.set_num_threads(threads)
