"""Fault injection for the resume test: SIGKILL this process after a given global step."""

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """Kill the process (SIGKILL: no handler, no cleanup) once ``global_step`` reaches
    ``$KDLSQ_TEST_KILL_AT_STEP``; does nothing when the variable is unset."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        at = os.environ.get("KDLSQ_TEST_KILL_AT_STEP")
        if at and trainer.global_step >= int(at):
            os.kill(os.getpid(), signal.SIGKILL)
