"""NumericsGuard and ResumeCheckpoint on a tiny Lightning run: a NaN loss or step size stops training
with one message naming the step and the module, and the last good checkpoint stays loadable."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdlsq_pl.callbacks.robustness import NumericsGuard, ResumeCheckpoint
from kdlsq_pl.errors import NumericalError
from kdlsq_pl.quant.lsq import LSQQuantizer


class Tiny(pl.LightningModule):
    """``student``: a Linear whose input passes an LSQ quantizer; the loss turns NaN at ``nan_at``."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.student = nn.ModuleDict({"q": LSQQuantizer(4, kind="activation"), "fc": nn.Linear(4, 1)})
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.student["fc"](self.student["q"](x)) - y) ** 2).mean()
        return loss * float("nan") if self.global_step == self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)), batch_size=8)


def trainer(tmp_path, *extra):
    return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[NumericsGuard(), ResumeCheckpoint(str(tmp_path), every_n_train_steps=2), *extra])


def test_nan_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    module = Tiny(nan_at=5)
    with pytest.raises(NumericalError, match=r"non-finite training loss \(nan\) at global step 5 .*last good checkpoint: .*resume.ckpt"):
        trainer(tmp_path).fit(module, loader())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN never reached the weights
    state = torch.load(tmp_path / "resume.ckpt", weights_only=True)
    assert state["global_step"] == 4 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "resume.ckpt.tmp").exists()


class PoisonStep(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            with torch.no_grad():
                pl_module.student["q"].scale.fill_(float("inf"))


def test_nonfinite_step_size_names_the_quantizer(tmp_path):
    with pytest.raises(NumericalError, match=r"step size of student\.q is inf at global step 3"):
        # the guard runs after PoisonStep in the callback order here
        pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   callbacks=[PoisonStep(), NumericsGuard()]).fit(Tiny(), loader())


def test_resume_checkpoint_rejects_a_bad_interval(tmp_path):
    with pytest.raises(ValueError, match="every_n_train_steps=0 is out of range"):
        ResumeCheckpoint(str(tmp_path), every_n_train_steps=0)


def test_corrupt_resume_checkpoint_is_reported_not_used(tmp_path):
    from kdlsq_pl.errors import ConfigError
    from kdlsq_pl.stages.common import fit

    (tmp_path / "resume.ckpt").write_bytes(b"PK\x03\x04 truncated")
    dm = pl.LightningDataModule.from_datasets(train_dataset=loader().dataset, batch_size=8)
    with pytest.raises(ConfigError, match=r"resume checkpoint .*resume.ckpt is corrupt"):
        fit(trainer(tmp_path), Tiny(), dm)
