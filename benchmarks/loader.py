"""Loader benchmark: the reference's per-access face cropping against the prepared crop cache.

Both loaders read the same face images through the same Dataset class (`EvalRows`), the same
DataLoader settings and the same torchvision transform (Resize((256, 256)), ToTensor, Normalize;
the square size is what lets crops of different shapes be batched, and is the reference's test
transform):

(a) reference-style: OpenCV decode, dlib detection, crop, BGR->RGB on every access
    (`FaceCropLoader`, what CAL and CPL do in `__getitem__`);
(b) ours: `owdfa-bench prepare` once, then decode the cached 256 px crop (BMP, the default, and
    PNG, the compact option).

Wall-clock images/s through the DataLoader depend on what else runs on the machine, so the
single-process CPU time per item (`time.process_time`) is reported beside them. It also reports
the preparation throughput per number of worker processes and the cache-format measurements
(BMP / PNG / JPEG q95 / uint8 .npy: size, decode and encode time) behind the BMP default.

The images are variations (flip, scale, shift, brightness) of the real portrait that matplotlib
ships (`grace_hopper.jpg`, 512x600), saved as JPEG q95; no download is needed.

    python benchmarks/loader.py [--images 128] [--workers 2] [--prepare-workers 1 2]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from owdfa_bench.data.datasets import EvalRows, load_rgb  # noqa: E402
from owdfa_bench.data.faces import (  # noqa: E402
    CropSettings,
    FaceCropLoader,
    make_detector,
    prepare_face_cache,
    read_bgr,
    resolve_cached_rows,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def portrait() -> Image.Image:
    import matplotlib.cbook

    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` 512x600 JPEGs: the portrait flipped, rescaled 0.85-1.15, shifted, re-lit."""
    rng = np.random.default_rng(seed)
    base = portrait().convert("RGB")
    width, height = base.size
    paths = []
    for i in range(count):
        img = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else base
        scale = rng.uniform(0.85, 1.15)
        img = img.resize((int(width * scale), int(height * scale)), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
        dx = int(rng.integers(-40, 41)) + (width - img.width) // 2
        dy = int(rng.integers(-40, 41)) + (height - img.height) // 2
        canvas.paste(img, (dx, dy))
        pixels = np.clip(np.asarray(canvas, np.float32) * rng.uniform(0.8, 1.2), 0, 255)
        path = folder / "1_Swap_Benchmark" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
        paths.append(str(path))
    return paths


def one_thread(_worker_id: int = 0) -> None:
    torch.set_num_threads(1)  # each DataLoader worker is one core, as in training


def images_per_second(dataset: EvalRows, workers: int, batch_size: int, epochs: int) -> float:
    """Timed epochs after one untimed warm-up epoch (worker start-up, page cache)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        persistent_workers=workers > 0,
        worker_init_fn=one_thread,
    )
    for _ in loader:
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


def timed_ms(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def format_table(crops: list[Image.Image]) -> list[tuple[str, float, float, float, str]]:
    """(format, KiB per crop, decode ms, encode ms, lossless?) averaged over the crops."""
    encoders = {
        "BMP (default)": lambda im, b: im.save(b, format="BMP"),
        "PNG level 1 (`data.cache_format=png`)": lambda im, b: im.save(
            b, format="PNG", compress_level=1
        ),
        "PNG (level 6)": lambda im, b: im.save(b, format="PNG", compress_level=6),
        "JPEG q95": lambda im, b: im.save(b, format="JPEG", quality=95),
        "uint8 .npy": lambda im, b: np.save(b, np.asarray(im)),
    }
    rows = []
    for name, encode in encoders.items():
        blobs = []
        encode_ms = 0.0
        for im in crops:
            buf = io.BytesIO()
            encode_ms += timed_ms(lambda im=im, encode=encode: encode(im, io.BytesIO()), 2)
            encode(im, buf)
            blobs.append(buf.getvalue())
        if name.endswith(".npy"):

            def decode(b):
                return Image.fromarray(np.load(io.BytesIO(b)))
        else:

            def decode(b):
                return Image.open(io.BytesIO(b)).convert("RGB")

        decode_ms = sum(timed_ms(lambda b=b: decode(b), 5) for b in blobs)
        lossless = all(
            np.array_equal(np.asarray(decode(b)), np.asarray(im)) for b, im in zip(blobs, crops)
        )
        n = len(crops)
        rows.append(
            (
                name,
                sum(map(len, blobs)) / n / 1024,
                decode_ms / n,
                encode_ms / n,
                "yes" if lossless else "no",
            )
        )
    return rows


def cpu_ms_per_item(dataset: EvalRows, repeat: int) -> float:
    """Single-process CPU time of one `dataset[i]`, warm, averaged over `repeat` passes."""
    dataset[0]
    start = time.process_time()
    for _ in range(repeat):
        for i in range(len(dataset)):
            dataset[i]
    return (time.process_time() - start) / (repeat * len(dataset)) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (all loaders)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prepare-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cached-epochs", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="keep files here instead of a temp dir")
    args = parser.parse_args(argv)
    one_thread()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="owdfa-loader-bench-"))
    root = workdir / "data"
    try:
        sources = make_images(root, args.images)
        detector = make_detector()
        found = sum(len(detector(read_bgr(p), 0)) > 0 for p in sources)
        print(f"{len(sources)} images of 512x600 px (JPEG q95), faces found by dlib: {found}")

        prep = {}
        for n in args.prepare_workers:
            report = prepare_face_cache(
                sources,
                root,
                workdir / f"bmp-w{n}",
                CropSettings(256),
                workers=n,
                chunksize=4,
                progress=False,
            )
            prep[n] = report.images_per_second
            print(f"prepare with {n} worker(s): {prep[n]:.1f} img/s")
        prepare_face_cache(
            sources,
            root,
            workdir / "png",
            CropSettings(256, cache_format="png"),
            workers=max(args.prepare_workers),
            chunksize=4,
            progress=False,
        )
        rows = [(p, 0) for p in sources]
        base_cfg = {"name": "owdfa40", "root": str(root), "image_size": 256, "crop_face": True}
        bmp_cfg = {**base_cfg, "cache_dir": str(workdir / f"bmp-w{args.prepare_workers[0]}")}
        png_cfg = {**base_cfg, "cache_dir": str(workdir / "png"), "cache_format": "png"}

        transform = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize(MEAN, STD)])
        loaders = {
            "reference-style (decode + dlib detect + crop, every access)": EvalRows(
                rows, transform, loader=FaceCropLoader()
            ),
            "cached crops, BMP (default)": EvalRows(
                resolve_cached_rows(rows, bmp_cfg), transform, loader=load_rgb
            ),
            "cached crops, PNG (`data.cache_format=png`)": EvalRows(
                resolve_cached_rows(rows, png_cfg), transform, loader=load_rgb
            ),
        }
        results = {}
        for i, (name, dataset) in enumerate(loaders.items()):
            epochs = 1 if i == 0 else args.cached_epochs
            ips = images_per_second(dataset, args.workers, args.batch_size, epochs)
            cpu = cpu_ms_per_item(dataset, 1 if i == 0 else 5)
            results[name] = (ips, cpu)
            print(f"{name}: {ips:.1f} img/s, {cpu:.2f} CPU ms/item")
        (ref_ips, ref_cpu), *_ = results.values()
        print("speed-up: " + ", ".join(f"{ips / ref_ips:.1f}x" for ips, _ in results.values()))

        crops = [load_rgb(p) for p, _ in loaders["cached crops, BMP (default)"].rows[:32]]
        formats = format_table(crops)

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print("\n--- markdown for the README ---\n")
        print(
            f"Measured with `python benchmarks/loader.py` on {os.cpu_count()} CPU cores "
            f"({platform.machine()}, load average {load:.1f} during the run), "
            f"{len(sources)} face images of 512x600 px (JPEG q95, dlib finds a face in "
            f"{found}), DataLoader with {args.workers} workers, batch {args.batch_size}, "
            "transform Resize((256, 256)) + ToTensor + Normalize.\n"
        )
        print("| loader | images/s (DataLoader) | speed-up | CPU ms per item | speed-up |")
        print("|---|---:|---:|---:|---:|")
        for name, (ips, cpu) in results.items():
            print(
                f"| {name} | {ips:.1f} | {ips / ref_ips:.1f}x | {cpu:.2f} | {ref_cpu / cpu:.1f}x |"
            )
        print("\n| `owdfa-bench prepare` workers | images/s |\n|---:|---:|")
        for n, ips in prep.items():
            print(f"| {n} | {ips:.1f} |")
        print("\n| cache format (256x256 crop) | KiB | decode ms | encode ms | lossless |")
        print("|---|---:|---:|---:|---|")
        for name, kib, dec, enc, lossless in formats:
            print(f"| {name} | {kib:.1f} | {dec:.2f} | {enc:.2f} | {lossless} |")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
