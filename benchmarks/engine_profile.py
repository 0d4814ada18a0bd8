"""Where the integer engine's time goes: wall time per kind of step, against HF FP32 eager in the same process.

Usage: ``python benchmarks/engine_profile.py [--threads 2 1] [--batch 8] [--length 128] [--repeats 10] [--quant w2a8]``

Builds the bundled MiniLM with quantizers inserted and calibrated (as ``benchmarks/inference.py`` does; a trained
student runs the same operations at the same cost) and its :class:`~kdlsq_pl.integer.engine.IntegerEngine`, then
times ``--repeats`` forwards of a batch of random ids (every token real) with a clock around each call of: the
Linears' GEMMs (``IntLinear.mm``: oneDNN's matmul primitive on weights packed once) and each fused integer kernel
(``csrc/integer_cpu.cpp``; ``int_attention`` holds the attention products, oneDNN batched over each example's heads,
with the i-softmax between them); ``rest`` is the
forward's time outside them (the embedding gathers, Python, reshapes). It prints milliseconds per forward and
shares, the FP32 model's median time, and a ceiling: the FP32 time over the Linears' GEMM time alone (the
speed-up if everything else were free); then, in interleaved rounds, the engine with its workspace of reused
buffers against the same engine allocating a new tensor for every output, and the engine's Linears on oneDNN's
packed matmul against ``torch._int_mm``; and the memory each holds (the FP32
parameters; every tensor of the engine, ``IntegerEngine.nbytes``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inference import calibrated_student, random_batch  # noqa: E402
from kdlsq_pl.integer.engine import IntLinear  # noqa: E402

GEMM = "Linears: IntLinear.mm"


def build(quant_name: str, batch: int, length: int):
    """(HF FP32 eager model, integer engine, batch of random ids) for the bundled MiniLM."""
    from kdlsq_pl.integer.engine import IntegerEngine
    from kdlsq_pl.models.loading import load_classifier

    x = random_batch(batch, length, 0)
    student, path = calibrated_student(quant_name, x)
    fp32 = load_classifier(path, {"labels": ["0", "1"]}, attn_implementation="eager").eval()
    return fp32, IntegerEngine.from_student(student, [x]), x


class Clock:
    """Accumulates wall seconds per name around wrapped callables."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)

    def wrap(self, name: str, f):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = f(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t0
            return out
        return timed


def profile(engine, x: dict, repeats: int) -> tuple[float, dict[str, float]]:
    """(median ms per forward, {step: ms per forward}) with the engine's steps wrapped by a :class:`Clock`."""
    clock = Clock()
    kernels = engine.kernels

    class Kernels:  # the fused kernels, each call timed
        def __getattr__(self, name):
            return clock.wrap(name, getattr(kernels, name))

    engine.kernels = Kernels()
    mm = IntLinear.mm
    IntLinear.mm = clock.wrap(GEMM, mm)
    try:
        engine(**x)
        clock.seconds.clear()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine(**x)
            times.append(time.perf_counter() - t0)
    finally:
        IntLinear.mm = mm
        engine.kernels = kernels
    steps = {k: 1e3 * v / repeats for k, v in clock.seconds.items()}
    steps["rest (gathers, Python)"] = 1e3 * sum(times) / repeats - sum(steps.values())
    return 1e3 * statistics.median(times), steps


def interleaved_ab(engine, x: dict, repeats: int, switch) -> tuple[float, float]:
    """Median ms per forward with ``switch(engine, True)`` and with ``switch(engine, False)``, in interleaved rounds
    (left switched on)."""
    times = {True: [], False: []}
    try:
        for _ in range(repeats):
            for on in (True, False):
                switch(engine, on)
                engine(**x)
                t0 = time.perf_counter()
                engine(**x)
                times[on].append(1e3 * (time.perf_counter() - t0))
    finally:
        switch(engine, True)
    return statistics.median(times[True]), statistics.median(times[False])


def _reuse(engine, on: bool) -> None:
    engine.workspace.reuse = on


def _packed(engine, on: bool) -> None:
    """The Linears on their packed weights (oneDNN's matmul primitive) or, off, on ``torch._int_mm``."""
    for L in engine.layers:
        for lin in (L.qkv, L.q, L.k, L.v, L.o, L.i, L.o2):  # L.qkv: the three as one product, or None
            if lin is None:
                continue
            if not on and lin.packed is not None:
                lin.stashed, lin.packed = lin.packed, None
            elif on and "stashed" in lin.__dict__:
                lin.packed = lin.__dict__.pop("stashed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quant", default="w2a8")
    args = ap.parse_args()
    fp32, engine, x = build(args.quant, args.batch, args.length)
    print(f"torch {torch.__version__}; bundled MiniLM, {args.quant}; batch {args.batch}, length {args.length}; "
          f"{args.repeats} forwards each")
    fp_bytes = sum(p.numel() * p.element_size() for p in fp32.parameters())
    print(f"held in memory: HF FP32 parameters {fp_bytes / 2 ** 20:.1f} MiB, integer engine {engine.nbytes / 2 ** 20:.1f} MiB")
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            fp32(**x)
            fp_ms = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fp32(**x)
                fp_ms.append(1e3 * (time.perf_counter() - t0))
            fp = statistics.median(fp_ms)
            total, steps = profile(engine, x, args.repeats)
            print(f"\nthreads {threads}: HF FP32 eager {fp:.1f} ms, integer engine {total:.1f} ms ({fp / total:.2f}x)")
            with_ws, without_ws = interleaved_ab(engine, x, args.repeats, _reuse)
            print(f"  workspace (interleaved): {with_ws:.1f} ms with its reused buffers, {without_ws:.1f} ms with a new "
                  f"tensor per output ({without_ws / with_ws:.2f}x)")
            if engine.layers and engine.layers[0].o.packed is not None:
                packed, int_mm = interleaved_ab(engine, x, args.repeats, _packed)
                print(f"  Linears (interleaved): {packed:.1f} ms with oneDNN's packed matmul, {int_mm:.1f} ms with "
                      f"torch._int_mm ({int_mm / packed:.2f}x)")
            mean_total = sum(steps.values())
            for name, ms in sorted(steps.items(), key=lambda kv: -kv[1]):
                print(f"  {name:34s} {ms:7.1f} ms  {100 * ms / mean_total:5.1f}%")
            gemm = steps.get(GEMM, 0.0)
            print(f"  ceiling: FP32 / the Linears' GEMMs alone {fp / gemm:.2f}x")


if __name__ == "__main__":
    main()
