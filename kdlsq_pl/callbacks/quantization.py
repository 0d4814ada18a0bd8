"""Callbacks that insert fake quantizers into the student and freeze their step sizes.

Order inside ``Trainer.fit`` (Lightning 2.6): ``setup`` (insertion: the quantizer parameters exist
before a checkpoint is restored and before ``configure_optimizers``), checkpoint restore, then
``on_fit_start`` (calibration, skipped for quantizers already initialised, e.g. restored ones).
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from kdlsq_pl.data.glue import model_inputs
from kdlsq_pl.quant.modules import is_quantized, quantize_, lsq_quantizers

log = logging.getLogger(__name__)


class QuantizationCallback(pl.Callback):
    """Insert LSQ fake quantizers into ``pl_module.student`` and initialise their step sizes.

    Weight step sizes are initialised from the weights; activation step sizes from
    ``calibration_batches`` random training batches (the student in eval mode, no grad): each
    activation quantizer initialises from its input on each batch and the step sizes are averaged.

    Args:
        quant: the ``quant`` config (bits per role, quantizer options, ``calibration_batches``).
    """

    def __init__(self, quant: Mapping[str, Any]):
        self.quant = dict(quant)
        self.inserted = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.inserted is None and not is_quantized(pl_module.student):
            self.inserted = quantize_(pl_module.student, self.quant)
            log.info("quantization: %d weight and %d activation quantizers inserted (%s)",
                     len(self.inserted.weight), len(self.inserted.act), self.quant.get("name"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        qs = lsq_quantizers(pl_module.student)
        if not qs or all(q.is_initialized for q in qs.values()):
            return
        loader = trainer.datamodule.calibration_dataloader()
        batches = list(islice(iter(loader), int(self.quant.get("calibration_batches", 1))))
        calibrate(pl_module.student, batches, pl_module.device)
        log.info("quantization: step sizes initialised from %d calibration batch(es)", len(batches))


@torch.no_grad()
def calibrate(student: torch.nn.Module, batches: list[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu") -> None:
    """Initialise every uninitialised quantizer of ``student`` from forwards on ``batches``.

    Weight quantizers initialise from their weight on the first forward. Activation quantizers
    are re-initialised on each batch, and their clip values combined over the batches: the
    maximum for ``init="minmax"`` (so the range is exactly the min-max of all calibration
    tensors), the mean otherwise (percentile, KL, LSQ rules: the mean of per-batch values).

    Raises:
        ValueError: ``batches`` is empty.
    """
    if not batches:
        raise ValueError("calibrate: no calibration batch (the training set is empty)")
    pending = {n: q for n, q in lsq_quantizers(student).items() if not q.is_initialized}
    acts = {n: q for n, q in pending.items() if q.kind == "activation"}
    sums = {n: torch.zeros_like(q.scale) for n, q in acts.items()}
    was_training = student.training
    student.eval()
    try:
        for batch in batches:
            for q in acts.values():
                q.reset()
            student(**{k: v.to(device) for k, v in model_inputs(batch).items()})
            for n, q in acts.items():
                if q.init == "minmax":
                    torch.maximum(sums[n], q.scale, out=sums[n])
                else:
                    sums[n] += q.scale
        for n, q in acts.items():
            q.scale.copy_(sums[n] if q.init == "minmax" else sums[n] / len(batches))
    finally:
        student.train(was_training)


class StepSizeFreeze(pl.Callback):
    """Stop step-size updates (``requires_grad=False``) from a global step or an epoch on.

    Args:
        at_step: freeze when ``trainer.global_step >= at_step`` (``None``: never by step).
        at_epoch: freeze when ``trainer.current_epoch >= at_epoch`` (``None``: never by epoch).
    """

    def __init__(self, at_step: int | None = None, at_epoch: int | None = None):
        self.at_step, self.at_epoch = at_step, at_epoch
        self.frozen_at: int | None = None

    def _maybe_freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = (self.at_step is not None and trainer.global_step >= self.at_step) or \
              (self.at_epoch is not None and trainer.current_epoch >= self.at_epoch)
        if due and self.frozen_at is None:
            for q in lsq_quantizers(pl_module.student).values():
                q.freeze()
            self.frozen_at = trainer.global_step
            log.info("step sizes frozen at global step %d (epoch %d)", trainer.global_step, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._maybe_freeze(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"frozen_at": self.frozen_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.frozen_at = None  # re-freeze on the first batch after a restore (requires_grad is not saved)
