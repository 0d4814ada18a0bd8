"""trainer=ddp_cpu: two gloo processes on half-batches give the loss of one process on the whole batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import compose_cfg
from kdlsq_pl.stages.common import build_datamodule, build_trainer
from kdlsq_pl.stages.student import build_student_module, quant_callbacks

pytestmark = pytest.mark.slow  # two spawned processes plus a single-process run: about 2 minutes

# Fixed padding so every half-batch has the same shape: then the mean of the two per-process means is
# exactly the whole-batch mean of every loss term (soft CE, attention-score and hidden-state MSE).
SMALL = ("task=rte", "task.teacher.init_from=null", "quant=w2a8", "data.limit_train_examples=64", "data.limit_eval_examples=16",
         "data.padding=max_length", "task.max_length=64", "data.group_by_length=false",
         "callbacks.progress_bar=null", "callbacks.model_checkpoint=null", "callbacks.resume_checkpoint=null")


class LossLog(pl.Callback):
    """After each step: the training loss averaged over processes, written by rank 0 to ``path``."""

    def __init__(self, path: str):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.losses))


def losses(tmp_path: Path, minilm_path: str, name: str, *overrides: str) -> list[float]:
    cfg = compose_cfg(tmp_path / name, *SMALL, *overrides)
    pl.seed_everything(0)
    module = build_student_module(cfg, Path(minilm_path))  # the MiniLM itself stands in for a teacher
    for m in module.modules():  # each process draws its own dropout masks: switch dropout off to compare exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    dm = build_datamodule(cfg, minilm_path, cfg.data.batch_size)
    path = tmp_path / f"{name}.json"
    trainer = build_trainer(cfg, tmp_path / name, name, extra_callbacks=[*quant_callbacks(cfg), LossLog(str(path))],
                            max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return json.loads(path.read_text())


def test_ddp_cpu_matches_single_process_on_the_same_global_batch(tmp_path, minilm_path):
    single = losses(tmp_path, minilm_path, "single", "data.batch_size=16")
    ddp = losses(tmp_path, minilm_path, "ddp", "trainer=ddp_cpu", "data.batch_size=8")
    print("single:", single, "ddp_cpu:", ddp)
    assert len(single) == len(ddp) == 3
    # step 1: same weights, same 16 rows; steps 2-3: after DDP-averaged updates. Not bit-equal: a GEMM
    # over 8 rows rounds differently from one over 16 (~1e-7), and the 8-bit activation rounding turns a
    # few of those into whole quantization steps; measured gaps are 0.006-0.03%.
    assert ddp == pytest.approx(single, rel=1e-3)
