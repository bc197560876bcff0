"""PAL-GCD association benchmark: time and peak memory of one association step against N.

One association step of `methods.palgcd.associate` on N rows (the K_known labelled class centres
plus N - K_known unlabelled rows, no further sampling): kNN search, the sparse k-reciprocal
encoding with query expansion, the blockwise Jaccard pairs below the threshold, the greedy
prior-constrained association and the proxy memory. The embedding pass through the network that
precedes it in training is not included.

Features are random: a mixture of 41 Gaussian classes in D = 2048 (REAL, class 0, holds 22% of
the rows as in OWDFA-40; the others share the rest), L2-normalised, so that neighbourhoods and
clusters exist as they would on real features. Settings are the method's OWDFA-40 defaults
(k1 20, k2 6, thresh 0.6, outlier_thresh 100, 19 known classes as in P1).

Each N runs in a fresh child process so that its peak resident memory (`ru_maxrss`) is its own;
the peak *added* by the step is that peak minus the resident memory just before the step
(imports and features in place). Times are wall-clock seconds with the given number of threads.
A power law t = c N^a is fitted (least squares in log-log) over N >= --fit-from, per phase and in
total, and used to extrapolate to the larger N given by --extrapolate.

    python benchmarks/palgcd_association.py                 # one thread, about 3 minutes
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
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("knn_s", "encoding_s", "jaccard_s", "greedy_s", "proxies_s")
NUM_KNOWN = 19  # OWDFA-40 P1
NUM_CLASSES = 41


def rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def mixture_features(n_unlabelled: int, dim: int, rng: np.random.Generator):
    """Labelled rows (50 per known class) and unlabelled rows of a 41-class Gaussian mixture,
    L2-normalised: (labelled [950, dim], their classes, unlabelled [n_unlabelled, dim])."""
    centres = rng.standard_normal((NUM_CLASSES, dim)).astype(np.float32)
    share = np.full(NUM_CLASSES, 0.78 / (NUM_CLASSES - 1))
    share[0] = 0.22

    def draw(y: np.ndarray) -> np.ndarray:
        x = centres[y] + 1.5 * rng.standard_normal((len(y), dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    y_lab = np.repeat(np.arange(NUM_KNOWN), 50)
    y_unl = rng.choice(NUM_CLASSES, size=n_unlabelled, p=share)
    return draw(y_lab), y_lab, draw(y_unl)


def single(n: int, dim: int, threads: int, seed: int) -> dict:
    """One association on N rows in this process; returns its timings and memory."""
    import torch

    torch.set_num_threads(threads)
    from methods.palgcd import associate

    # the 19 labelled class centres and N - 19 unlabelled rows: N rows are associated
    x_lab, y_lab, x_unl = mixture_features(n - NUM_KNOWN, dim, np.random.default_rng(seed))
    labelled, labelled_y = torch.from_numpy(x_lab), torch.from_numpy(y_lab)
    unlabelled = torch.from_numpy(x_unl)
    before_peak, before_now = rss_mib(), current_rss_mib()
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
        "peak_added_mib": round(max(0.0, rss_mib() - max(before_peak, before_now)), 1),
        "rss_before_mib": round(before_now, 1),
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
    parser.add_argument("--fit-from", type=int, default=4000, help="fit over N >= this")
    parser.add_argument("--extrapolate", type=int, nargs="*", default=[37619, 71000])
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows and fits here")
    args = parser.parse_args()
    if args.single:
        print(json.dumps(single(args.single, args.dim, args.threads, args.seed)))
        return

    print(f"# {platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} thread(s)")
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--single", str(n), "--dim", str(args.dim)]
        cmd += ["--threads", str(args.threads), "--seed", str(args.seed)]
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
        print(f"\n# power-law fits t = c N^a over N >= {args.fit_from}")
        for key, f in fits.items():
            extra = "  ".join(f"N={m}: {f[f'at_{m}']}" for m in args.extrapolate)
            print(f"{key:15s} a = {f['exponent']:5.2f}   extrapolated {extra}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fits": fits}, indent=2))


if __name__ == "__main__":
    main()
