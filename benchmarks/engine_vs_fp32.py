"""The integer engine against HF FP32 eager in one process, forward by forward: for comparing two commits on a host
whose speed drifts (run it from a worktree of each commit, in alternation, several times; for a commit older than
this script, copy it into that worktree's ``benchmarks/``).

Usage: ``python benchmarks/engine_vs_fp32.py [--threads 2] [--batch 8] [--length 128] [--rounds 15] [--quant w2a8]``

Builds the bundled MiniLM quantized and calibrated, and its :class:`~kdlsq_pl.integer.engine.IntegerEngine`, as
``benchmarks/engine_profile.py`` does; then runs ``--rounds`` rounds of one engine forward followed by one FP32
forward on the same random batch (every token real) and prints the median milliseconds of each and the median of the
per-round ratios FP32 / engine (the speed-up; each round's two forwards run within a few hundred milliseconds of each
other, so a slow or fast minute of the host moves both).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_profile import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quant", default="w2a8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp32, engine, x = build(args.quant, args.batch, args.length)
    ratios, t_engine, t_fp32 = [], [], []
    with torch.no_grad():
        engine(**x)
        fp32(**x)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            engine(**x)
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            fp32(**x)
            b = time.perf_counter() - t0
            ratios.append(b / a)
            t_engine.append(a)
            t_fp32.append(b)
    print(f"{ROOT.name}: threads {args.threads}, batch {args.batch}, length {args.length}, {args.quant}: integer engine "
          f"{1e3 * statistics.median(t_engine):.1f} ms, HF FP32 eager {1e3 * statistics.median(t_fp32):.1f} ms, "
          f"speed-up (median of {args.rounds} rounds) {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
