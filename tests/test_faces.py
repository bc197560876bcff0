"""Face cropping as in the references, the crop cache, and the predictor lookup."""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owdfa_bench import cache as cache_module
from owdfa_bench.data import faces
from owdfa_bench.data.faces import (
    CropSettings,
    StaleCacheError,
    cache_dir_for,
    crop_face_bgr,
    margin_box,
    prepare_face_cache,
    resolve_cached_rows,
    resolve_predictor_path,
)

try:
    import dlib  # noqa: F401

    HAVE_DLIB = True
except ImportError:
    HAVE_DLIB = False
needs_dlib = pytest.mark.skipif(not HAVE_DLIB, reason="dlib is not installed")


class Rect:
    """Stands in for a dlib rectangle."""

    def __init__(self, left, top, right, bottom):
        self.box = (left, top, right, bottom)

    def left(self):
        return self.box[0]

    def top(self):
        return self.box[1]

    def right(self):
        return self.box[2]

    def bottom(self):
        return self.box[3]


def fixed_detector(*rects):
    calls = []

    def detect(image, upsample):
        calls.append(upsample)
        return list(rects)

    detect.calls = calls
    return detect


def portrait_path() -> str:
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def test_margin_box_keeps_the_reference_float_truncation():
    # w = 100, h = 200: (1.2 - 1) = 0.19999999999999996, so int(100 * 0.1999.. / 2) = 9, not 10,
    # and int(200 * 0.1999.. / 2) = 19.
    assert margin_box(50, 60, 150, 260, height=1000, width=1000) == (41, 41, 159, 279)
    # w = 55, h = 33: int(5.4999..) = 5, int(3.2999..) = 3
    assert margin_box(50, 60, 105, 93, height=1000, width=1000) == (45, 57, 110, 96)


def test_margin_box_clips_to_the_image():
    assert margin_box(-5, 2, 95, 102, height=100, width=90) == (0, 0, 90, 100)


def test_crop_uses_first_detection_and_returns_rgb():
    image = np.zeros((100, 100, 3), np.uint8)
    image[40:60, 40:60] = (0, 0, 255)  # pure red in BGR
    image[0:10, 0:10] = (255, 0, 0)  # pure blue in BGR
    detector = fixed_detector(Rect(40, 40, 60, 60), Rect(0, 0, 10, 10))
    crop, box, found = crop_face_bgr(image, detector)
    assert found and detector.calls == [0]  # 0 upsampling steps, as the reference
    assert box == (39, 39, 61, 61)  # 20 px face: int(20 * 0.1999.. / 2) = 1 per side
    assert crop.shape == (22, 22, 3)
    assert tuple(crop[11, 11]) == (255, 0, 0)  # the red patch is red in RGB
    assert crop.flags["C_CONTIGUOUS"]


def test_no_face_keeps_the_whole_image_in_rgb():
    image = np.zeros((30, 40, 3), np.uint8)
    image[5:10, 5:10] = (0, 0, 255)
    crop, box, found = crop_face_bgr(image, fixed_detector())
    assert not found and box == (0, 0, 40, 30) and crop.shape == (30, 40, 3)
    assert tuple(crop[7, 7]) == (255, 0, 0)


def test_crop_rejects_non_bgr_input():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        crop_face_bgr(np.zeros((10, 10), np.uint8), fixed_detector())


def test_cache_resize_equals_torchvision_resize():
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ours = np.asarray(faces.resize_square(crop, 16))
    reference = T.Resize((16, 16), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    assert np.array_equal(ours, np.asarray(reference(Image.fromarray(crop))))


def test_source_key_is_relative_inside_root_and_absolute_outside(tmp_path):
    assert faces.source_key(tmp_path / "1_A" / "x.png", tmp_path) == "1_A/x.png"
    outside = faces.source_key("/elsewhere/y.png", tmp_path)
    assert outside == "/elsewhere/y.png"
    assert faces.cache_file_for("1_A/x.png") == "crops/1_A/x.png.bmp"
    assert faces.cache_file_for("1_A/x.png", "png") == "crops/1_A/x.png.png"
    assert faces.cache_file_for(outside).startswith("external/")


def test_cache_dir_default_and_explicit(tmp_path):
    cfg = {"root": str(tmp_path), "image_size": 128, "crop_face": True}
    assert cache_dir_for(cfg) == tmp_path / ".owdfa_cache" / "crops-128"
    assert cache_dir_for({**cfg, "cache_dir": str(tmp_path / "c")}) == tmp_path / "c"
    png = cache_dir_for({**cfg, "cache_format": "png"})
    assert png == tmp_path / ".owdfa_cache" / "crops-128-png"
    with pytest.raises(ValueError, match="data.root or data.cache_dir"):
        cache_dir_for({"image_size": 256})


def test_predictor_path_explicit_missing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.predictor_path"):
        resolve_predictor_path(tmp_path / "nope.dat")


def test_predictor_path_from_release_root(tmp_path):
    (tmp_path / faces.PREDICTOR_FILE).write_bytes(b"x")
    assert resolve_predictor_path(None, tmp_path) == tmp_path / faces.PREDICTOR_FILE
    data = tmp_path / "data"
    data.mkdir()
    assert resolve_predictor_path(None, data) == tmp_path / faces.PREDICTOR_FILE


def test_predictor_path_from_package_without_importing_it(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        pytest.skip("face-recognition-models is not installed")
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    path = resolve_predictor_path(None, tmp_path)
    assert path.name == faces.PREDICTOR_FILE and path.is_file()
    assert path.parent.name == "models"
    assert "face_recognition_models" not in sys.modules


def test_predictor_missing_everywhere_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(faces.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="owdfa-bench download"):
        resolve_predictor_path(None, tmp_path)


def test_face_crop_loader_pickles_without_its_detector():
    loader = faces.FaceCropLoader()
    loader._detector = object()
    clone = pickle.loads(pickle.dumps(loader))
    assert clone._detector is None and clone.margin == faces.FACE_MARGIN


# ------------------------------------------------------------------ real dlib on a real face


@needs_dlib
def test_dlib_finds_the_portrait_and_crop_matches_the_reference_rule():
    detector = faces.make_detector()
    image = faces.read_bgr(portrait_path())
    rects = detector(image, 0)
    assert len(rects) >= 1
    r = rects[0]
    crop, box, found = crop_face_bgr(image, detector)
    assert found
    assert box == margin_box(r.left(), r.top(), r.right(), r.bottom(), *image.shape[:2])
    x0, y0, x1, y1 = box
    assert np.array_equal(crop, image[y0:y1, x0:x1, ::-1])


@pytest.fixture
def release(tmp_path):
    """A data root with a face, a no-face image with a red patch, and an unreadable file."""
    import cv2

    folder = tmp_path / "1_Swap_Deepfakes"
    folder.mkdir()
    shutil.copy(portrait_path(), folder / "face.jpg")
    no_face = np.zeros((40, 60, 3), np.uint8)
    no_face[:, :30] = (0, 0, 255)  # left half pure red (BGR order on disk via OpenCV)
    cv2.imwrite(str(folder / "red.png"), no_face)
    (folder / "broken.jpg").write_bytes(b"not an image")
    sources = [str(folder / n) for n in ("face.jpg", "red.png", "broken.jpg")]
    cfg = {"name": "owdfa40", "root": str(tmp_path), "image_size": 32, "crop_face": True}
    return tmp_path, sources, cfg


@needs_dlib
def test_prepare_writes_crops_manifest_and_counts(release):
    root, sources, cfg = release
    cache = cache_dir_for(cfg)
    report = prepare_face_cache(sources, root, cache, CropSettings(32), progress=False)
    assert (report.requested, report.processed, report.up_to_date) == (3, 3, 0)
    assert (report.faces, report.no_face) == (1, 1)
    assert report.unreadable == ["1_Swap_Deepfakes/broken.jpg"]
    manifest = faces.read_manifest(cache)
    assert manifest["1_Swap_Deepfakes/face.jpg"]["face_found"] == "1"
    assert manifest["1_Swap_Deepfakes/red.png"]["x1"] == "60"  # whole image box
    red = np.asarray(Image.open(cache / manifest["1_Swap_Deepfakes/red.png"]["cache_file"]))
    assert red.shape == (32, 32, 3)
    assert tuple(red[16, 4]) == (255, 0, 0) and tuple(red[16, 28]) == (0, 0, 0)

    again = prepare_face_cache(sources, root, cache, CropSettings(32), progress=False)
    assert (again.processed, again.up_to_date) == (0, 3)
    with pytest.raises(ValueError, match="was built with"):
        prepare_face_cache(sources, root, cache, CropSettings(32, cache_format="png"))


@needs_dlib
def test_png_cache_holds_the_same_pixels_as_bmp(release, tmp_path_factory):
    root, sources, _ = release
    bmp, png = tmp_path_factory.mktemp("bmp"), tmp_path_factory.mktemp("png")
    prepare_face_cache(sources[:2], root, bmp, CropSettings(32), progress=False)
    prepare_face_cache(sources[:2], root, png, CropSettings(32, cache_format="png"), progress=False)
    for key, entry in faces.read_manifest(png).items():
        assert entry["cache_file"].endswith(".png")
        other = faces.read_manifest(bmp)[key]["cache_file"]
        assert np.array_equal(
            np.asarray(Image.open(png / entry["cache_file"])), np.asarray(Image.open(bmp / other))
        )
    with pytest.raises(ValueError, match="cache_format"):
        CropSettings(cache_format="webp")


@needs_dlib
def test_prepare_in_worker_processes_matches_in_process(release, tmp_path_factory):
    root, sources, cfg = release
    one = tmp_path_factory.mktemp("one")
    two = tmp_path_factory.mktemp("two")
    prepare_face_cache(sources, root, one, CropSettings(32), workers=1, progress=False)
    report = prepare_face_cache(
        sources, root, two, CropSettings(32), workers=2, chunksize=1, progress=False
    )
    assert report.workers == 2 and report.processed == 3
    a, b = faces.read_manifest(one), faces.read_manifest(two)
    assert a.keys() == b.keys()
    for key in a:
        assert {k: v for k, v in a[key].items()} == b[key]
        if a[key]["status"] == "ok":
            pa, pb = one / a[key]["cache_file"], two / b[key]["cache_file"]
            assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))


@needs_dlib
def test_resolve_cached_rows_maps_sources_and_detects_staleness(release):
    root, sources, cfg = release
    good = [(sources[0], 3), (sources[1], 5)]
    with pytest.raises(StaleCacheError, match="owdfa-bench prepare data=owdfa40 data.root="):
        resolve_cached_rows(good, cfg)  # no cache yet
    prepare_face_cache(sources, root, cache_dir_for(cfg), CropSettings(32), progress=False)
    rows = resolve_cached_rows(good, cfg)
    assert [label for _, label in rows] == [3, 5]
    assert all(Image.open(p).size == (32, 32) for p, _ in rows)

    with pytest.raises(RuntimeError, match="broken.jpg"):
        resolve_cached_rows(good + [(sources[2], 1)], cfg)
    kept = resolve_cached_rows(good + [(sources[2], 1)], {**cfg, "max_unreadable_fraction": 0.5})
    assert kept == rows

    with pytest.raises(StaleCacheError, match="was built with"):
        resolve_cached_rows(good, {**cfg, "image_size": 64, "cache_dir": str(cache_dir_for(cfg))})

    extra = Path(root) / "1_Swap_Deepfakes" / "new.png"
    shutil.copy(sources[1], extra)
    with pytest.raises(StaleCacheError, match="not in the cache manifest"):
        resolve_cached_rows(good + [(str(extra), 1)], cfg)

    st = os.stat(sources[1])
    os.utime(sources[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleCacheError, match="changed since"):
        resolve_cached_rows(good, cfg)
    # Same bytes, new mtime: prepare refreshes the stat without a new detection.
    report = prepare_face_cache(sources, root, cache_dir_for(cfg), CropSettings(32), progress=False)
    assert report.processed == 1
    assert resolve_cached_rows(good, cfg) == rows


def flip_a_byte(path: Path) -> None:
    """One byte of `path` inverted in place: same size, same inode, mtime set back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - 10)  # pixel data, not the header
        byte = f.read(1)
        f.seek(st.st_size - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@needs_dlib
def test_a_flipped_byte_in_a_crop_stops_training_and_prepare_makes_it_again(release):
    root, sources, cfg = release
    cache = cache_dir_for(cfg)
    prepare_face_cache(sources, root, cache, CropSettings(32), progress=False)
    good = [(sources[0], 3), (sources[1], 5)]
    rows = resolve_cached_rows(good, cfg)
    crop = Path(rows[0][0])
    digest = hashlib.sha256(crop.read_bytes()).hexdigest()
    assert faces.read_manifest(cache)["1_Swap_Deepfakes/face.jpg"]["crop_sha256"] == digest
    flip_a_byte(crop)
    with pytest.raises(StaleCacheError, match="1 cached crops differ from their SHA-256") as err:
        resolve_cached_rows(good, cfg)
    assert str(crop) in str(err.value) and "owdfa-bench prepare" in str(err.value)
    report = prepare_face_cache(sources, root, cache, CropSettings(32), progress=False)
    assert (report.processed, report.up_to_date) == (1, 2)  # only the damaged crop, detected again
    assert hashlib.sha256(crop.read_bytes()).hexdigest() == digest
    assert resolve_cached_rows(good, cfg) == rows


@needs_dlib
def test_a_copied_crop_cache_is_hashed_once_and_an_older_one_gets_its_digests(
    release, tmp_path, monkeypatch
):
    root, sources, cfg = release
    prepare_face_cache(sources, root, cache_dir_for(cfg), CropSettings(32), progress=False)
    copy = shutil.copytree(cache_dir_for(cfg), tmp_path / "copied-cache")
    copied = {**cfg, "cache_dir": str(copy)}
    good = [(sources[0], 3), (sources[1], 5)]
    hashed, real = [], cache_module.file_digest
    monkeypatch.setattr(cache_module, "file_digest", lambda *a: hashed.append(a) or real(*a))
    assert [label for _, label in resolve_cached_rows(good, copied)] == [3, 5]
    assert len(hashed) == 2
    resolve_cached_rows(good, copied)
    assert len(hashed) == 2  # stamped: not read again

    # a manifest of before crop digests: training asks for prepare, which only hashes the crops
    old_columns = [c for c in faces.MANIFEST_FIELDS if c != "crop_sha256"]
    manifest = faces.read_manifest(copy)
    with open(copy / faces.MANIFEST_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(manifest.values())
    assert faces.read_manifest(copy)["1_Swap_Deepfakes/face.jpg"]["crop_sha256"] == ""
    with pytest.raises(StaleCacheError, match="before crop digests were recorded"):
        resolve_cached_rows(good, copied)
    report = prepare_face_cache(sources, root, copy, CropSettings(32), progress=False)
    assert (report.processed, report.up_to_date) == (0, 3)
    assert faces.read_manifest(copy) == manifest
    assert [label for _, label in resolve_cached_rows(good, copied)] == [3, 5]


@needs_dlib
def test_cli_prepare_composes_overrides(release, tmp_path_factory):
    root, _, _ = release
    conf = tmp_path_factory.mktemp("conf")
    (conf / "data").mkdir()
    (conf / "config.yaml").write_text("defaults:\n  - _self_\n  - data: owdfa40\nseed: 1\n")
    (conf / "data" / "owdfa40.yaml").write_text(
        "name: owdfa40\nroot: null\nimage_size: 256\ncrop_face: true\ncache_dir: null\n"
        "predictor_path: null\n"
    )
    code = faces.cli_prepare(
        [
            f"data.root={root}",
            "data.image_size=24",
            "--workers",
            "1",
            "--no-progress",
            "--config-dir",
            str(conf),
        ]
    )
    assert code == 0
    manifest = faces.read_manifest(Path(root) / ".owdfa_cache" / "crops-24")
    assert len(manifest) == 3
    assert (
        faces.cli_prepare(
            ["data.root=" + str(root / "absent"), "--config-dir", str(conf), "--no-progress"]
        )
        == 1
    )


@needs_dlib
def test_alignment_needs_and_uses_the_predictor(release):
    root, sources, cfg = release
    with pytest.raises(ValueError, match="predictor"):
        prepare_face_cache(
            sources, root, cache_dir_for(cfg), CropSettings(32, align=True), progress=False
        )
    try:
        predictor = faces.load_predictor(resolve_predictor_path(None, root))
    except FileNotFoundError:
        pytest.skip("no 68-landmark predictor file available offline")
    image = faces.read_bgr(portrait_path())
    chip, _, found = crop_face_bgr(image, faces.make_detector(), predictor)
    assert found and chip.shape == (faces.ALIGNED_CHIP_SIZE, faces.ALIGNED_CHIP_SIZE, 3)


def test_a_cropped_run_records_its_dropped_images_and_its_share_without_a_face(
    make_owdfa40_cfg, owdfa40_root, tmp_path
):
    """The record lists an image the crop cache could not read, and how many images dlib found
    no face in (the tree's flat colour images: all of them, kept whole)."""
    pytest.importorskip("dlib")
    from owdfa_bench.runner import run

    root = tmp_path / "data"
    shutil.copytree(owdfa40_root, root)
    broken = root / "1_Swap_Deepfakes" / "frames" / "000.png"
    broken.write_bytes(b"not a png")
    crops = tmp_path / "crops"
    cfg = make_owdfa40_cfg(
        f"data.root={root}",
        "data.crop_face=true",
        f"data.cache_dir={crops}",
        "data.max_unreadable_fraction=0.05",
    )
    settings = faces.settings_from_config(cfg.data)
    faces.prepare_face_cache(faces.list_sources(cfg), root, crops, settings, progress=False)
    record = run(cfg)
    assert record["unreadable"] == [str(broken)]
    images = sum(record["counts"].values())
    assert record["face_crops"] == {"images": images, "no_face": images, "no_face_share": 1.0}
