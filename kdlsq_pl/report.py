"""Gather result records into a results table (Markdown), a CSV and a plot.

Usage: ``python -m kdlsq_pl.report [--root outputs] [--out outputs/report]``

Reads every ``result.json`` under ``--root``. Rows of ``RESULTS.md``: the FP32 teacher, then each
method x bit setting with its size in MB and compression ratio against FP32; columns: tasks (their
dev metric, x100) and the average over tasks. Several seeds give ``mean +- std``. ``results.csv``
has one row per run; ``results.png`` plots each task's metric against weight bits with the teacher
as a dashed line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from kdlsq_pl.results import RESULT_FILE

TASK_ORDER = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
TASK_LABEL = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
CSV_FIELDS = ["path", "stage", "method", "task", "quant", "seed", "status", "metric", "best", "final", "teacher_metric",
              "size_bytes", "compression_ratio", "wall_time_s", "git_commit"]


def load_records(root: str | Path) -> list[dict]:
    """Every ``result.json`` under ``root`` (recursively), each with its ``path``; unreadable ones are reported as failed."""
    records = []
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            rec = {"status": "failed", "error": f"unreadable result record: {e}"}
        rec["path"] = str(path.parent)
        records.append(rec)
    return records


def fmt_cell(values: list[float]) -> str:
    """``83.26`` for one value, ``83.26 +- 0.41`` (sample std) for several, ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def bits_label(rec: dict) -> str:
    b = rec.get("bits") or {}
    return f"{b.get('weight_bits', '?')}-{b.get('embedding_bits', '?')}-{b.get('act_bits', '?')}"


def build_table(records: Iterable[dict]) -> tuple[list[str], list[list[str]], dict]:
    """The results table as (header, rows, cells) where ``cells[(row_key, task)]`` lists the values."""
    records = list(records)
    teacher: dict[tuple[str, int], float] = {}
    teacher_runs: dict[tuple[str, int], float] = {}  # teacher-stage records, used where no student names its teacher
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    failed: dict[tuple[str, str], int] = defaultdict(int)
    meta: dict[str, dict] = {}
    tasks = set()
    for rec in records:
        task = rec.get("task")
        if task is None:
            continue
        tasks.add(task)
        if rec.get("stage") == "teacher":
            if rec.get("status") == "finished" and rec.get("best") is not None:
                teacher_runs[(task, rec.get("seed"))] = rec["best"]
            continue
        if rec.get("teacher_metric") is not None:  # the teacher this student was distilled from
            teacher[(task, rec.get("seed"))] = rec["teacher_metric"]
        key = f"{rec.get('method', 'kdlsq')} {rec.get('quant', '?')}"
        if key not in meta or (meta[key]["size"] is None and rec.get("size_bytes")):  # a failed record has no size or bits
            meta[key] = {"bits": bits_label(rec), "size": rec.get("size_bytes"), "ratio": rec.get("compression_ratio"),
                         "wbits": (rec.get("bits") or {}).get("weight_bits", 32)}
        if rec.get("status") == "finished" and rec.get("best") is not None:
            cells[(key, task)].append(rec["best"])
        else:
            failed[(key, task)] += 1
    for key, value in teacher_runs.items():
        teacher.setdefault(key, value)
    for (task, _), value in teacher.items():
        cells[("teacher (FP32)", task)].append(value)
    task_list = [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))
    metric = {r["task"]: r.get("metric", "") for r in records if r.get("task")}
    header = ["model", "W-E-A bits", "size (MB)", "vs FP32"] + [f"{TASK_LABEL.get(t, t)} ({metric.get(t, '')})" for t in task_list] + ["avg"]
    fp32_bytes = next((r["fp32_bytes"] for r in records if r.get("fp32_bytes")), None)
    rows = []
    keys = ["teacher (FP32)"] + sorted(meta, key=lambda k: (-meta[k]["wbits"], k))
    for key in keys:
        if key == "teacher (FP32)":
            info = {"bits": "32-32-32", "size": fp32_bytes, "ratio": 1.0 if fp32_bytes else None}
        else:
            info = meta[key]
        row = [key, info["bits"], f"{info['size'] / 1e6:.1f}" if info.get("size") else "-",
               f"{info['ratio']:.1f}x" if info.get("ratio") else "-"]
        means = []
        for t in task_list:
            vals = cells.get((key, t), [])
            text = fmt_cell(vals)
            if failed.get((key, t)):
                text = f"{text} (failed: {failed[(key, t)]})" if vals else f"FAILED ({failed[(key, t)]})"
            row.append(text)
            if vals:
                means.append(statistics.mean(vals))
        row.append(f"{statistics.mean(means):.2f}" if len(means) == len(task_list) and means else "-")
        rows.append(row)
    return header, rows, {"cells": dict(cells), "tasks": task_list, "meta": meta}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for rec in records:
            w.writerow({k: rec.get(k, "") for k in CSV_FIELDS} | {"method": rec.get("method", "teacher" if rec.get("stage") == "teacher" else "kdlsq")})
    tmp.replace(path)


def plot(info: dict, path: Path) -> None:
    """Metric against weight bits per task; the teacher as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = info["tasks"]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4 * max(len(tasks), 1), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by_method: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for key, meta in info["meta"].items():
            vals = info["cells"].get((key, task))
            if vals:
                by_method[key.split(" ")[0]].append((meta["wbits"], statistics.mean(vals)))
        for method, pts in sorted(by_method.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        teacher = info["cells"].get(("teacher (FP32)", task))
        if teacher:
            ax.axhline(statistics.mean(teacher), linestyle="--", color="gray", label="teacher (FP32)")
        ax.set_title(TASK_LABEL.get(task, task))
        ax.set_xlabel("weight bits")
        ax.set_xticks([2, 4, 8])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dev metric (x100)")
    labelled = next((ax for ax in axes[0] if ax.get_legend_handles_labels()[0]), None)
    if labelled is not None:
        labelled.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root: str | Path, out: str | Path) -> str:
    """Write ``RESULTS.md``, ``results.csv`` and ``results.png`` under ``out``; return the Markdown."""
    records = load_records(root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows, info = build_table(records)
    text = f"# Results\n\nDev metrics x100 from {len(records)} result records under `{root}` (best dev value per run).\n\n" + markdown(header, rows)
    tmp = out / "RESULTS.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "RESULTS.md")
    write_csv(records, out / "results.csv")
    if info["tasks"]:
        plot(info, out / "results.png")
    return text


def log_to_wandb(root: str | Path, out: str | Path, group: str | None, offline: bool = True) -> None:
    """Log the table (a W&B Table) and the plot to a W&B run of job type ``report`` in ``group``."""
    import wandb

    header, rows, _ = build_table(load_records(root))
    run = wandb.init(project="kdlsq-pl", job_type="report", group=group, name=f"report-{group or Path(root).name}",
                     dir=str(out), mode="offline" if offline else "online")
    payload = {"results": wandb.Table(columns=header, data=rows)}
    if (Path(out) / "results.png").is_file():
        payload["results_plot"] = wandb.Image(str(Path(out) / "results.png"))
    run.log(payload)
    run.finish()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Gather result records into RESULTS.md, results.csv and results.png.")
    ap.add_argument("--root", default=str(Path(os.environ.get("KDLSQ_ROOT", ".")) / "outputs"),
                    help="folder searched for result.json files (default: $KDLSQ_ROOT/outputs, else ./outputs)")
    ap.add_argument("--out", default=None, help="where to write (default: <root>/report)")
    ap.add_argument("--wandb", action="store_true", help="also log the table and plot to W&B (offline unless --online)")
    ap.add_argument("--online", action="store_true")
    ap.add_argument("--group", default=None, help="W&B group (default: the root folder's name)")
    args = ap.parse_args(argv)
    out = args.out or Path(args.root) / "report"
    if not any(Path(args.root).rglob(RESULT_FILE)):
        print(f"error: no {RESULT_FILE} under {args.root}; allowed: a folder holding run folders (set --root or KDLSQ_ROOT)",
              file=sys.stderr)
        sys.exit(2)
    print(report(args.root, out))
    if args.wandb:
        log_to_wandb(args.root, out, args.group or Path(args.root).name, offline=not args.online)


if __name__ == "__main__":
    main()
