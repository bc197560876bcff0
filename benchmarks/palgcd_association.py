"""PAL-GCD association benchmark: time and peak memory of one association step against N.

One association step of `methods.palgcd.associate` on N rows (the K_known labelled class centres
plus N - K_known unlabelled rows, no further sampling): kNN search, the sparse k-reciprocal
encoding with query expansion, the blockwise Jaccard pairs below the threshold, the greedy
prior-constrained association and the proxy memory. The embedding pass through the network that
precedes it in training is not included.

Features are random: a mixture of 41 Gaussian classes in D = 2048 (REAL, class 0, holds 22% of
the rows as in OWDFA-40; the others share the rest), L2-normalised, either isotropic classes
(the default; no local structure and strong hubs, the costly case for the Jaccard step) or
classes made of short "videos" of near-duplicate frames (--video 16). Settings are the
method's OWDFA-40 defaults (k1 20, k2 6, thresh 0.6, outlier_thresh 100, 19 known classes as in
P1).

Each N runs in a fresh child process; the peak memory *added* by the step is the highest
resident memory polled (every 2 ms) during the step minus the resident memory just before it
(imports and input features in place). Times are wall-clock seconds with the given number of
threads. A power law t = c N^a is fitted (least squares in log-log) over N >= --fit-from, per
phase and in total, and used to extrapolate to the larger N given by --extrapolate.

    python benchmarks/palgcd_association.py                 # one thread, about 2 minutes
    python benchmarks/palgcd_association.py --video 16      # frames of videos
    python benchmarks/palgcd_association.py --sizes 2000 4000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("knn_s", "encoding_s", "jaccard_s", "greedy_s", "proxies_s")
NUM_KNOWN = 19  # OWDFA-40 P1
NUM_CLASSES = 41


def current_rss_mib() -> float:
    """Resident memory of this process now, MiB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class PeakRSS:
    """The highest resident memory seen while the block runs, polled every 2 ms (torch's CPU
    allocations are invisible to tracemalloc). `ru_maxrss` cannot isolate a step: it keeps the
    peak of everything before it."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = current_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, current_rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mib())


def mixture_features(n_unlabelled: int, dim: int, rng: np.random.Generator, video: int = 0):
    """Labelled rows (50 per known class) and unlabelled rows of a 41-class Gaussian mixture,
    L2-normalised: (labelled [950, dim], their classes, unlabelled [n_unlabelled, dim]).

    video = 0: every row is its class centre + N(0, 1.5^2) noise (isotropic classes: no local
    structure, strong hubs). video = m > 1: rows come in "videos" of m frames, each video a
    class centre + N(0, 1) offset and each frame that + N(0, 0.5^2) (OWDFA-40's frames of
    videos: tight local groups).
    """
    centres = rng.standard_normal((NUM_CLASSES, dim)).astype(np.float32)
    share = np.full(NUM_CLASSES, 0.78 / (NUM_CLASSES - 1))
    share[0] = 0.22

    def draw(y: np.ndarray) -> np.ndarray:
        if video <= 1:
            x = np.empty((len(y), dim), dtype=np.float32)
            for s in range(0, len(y), 4096):  # in chunks: no large temporaries
                part = y[s : s + 4096]
                x[s : s + 4096] = centres[part] + 1.5 * rng.standard_normal(
                    (len(part), dim), dtype=np.float32
                )
        else:
            y = np.sort(y)
            x = np.empty((len(y), dim), dtype=np.float32)
            for c in np.unique(y):
                rows = np.where(y == c)[0]
                for s in range(0, len(rows), video):
                    part = rows[s : s + video]
                    centre = centres[c] + rng.standard_normal(dim).astype(np.float32)
                    noise = 0.5 * rng.standard_normal((len(part), dim), dtype=np.float32)
                    x[part] = centre + noise
            x = x[rng.permutation(len(y))]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    y_lab = np.repeat(np.arange(NUM_KNOWN), 50)
    y_unl = rng.choice(NUM_CLASSES, size=n_unlabelled, p=share)
    return draw(y_lab), y_lab, draw(y_unl)


def single(n: int, dim: int, threads: int, seed: int, video: int = 0) -> dict:
    """One association on N rows in this process; returns its timings and memory."""
    import torch

    torch.set_num_threads(threads)
    from methods.palgcd import associate

    # the 19 labelled class centres and N - 19 unlabelled rows: N rows are associated
    rng = np.random.default_rng(seed)
    x_lab, y_lab, x_unl = mixture_features(n - NUM_KNOWN, dim, rng, video)
    labelled, labelled_y = torch.from_numpy(x_lab), torch.from_numpy(y_lab)
    unlabelled = torch.from_numpy(x_unl)
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = associate(
            labelled,
            labelled_y,
            unlabelled,
            NUM_KNOWN,
            thresh=0.6,
            k1=20,
            k2=6,
            sample_ratio=1.0,
            outlier_thresh=100,
            seed=0,
        )
        total = time.perf_counter() - start
    stats = result.stats
    return {
        "n": n,
        "dim": dim,
        "video": video,
        "threads": threads,
        "total_s": round(total, 3),
        "knn_s": stats["knn_s"],
        "encoding_s": stats["encoding_s"],
        "jaccard_s": stats["jaccard_s"],
        "greedy_s": stats["greedy_s"],
        "proxies_s": round(stats["total_s"] - stats["rerank_s"] - stats["greedy_s"], 3),
        "nnz_per_row": stats["nnz_per_row"],
        "pairs": stats["pairs_below_thresh"],
        "proxies": stats["proxies"],
        "peak_added_mib": round(memory.peak - memory.start, 1),
        "rss_before_mib": round(memory.start, 1),
        "features_mib": round((len(x_lab) + len(x_unl)) * dim * 4 / 2**20, 1),
        "dense_official_mib": round(2 * n * n * 4 / 2**20, 1),  # V and the Jaccard matrix, fp32
    }


def fit_power(ns, ts) -> tuple[float, float]:
    """(a, c) of t = c N^a by least squares on log t against log N."""
    a, log_c = np.polyfit(np.log(ns), np.log(ts), 1)
    return float(a), float(np.exp(log_c))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 11299, 16000, 24000]
    )
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--video", type=int, default=0, help="frames per video (0: isotropic classes)"
    )
    parser.add_argument("--fit-from", type=int, default=4000, help="fit over N >= this")
    parser.add_argument("--extrapolate", type=int, nargs="*", default=[37619, 71000])
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows and fits here")
    args = parser.parse_args()
    if args.single:
        print(json.dumps(single(args.single, args.dim, args.threads, args.seed, args.video)))
        return

    structure = f"videos of {args.video} frames" if args.video > 1 else "isotropic classes"
    print(
        f"# {platform.machine()}, {args.threads} thread(s), D={args.dim}, {structure}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--single", str(n), "--dim", str(args.dim)]
        cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
        cmd += ["--video", str(args.video)]
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, **env}
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"N={n:6d}  total {row['total_s']:8.2f} s  "
            + "  ".join(f"{p[:-2]} {row[p]:7.2f}" for p in PHASES)
            + f"  peak +{row['peak_added_mib']:7.1f} MiB  pairs {row['pairs']}"
            + f"  V nnz/row {row['nnz_per_row']}  proxies {row['proxies']}",
            flush=True,
        )
    fit_rows = [r for r in rows if r["n"] >= args.fit_from]
    fits = {}
    if len(fit_rows) >= 2:
        ns = np.array([r["n"] for r in fit_rows], dtype=float)
        for key in ("total_s", *PHASES, "peak_added_mib"):
            ts = np.array([max(r[key], 1e-3) for r in fit_rows], dtype=float)
            a, c = fit_power(ns, ts)
            fits[key] = {
                "exponent": round(a, 2),
                **{f"at_{m}": round(c * m**a, 1) for m in args.extrapolate},
            }
        # each phase grows at its own rate: the total at large N is the sum of the phase fits
        fits["sum_of_phases_s"] = {
            f"at_{m}": round(sum(fits[p][f"at_{m}"] for p in PHASES), 1) for m in args.extrapolate
        }
        print(f"\n# power-law fits t = c N^a over N >= {args.fit_from}")
        for key, f in fits.items():
            extra = "  ".join(f"N={m}: {f[f'at_{m}']}" for m in args.extrapolate)
            a = f"a = {f['exponent']:5.2f}" if "exponent" in f else " " * 10
            print(f"{key:15s} {a}   extrapolated {extra}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fits": fits}, indent=2))


if __name__ == "__main__":
    main()
