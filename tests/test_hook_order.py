"""The Lightning hook order that ``QuantizationCallback`` relies on (kdlsq_pl/callbacks/quantization.py).

The callback inserts quantizers in ``setup`` so that (1) a resumed checkpoint's quantizer step sizes have
parameters to load into (strict loading), (2) ``configure_optimizers`` sees the step sizes and puts them in
their optimizer groups, and (3) ``on_fit_start``'s calibration runs after the restore, so restored step
sizes are not re-initialised. A Lightning upgrade that reorders these hooks fails here first.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Recorder(pl.Callback):
    def __init__(self, events: list[str]):
        self.events = events

    def setup(self, trainer, pl_module, stage):
        self.events.append("callback.setup")

    def on_fit_start(self, trainer, pl_module):
        self.events.append("callback.on_fit_start")


class Tiny(pl.LightningModule):
    def __init__(self, events: list[str]):
        super().__init__()
        self.events = events
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        self.events.append("module.configure_optimizers")
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_load_checkpoint(self, checkpoint):
        self.events.append("module.on_load_checkpoint")

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        self.events.append("module.load_state_dict")
        return super().load_state_dict(state_dict, strict=strict, **kwargs)


def _fit(tmp_path, events, ckpt_path=None, max_epochs=1):
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[Recorder(events)], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Tiny(events), data, ckpt_path=ckpt_path)
    return trainer


def test_fresh_fit_calls_setup_before_configure_optimizers_before_on_fit_start(tmp_path):
    events: list[str] = []
    _fit(tmp_path, events)
    assert events == ["callback.setup", "module.configure_optimizers", "callback.on_fit_start"]


def test_resumed_fit_restores_weights_after_setup_and_before_optimizers_and_on_fit_start(tmp_path):
    first: list[str] = []
    trainer = _fit(tmp_path, first)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    events: list[str] = []
    _fit(tmp_path, events, ckpt_path=str(ckpt), max_epochs=2)
    assert events == ["callback.setup", "module.on_load_checkpoint", "module.load_state_dict",
                      "module.configure_optimizers", "callback.on_fit_start"]


# ------------------------------------------------------------------ step-size freezing in a real Trainer
class QuantStudent(pl.LightningModule):
    """A one-Linear student whose weight (4 bits) and input (4 bits) pass through LSQ quantizers, trained by SGD."""

    def __init__(self):
        super().__init__()
        from kdlsq_pl.quant.lsq import LSQQuantizer
        from kdlsq_pl.quant.modules import QuantLinear
        torch.manual_seed(0)
        self.student = nn.Sequential(QuantLinear(nn.Linear(4, 1), LSQQuantizer(4, kind="weight"),
                                                 LSQQuantizer(4, kind="activation")))
        self.seen: list[tuple[int, int, list[float], bool]] = []  # (epoch, step, step sizes, requires_grad)

    def on_train_batch_start(self, batch, batch_idx):
        scales = [float(q.scale.detach()) for q in self._qs()]
        self.seen.append((self.current_epoch, self.global_step, scales, all(q.scale.requires_grad for q in self._qs())))

    def _qs(self):
        from kdlsq_pl.quant.modules import lsq_quantizers
        return list(lsq_quantizers(self.student).values())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.student(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _quant_fit(tmp_path, module, callbacks, max_epochs, ckpt_path=None):
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=4)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_step_sizes_learn_in_epoch_0_and_stay_fixed_from_the_freeze_epoch_on(tmp_path):
    from kdlsq_pl.callbacks.quantization import StepSizeFreeze

    m = QuantStudent()
    _quant_fit(tmp_path, m, [StepSizeFreeze(at_epoch=1)], max_epochs=3)
    epoch0 = [s for e, _, s, _ in m.seen if e == 0]
    later = [(s, g) for e, _, s, g in m.seen if e >= 1]
    assert len(epoch0) == 4 and len(later) == 8
    assert epoch0[0] != epoch0[-1]  # the step sizes did learn before the freeze
    assert all(not g for _, g in later)  # frozen from the first batch of epoch 1 on
    frozen = [s for s, _ in later]
    assert all(s == frozen[0] for s in frozen) and m.seen[4][2] == frozen[0]
    assert all(float(q.scale.detach()) == v for q, v in zip(m._qs(), frozen[0]))  # and after the last step


def test_step_sizes_stay_frozen_after_a_resume(tmp_path):
    """Frozen at step 2, checkpointed at step 4 (end of epoch 0), resumed for 2 more epochs: the step sizes are
    re-frozen on the first resumed batch (requires_grad is not in the checkpoint) and never move."""
    from kdlsq_pl.callbacks.quantization import StepSizeFreeze

    first = QuantStudent()
    trainer = _quant_fit(tmp_path, first, [StepSizeFreeze(at_step=2)], max_epochs=1)
    assert first.seen[1][2] != first.seen[2][2] and not first.seen[2][3]  # learned at step 1, frozen from step 2
    ckpt = tmp_path / "epoch0.ckpt"
    trainer.save_checkpoint(ckpt)
    at_ckpt = [float(q.scale.detach()) for q in first._qs()]
    resumed = QuantStudent()  # fresh quantizers: the step sizes come from the checkpoint
    _quant_fit(tmp_path, resumed, [StepSizeFreeze(at_step=2)], max_epochs=3, ckpt_path=str(ckpt))
    assert [step for _, step, _, _ in resumed.seen] == list(range(4, 12))
    assert all(s == at_ckpt and not g for _, _, s, g in resumed.seen)
    assert [float(q.scale.detach()) for q in resumed._qs()] == at_ckpt
    # while the full-precision bias kept training
    assert not torch.equal(resumed.student[0].bias, first.student[0].bias)
