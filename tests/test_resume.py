"""Kill a real student run mid-epoch with SIGKILL, restart it with the same command, and get exactly
the metrics and the final weights of an uninterrupted run (slow: ``make test-slow``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow

# 48 real RTE rows, batch 8: 6 steps per epoch, 2 epochs, dev evaluated twice per epoch;
# resume checkpoints every 4 steps (mid-epoch 0 and 1); the kill comes after step 9.
ARGS = ["task=rte", "task.teacher.init_from=null", "quant=w2a8", "data.limit_train_examples=48", "data.limit_eval_examples=32",
        "data.batch_size=8", "trainer.max_epochs=2", "task.teacher.epochs=1",
        # torch's fused AdamW: its update is the same in every process; the default foreach one is not (README,
        # "Determinism": the word table's update differs in about half of the processes, resumed or not)
        "optim.adamw=fused",
        "callbacks.resume_checkpoint.every_n_train_steps=4", "callbacks.progress_bar=null",
        "+callbacks.kill._target_=killer.KillAtStep",
        # the weights after the last step (the run itself keeps only best.ckpt): compared tensor for tensor below
        "+callbacks.final._target_=pytorch_lightning.callbacks.ModelCheckpoint", "+callbacks.final.filename=final",
        "+callbacks.final.dirpath=${paths.output_dir}/final", "+callbacks.final.save_on_train_epoch_end=true"]


def run_cli(root, out, kill_at=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "offline"}
    env.pop("KDLSQ_TEST_KILL_AT_STEP", None)
    if kill_at is not None:
        env["KDLSQ_TEST_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, str(REPO / "run.py"), f"paths.root_dir={root}", f"hydra.run.dir={out}", "logger=csv", *ARGS]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


def final_student(run):
    """The student's end-of-training checkpoint in ``<run>/final`` (the first run there also trained the teacher,
    whose own final checkpoint sits beside it)."""
    ckpts = [torch.load(p, weights_only=True) for p in sorted((run / "final").glob("*.ckpt"))]
    students = [c for c in ckpts if any(k.startswith("student.") for k in c["state_dict"])]
    assert len(students) == 1, [sorted(c["state_dict"])[:1] for c in ckpts]
    return students[0]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    full = run_cli(tmp_path, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    expected = json.loads((tmp_path / "full" / "result.json").read_text())

    killed = run_cli(tmp_path, tmp_path / "resumed", kill_at=9)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "resumed" / "result.json").exists()  # nothing claims success
    assert (tmp_path / "resumed" / "checkpoints" / "resume.ckpt").is_file()

    resumed = run_cli(tmp_path, tmp_path / "resumed")  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    # the datamodule restores the sampler mid-epoch, so Lightning's "not resumable" warning must not alarm the user
    assert "not resumable" not in resumed.stderr + resumed.stdout
    got = json.loads((tmp_path / "resumed" / "result.json").read_text())
    print("uninterrupted:", expected["metrics"], expected["best_metrics"], "resumed:", got["metrics"], got["best_metrics"])
    assert got["metrics"] == expected["metrics"] and got["best_metrics"] == expected["best_metrics"]
    assert not (tmp_path / "resumed" / "checkpoints" / "resume.ckpt").exists()  # removed once finished
    # both saw every step: the best checkpoint's step and the metric history agree, and the final student
    # (final.ckpt, written after step 12, three steps past the kill) is the same tensor for tensor, bit for bit
    a = torch.load(tmp_path / "full" / "checkpoints" / "best.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "best.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] and a["glue_best"] == b["glue_best"]
    a, b = final_student(tmp_path / "full"), final_student(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 12 and a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.endswith("weight_quantizer.scale") for k in a["state_dict"])  # the step sizes are compared too
    # every tensor bit for bit, the float word-embedding table included
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    # the optimizer states (Adam moments, step counts) bit for bit, the table's included
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])
