"""What checking the synthetic cache costs when a run reuses it, at its default size.

    OWDFA_BENCH_CACHE=$(mktemp -d) /usr/bin/time -v python benchmarks/cache_check.py
    python benchmarks/cache_check.py --repeats 50 --root /some/synth-cache

Renders the default synthetic set (conf/data/synth.yaml: 4,500 PNGs at 32 px) once, unless
`--root` names an existing one, then times the reuse check in five ways, round-robin, so a
change of load on the machine hits all of them alike:

- no file check: read the manifest, compare version and parameters, recompute its hash;
- sizes: that, plus every listed PNG is there with its size (the check before content checks);
- fast path (the default): `synth.cache_problem`: names listed, then each PNG's stamp
  (size, mtime, ctime, inode) compared, no file read;
- first reuse of a copied cache: the stamps file removed first, so every PNG is hashed and
  stamped again (what a `cp -r` of the cache costs once);
- full hash: `synth.cache_problem(full=True)`, what `OWDFA_BENCH_CACHE_CHECK=full` runs.

The files are in the page cache (the set was just written or read): the hashes measure
SHA-256 and file opens, not the disk. Median wall and CPU milliseconds per check, with ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from owdfa_bench import cache
from owdfa_bench.data import synth


def manifest_only(root: Path, params: synth.SynthParams) -> list[dict]:
    """The checks of the manifest itself, no file touched: what reuse costs with no file check."""
    manifest = synth._read_manifest(root)
    expected = {"generator_version": synth.GENERATOR_VERSION, "parameters": params.to_dict()}
    assert manifest is not None and cache.stale_reason(manifest, expected) is None
    files = manifest["files"]
    listing = [(f["path"], f["sha256"]) for f in files]
    assert synth.manifest_hash(params.to_dict(), listing) == manifest["manifest_sha256"]
    return files


def sizes_only(root: Path, params: synth.SynthParams) -> None:
    files = manifest_only(root, params)
    assert cache.files_problem(root, {f["path"]: f["bytes"] for f in files}, "*/*.png") is None


def copied_first_reuse(root: Path, params: synth.SynthParams) -> None:
    (root / cache.STAMPS_FILE).unlink()
    assert synth.cache_problem(root, params) is None


def variants(root: Path, params: synth.SynthParams) -> dict[str, Callable[[], object]]:
    return {
        "no file check (manifest only)": lambda: manifest_only(root, params),
        "names and sizes (the check before)": lambda: sizes_only(root, params),
        "fast path: stamps (default)": lambda: synth.cache_problem(root, params),
        "copied cache, first reuse (hash + re-stamp)": lambda: copied_first_reuse(root, params),
        "full hash (OWDFA_BENCH_CACHE_CHECK=full)": lambda: synth.cache_problem(
            root, params, full=True
        ),
    }


def counting_hashes() -> list[int]:
    """Count the files the cache module hashes (one list item per file)."""
    hashed, real = [], cache.file_digest

    def counted(path: str | os.PathLike, algorithm: str = "sha256") -> str:
        hashed.append(1)
        return real(path, algorithm)

    cache.file_digest = counted
    return hashed


def time_round_robin(
    checks: dict[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float, int]]:
    """Median wall ms and CPU ms of each check over `repeats` rounds (one call of each per
    round), and the files it hashed per call."""
    hashed = counting_hashes()
    wall: dict[str, list[float]] = {name: [] for name in checks}
    cpu: dict[str, list[float]] = {name: [] for name in checks}
    files: dict[str, int] = dict.fromkeys(checks, 0)
    for _ in range(repeats):
        for name, check in checks.items():
            before = len(hashed)
            w0, c0 = time.perf_counter(), time.process_time()
            check()
            w1, c1 = time.perf_counter(), time.process_time()
            wall[name].append((w1 - w0) * 1e3)
            cpu[name].append((c1 - c0) * 1e3)
            files[name] = len(hashed) - before
    return {
        name: (statistics.median(wall[name]), statistics.median(cpu[name]), files[name])
        for name in checks
    }


def table(medians: dict[str, tuple[float, float, int]], files: int) -> str:
    base = medians["no file check (manifest only)"][0]
    fast = medians["fast path: stamps (default)"][0]
    lines = [
        f"reuse check of the synthetic set ({files} PNGs), median per check",
        "",
        "| check | files hashed | wall ms | CPU ms | x no file check | x fast path |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (wall_ms, cpu_ms, hashed) in medians.items():
        lines.append(
            f"| {name} | {hashed} | {wall_ms:.1f} | {cpu_ms:.1f} | {wall_ms / base:.1f}x "
            f"| {wall_ms / fast:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="rounds (default 20)")
    parser.add_argument("--root", type=Path, default=None, help="an existing default synth set")
    args = parser.parse_args()
    params = synth.SynthParams()  # conf/data/synth.yaml
    root = args.root or cache.cache_base() / "bench-cache-check" / f"synth-{params.short_hash()}"
    if synth.cache_problem(root, params) is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        synth.generate_synth_dataset(root, **params.to_dict())
        print(
            f"rendered {root} in {time.perf_counter() - t0:.1f} s "
            f"({time.process_time() - c0:.1f} CPU-s in this process)"
        )
    files = len(synth._read_manifest(root)["files"])
    print(f"{files} PNGs, {sum(p.stat().st_size for p in root.glob('*/*.png')) / 2**20:.1f} MiB")
    print(f"CPU cores: {os.cpu_count()}, repeats: {args.repeats}")
    print(table(time_round_robin(variants(root, params), args.repeats), files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
