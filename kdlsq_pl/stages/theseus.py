"""The ``method=theseus`` student stage: BERT-of-Theseus module replacing from the fine-tuned teacher
(``kdlsq_pl/models/theseus.py``), evaluated and saved as the successor alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from kdlsq_pl import cell_name
from kdlsq_pl.models.loading import load_classifier, weight_files
from kdlsq_pl.models.modules import TeacherModule
from kdlsq_pl.models.theseus import TheseusEncoder, successor_model, theseus_
from kdlsq_pl.quant.modules import model_size_bytes
from kdlsq_pl.report import fmt, print_summary
from kdlsq_pl.results import atomic_output
from kdlsq_pl.stages.common import build_datamodule, build_trainer, finish_loggers, fit, restore_best, teacher_fp32_bytes


class TheseusModule(TeacherModule):
    """Task-loss training of a model whose encoder is a :class:`TheseusEncoder`; only its successor layers are
    trainable, so the optimizer holds only them (``decay_groups`` keeps parameters that require grad). Logs the
    replacing rate ``theseus/rate`` each step; a batch in which no module was replaced takes no optimizer step."""

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        enc: TheseusEncoder = self.model.base_model.encoder
        self.log("theseus/rate", enc.rate)
        loss = super().training_step(batch, batch_idx)
        # a batch that drew the predecessor for every module has nothing to train: Lightning skips its step
        return loss if any(enc.last_replaced) else None


def train_theseus(cfg: DictConfig, teacher_dir: Path, teacher: Mapping[str, Any], out_dir: Path) -> dict:
    """Module replacing from the teacher in ``teacher_dir``; returns the record's fields (as ``train_student``):
    the successor's best and final dev metric, its FP32 size against the teacher's, ``successor_dir`` and
    ``file_bytes`` (bytes of its saved weight files)."""
    th = cfg.method.theseus
    t0 = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg, str(teacher_dir), cfg.data.batch_size)
    model = load_classifier(str(teacher_dir), cfg.task)
    theseus_(model, th.successor_layers, th.k, th.b, th.rate if th.scheduler == "constant" else None)
    module = TheseusModule(model, cfg.task, lr=th.lr, weight_decay=th.weight_decay, warmup_ratio=cfg.optim.warmup_ratio)
    trainer = build_trainer(cfg, out_dir, cell_name(cfg.stage, "theseus", cfg.task.name, cfg.quant.name, cfg.seed))
    try:
        fit(trainer, module, dm)
        module.metrics_from_trainer()
        final, best = dict(module.last), dict(module.best_row)
        ckpt = restore_best(trainer, module)
    finally:
        finish_loggers(trainer)
    successor = successor_model(model)
    with atomic_output(out_dir / "successor", directory=True) as tmp:
        successor.save_pretrained(tmp)
        dm.tokenizer.save_pretrained(tmp)
    size = model_size_bytes(successor)
    teacher_bytes = teacher_fp32_bytes(teacher_dir, cfg.task)
    metric = cfg.task.metric
    fields = {
        "bits": {"weight_bits": 32, "embedding_bits": 32, "act_bits": 32}, "bit_overrides": {}, "avg_weight_bits": 32.0,
        "teacher_metric": teacher.get("value"), "teacher_metrics": teacher.get("metrics"), "teacher_dir": str(teacher_dir),
        "metrics": final, "best_metrics": best, "best": best.get(metric), "final": final.get(metric),
        "size_bytes": size["size_bytes"], "fp32_bytes": teacher_bytes, "compression_ratio": teacher_bytes / size["size_bytes"],
        "successor_layers": int(th.successor_layers), "successor_dir": str(out_dir / "successor"), "checkpoint": ckpt,
        # the real file a user ships: the successor's FP32 weights as saved (the report's file-size axis)
        "file_bytes": sum(f.stat().st_size for f in weight_files(out_dir / "successor")),
        "student_layers": int(th.successor_layers), "teacher_layers": len(model.base_model.encoder.predecessor),
        "student_wall_time_s": round(time.time() - t0, 1),
    }
    print_summary(f"theseus {th.successor_layers}-layer successor on {cfg.task.name} ({metric}, dev)", [
        ("teacher (FP32)", fmt(teacher.get("value"))), ("successor best", fmt(fields["best"])), ("successor final", fmt(fields["final"])),
        ("size (MB)", f"{size['size_bytes'] / 1e6:.2f} ({fields['compression_ratio']:.1f}x smaller than the teacher)"),
        ("wall time (s)", f"{fields['student_wall_time_s']:.0f}")])
    return fields
