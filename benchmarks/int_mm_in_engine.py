"""The Linears' int8 GEMM (``torch._int_mm``, oneDNN) inside the integer engine against the same call in isolation.

Usage: ``python benchmarks/int_mm_in_engine.py [--threads 2] [--batch 8] [--length 128] [--repeats 5]``

Builds the engine of ``benchmarks/engine_profile.py`` (bundled MiniLM, W2A8, calibrated), then prints, per weight
shape ``[in, out]``, milliseconds per call of ``torch._int_mm``:

- ``in engine``: mean over the calls of ``--repeats`` forwards (each call timed where the engine makes it; the
  engine writes every product into a reused workspace buffer, ``out=``);
- ``new output``: the median of 40 back-to-back calls on one layer's weight and random int8 codes, each call's
  product kept alive, so each writes to memory not written before (what the engine did before its workspace);
- ``reused output``: the same 40 calls, all writing into one ``out`` buffer.

The gap between the last two is the cost of writing an int32 product (1.5-6 MB at batch 8) to memory that is not in
cache: on the Intel host of 2026-12-05 it doubled the GEMMs' time inside a forward (README, section "Integer-only
inference (I-BERT operators) and ONNX").
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
    calls = defaultdict(list)

    def timed(a, w, out=None):
        t0 = time.perf_counter()
        out = int_mm(a, w, out=out)
        calls[tuple(w.shape)].append(time.perf_counter() - t0)
        return out

    for _ in range(3):
        engine(**inputs)
    torch._int_mm = timed
    try:
        for _ in range(args.repeats):
            engine(**inputs)
    finally:
        torch._int_mm = int_mm

    layer = engine.layers[len(engine.layers) // 2]
    weights = {tuple(lin.w_t.shape): lin.w_t for lin in (layer.q, layer.i, layer.o2)}
    rows = args.batch * args.length

    def isolated(w, reuse: bool) -> float:
        a = torch.randint(-128, 128, (rows, w.shape[0]), dtype=torch.int8)
        out = int_mm(a, w)
        kept, times = [], []
        for _ in range(40):
            t0 = time.perf_counter()
            y = int_mm(a, w, out=out) if reuse else int_mm(a, w)
            times.append(time.perf_counter() - t0)
            kept.append(y)
        return statistics.median(times)

    print(f"torch {torch.__version__}; {args.threads} threads; {rows} rows (batch {args.batch} x length {args.length}); ms per call")
    print(f"{'weight [in, out]':>18} | {'calls':>5} | {'in engine':>9} | {'new output':>10} | {'reused output':>13}")
    for shape in sorted(calls):
        if shape not in weights:
            continue
        print(f"{str(list(shape)):>18} | {len(calls[shape]):>5} | {statistics.mean(calls[shape]) * 1e3:>9.3f} | "
              f"{isolated(weights[shape], False) * 1e3:>10.3f} | {isolated(weights[shape], True) * 1e3:>13.3f}")


if __name__ == "__main__":
    main()
