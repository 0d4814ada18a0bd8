"""Gather result records into a results table (Markdown), a CSV and a plot.

Usage: ``python -m kdlsq_pl.report [--root outputs] [--out outputs/report]``

Reads every ``result.json`` under ``--root``. Rows of ``RESULTS.md``: the FP32 teacher, then each
method x bit setting with its size in MB and compression ratio against FP32; columns: tasks (their
dev metric, x100) and the average over tasks. Every cell gives ``mean +- std (n=seeds)``.
``results.csv`` has one row per run; ``results.png`` plots each task's metric against weight bits
(error bars: std over seeds) with the teacher as a dashed line, and against the real file size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from kdlsq_pl.results import RESULT_FILE, atomic_output

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


def fmt_cell(values: Iterable[float], n_expected: int | None = None) -> str:
    """``83.26 (n=1)`` for one value, ``83.26 +- 0.41 (n=3)`` (mean and sample std, by pandas) for several,
    ``-`` for none; ``(n=1 of 3)`` when the cell has fewer seeds than ``n_expected`` (the fullest cell)."""
    values = pd.Series(list(values), dtype=float)
    if values.empty:
        return "-"
    n = f"n={len(values)}" + (f" of {n_expected}" if n_expected and len(values) < n_expected else "")
    if len(values) == 1:
        return f"{values.iloc[0]:.2f} ({n})"
    return f"{values.mean():.2f} +- {values.std(ddof=1):.2f} ({n})"


def bits_label(rec: dict) -> str:
    """``2-2-8`` (weight, embedding, activation bits); a mixed-precision model (``bit_overrides`` in its record)
    adds its average bits per weight: ``2-2-8, mixed (2.41 avg)``; a student shallower than its teacher
    (``student_layers`` < ``teacher_layers``) its depth: ``32-32-32, 3 layers``."""
    b = rec.get("bits") or {}
    label = f"{b.get('weight_bits', '?')}-{b.get('embedding_bits', '?')}-{b.get('act_bits', '?')}"
    if rec.get("bit_overrides") and rec.get("avg_weight_bits") is not None:
        label += f", mixed ({rec['avg_weight_bits']:.2f} avg)"
    if shallower_depth(rec):
        label += f", {rec['student_layers']} layers"  # a shallower student (theseus, shallow_ft/kd, student.layers)
    return label


def shallower_depth(rec: dict) -> int | None:
    """The student's encoder layers when fewer than its teacher's (``student_layers`` < ``teacher_layers``), else ``None``."""
    n, teacher = rec.get("student_layers"), rec.get("teacher_layers")
    return int(n) if n and teacher and n < teacher else None


TEACHER = "teacher (FP32)"


def build_table(records: Iterable[dict]) -> tuple[list[str], list[list[str]], dict]:
    """The results table as (header, rows, info).

    A row per method x bit setting (the key ``"<method> <quant>"``), a column per task. A cell is the mean
    +- sample std of the finished runs' best dev values over seeds, with the number of seeds. The teacher
    row counts each distinct teacher once (by ``teacher_dir``: the students of three seeds share one), from
    the students' ``teacher_metric``, or teacher-stage records where no student names a teacher.
    ``info``: ``cells`` (``(key, task) -> values``), ``tasks``, ``meta`` (bits, size, ratio, weight bits (the
    average over weights for a mixed-precision model) and the real file size per key: the packed export, the
    FP32 ``model.safetensors`` for the teacher and for a Theseus successor (``file_bytes``); ``-`` in the table
    where no file was written).
    """
    records = list(records)
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    failed: dict[tuple[str, str], int] = defaultdict(int)
    teachers: dict[tuple[str, str], float] = {}  # (task, teacher id) -> metric
    teacher_runs: dict[tuple[str, str], float] = {}
    meta: dict[str, dict] = {}
    tasks = set()
    for rec in records:
        task = rec.get("task")
        if task is None:
            continue
        tasks.add(task)
        if rec.get("stage") == "teacher":
            if rec.get("status") == "finished" and rec.get("best") is not None:
                teacher_runs[(task, rec.get("teacher_dir") or rec.get("path"))] = rec["best"]
            continue
        if rec.get("teacher_metric") is not None:  # the teacher this student was distilled from
            teachers[(task, rec.get("teacher_dir") or f"seed{rec.get('seed')}")] = rec["teacher_metric"]
            if rec.get("fp32_file_bytes"):
                meta.setdefault(TEACHER, {})["file"] = rec["fp32_file_bytes"]
        key = f"{rec.get('method', 'kdlsq')} {rec.get('quant', '?')}"
        label = bits_label(rec)
        if (key not in meta or (meta[key]["size"] is None and rec.get("size_bytes"))  # a failed record has no size or bits
                or (shallower_depth(rec) and not meta[key]["layers"])):  # records older than the depth fields
            meta[key] = {"bits": label, "layers": shallower_depth(rec), "size": rec.get("size_bytes"), "ratio": rec.get("compression_ratio"),
                         "wbits": rec.get("avg_weight_bits") or (rec.get("bits") or {}).get("weight_bits", 32),
                         "file": rec.get("packed_bytes") or rec.get("file_bytes"), "mixed": bool(rec.get("bit_overrides"))}
        if rec.get("status") == "finished" and rec.get("best") is not None:
            cells[(key, task)].append(rec["best"])
        else:
            failed[(key, task)] += 1
    tasks_with_students = {task for task, _ in teachers}
    for (task, tid), value in teacher_runs.items():
        if task not in tasks_with_students:
            teachers[(task, tid)] = value
    for (task, _), value in teachers.items():
        cells[(TEACHER, task)].append(value)
    task_list = [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))
    metric = {r["task"]: r.get("metric", "") for r in records if r.get("task")}
    header = ["model", "W-E-A bits", "size (MB)", "file (MB)", "vs FP32"] + [f"{TASK_LABEL.get(t, t)} ({metric.get(t, '')})" for t in task_list] + ["avg"]
    fp32_bytes = next((r["fp32_bytes"] for r in records if r.get("fp32_bytes")), None)
    meta.setdefault(TEACHER, {}).update(bits="32-32-32", size=fp32_bytes, ratio=1.0 if fp32_bytes else None, wbits=32)
    meta[TEACHER].setdefault("file", fp32_bytes)
    n_expected = max((len(v) for (k, _), v in cells.items() if k != TEACHER), default=0)
    rows = []
    for key in [TEACHER] + sorted((k for k in meta if k != TEACHER), key=lambda k: (-meta[k]["wbits"], k)):
        info = meta[key]
        row = [key, info["bits"], f"{info['size'] / 1e6:.1f}" if info.get("size") else "-",
               f"{info['file'] / 1e6:.2f}" if info.get("file") else "-", f"{info['ratio']:.1f}x" if info.get("ratio") else "-"]
        means = []
        for t in task_list:
            vals = cells.get((key, t), [])
            text = fmt_cell(vals, None if key == TEACHER else n_expected)
            if failed.get((key, t)):
                text = f"{text} (failed: {failed[(key, t)]})" if vals else f"FAILED ({failed[(key, t)]})"
            row.append(text)
            if vals:
                means.append(pd.Series(vals).mean())
        row.append(f"{pd.Series(means).mean():.2f}" if len(means) == len(task_list) and means else "-")
        rows.append(row)
    return header, rows, {"cells": dict(cells), "tasks": task_list, "meta": meta}


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column rich table (what, value) on the console: the end-of-run summary."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def fmt(value: float | None) -> str:
    """A metric with two decimals, ``-`` for none."""
    return "-" if value is None else f"{value:.2f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict], path: Path) -> None:
    """One row per run (``CSV_FIELDS``), written to a temporary file and renamed into place."""
    rows = [{k: rec.get(k, "") for k in CSV_FIELDS} | {"method": rec.get("method", "teacher" if rec.get("stage") == "teacher" else "kdlsq")}
            for rec in records]
    with atomic_output(path) as tmp:
        pd.DataFrame(rows, columns=CSV_FIELDS).to_csv(tmp, index=False)


def series(key: str, meta: dict) -> str:
    """The plot's top-row line of a table row ``"<method> <quant name>"``: the method plus what the quant name adds to
    its bits (``"kdlsq w2a8_ibert"`` -> ``"kdlsq_ibert"``, ``"theseus fp32"`` -> ``"theseus"``); a mixed-precision
    setting (``meta["mixed"]``) is a line of its own, its whole key."""
    method, _, qname = key.partition(" ")
    return key if meta.get("mixed") else method + re.sub(r"^(w\d+(e\d+)?a\d+|fp32)", "", qname)


#: The bottom row's marker per weight bits (the teacher: a square; a mixed setting or other bits: a diamond).
BITS_MARKER = {32: "P", 8: "o", 4: "^", 2: "v"}


def point_marker(key: str, meta: dict) -> str:
    """The bottom row's marker of a table row: ``"s"`` for the teacher, else by weight bits (``BITS_MARKER``), ``"D"``
    for a mixed-precision setting or bits without a marker of their own."""
    if key == TEACHER:
        return "s"
    return "D" if meta.get("mixed") else BITS_MARKER.get(meta.get("wbits"), "D")


def plot(info: dict, path: Path) -> None:
    """Two rows of panels, one column per task. Top: metric against weight bits per method, mean with the
    sample std over seeds as error bars (a mixed-precision setting: its own point at its average weight bits), the
    teacher as a dashed line. Bottom: metric against the real file
    size (MB, log scale: the packed export, FP32 safetensors for the teacher), every method and the teacher, each
    point in its method's colour from the top row and with its bits' marker (``point_marker``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour per line (method), the same in both rows and every task's panel; in the bottom row the marker
    # tells the weight bits apart, so a point there has its line's colour above
    color = {name: f"C{i % 10}" for i, name in enumerate(sorted({series(k, m) for k, m in info["meta"].items() if k != TEACHER}))}
    tasks = info["tasks"]
    ncol = max(len(tasks), 1)
    fig, axes = plt.subplots(2, ncol, figsize=(4.2 * ncol + 2.6, 6.4), squeeze=False)
    for col, task in enumerate(tasks):
        top, bottom = axes[0][col], axes[1][col]
        by_method: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for key, meta in info["meta"].items():
            vals = pd.Series(info["cells"].get((key, task), []), dtype=float)
            if vals.empty:
                continue
            std = vals.std(ddof=1) if len(vals) > 1 else 0.0
            if key != TEACHER:
                # a mixed-precision setting is its own point (at its average bits), not a point on the method's line
                by_method[series(key, meta)].append((meta["wbits"], vals.mean(), std))
            if meta.get("file"):
                bottom.errorbar([meta["file"] / 1e6], [vals.mean()], yerr=[std], marker=point_marker(key, meta),
                                capsize=3, linestyle="none", label=key,
                                color="gray" if key == TEACHER else color[series(key, meta)])
        for method, pts in sorted(by_method.items()):
            pts.sort()
            top.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=method,
                         color=color[method])
        teacher = info["cells"].get((TEACHER, task))
        if teacher:
            top.axhline(pd.Series(teacher).mean(), linestyle="--", color="gray", label=TEACHER)
        top.set_title(TASK_LABEL.get(task, task))
        top.set_xlabel("weight bits (log scale)")
        top.set_xscale("log", base=2)
        bits = sorted({2, 4, 8} | {round(p[0]) for pts in by_method.values() for p in pts})
        top.set_xticks(bits, [str(b) for b in bits])
        bottom.set_xscale("log")
        bottom.set_xlabel("file size (MB, log scale)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("dev metric (x100)")
        # one legend per row, outside its last panel on the right (inside, a legend of a dozen series hides points),
        # naming every series of the row (a task may lack some of them)
        entries: dict[str, Any] = {}
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
        if entries:
            row[-1].legend(list(entries.values()), list(entries.keys()), fontsize=7, loc="upper left",
                           bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
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
    with atomic_output(out / "RESULTS.md") as tmp:
        tmp.write_text(text)
    write_csv(records, out / "results.csv")
    if info["tasks"]:
        plot(info, out / "results.png")
    return text


def study_record(rec: dict) -> dict | None:
    """``rec`` as a record of the minimal-knowledge study, or ``None`` when it is not one (unfinished, or no
    ``hidden_selection``). A cell of the study without a hidden-state term written before records carried the study's
    fields (``loss.hidden=0`` with ``loss.selection.name=none`` in its config) gets them from its config: selection
    ``none``, 0.0 kept, and the teacher source the loss implies (``none`` when no term reads the teacher: the
    prediction term of a regression task against the gold score: :func:`~kdlsq_pl.distill.losses.reads_teacher`)."""
    if rec.get("status") != "finished":
        return None
    if rec.get("hidden_selection"):
        return rec
    cfg = rec.get("config") or {}
    loss = cfg.get("loss") or {}
    if loss.get("hidden", 1) != 0 or (loss.get("selection") or {}).get("name") != "none" or not (cfg.get("method") or {}).get("train", True):
        return None
    from kdlsq_pl.distill.losses import reads_teacher
    from kdlsq_pl.models.loading import is_regression

    task = cfg.get("task") or {}
    teacher = reads_teacher(loss, "labels" in task and is_regression(task), loss.get("regression_target", "label"))
    cached = bool((cfg.get("teacher_cache") or {}).get("enabled"))
    return {**rec, "hidden_selection": {"name": "none"}, "hidden_fraction": 0.0,
            "teacher_source": ("cached" if cached else "live") if teacher else "none"}


def selection_table(records: Iterable[dict]) -> tuple[list[str], list[list[str]], dict]:
    """The minimal-knowledge study (``conf/experiment/minimal_knowledge.yaml``): one row per (task, selection,
    teacher source, method) with the share of the hidden-state knowledge kept (%), the dev metric (mean +- std over
    seeds), its difference to the full cached selection of the task and method, the teacher cache on disk (MB) and
    its ratio to the full cache, and the training time per epoch (s) with the speed-up against the live teacher's.
    A student trained without a hidden-state term (``loss.hidden=0``) is the ``none`` row (0% kept); fields a record
    does not hold show ``-``. Records that are not the study's are left out (:func:`study_record`). The selection is
    named ``<selection> (<method>)`` when the records hold more than one method. Also returns the points for
    :func:`plot_selection`."""
    rows_by: dict[tuple, list[dict]] = defaultdict(list)
    for rec in filter(None, map(study_record, records)):
        rows_by[(rec["task"], rec["hidden_selection"]["name"], rec.get("teacher_source", "cached"), rec.get("method", ""))].append(rec)
    several = len({key[3] for key in rows_by}) > 1
    header = ["task", "selection", "teacher", "kept (%)", "metric", "vs full", "cache (MB)", "cache vs full", "s / epoch", "speed-up vs live"]
    mean = lambda recs, key: float(pd.Series([r[key] for r in recs if r.get(key) is not None], dtype=float).mean())  # noqa: E731
    rows, points = [], defaultdict(list)
    order = lambda kv: (kv[0][0], kv[0][3], -mean(kv[1], "hidden_fraction"), kv[0][1], kv[0][2])  # noqa: E731
    for (task, name, source, method), recs in sorted(rows_by.items(), key=order):
        full = rows_by.get((task, "full", "cached", method), [])
        live = rows_by.get((task, "full", "live", method), [])
        m = mean(recs, "best")
        cache = mean(recs, "teacher_cache_bytes") if source == "cached" else float("nan")
        t = mean(recs, "fit_time_per_epoch_s")
        name = f"{name} ({method})" if several else name
        rows.append([TASK_LABEL.get(task, task), name, source, f"{100 * mean(recs, 'hidden_fraction'):.2f}",
                     fmt_cell([r["best"] for r in recs]) + f" ({recs[0].get('metric', '')})",
                     f"{m - mean(full, 'best'):+.2f}" if full else "-",
                     f"{cache / 1e6:.1f}" if cache == cache else "-",
                     f"{mean(full, 'teacher_cache_bytes') / cache:.0f}x smaller" if full and cache == cache and cache > 0 else "-",
                     f"{t:.0f}" if t == t else "-", f"{mean(live, 'fit_time_per_epoch_s') / t:.2f}x" if live and t > 0 else "-"])
        points[task].append((name, source, 100 * mean(recs, "hidden_fraction"), m,
                             float(pd.Series([r["best"] for r in recs]).std(ddof=1)) if len(recs) > 1 else 0.0,
                             cache / 1e6, t))
    return header, rows, {"points": dict(points)}


def plot_selection(info: dict, path: Path) -> None:
    """Two panels per task (one column each). Top: dev metric (mean, std over seeds as error bars) against the share
    of the hidden-state knowledge kept (%, log scale), one point per selection, labelled; the full cached selection as
    a dashed line. Bottom: training time per epoch (s) against the teacher cache on disk (MB, log scale), one point
    per cached selection; the live teacher's time per epoch (no cache) as a dashed line. A selection keeping 0%
    (``none``: no hidden-state term) has no place on the log axis: it is a dotted line, its mean, on the top panel,
    in a band of +- its std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(info["points"])
    n = max(len(tasks), 1)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 8.0), squeeze=False)
    for col, task in enumerate(tasks):
        top, bottom = axes[0][col], axes[1][col]
        for name, source, frac, m, std, cache_mb, t in info["points"][task]:
            label = f"{name}{' (live)' if source == 'live' else ''}"
            if frac <= 0:  # none: no place on the log axis; its mean as a line, +- its std as a band
                top.axhline(m, linestyle=":", color="black", label=f"no hidden-state term, teacher {source} ({m:.2f})")
                if std > 0:
                    top.axhspan(m - std, m + std, color="black", alpha=0.06)
                continue
            top.errorbar([frac], [m], yerr=[std], marker="s" if source == "live" else "o", capsize=3, linestyle="none")
            top.annotate(label, (frac, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if name == "full" and source == "cached":
                top.axhline(m, linestyle="--", color="gray")
            if source == "live":
                bottom.axhline(t, linestyle="--", color="red", label=f"live teacher, no cache ({t:.0f} s)")
            elif cache_mb == cache_mb and cache_mb > 0:
                bottom.plot([cache_mb], [t], marker="o", linestyle="none")
                bottom.annotate(name, (cache_mb, t), fontsize=7, xytext=(3, 3), textcoords="offset points")
        top.set_xscale("log")
        top.set_xlabel("hidden-state knowledge kept (%, log scale)")
        top.set_ylabel("dev metric (x100)")
        top.set_title(TASK_LABEL.get(task, task))
        bottom.set_xscale("log")
        bottom.set_xlabel("teacher cache on disk (MB, log scale)")
        bottom.set_ylabel("training time per epoch (s)")
        bottom.set_ylim(bottom=0)
        if top.get_legend_handles_labels()[0]:
            top.legend(fontsize=7)
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=7)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_report(root: str | Path, out: str | Path) -> str:
    """Write ``SELECTION.md`` and ``selection.png`` under ``out``; return the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows, info = selection_table(load_records(root))
    text = ("# Minimal hidden-state knowledge\n\nKDLSQ students distilling a part of the teacher's hidden states "
            f"(records under `{root}`); dev metric x100, best dev value per run.\n\n" + markdown(header, rows))
    with atomic_output(out / "SELECTION.md") as tmp:
        tmp.write_text(text)
    if info["points"]:
        plot_selection(info, out / "selection.png")
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
    ap.add_argument("--study", choices=["grid", "selection"], default="grid",
                    help="grid: RESULTS.md (method x bits); selection: the minimal hidden-state knowledge study (SELECTION.md)")
    args = ap.parse_args(argv)
    out = args.out or Path(args.root) / "report"
    if not any(Path(args.root).rglob(RESULT_FILE)):
        print(f"error: no {RESULT_FILE} under {args.root}; allowed: a folder holding run folders (set --root or KDLSQ_ROOT)",
              file=sys.stderr)
        sys.exit(2)
    if args.study == "selection":
        print(selection_report(args.root, out))
        return
    print(report(args.root, out))
    if args.wandb:
        log_to_wandb(args.root, out, args.group or Path(args.root).name, offline=not args.online)


if __name__ == "__main__":
    main()
