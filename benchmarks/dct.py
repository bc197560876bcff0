"""How CAL's DCT attention computes its 2-D DCT: a cosine basis as two matmuls, or `torch.fft`.

The reference uses torch-dct (not a dependency here). Two candidates, both checked against
`scipy.fft.dctn/idctn(type=2)` before timing:
  matmul  `methods.cal.dct_2d/idct_2d`: C_H @ x @ C_W^T with a cached [n, n] basis (shipped);
  fft     Makhoul's reordering + complex FFT, inverse by the same identity (kept here only).
Each trial times DCT -> scale -> inverse DCT, forward and backward, on a [32, 3, n, n] batch; the
candidates alternate within each repeat, so load changes hit both alike. Run:
    python benchmarks/dct.py [--repeats 9] [--threads 2]

Measured on the development machine (2 CPU cores shared with other jobs, torch 2.14.1,
2 threads); absolute times follow the machine's load, the ratio much less:
    this script, 3 runs:  64 px  24 / 304 ms (12.5x), 184 / 1008 ms (5.5x), 191 / 1052 ms (5.5x)
                         256 px 238 / 1815 ms (7.6x), 480 / 2609 ms (5.4x), 456 / 2426 ms (5.3x)
    first prototype of the same two transforms, lightly loaded, median of 7:
                          64 px 3.8 / 23.1 ms (6.1x);  256 px 100 / 553 ms (5.5x)
(matmul / fft, fft-to-matmul ratio in brackets.)
An rfft-of-the-mirrored-signal variant tried during development was ~1.5x faster than this fft
and still ~4x slower than matmul. Hence the matmul basis in methods/cal.py. (On a GPU both are
far from the backbone's cost; the matmul form is also exact to float32 rounding, see the tests.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import scipy.fft
import torch

from methods.cal import dct_2d, idct_2d


def _even_odd_order(n: int) -> torch.Tensor:
    """v = x[order]: even samples ascending, then odd samples descending (Makhoul)."""
    half = (n + 1) // 2
    order = torch.empty(n, dtype=torch.long)
    order[:half] = torch.arange(0, n, 2)
    order[half:] = torch.arange(1, n, 2).flip(0)
    return order


class FFTDCT:
    """Unnormalised DCT-II and its inverse along the last axis through an n-point complex FFT."""

    def __init__(self, n: int):
        k = torch.arange(n, dtype=torch.float64)
        self.order = _even_odd_order(n)
        self.inverse_order = torch.argsort(self.order)
        self.twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))  # complex128
        self.inverse_twiddle = torch.polar(torch.ones_like(k), math.pi * k / (2 * n)) / 2
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def twiddles(self, real_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Twiddle factors in the complex dtype matching `real_dtype`, cast once."""
        if real_dtype not in self._cast:
            cdtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
            self._cast[real_dtype] = (self.twiddle.to(cdtype), self.inverse_twiddle.to(cdtype))
        return self._cast[real_dtype]

    def dct_1d(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.fft(x.index_select(-1, self.order))
        return 2 * (spectrum * self.twiddles(x.dtype)[0]).real

    def idct_1d(self, y: torch.Tensor) -> torch.Tensor:
        mirrored = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], dim=-1)
        spectrum = torch.complex(y, -mirrored) * self.twiddles(y.dtype)[1]
        return torch.fft.ifft(spectrum).real.index_select(-1, self.inverse_order)

    def dct_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self.dct_1d(self.dct_1d(x).transpose(-1, -2)).transpose(-1, -2)

    def idct_2d(self, y: torch.Tensor) -> torch.Tensor:
        return self.idct_1d(self.idct_1d(y).transpose(-1, -2)).transpose(-1, -2)


def check_against_scipy(n: int) -> None:
    x = torch.randn(2, 3, n, n, dtype=torch.float64)
    expected = scipy.fft.dctn(x.numpy(), type=2, axes=(-2, -1))
    fft = FFTDCT(n)
    for name, forward, inverse in (("matmul", dct_2d, idct_2d), ("fft", fft.dct_2d, fft.idct_2d)):
        coeffs = forward(x).numpy()
        scale = np.abs(expected).max()
        if not np.allclose(coeffs, expected, rtol=0, atol=1e-10 * scale):
            raise AssertionError(f"{name} DCT differs from scipy at {n} px")
        back = inverse(torch.from_numpy(expected)).numpy()
        if not np.allclose(back, x.numpy(), rtol=0, atol=1e-10):
            raise AssertionError(f"{name} inverse DCT differs from scipy at {n} px")


def time_round_trip(forward, inverse, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    start = time.perf_counter()
    out = inverse(forward(x) * 0.5)
    out.sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"median of {args.repeats} (forward + backward of DCT -> scale -> inverse DCT)"
    )
    for n in (64, 256):
        check_against_scipy(n)
        fft = FFTDCT(n)
        candidates = {"matmul": (dct_2d, idct_2d), "fft": (fft.dct_2d, fft.idct_2d)}
        x = torch.randn(args.batch, 3, n, n)
        for forward, inverse in candidates.values():  # warm-up (caches, allocator)
            time_round_trip(forward, inverse, x)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, (forward, inverse) in candidates.items():
                times[name].append(time_round_trip(forward, inverse, x))
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(
            f"{n:4d} px: matmul {med['matmul']:8.1f} ms, fft {med['fft']:8.1f} ms, "
            f"fft / matmul = {med['fft'] / med['matmul']:.1f}x"
        )


if __name__ == "__main__":
    main()
