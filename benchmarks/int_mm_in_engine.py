"""The Linears' int8 GEMM (``torch._int_mm``, oneDNN) inside the integer engine against the same call in isolation.

Usage: ``python benchmarks/int_mm_in_engine.py [--threads 2] [--batch 8] [--length 128] [--repeats 5]``

Builds the engine of ``benchmarks/engine_profile.py`` (bundled MiniLM, W2A8, calibrated), then prints, per weight
shape ``[in, out]``, milliseconds per call of ``torch._int_mm``:

- ``in engine``: mean over the calls of ``--repeats`` forwards (each call timed where the engine makes it);
- ``2nd call``: the same call made again at once, on the same operands (what is left once the first call of a
  burst has paid any start-up cost);
- ``isolated``: the median of 40 back-to-back calls on one layer's weight and random int8 codes, in the same process.

Then, after a forward and after a 50 ms pause, the times of 8 back-to-back calls of the largest shape: the first
call of a burst is the slow one. The gap between ``in engine`` and ``isolated`` is GEMM time that no elementwise
kernel can win back; it depends on the CPU (README, section "Integer-only inference (I-BERT operators) and ONNX").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_profile import build  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, engine, x = build("w2a8", args.batch, args.length)
    inputs = {k: x[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    int_mm = torch._int_mm
    first, second = defaultdict(list), defaultdict(list)

    def timed_twice(a, w):
        t0 = time.perf_counter()
        int_mm(a, w)
        t1 = time.perf_counter()
        out = int_mm(a, w)
        t2 = time.perf_counter()
        first[tuple(w.shape)].append(t1 - t0)
        second[tuple(w.shape)].append(t2 - t1)
        return out

    for _ in range(3):
        engine(**inputs)
    torch._int_mm = timed_twice
    try:
        for _ in range(args.repeats):
            engine(**inputs)
    finally:
        torch._int_mm = int_mm

    layer = engine.layers[len(engine.layers) // 2]
    weights = {tuple(lin.w_t.shape): lin.w_t for lin in (layer.q, layer.i, layer.o2)}
    rows = args.batch * args.length

    def isolated(w):
        a = torch.randint(-128, 128, (rows, w.shape[0]), dtype=torch.int8)
        int_mm(a, w)
        times = []
        for _ in range(40):
            t0 = time.perf_counter()
            int_mm(a, w)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"torch {torch.__version__}; {args.threads} threads; {rows} rows (batch {args.batch} x length {args.length}); ms per call")
    print(f"{'weight [in, out]':>18} | {'calls':>5} | {'in engine':>9} | {'2nd call':>8} | {'isolated':>8}")
    for shape in sorted(first):
        if shape not in weights:
            continue
        print(f"{str(list(shape)):>18} | {len(first[shape]):>5} | {statistics.mean(first[shape]) * 1e3:>9.3f} | "
              f"{statistics.mean(second[shape]) * 1e3:>8.3f} | {isolated(weights[shape]) * 1e3:>8.3f}")
    big = max(weights, key=lambda s: s[0] * s[1])
    a = torch.randint(-128, 128, (rows, big[0]), dtype=torch.int8)
    for when in ("after a forward", "after a 50 ms pause"):
        engine(**inputs)
        if when != "after a forward":
            time.sleep(0.05)
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            int_mm(a, weights[big])
            times.append(f"{(time.perf_counter() - t0) * 1e3:.2f}")
        print(f"{list(big)} back to back, {when}: {' '.join(times)} ms")


if __name__ == "__main__":
    main()
