"""Nanoseconds per element of LSQ fake quantization, the fused C++ kernel against the torch formula.

Usage: .venv/bin/python benchmarks/lsq_kernel.py [--sizes 786432 3145728 6291456] [--repeat 20]

For each size (float32 elements of an activation, e.g. 786 432 = 32 x 64 x 384, 6 291 456 = the attention
probabilities 32 x 12 x 128 x 128) and each path: the forward alone (``fake_quantize`` with no gradient
wanted) and forward plus backward of an activation (d/dv and d/ds; the sum over elements for d/ds is torch's
on both paths). Medians of ``--repeat`` calls after two warm-up calls, CPU, all of torch's threads. A plain
copy of the same tensor is printed as the memory-speed yardstick.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlsq_pl.kernels import cpu_kernels, keep_freed_memory  # noqa: E402
from kdlsq_pl.quant.lsq import fake_quantize  # noqa: E402


def median_seconds(fn, repeat: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` calls after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[786_432, 3_145_728, 6_291_456])
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    keep_freed_memory()
    if cpu_kernels() is None:
        sys.exit("the fused kernel could not be built here (see the warning above)")
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; 8-bit LSQ, gradient scale on; ns per element")
    print(f"{'elements':>9} | {'copy':>5} | {'path':<12} | {'forward':>7} | {'fwd+bwd':>7}")
    for n in args.sizes:
        torch.manual_seed(0)
        x = torch.randn(n)
        grad = torch.randn(n)
        out = torch.empty_like(x)
        ns = lambda sec: sec / n * 1e9  # noqa: E731
        copy = ns(median_seconds(lambda: out.copy_(x), args.repeat))
        for fused in (True, False):
            s = torch.tensor(0.05, requires_grad=True)
            v = x.clone().requires_grad_()
            v_in = v * 1.0  # a non-leaf input, as an activation
            fwd = median_seconds(lambda: fake_quantize(v_in.detach(), s.detach(), 128, 127, 0.01, fused=fused), args.repeat)

            def fwd_bwd():
                y = fake_quantize(v_in, s, 128, 127, 0.01, fused=fused)
                torch.autograd.grad(y, (v_in, s), grad)

            both = median_seconds(fwd_bwd, args.repeat)
            name = "fused kernel" if fused else "torch"
            print(f"{n:>9} | {copy:>5.2f} | {name:<12} | {ns(fwd):>7.2f} | {ns(both):>7.2f}")


if __name__ == "__main__":
    main()
