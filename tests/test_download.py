"""The OWDFA-40 download: the network wrapper, safe resumable unzip, class-folder check."""

from __future__ import annotations

import json
import os
import stat
import zipfile
import zlib
from pathlib import Path

import pytest

from owdfa_bench.data import download
from owdfa_bench.data.download import (
    UnsafeZipError,
    cli_download,
    extract_release,
    extract_zip,
    is_extracted,
    missing_classes,
)
from owdfa_bench.protocols import load_registry


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def class_folders() -> list[str]:
    return [f for c in load_registry("owdfa40")["classes"] for f in c["folders"]]


def test_fetch_release_is_a_thin_snapshot_download_call(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert download.fetch_release(tmp_path) == tmp_path
    ((repo_id, kwargs),) = calls
    assert repo_id == "hyzheng/OWDFA40-Benchmark"
    assert kwargs["repo_type"] == "dataset" and kwargs["local_dir"] == str(tmp_path)
    assert kwargs["allow_patterns"] == ["data/*.zip", "shape_predictor_68_face_landmarks.dat"]
    assert kwargs["ignore_patterns"] is None
    download.fetch_release(tmp_path, skip_zips=["1_Swap_Deepfakes.zip"])
    assert calls[-1][1]["ignore_patterns"] == ["data/1_Swap_Deepfakes.zip"]


def test_extract_writes_members_and_marker_then_skips(tmp_path):
    z = make_zip(
        tmp_path / "data" / "1_Swap_Deepfakes.zip",
        {"a/x.png": b"x" * 10, "b.jpg": b"yy", "empty/": b""},
    )
    target = tmp_path / "1_Swap_Deepfakes"
    result = extract_zip(z, target)
    assert (result.written, result.kept) == (2, 0)
    assert (target / "a" / "x.png").read_bytes() == b"x" * 10
    assert (target / "empty").is_dir()
    marker = json.loads((target / download.MARKER_FILE).read_text())
    assert marker["size"] == z.stat().st_size and len(marker["sha256"]) == 64
    assert is_extracted(z, target)
    results = extract_release(tmp_path, progress=False)
    assert [r.skipped for r in results] == [True]


def test_touched_zip_with_same_bytes_still_counts_as_extracted(tmp_path):
    z = make_zip(tmp_path / "data" / "2_Swap_FaceSwap.zip", {"x.png": b"123"})
    target = tmp_path / "2_Swap_FaceSwap"
    extract_zip(z, target)
    st = z.stat()
    os.utime(z, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert is_extracted(z, target)  # mtime differs, SHA-256 matches
    make_zip(z, {"x.png": b"456"})  # new content, same size
    assert not is_extracted(z, target)


def test_interrupted_extraction_resumes(tmp_path):
    make_zip(
        tmp_path / "data" / "3_Swap_DeepFaceLab.zip",
        {"a.png": b"a" * 100, "b.png": b"b" * 100, "c.png": b"c" * 100},
    )
    target = tmp_path / "3_Swap_DeepFaceLab"
    target.mkdir()
    (target / "a.png").write_bytes(b"a" * 100)  # complete
    (target / "b.png").write_bytes(b"b" * 40)  # torn write
    results = extract_release(tmp_path, progress=True)
    assert [(r.skipped, r.written, r.kept) for r in results] == [(False, 2, 1)]
    assert (target / "b.png").read_bytes() == b"b" * 100
    assert not list(target.glob("*.partial"))


def damage(path: Path) -> None:
    """One byte of `path` inverted in place: same size, mtime set back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_damaged_member_is_extracted_again(tmp_path):
    members = {"a.png": b"a" * 100, "b.png": b"b" * 100, "c.png": b"c" * 100}
    make_zip(tmp_path / "data" / "3_Swap_DeepFaceLab.zip", members)
    target = tmp_path / "3_Swap_DeepFaceLab"
    extract_release(tmp_path, progress=False)
    marker = json.loads((target / download.MARKER_FILE).read_text())
    assert marker["member_crc32"] == {n: f"{zlib.crc32(d):08x}" for n, d in members.items()}
    assert download.damaged_members(target) == []
    damage(target / "b.png")
    assert download.damaged_members(target) == ["b.png"]
    results = extract_release(tmp_path, progress=False)
    assert [(r.skipped, r.written, r.kept) for r in results] == [(False, 1, 2)]
    assert (target / "b.png").read_bytes() == members["b.png"]
    assert [r.skipped for r in extract_release(tmp_path, progress=False)] == [True]


def test_a_damaged_member_of_a_deleted_zip_fetches_the_zip_again(tmp_path, capsys):
    for folder in class_folders():
        make_zip(tmp_path / "data" / f"{folder}.zip", {"img_0.png": b"p" * 20})
    args = ["--root", str(tmp_path), "--no-fetch", "--delete-zips", "--no-progress"]
    assert cli_download(args) == 0
    damage(tmp_path / "1_Swap_Deepfakes" / "img_0.png")
    capsys.readouterr()
    assert cli_download(args) == 1
    err = capsys.readouterr().err
    assert "1_Swap_Deepfakes: 1 files differ from their zip's CRC-32 (e.g. img_0.png)" in err
    assert "42 zips: 0 extracted now, 41 already complete" in err
    assert "1_Swap_Deepfakes.zip" not in download.extracted_without_zip(tmp_path)  # refetched


def test_an_older_marker_gets_the_member_crcs_without_rewriting(tmp_path):
    z = make_zip(tmp_path / "data" / "2_Swap_FaceSwap.zip", {"x.png": b"123", "y.png": b"45"})
    target = tmp_path / "2_Swap_FaceSwap"
    extract_zip(z, target)
    marker_path = target / download.MARKER_FILE
    marker = json.loads(marker_path.read_text())
    del marker["member_crc32"]
    marker_path.write_text(json.dumps(marker))
    assert download.damaged_members(target) is None  # nothing known: checked again
    results = extract_release(tmp_path, progress=False)
    assert [(r.skipped, r.written, r.kept) for r in results] == [(False, 0, 2)]
    assert download.damaged_members(target) == []


@pytest.mark.parametrize(
    "name", ["../evil.png", "ok/../../evil.png", "/tmp/evil.png", "C:/evil.png", "..\\evil.png"]
)
def test_zip_slip_and_absolute_paths_are_refused(tmp_path, name):
    z = make_zip(tmp_path / "data" / "4_x.zip", {"fine.png": b"1", name: b"2"})
    with pytest.raises(UnsafeZipError, match="evil.png"):
        extract_zip(z, tmp_path / "4_x")
    assert not (tmp_path / "4_x" / "fine.png").exists()  # checked before writing anything
    assert not (tmp_path / "evil.png").exists()


def test_symlink_members_are_refused(tmp_path):
    z = tmp_path / "data" / "5_x.zip"
    z.parent.mkdir()
    with zipfile.ZipFile(z, "w") as archive:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeZipError, match="symbolic link"):
        extract_zip(z, tmp_path / "5_x")


def test_missing_classes_names_index_code_and_folder(tmp_path):
    for folder in class_folders():
        if not folder.startswith(("7_", "40_")):
            (tmp_path / folder).mkdir()
    missing = missing_classes(tmp_path)
    assert missing == [
        "7 (R2, expected 7_Reenact_NeuralTextures)",
        "40 (R12, expected 40_Reenact_OneShot)",
    ]
    (tmp_path / "7_anything").mkdir()
    (tmp_path / "40_Reenact_OneShot").mkdir()
    assert missing_classes(tmp_path) == []


def test_real_class_needs_only_one_of_its_folders(tmp_path):
    for folder in class_folders():
        if folder != "0_Real_FF++":
            (tmp_path / folder).mkdir()
    assert missing_classes(tmp_path) == []


def test_cli_download_offline_unzips_and_verifies(tmp_path, capsys):
    for folder in class_folders():
        make_zip(tmp_path / "data" / f"{folder}.zip", {"img_0.png": b"p"})
    assert cli_download(["--root", str(tmp_path), "--no-fetch", "--no-progress"]) == 0
    assert (tmp_path / "0_Real_FF++" / "img_0.png").is_file()
    assert (
        cli_download(["--root", str(tmp_path), "--no-fetch", "--delete-zips", "--no-progress"]) == 0
    )
    assert not list((tmp_path / "data").glob("*.zip"))
    assert len(download.extracted_without_zip(tmp_path)) == len(class_folders())
    assert "already complete" in capsys.readouterr().err


def test_cli_download_fails_on_missing_class_and_unsafe_zip(tmp_path):
    make_zip(tmp_path / "data" / "1_Swap_Deepfakes.zip", {"a.png": b"1"})
    assert cli_download(["--root", str(tmp_path), "--no-fetch", "--no-progress"]) == 1
    make_zip(tmp_path / "data" / "2_Swap_FaceSwap.zip", {"../../x.png": b"1"})
    assert cli_download(["--root", str(tmp_path), "--no-fetch", "--no-progress"]) == 1


def test_cli_download_fetches_then_unzips(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(root, repo_id, revision, skip_zips):
        fetched.append((repo_id, list(skip_zips)))
        for folder in class_folders():
            make_zip(Path(root) / "data" / f"{folder}.zip", {"img_0.png": b"p"})
        (Path(root) / download.PREDICTOR_FILE).write_bytes(b"dat")
        return Path(root)

    monkeypatch.setattr(download, "fetch_release", fake_fetch)
    assert cli_download(["--root", str(tmp_path), "--no-progress"]) == 0
    assert fetched == [("hyzheng/OWDFA40-Benchmark", [])]
    assert missing_classes(tmp_path) == []
