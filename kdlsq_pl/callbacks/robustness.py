"""Callbacks that make a run survive: an atomic resume checkpoint every N steps, and a guard that
stops on the first non-finite loss or step size with one clear message.

A killed run (SIGTERM, SIGKILL, pre-emption) restarted with the same command resumes from
``<run>/checkpoints/resume.ckpt``: student weights, every quantizer's step size and state, the
optimizer, the LR schedule, the RNG and the data position (``GLUEDataModule.state_dict``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from kdlsq_pl.errors import NumericalError
from kdlsq_pl.quant.modules import lsq_quantizers

log = logging.getLogger("kdlsq_pl")
RESUME_FILE = "resume.ckpt"


class ResumeCheckpoint(pl.Callback):
    """Save a full training checkpoint every ``every_n_train_steps`` optimizer steps, atomically.

    The checkpoint is written to ``<dirpath>/resume.ckpt.tmp`` and renamed over ``resume.ckpt``, so a
    crash while writing leaves the previous one intact. ``resume_path`` gives the file to restart from.

    Args:
        dirpath: folder of the checkpoint (the run's ``checkpoints/``).
        every_n_train_steps: save interval in optimizer steps (>= 1).
    Raises:
        ValueError: ``every_n_train_steps`` < 1.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 50):
        if int(every_n_train_steps) < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps!r} is out of range; allowed: >= 1")
        self.path = Path(dirpath) / RESUME_FILE
        self.every = int(every_n_train_steps)

    def resume_path(self) -> str | None:
        """The checkpoint to restart from, or ``None`` for a fresh start."""
        return str(self.path) if self.path.is_file() else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every == 0 and not trainer.sanity_checking:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer, loops, callbacks
        if trainer.is_global_zero:
            os.replace(tmp, self.path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # finished: nothing to resume (the best/last checkpoints stay)
            self.path.unlink(missing_ok=True)


class NumericsGuard(pl.Callback):
    """Stop training on a NaN/Inf loss (before the optimizer step) or a NaN/Inf step size.

    (A step size that reaches zero or goes negative is clamped to ``eps`` in the quantizer's forward,
    ``kdlsq_pl.quant.lsq.fake_quantize``, so it cannot divide by zero or flip the grid.)

    Raises ``NumericalError`` naming the global step and the loss term or quantizer module; nothing
    is checkpointed after the fault, so the last resume/best checkpoints are the last good state.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            terms = {k.removeprefix("train/loss_"): float(v) for k, v in trainer.callback_metrics.items()
                     if k.startswith("train/loss_")}
            bad = ", ".join(f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)) or "see train/loss_* terms"
            raise NumericalError(f"non-finite training loss ({float(loss)}) at global step {trainer.global_step} "
                                 f"(epoch {trainer.current_epoch}; {bad}); {self._last_good(trainer)}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        model = getattr(pl_module, "student", None)
        for name, q in lsq_quantizers(model).items() if model is not None else ():
            s = q.scale.detach()
            if not torch.isfinite(s).all():
                raise NumericalError(f"step size of student.{name} is {s.flatten()[~torch.isfinite(s.flatten())][0].item()} "
                                     f"at global step {trainer.global_step}; {self._last_good(trainer)}")

    @staticmethod
    def _last_good(trainer: pl.Trainer) -> str:
        paths = [p for cb in trainer.callbacks for p in [getattr(cb, "path", None), getattr(cb, "last_model_path", None)]
                 if p and Path(p).is_file()]
        return f"last good checkpoint: {paths[0]}" if paths else "no checkpoint was written before it"
