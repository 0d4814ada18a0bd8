"""Dev metric of each trained student in the integer engine against the fake-quantized student it was built from.

Usage: ``python benchmarks/engine_accuracy.py [--root outputs/grid/cpu] [--tasks mrpc stsb] [--methods kdlsq ...]
[--match 'w2a8_*']``

For every finished student cell under ``--root`` whose checkpoint is on disk (``<cell>/result.json`` with
``stage: student``), of the given tasks and methods, it predicts the whole dev split twice, built as
``python -m kdlsq_pl.infer <cell> --engine fake|integer`` builds them: the fake-quantized student in float and the
integer engine built from it. It prints one row per cell (the task's metric x100 for both, their difference, how
many predicted classes differ (regression: the mean absolute difference of the scores), and whether the student was
trained through I-BERT's operators, ``quant.integer_ops``), then one row per
(method, quant, task): the mean over seeds of both and of the difference, with the number of seeds.
Issue 17's accuracy goal is the difference within 0.3 points for students trained with the integer operators.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cells(root: Path, tasks: list[str], methods: list[str], match: str = "*") -> list[tuple[Path, dict]]:
    """(cell folder, record) of each finished student cell under ``root`` whose folder name matches the glob ``match``
    and whose checkpoint is on disk, sorted by name."""
    out = []
    for path in sorted(root.glob(f"{match}/result.json")):
        rec = json.loads(path.read_text())
        if rec.get("stage") != "student" or rec.get("status") != "finished":
            continue
        if rec.get("task") not in tasks or rec.get("method", "kdlsq") not in methods:
            continue
        if not (path.parent / "checkpoints").is_dir() and not (path.parent / "packed").is_dir():
            continue
        out.append((path.parent, rec))
    return out


@torch.no_grad()
def dev_predictions(cell: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """``({"fake": preds, "integer": preds}, labels, task)`` over the whole dev split of ``cell``: class ids ``[N]``
    or regression scores ``[N]``, the integer engine built as ``kdlsq_pl.infer --engine integer`` builds it."""
    from kdlsq_pl.infer import build_engine, calibration_batches, load_student, run_datamodule, split_predictions

    student, record = load_student(cell)
    dm, task = run_datamodule(record)
    calibration = calibration_batches(dm)
    out = {}
    for name in ("fake", "integer"):
        out[name], labels, _ = split_predictions(build_engine(name, student, calibration), dm, "dev", not task["labels"])
    return out, labels, task


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="outputs/grid/cpu")
    ap.add_argument("--tasks", nargs="+", default=["mrpc", "stsb"])
    ap.add_argument("--methods", nargs="+", default=["kdlsq", "kdlsq_per_channel"])
    ap.add_argument("--match", default="*", help="a glob on the cell folder names, e.g. '*_ibert_*'")
    args = ap.parse_args(argv)
    from kdlsq_pl.infer import dev_metrics

    found = cells(Path(args.root), args.tasks, args.methods, args.match)
    if not found:
        sys.exit(f"error: no finished student cell with a checkpoint under {args.root} for tasks {args.tasks}; "
                 "allowed: a grid folder such as outputs/grid/cpu")
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    print("| cell | integer ops | fake-quantized | integer engine | difference | predictions that differ |")
    print("|---|---|---|---|---|---|")
    for cell, rec in found:
        metric = rec["metric"]
        preds, labels, task = dev_predictions(cell)
        value = {name: dev_metrics(task, p, labels)[metric] for name, p in preds.items()}
        if task["labels"]:
            differ = f"{int((preds['fake'] != preds['integer']).sum())} of {len(labels)}"
        else:
            differ = f"mean |score difference| {float((preds['fake'] - preds['integer']).abs().mean()):.4f}"
        ibert = bool(((rec.get("config") or {}).get("quant") or {}).get("integer_ops", False))
        print(f"| {cell.name} | {'yes' if ibert else 'no'} | {value['fake']:.2f} | {value['integer']:.2f} | "
              f"{value['integer'] - value['fake']:+.2f} | {differ} |", flush=True)
        groups[(rec.get("method", "kdlsq"), rec["quant"], rec["task"], metric)].append((value["fake"], value["integer"]))
    print()
    print("| method | quant | task (metric) | seeds | fake-quantized | integer engine | mean difference |")
    print("|---|---|---|---|---|---|---|")
    for (method, quant, task, metric), pairs in sorted(groups.items()):
        fake = statistics.mean(p[0] for p in pairs)
        integer = statistics.mean(p[1] for p in pairs)
        print(f"| {method} | {quant} | {task} ({metric}) | {len(pairs)} | {fake:.2f} | {integer:.2f} | {integer - fake:+.2f} |")


if __name__ == "__main__":
    main()
