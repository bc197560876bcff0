"""Face cropping as in the references, and the crop cache that `owdfa-bench prepare` builds once.

The reference (CAL and CPL, identical code; CPL's `owdfa/datasets/utils/face_cropper.py`) crops
on every `__getitem__`: OpenCV reads the image as BGR, dlib's frontal detector runs on that BGR
array with 0 upsampling, the FIRST detection is enlarged by a 1.2 margin (each side by
`int(w * (1.2 - 1) / 2)`, `int(h * (1.2 - 1) / 2)`), clipped and cropped; with no detection the
whole image is used; then BGR -> RGB. The 68-landmark predictor is loaded but unused (its
alignment branch is dead code, `align=False`).

Here detection runs once per image in worker processes, and the crop is stored resized to
`image_size` x `image_size` (PIL bilinear, the same operation as the final `Resize((s, s))` of the
test and weak views) in a lossless file, with a manifest recording for each source its size,
mtime and SHA-1, the crop box, whether a face was found, the cache file and its SHA-256. Training
then reads the small crop instead of decoding and detecting. Each crop is hashed once, when
written, and stamped (`owdfa_bench.cache`); training and `prepare` check every crop they use
against the manifest's SHA-256 by its stamp, or by hashing all of them when a stamp misses (a
copied cache) or `OWDFA_BENCH_CACHE_CHECK=full` asks. A damaged crop stops training with the
file named and the `prepare` command, which redoes it; so does a source whose size or mtime
changed. The default cache format is uncompressed BMP (lossless, read by PIL with no loader
change, ~4x cheaper to decode than PNG, 1.7x its size); `data.cache_format=png` trades decode
time for disk. `benchmarks/README.md` has the measurements
behind that choice and the speed-up.

Deliberate deviations from the reference:
- Cached crops are pre-resized to the square training size. The test and weak views are
  therefore bit-identical to the reference's (resizing to the same size is the identity in PIL);
  the strong view's RandomResizedCrop / shorter-side resize to 292 px starts from the 256 px crop
  instead of the full-resolution crop (one extra resampling).
- An unreadable image is reported by `prepare` and is an error when training touches it (the
  reference silently returns the first item it ever loaded instead), unless
  `data.max_unreadable_fraction` allows dropping it.
- The predictor is needed only for the optional alignment (dlib face chip of 320 px as in the
  reference's dead branch: `owdfa-bench prepare data=owdfa40 data.root=DIR data.align=true`,
  and `data.align=true` when training); by default its presence is not checked.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from owdfa_bench.cache import (
    STAMPS_FILE,
    FileStamp,
    atomic_path,
    build_lock,
    content_mismatches,
    file_digest,
    read_json,
    stale_reason,
    stamp_files,
    write_json_atomic,
)
from owdfa_bench.resources import conf_dir

log = logging.getLogger(__name__)

Row = tuple[str, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (right/bottom exclusive), in source pixels

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
FACE_MARGIN = 1.2  # reference `dlib_crop_face(..., margin=1.2)`
ALIGNED_CHIP_SIZE = 320  # reference alignment branch: dlib.get_face_chip(size=320)
CACHE_VERSION = 1
# Lossless formats PIL reads directly, with their save options (benchmarks/README.md).
# PNG level 1: level 6 decodes no faster, writes ~4x slower, saves only ~5% of the size.
CACHE_FORMATS = {
    "bmp": {"format": "BMP"},  # default: uncompressed, fastest to decode
    "png": {"format": "PNG", "compress_level": 1},  # ~60% of the BMP size, ~4x slower decode
}
DEFAULT_CACHE_FORMAT = "bmp"
MANIFEST_FILE = "manifest.csv"
INFO_FILE = "cache_info.json"
REPORT_FILE = "prepare_report.json"
MANIFEST_FIELDS = (
    "source",
    "size",
    "mtime_ns",
    "sha1",
    "status",
    "face_found",
    "x0",
    "y0",
    "x1",
    "y1",
    "width",
    "height",
    "cache_file",
    "crop_sha256",  # of the cache file; empty in manifests written before it was recorded
)
CONF_DIR = conf_dir()


# --------------------------------------------------------------------------------------------
# Cropping (shared by the on-the-fly loader and `prepare`)


def margin_box(
    left: int,
    top: int,
    right: int,
    bottom: int,
    height: int,
    width: int,
    margin: float = FACE_MARGIN,
) -> Box:
    """The reference's enlarged, clipped box around a detection.

    `margin - 1` is computed in floating point exactly as the reference does, so with 1.2 the
    growth factor is 0.19999999999999996: a 100 px wide face grows by 9 px per side, not 10.
    """
    extra = margin - 1
    w, h = right - left, bottom - top
    dx, dy = int(w * extra / 2), int(h * extra / 2)
    return (max(0, left - dx), max(0, top - dy), min(width, right + dx), min(height, bottom + dy))


def crop_face_bgr(
    image_bgr: np.ndarray, detector: Any, predictor: Any = None, margin: float = FACE_MARGIN
) -> tuple[np.ndarray, Box, bool]:
    """(RGB crop, box, face found) of a BGR uint8 image, as the reference crops it.

    `detector` is dlib's frontal face detector (or any callable `detector(image, 0)` returning
    rectangles with left/top/right/bottom methods); it sees the BGR array, as in the reference.
    The first detection is used. Without a face the whole image is returned with `found=False`.
    With a dlib shape `predictor` the face is aligned to a 320 px chip instead (the reference's
    unused `align=True` branch); the box is then the raw detection.
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(
            f"expected an HxWx3 uint8 BGR image, got shape {image_bgr.shape} "
            f"dtype {image_bgr.dtype}"
        )
    height, width = image_bgr.shape[:2]
    detections = detector(image_bgr, 0)
    if len(detections) > 0:
        det = detections[0]
        if predictor is not None:
            import dlib

            chip = dlib.get_face_chip(image_bgr, predictor(image_bgr, det), size=ALIGNED_CHIP_SIZE)
            box = (det.left(), det.top(), det.right(), det.bottom())
            return np.ascontiguousarray(chip[:, :, ::-1]), box, True
        box = margin_box(det.left(), det.top(), det.right(), det.bottom(), height, width, margin)
        x0, y0, x1, y1 = box
        if x0 < x1 and y0 < y1:  # a detection wholly outside the image falls through
            return np.ascontiguousarray(image_bgr[y0:y1, x0:x1, ::-1]), box, True
    return np.ascontiguousarray(image_bgr[:, :, ::-1]), (0, 0, width, height), False


def read_bgr(path: str | os.PathLike) -> np.ndarray | None:
    """OpenCV's colour read (the reference's `cv2.imread`); None when the file cannot be read."""
    import cv2

    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return image if image is not None and image.size else None


def make_detector() -> Any:
    try:
        import dlib
    except ImportError as err:
        raise ImportError(
            "face cropping needs dlib: pip install 'owdfa-bench[face]' "
            "(dlib-bin provides prebuilt wheels)"
        ) from err
    return dlib.get_frontal_face_detector()


def load_predictor(path: str | os.PathLike) -> Any:
    import dlib

    return dlib.shape_predictor(str(path))


def resolve_predictor_path(
    predictor_path: str | os.PathLike | None = None, release_root: str | os.PathLike | None = None
) -> Path:
    """The 68-landmark predictor file: explicit path, else the release, else the package.

    Looked up, in order: `predictor_path`; `<release_root>/` and its parent (the release puts the
    file beside its image folders); `face_recognition_models/models/` found with
    `importlib.util.find_spec`, which locates the package without importing it (importing it
    fails on current setuptools, which no longer ships `pkg_resources`).
    """
    if predictor_path:
        path = Path(predictor_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"data.predictor_path={path} does not exist; point it at "
                f"{PREDICTOR_FILE} or set it to null to search the release "
                "and the face-recognition-models package"
            )
        return path
    candidates = []
    if release_root:
        root = Path(release_root).expanduser()
        candidates += [root / PREDICTOR_FILE, root.parent / PREDICTOR_FILE]
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "models" / PREDICTOR_FILE for p in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = "\n  ".join(str(c) for c in candidates) or "(nothing: no release root given)"
    raise FileNotFoundError(
        f"{PREDICTOR_FILE} not found; searched:\n  {searched}\n"
        "Run `owdfa-bench download --root DIR` (the release ships it), "
        "pip install face-recognition-models, or set data.predictor_path."
    )


class FaceCropLoader:
    """`path -> RGB PIL image` of the face crop, detecting on every call (the reference's way).

    The detector is built lazily in each process, so the loader pickles into DataLoader workers.
    """

    def __init__(self, margin: float = FACE_MARGIN):
        self.margin = margin
        self._detector = None

    def __getstate__(self) -> dict:
        return {"margin": self.margin, "_detector": None}

    def __call__(self, path: str) -> Image.Image:
        if self._detector is None:
            self._detector = make_detector()
        image = read_bgr(path)
        if image is None:
            raise OSError(f"cannot read image {path}")
        crop, _, _ = crop_face_bgr(image, self._detector, margin=self.margin)
        return Image.fromarray(crop)


def resize_square(crop_rgb: np.ndarray, size: int) -> Image.Image:
    """The cache's resize: PIL bilinear to size x size, as torchvision's Resize((s, s)) does."""
    return Image.fromarray(crop_rgb).resize((size, size), Image.Resampling.BILINEAR)


# --------------------------------------------------------------------------------------------
# The cache: settings, keys, manifest


@dataclass(frozen=True)
class CropSettings:
    """What a cache's crops depend on; a cache built with other settings is stale."""

    image_size: int = 256
    margin: float = FACE_MARGIN
    align: bool = False
    cache_format: str = DEFAULT_CACHE_FORMAT

    def __post_init__(self) -> None:
        if self.cache_format not in CACHE_FORMATS:
            raise ValueError(
                f"data.cache_format={self.cache_format!r}; use one of {sorted(CACHE_FORMATS)}"
            )

    def info(self) -> dict:
        return {"version": CACHE_VERSION, **asdict(self)}


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def settings_from_config(data_cfg: Any) -> CropSettings:
    return CropSettings(
        image_size=int(_cfg_get(data_cfg, "image_size", 256)),
        margin=float(_cfg_get(data_cfg, "face_margin", FACE_MARGIN)),
        align=bool(_cfg_get(data_cfg, "align", False)),
        cache_format=str(_cfg_get(data_cfg, "cache_format", DEFAULT_CACHE_FORMAT)),
    )


def cache_dir_for(data_cfg: Any) -> Path:
    """`data.cache_dir`, or `<data.root>/.owdfa_cache/<crops|aligned>-<image_size>`
    (suffixed `-png` for the PNG format, so both formats can sit side by side)."""
    explicit = _cfg_get(data_cfg, "cache_dir")
    if explicit:
        return Path(str(explicit)).expanduser()
    root = _cfg_get(data_cfg, "root")
    if not root:
        raise ValueError("the face-crop cache needs data.root or data.cache_dir to be set")
    settings = settings_from_config(data_cfg)
    kind = "aligned" if settings.align else "crops"
    name = f"{kind}-{settings.image_size}"
    if settings.cache_format != DEFAULT_CACHE_FORMAT:
        name += f"-{settings.cache_format}"
    return Path(str(root)).expanduser() / ".owdfa_cache" / name


def source_key(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """Manifest key: the path relative to the data root (portable), or absolute outside it."""
    absolute = os.path.abspath(path)
    if root:
        rel = os.path.relpath(absolute, os.path.abspath(root))
        if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            return Path(rel).as_posix()
    return Path(absolute).as_posix()


def cache_file_for(key: str, cache_format: str = DEFAULT_CACHE_FORMAT) -> str:
    """Cache path (relative to the cache folder) of a manifest key; mirrors relative keys."""
    if not Path(key).is_absolute():
        return f"crops/{key}.{cache_format}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return f"external/{digest[:2]}/{digest}_{os.path.basename(key)}.{cache_format}"


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """key -> manifest entry; later lines win (prepare appends, then compacts). A column an
    older manifest lacks reads as ""."""
    path = Path(cache_dir) / MANIFEST_FILE
    entries: dict[str, dict[str, str]] = {}
    if not path.is_file():
        return entries
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [k for k in MANIFEST_FIELDS if k in (reader.fieldnames or ())]
        for row in reader:
            if all(row.get(k) is not None for k in columns):  # skip a torn last line
                entries[row["source"]] = {k: row.get(k) or "" for k in MANIFEST_FIELDS}
    return entries


def _manifest_columns(cache_dir: Path) -> list[str]:
    with open(cache_dir / MANIFEST_FILE, newline="") as f:
        return next(csv.reader(f), [])


def write_manifest(cache_dir: str | os.PathLike, entries: Iterable[dict]) -> None:
    """The compacted manifest (one line per source, sorted), replacing the old one atomically."""
    with atomic_path(Path(cache_dir) / MANIFEST_FILE) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        for entry in sorted(entries, key=lambda e: e["source"]):
            writer.writerow({k: entry[k] for k in MANIFEST_FIELDS})


def _read_info(cache_dir: Path) -> dict | None:
    return read_json(cache_dir / INFO_FILE)


def _stat_matches(entry: dict, st: os.stat_result) -> bool:
    """Whether a manifest entry's recorded size and mtime are the source's current ones."""
    return FileStamp(int(entry["size"]), int(entry["mtime_ns"])).matches_stat(st)


def _damaged_crops(cache: Path, entries: Sequence[dict[str, str]]) -> set[str]:
    """The cache files of `entries` (status ok) that are missing or not the crop their manifest
    entry's SHA-256 describes. A crop made before crop digests were recorded gets its SHA-256
    now (entries are updated in place): it was trusted on its size before, and is from now on
    checked by content."""
    ok = [e for e in entries if e["status"] == "ok"]
    older = [e for e in ok if not e["crop_sha256"] and (cache / e["cache_file"]).is_file()]
    for entry in older:
        entry["crop_sha256"] = file_digest(cache / entry["cache_file"])
    if older:
        log.info("face-crop cache %s: recorded the SHA-256 of %d older crops", cache, len(older))
    listed = {e["cache_file"]: e["crop_sha256"] for e in ok}
    return set(content_mismatches(cache, listed, cache / STAMPS_FILE))


# --------------------------------------------------------------------------------------------
# Prepare: detection once per image, in worker processes


def crop_to_cache(
    source: str,
    key: str,
    cache_dir: str,
    settings: CropSettings,
    detector: Any,
    predictor: Any = None,
    previous: dict | None = None,
) -> dict:
    """Crop one source image into the cache; return its manifest entry.

    When the source's stat changed but its SHA-1 did not (a copy, a touch) and the crop exists,
    only the stat is refreshed: no second detection. The caller passes no `previous` for a crop
    found damaged, so it is made again.
    """
    cache_file = cache_file_for(key, settings.cache_format)
    out = os.path.join(cache_dir, cache_file)
    entry = dict.fromkeys(MANIFEST_FIELDS, "")
    entry.update(source=key, cache_file=cache_file, face_found="0")
    try:
        stamp = FileStamp.of(source, "sha1")
    except OSError:
        entry.update(size="-1", mtime_ns="-1", status="missing")
        return entry
    entry.update(size=str(stamp.size), mtime_ns=str(stamp.mtime_ns), sha1=stamp.digest)
    if (
        previous
        and previous.get("status") == "ok"
        and previous.get("sha1") == stamp.digest
        and os.path.isfile(out)
    ):
        return {**previous, "size": entry["size"], "mtime_ns": entry["mtime_ns"]}
    image = read_bgr(source)
    if image is None:
        entry.update(status="unreadable")
        return entry
    height, width = image.shape[:2]
    crop, box, found = crop_face_bgr(image, detector, predictor, settings.margin)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_path(out) as tmp:  # a killed prepare never leaves a half-written crop
        resize_square(crop, settings.image_size).save(tmp, **CACHE_FORMATS[settings.cache_format])
        crop_sha256 = file_digest(tmp)  # hashed once, here; reuse compares stamps
    entry.update(
        status="ok",
        crop_sha256=crop_sha256,
        face_found=str(int(found)),
        x0=box[0],
        y0=box[1],
        x1=box[2],
        y1=box[3],
        width=width,
        height=height,
    )
    return {k: str(v) for k, v in entry.items()}


_WORKER: dict[str, Any] = {}


def _init_worker(cache_dir: str, settings: CropSettings, predictor_path: str | None) -> None:
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the processes
    _WORKER.update(
        cache_dir=cache_dir,
        settings=settings,
        detector=make_detector(),
        predictor=load_predictor(predictor_path) if predictor_path else None,
    )


def _work(task: tuple[str, str, dict | None]) -> dict:
    source, key, previous = task
    return crop_to_cache(
        source,
        key,
        _WORKER["cache_dir"],
        _WORKER["settings"],
        _WORKER["detector"],
        _WORKER["predictor"],
        previous,
    )


@dataclass
class PrepareReport:
    cache_dir: str
    requested: int = 0
    up_to_date: int = 0  # skipped: manifest entry and crop already current
    processed: int = 0
    faces: int = 0  # over all requested sources
    no_face: int = 0
    unreadable: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    workers: int = 1
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"face-crop cache: {self.cache_dir}",
            f"  {self.requested} images: {self.processed} processed "
            f"({self.images_per_second:.1f} img/s with {self.workers} workers), "
            f"{self.up_to_date} already up to date",
            f"  face found: {self.faces}; no face (whole image kept): {self.no_face}; "
            f"unreadable: {len(self.unreadable)}; missing: {len(self.missing)}",
        ]
        for title, paths in (("unreadable", self.unreadable), ("missing", self.missing)):
            if paths:
                lines.append(f"  {title} (first 10 of {len(paths)}):")
                lines += [f"    {p}" for p in paths[:10]]
        return "\n".join(lines)


def _progress(items: Iterator[dict], total: int, enabled: bool) -> Iterator[dict]:
    if not enabled:
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]cropping faces"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("crop", total=total)
        for item in items:
            bar.advance(task)
            yield item


def prepare_face_cache(
    sources: Sequence[str],
    root: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    settings: CropSettings | None = None,
    workers: int = 1,
    chunksize: int = 16,
    predictor_path: str | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Crop every source image once into `cache_dir`; safe to re-run (only stale work is done).

    `root` makes manifest keys relative (the data root; sources outside it keep absolute keys).
    `workers > 1` uses a multiprocessing pool, each worker with its own dlib detector.
    Alignment (`settings.align`) needs `predictor_path`.
    """
    settings = settings or CropSettings()
    if settings.align and not predictor_path:
        raise ValueError(
            "alignment (data.align=true) needs the landmark predictor; "
            "pass predictor_path (see resolve_predictor_path)"
        )
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with build_lock(cache):  # two prepares of one cache would drop each other's manifest lines
        return _prepare_locked(
            sources, root, cache, settings, workers, chunksize, predictor_path, progress
        )


def _prepare_locked(
    sources: Sequence[str],
    root: str | os.PathLike | None,
    cache: Path,
    settings: CropSettings,
    workers: int,
    chunksize: int,
    predictor_path: str | None,
    progress: bool,
) -> PrepareReport:
    info = _read_info(cache)
    if info is not None and info != settings.info():
        reason = stale_reason(info, settings.info()) or "other keys"
        raise ValueError(
            f"the cache at {cache} was built with {info}, not {settings.info()} ({reason}); "
            "delete it or set data.cache_dir to another folder"
        )
    write_json_atomic(cache / INFO_FILE, settings.info(), indent=2)
    manifest = read_manifest(cache)
    if manifest and _manifest_columns(cache) != list(MANIFEST_FIELDS):
        write_manifest(cache, manifest.values())  # an older layout: appended lines must match
    report = PrepareReport(str(cache), workers=max(1, workers))
    sources = list(dict.fromkeys(str(s) for s in sources))  # de-duplicated, order kept
    keys = [source_key(source, root) for source in sources]
    damaged = _damaged_crops(cache, [manifest[k] for k in keys if k in manifest])
    tasks = []
    for source, key in zip(sources, keys):
        previous = manifest.get(key)
        if previous is not None and previous["cache_file"] in damaged:
            previous = None  # made again, detection included
        try:
            st = os.stat(source)
        except OSError:
            st = None
        if previous is not None and st is not None and _stat_matches(previous, st):
            report.up_to_date += 1
        else:
            tasks.append((source, key, previous))
    report.requested = len(keys)

    start = time.perf_counter()
    manifest_path = cache / MANIFEST_FILE
    new_file = not manifest_path.is_file()
    with open(manifest_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        if new_file:
            writer.writeheader()
        init_args = (str(cache), settings, predictor_path)
        if report.workers == 1 or len(tasks) <= 1:
            _init_worker(*init_args)
            results: Iterator[dict] = map(_work, tasks)
            pool = None
        else:
            pool = multiprocessing.get_context().Pool(report.workers, _init_worker, init_args)
            results = pool.imap_unordered(_work, tasks, chunksize=max(1, chunksize))
        made: dict[str, str] = {}  # cache file -> SHA-256 of the crops written or kept now
        try:
            for entry in _progress(results, len(tasks), progress):
                writer.writerow(entry)  # appended as we go: an interrupted run resumes
                manifest[entry["source"]] = entry
                report.processed += 1
                if entry["status"] == "ok":
                    made[entry["cache_file"]] = entry["crop_sha256"]
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            _WORKER.clear()
            stamp_files(cache, made, cache / STAMPS_FILE)
    report.seconds = time.perf_counter() - start
    write_manifest(cache, manifest.values())

    for key in keys:
        entry = manifest[key]
        if entry["status"] == "unreadable":
            report.unreadable.append(key)
        elif entry["status"] == "missing":
            report.missing.append(key)
        elif entry["face_found"] == "1":
            report.faces += 1
        else:
            report.no_face += 1
    report_dict = {**asdict(report), "images_per_second": report.images_per_second}
    write_json_atomic(cache / REPORT_FILE, report_dict, indent=2)
    return report


# --------------------------------------------------------------------------------------------
# Training side: source rows -> cached crop rows


class StaleCacheError(RuntimeError):
    """The face-crop cache is missing, built with other settings, or older than the sources."""


def _prepare_command(data_cfg: Any) -> str:
    name = _cfg_get(data_cfg, "name", "owdfa40")
    parts = [f"owdfa-bench prepare data={name}"]
    defaults = {"image_size": 256, "cache_format": DEFAULT_CACHE_FORMAT}
    for key in ("root", "cache_dir", "image_size", "cache_format"):
        value = _cfg_get(data_cfg, key)
        if value is not None and value != defaults.get(key):
            parts.append(f"data.{key}={value}")
    return " ".join(parts)


@dataclass
class CropCounts:
    """What the crops of a run's rows are: how many hold a detected face, how many keep the
    whole image (dlib found none), and the source images dropped as unreadable."""

    faces: int = 0
    no_face: int = 0
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """For the record: the counts and the share of images without a detected face."""
        images = self.faces + self.no_face
        share = round(self.no_face / images, 4) if images else None
        return {"images": images, "no_face": self.no_face, "no_face_share": share}


def resolve_cached_rows(
    rows: list[Row],
    data_cfg: Any,
    digests: dict[str, str] | None = None,
    counts: CropCounts | None = None,
) -> list[Row]:
    """Map `(source image path, label)` rows to `(cached crop path, label)` rows; `digests`, when
    given, receives each crop's checked SHA-256 (crop path -> hex), and `counts` the rows'
    detected faces and dropped images.

    Raises `StaleCacheError`, naming the `owdfa-bench prepare ...` command to run, when the cache
    is missing, was built with other settings (image size, crop mode, margin, alignment), a
    source is not in its manifest or changed since (size or mtime), or a crop is missing or not
    the content its manifest's SHA-256 says (by its stamp; all the rows' crops are hashed when a
    stamp misses or $OWDFA_BENCH_CACHE_CHECK=full asks). Rows whose source was
    unreadable at prepare time are dropped with a warning when their fraction is at most
    `data.max_unreadable_fraction` (default 0: an error).
    """
    cache = cache_dir_for(data_cfg)
    command = _prepare_command(data_cfg)
    info = _read_info(cache)
    if info is None or not (cache / MANIFEST_FILE).is_file():
        raise StaleCacheError(
            f"no face-crop cache at {cache}. Crop the faces once with:\n  {command}"
        )
    expected = settings_from_config(data_cfg).info()
    if info != expected:
        raise StaleCacheError(
            f"the face-crop cache at {cache} was built with {info}, but the "
            f"config asks for {expected}. Rebuild it with:\n  {command}"
        )
    manifest = read_manifest(cache)
    root = _cfg_get(data_cfg, "root")
    out: list[Row] = []
    not_in_manifest, changed, unreadable, lost, undigested = [], [], [], [], []
    crops: dict[str, str] = {}  # cache file -> SHA-256 of the crops the rows use
    for path, label in rows:
        entry = manifest.get(source_key(path, root))
        if entry is None:
            not_in_manifest.append(path)
            continue
        if entry["status"] == "unreadable":
            unreadable.append(path)
            continue
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or entry["status"] != "ok" or not _stat_matches(entry, st):
            changed.append(path)
            continue
        crop = cache / entry["cache_file"]
        if not crop.is_file():
            lost.append(str(crop))
            continue
        if not entry["crop_sha256"]:
            undigested.append(str(crop))
        crops[entry["cache_file"]] = entry["crop_sha256"]
        out.append((str(crop), label))
        if counts is not None:
            if entry["face_found"] == "1":
                counts.faces += 1
            else:
                counts.no_face += 1
    damaged = [] if undigested else content_mismatches(cache, crops, cache / STAMPS_FILE)
    problems = [
        (not_in_manifest, "not in the cache manifest"),
        (changed, "missing or changed since the cache was built"),
        (lost, "cached crop file missing"),
        (undigested, "cached crops made before crop digests were recorded (prepare records them)"),
        ([str(cache / c) for c in damaged], "cached crops differ from their SHA-256 (damaged)"),
    ]
    problems = [(paths, why) for paths, why in problems if paths]
    if problems:
        details = "\n".join(f"  {len(paths)} {why}, e.g. {paths[0]}" for paths, why in problems)
        raise StaleCacheError(
            f"the face-crop cache at {cache} is stale for these rows:\n"
            f"{details}\nUpdate it (only stale images are redone) with:\n"
            f"  {command}"
        )
    if unreadable:
        allowed = float(_cfg_get(data_cfg, "max_unreadable_fraction", 0.0))
        fraction = len(unreadable) / max(1, len(rows))
        listing = "\n  ".join(unreadable[:20])
        if fraction > allowed:
            raise RuntimeError(
                f"{len(unreadable)} of {len(rows)} images ({fraction:.2%}) could not be read when "
                f"the cache was prepared:\n  {listing}\nFix or replace these files and re-run "
                f"`{command}`, or raise data.max_unreadable_fraction (now {allowed}) to train "
                "without them."
            )
        log.warning("dropping %d unreadable images:\n  %s", len(unreadable), listing)
        if counts is not None:
            counts.unreadable.extend(unreadable)
    if digests is not None:
        digests.update({str(cache / file): digest for file, digest in crops.items()})
    return out


# --------------------------------------------------------------------------------------------
# CLI: owdfa-bench prepare data=owdfa40 data.root=DIR


def compose_config(overrides: Sequence[str], config_dir: str | os.PathLike | None = None) -> Any:
    """The project config composed with Hydra's compose API (no run folder, no logging set-up)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from owdfa_bench.config import register_configs

    register_configs()  # the structured configs the YAML defaults lists name
    conf = Path(config_dir or CONF_DIR).expanduser().resolve()
    if not (conf / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no config.yaml in {conf}; pass --config-dir a folder holding config.yaml"
        )
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def list_sources(cfg: Any) -> list[str]:
    """Every image the data config can use: OWDFA-40 class folders, or OW-DFA meta CSV rows."""
    data_cfg = cfg.data
    name = _cfg_get(data_cfg, "name")
    if name == "owdfa40":
        from owdfa_bench.data.owdfa40 import list_class_folders

        root = _cfg_get(data_cfg, "root")
        if not root:
            raise ValueError("prepare needs data.root=<folder of the OWDFA-40 class folders>")
        return [p for _, _, paths in list_class_folders(root) for p in paths]
    if name == "owdfa23":
        from owdfa_bench.data.owdfa23 import meta_image_paths

        return meta_image_paths(_cfg_get(data_cfg, "meta_dir"), _cfg_get(data_cfg, "root"))
    raise ValueError(
        f"prepare crops real data only (data=owdfa40 or data=owdfa23), got data={name}"
    )


def cli_prepare(argv: list[str]) -> int:
    """`owdfa-bench prepare [--workers N] OVERRIDES...`: crop faces once into the cache."""
    parser = argparse.ArgumentParser(
        prog="owdfa-bench prepare",
        description="Detect and crop faces once, into the cache that training reads.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. data=owdfa40 data.root=/data/OWDFA40"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: all cores)",
    )
    parser.add_argument("--chunksize", type=int, default=16, help="images per worker task")
    parser.add_argument("--config-dir", default=None, help="config folder (default: conf/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True)
    try:
        cfg = compose_config(args.overrides, args.config_dir)
        data_cfg = cfg.data
        settings = settings_from_config(data_cfg)
        predictor = None
        if settings.align:
            predictor = str(
                resolve_predictor_path(
                    _cfg_get(data_cfg, "predictor_path"), _cfg_get(data_cfg, "root")
                )
            )
        sources = list_sources(cfg)
        if not _cfg_get(data_cfg, "crop_face", False):
            console.print("note: training reads these crops only with data.crop_face=true")
        console.print(f"{len(sources)} images; cache {cache_dir_for(data_cfg)}")
        report = prepare_face_cache(
            sources,
            _cfg_get(data_cfg, "root"),
            cache_dir_for(data_cfg),
            settings,
            workers=args.workers,
            chunksize=args.chunksize,
            predictor_path=predictor,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    console.print(report.summary())
    if report.missing:
        console.print("[red]some source images do not exist; check data.root[/red]")
        return 1
    return 0
