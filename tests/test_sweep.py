"""Hydra multirun over 2 tasks x 2 bit settings on real data (one batch per stage): records, teacher reuse, W&B, report, reruns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from kdlsq_pl.report import build_table, load_records
from wandb_records import run_info

# One batch per stage (fast_dev_run would replace the W&B logger with a dummy); no checkpoints on disk. Both tasks'
# teachers take the same head ([CLS] + pooler dense; RTE's default drops the dense), so a row's file size is each cell's,
# and both start from the checkpoint (RTE's default starts from STS-B's teacher: a third training).
SMALL = ["trainer.max_epochs=1", "task.teacher.epochs=1", "task.teacher.pooling=cls", "task.teacher.pooler_dense=true",
         "task.teacher.init_from=null",
         "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "data.limit_train_examples=16", "data.limit_eval_examples=16", "data.batch_size=8", "~callbacks.model_checkpoint"]


def sweep(root, *args):
    cmd = [sys.executable, str(REPO / "run.py"), "-m", f"paths.root_dir={root}", f"hydra.sweep.dir={root}/grid",
           "experiment_name=testgrid", *SMALL, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    proc = sweep(root, "task=rte,wnli", "quant=w8a8,w2a8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def cell_logs(root):
    return {p.parent.name: p.read_text() for p in (root / "grid").glob("*/run.log")}


def test_four_records_and_report_copies_them(grid):
    recs = [r for r in load_records(grid / "grid") if r.get("stage") == "student"]
    assert sorted((r["task"], r["quant"], r["status"]) for r in recs) == [
        ("rte", "w2a8", "finished"), ("rte", "w8a8", "finished"), ("wnli", "w2a8", "finished"), ("wnli", "w8a8", "finished")]
    header, rows, _ = build_table(recs)
    assert header == ["model", "W-E-A bits", "size (MB)", "file (MB)", "vs FP32", "RTE (acc)", "WNLI (acc)", "avg"]
    table = {r[0]: r for r in rows}
    assert list(table) == ["teacher (FP32)", "kdlsq w8a8", "kdlsq w2a8"]
    for r in recs:
        col = 5 if r["task"] == "rte" else 6
        assert table[f"kdlsq {r['quant']}"][3] == f"{r['packed_bytes'] / 1e6:.2f}"  # the packed export's real size
        assert table[f"kdlsq {r['quant']}"][col] == f"{r['best']:.2f} (n=1)"
        assert table["teacher (FP32)"][col] == f"{r['teacher_metric']:.2f} (n=1)"


def test_teacher_trained_once_per_task(grid):
    logs = cell_logs(grid)
    assert len(logs) == 4
    trained = sum(t.count("training it first") for t in logs.values())
    reused = sum(t.count("teacher: reusing") for t in logs.values())
    assert (trained, reused) == (2, 2)


def test_wandb_runs_grouped_and_tagged(grid):
    infos = [run_info(p) for p in (grid / "grid").glob("*/wandb/offline-run-*/run-*.wandb")]
    students = [i for i in infos if not i["name"].startswith("teacher")]
    assert len(students) == 4
    for info in students:
        assert info["group"] == "testgrid"
        assert {"student", "seed42", "kdlsq"} <= set(info["tags"]) and set(info["tags"]) & {"rte", "wnli"}
        assert set(info["tags"]) & {"w8a8", "w2a8"} and info["name"].split("_")[0] in info["tags"]
        assert info["name"] == f"{info['name'].split('_')[0]}_{info['name'].split('_')[1]}_s42"  # the cell folder's name


def test_rerun_skips_finished_and_failed_cell_is_recorded(grid):
    before = {p: p.stat().st_mtime_ns for p in (grid / "grid").glob("*/result.json")}
    proc = sweep(grid, "task=rte,wnli", "quant=w8a8,w2a8")
    assert proc.returncode == 0
    assert sum(t.count("already holds a finished result") for t in cell_logs(grid).values()) == 4
    assert {p: p.stat().st_mtime_ns for p in (grid / "grid").glob("*/result.json")} == before
    # a cell forced to fail (QNLI has no train.tsv here) is recorded as failed; the sweep still exits 0
    proc = sweep(grid, "task=qnli", "quant=w8a8", "hydra.sweep.subdir=x${hydra.job.num}_${task.name}")
    assert proc.returncode == 0 and "task=qnli: missing file" in proc.stderr
    failed = [json.loads(p.read_text()) for p in (grid / "grid").glob("x*_qnli/result.json")]
    assert failed and failed[0]["status"] == "failed" and "QNLI/train.tsv" in failed[0]["error"]
    _, rows, _ = build_table(load_records(grid / "grid"))
    assert any("FAILED (1)" in cell for r in rows for cell in r)
