"""What every stage shares: the datamodule, the Trainer with its callbacks and loggers, ``fit`` with resume,
restoring the best checkpoint, closing W&B runs."""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdlsq_pl.data.glue import GLUEDataModule
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import is_qa

log = logging.getLogger("kdlsq_pl")


def build_datamodule(cfg: DictConfig, tokenizer_path: str, batch_size: int, seed: int | None = None,
                     symmetric_pairs: bool = False) -> GLUEDataModule:
    """The data module for ``cfg.task`` with the given training batch size (shuffled by ``seed``, default ``cfg.seed``):
    GLUE's, or for ``task.kind: qa`` SQuAD's (``kdlsq_pl.data.squad_module``). ``symmetric_pairs``: the teacher
    stage's ``task.teacher.symmetric_pairs`` (GLUE pairs in both orders)."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    kwargs = dict(batch_size=batch_size, eval_batch_size=cfg.data.eval_batch_size, max_length=cfg.task.max_length,
                  limit_train_examples=cfg.data.limit_train_examples, limit_eval_examples=cfg.data.limit_eval_examples,
                  num_workers=cfg.data.num_workers, seed=cfg.seed if seed is None else seed,
                  group_by_length=cfg.data.group_by_length, padding=cfg.data.padding)
    if is_qa(task):
        from kdlsq_pl.data.squad_module import SQuADDataModule
        return SQuADDataModule(task, tokenizer_path, cfg.data.get("squad_dir"), cfg.paths.cache_dir, **kwargs)
    return GLUEDataModule(task, tokenizer_path, cfg.data.glue_dir, cfg.paths.cache_dir, symmetric_pairs=symmetric_pairs, **kwargs)


def protocol_fields(dm: GLUEDataModule) -> dict:
    """What a record must say about how its numbers were measured: for SQuAD ``{"squad_protocol": {...}}`` (the
    protocol, ``offline-dev-split`` numbers being no official dev results, and the split's sizes); else nothing."""
    record = getattr(dm, "protocol_record", None)
    return {"squad_protocol": dict(record)} if record else {}


def build_trainer(cfg: DictConfig, out_dir: Path, run_name: str, extra_callbacks: list | None = None, **overrides: Any) -> pl.Trainer:
    """A ``Trainer`` from ``cfg.trainer`` with the configured callbacks and loggers, writing under ``out_dir``."""
    callbacks = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None:  # callbacks.<name>=null switches one off
            continue
        if name in ("model_checkpoint", "resume_checkpoint"):
            callbacks.append(instantiate(cb_cfg, dirpath=str(out_dir / "checkpoints")))
        else:
            callbacks.append(instantiate(cb_cfg))
    loggers = []
    for name, lg_cfg in (cfg.get("logger") or {}).items():
        kwargs: dict[str, Any] = {"save_dir": str(out_dir)}
        if name == "wandb":
            kwargs.update(name=run_name, group=lg_cfg.get("group") or sweep_group(),
                          config=OmegaConf.to_container(cfg, resolve=True))
        loggers.append(instantiate(lg_cfg, _partial_=True)(**kwargs))  # partial: `config` is instantiate's own argument
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(default_root_dir=str(out_dir), **overrides)
    return instantiate(trainer_cfg, callbacks=callbacks + (extra_callbacks or []), logger=loggers or False,
                       enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))


def fit(trainer: pl.Trainer, module: pl.LightningModule, dm: pl.LightningDataModule) -> None:
    """``trainer.fit``, resuming from the run's ``resume.ckpt`` if a killed run left one (loaded ``weights_only``)."""
    from kdlsq_pl.callbacks.robustness import ResumeCheckpoint

    ckpt = next((cb.resume_path() for cb in trainer.callbacks if isinstance(cb, ResumeCheckpoint)), None)
    if ckpt:
        if not zipfile.is_zipfile(ckpt):  # torch.save writes a zip archive; a truncated one is not
            raise ConfigError(f"resume checkpoint {ckpt} is corrupt (not a complete torch archive); delete it to start this run over")
        log.info("resuming from %s", ckpt)
    with warnings.catch_warnings():
        if type(dm).load_state_dict is not pl.LightningDataModule.load_state_dict:
            # The datamodule's own state (saved in every checkpoint) makes its sampler skip the batches already
            # trained, so a mid-epoch resume equals the uninterrupted run (tests/test_resume.py); Lightning only
            # knows stateful *dataloaders* and would warn that the results may be unreliable.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True if ckpt else None)


def sweep_group() -> str | None:
    """In a Hydra multirun, the sweep directory's name (W&B group of all its jobs); else ``None``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    except (ImportError, ValueError):  # not running under Hydra (tests, notebooks)
        return None


def finish_loggers(trainer: pl.Trainer) -> None:
    """Close W&B runs so the next run (or multirun job) starts a fresh one."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb
            lg.finalize("success")
            wandb.finish()


def restore_best(trainer: pl.Trainer, module: pl.LightningModule) -> str | None:
    """Load the best checkpoint's weights (safetensors-free, ``weights_only=True``) into ``module``."""
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not ckpt:
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return ckpt


def teacher_fp32_bytes(teacher_dir: Path, task: DictConfig) -> float:
    """The FP32 size of the stored teacher's parameters (bytes, 4 per value, as ``model_size_bytes``), counted on a
    ``meta``-device skeleton of its config and head (no weights are read): the reference of a shallower student."""
    from transformers import AutoConfig

    from kdlsq_pl.models.loading import task_model_class
    from kdlsq_pl.models.pooling import apply_pooling
    from kdlsq_pl.quant.modules import model_size_bytes

    config = AutoConfig.from_pretrained(str(teacher_dir))
    with torch.device("meta"):
        skeleton = task_model_class(task).from_config(config)
    if not is_qa(task):
        apply_pooling(skeleton)  # the pooling recorded in the teacher's config (no pooler dense: fewer parameters)
    return model_size_bytes(skeleton)["fp32_bytes"]
