"""The stages of one run: teacher fine-tuning and KDLSQ student training, from a composed config."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from kdlsq_pl.config import validate
from kdlsq_pl.data.glue import GLUEDataModule
from kdlsq_pl.models.loading import TeacherStore, load_classifier, resolve_model_path
from kdlsq_pl.module import TeacherModule
from kdlsq_pl.results import RESULT_FILE, atomic_write_json, git_commit, versions

log = logging.getLogger("kdlsq_pl")


def build_datamodule(cfg: DictConfig, tokenizer_path: str, batch_size: int) -> GLUEDataModule:
    """The GLUE data module for ``cfg.task`` with the given training batch size."""
    return GLUEDataModule(
        OmegaConf.to_container(cfg.task, resolve=True), tokenizer_path, cfg.data.glue_dir, cfg.paths.cache_dir,
        batch_size=batch_size, eval_batch_size=cfg.data.eval_batch_size, max_length=cfg.task.max_length,
        limit_train_examples=cfg.data.limit_train_examples, limit_eval_examples=cfg.data.limit_eval_examples,
        num_workers=cfg.data.num_workers, seed=cfg.seed, group_by_length=cfg.data.group_by_length)


def build_trainer(cfg: DictConfig, out_dir: Path, run_name: str, extra_callbacks: list | None = None, **overrides: Any) -> pl.Trainer:
    """A ``Trainer`` from ``cfg.trainer`` with the configured callbacks and loggers, writing under ``out_dir``."""
    callbacks = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if name == "model_checkpoint":
            callbacks.append(instantiate(cb_cfg, dirpath=str(out_dir / "checkpoints")))
        else:
            callbacks.append(instantiate(cb_cfg))
    loggers = []
    for name, lg_cfg in (cfg.get("logger") or {}).items():
        kwargs = {"save_dir": str(out_dir)}
        if name == "wandb":
            kwargs["name"] = run_name
        loggers.append(instantiate(lg_cfg, **kwargs))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(default_root_dir=str(out_dir), **overrides)
    return instantiate(trainer_cfg, callbacks=callbacks + (extra_callbacks or []), logger=loggers or False,
                       enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))


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


def train_teacher(cfg: DictConfig, model_path: str, out_dir: Path) -> tuple[Path, dict]:
    """Fine-tune the full-precision teacher on ``cfg.task`` and save the best dev checkpoint to the store.

    Hyper-parameters come from ``cfg.task.teacher`` (lr, epochs, batch size, warm-up, weight decay).
    Returns the teacher directory and its record (dev metrics x100, wall time in seconds).
    """
    t0 = time.time()
    tcfg = cfg.task.teacher
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg, model_path, tcfg.batch_size)
    model = load_classifier(model_path, cfg.task)
    module = TeacherModule(model, cfg.task, lr=tcfg.lr, weight_decay=tcfg.weight_decay, warmup_ratio=tcfg.warmup_ratio)
    trainer = build_trainer(cfg, out_dir, f"teacher-{cfg.task.name}-s{cfg.seed}", max_epochs=tcfg.epochs, val_check_interval=1.0)
    try:
        trainer.fit(module, datamodule=dm)
        best_ckpt = restore_best(trainer, module)
        module.best, module.last = {}, {}
        trainer.validate(module, datamodule=dm, verbose=False)
    finally:
        finish_loggers(trainer)
    record = {"task": cfg.task.name, "model": str(cfg.model.name_or_path), "seed": cfg.seed,
              "metric": cfg.task.metric, "value": module.last.get(cfg.task.metric), "metrics": dict(module.last),
              "hparams": OmegaConf.to_container(tcfg, resolve=True), "wall_time_s": round(time.time() - t0, 1),
              "checkpoint": best_ckpt, "git_commit": git_commit()}
    if not cfg.trainer.get("fast_dev_run"):
        path = TeacherStore(cfg.teacher.store).save(module.model, dm.tokenizer, record, cfg.model.name_or_path, cfg.task.name, cfg.seed)
    else:  # a smoke run never publishes a teacher
        path = out_dir / "teacher_model"
        module.model.save_pretrained(path)
        dm.tokenizer.save_pretrained(path)
    return path, record


def ensure_teacher(cfg: DictConfig, model_path: str, out_dir: Path) -> tuple[Path, dict]:
    """The stored teacher for (model, task, seed), training it first if the store has none."""
    store = TeacherStore(cfg.teacher.store)
    key = (cfg.model.name_or_path, cfg.task.name, cfg.seed)
    if store.has(*key) and not cfg.teacher.retrain:
        path = store.path(*key)
        log.info("teacher: reusing %s", path)
        return path, store.record(*key)
    log.info("teacher: none in the store for (model=%s, task=%s, seed=%s); training it first", *key)
    return train_teacher(cfg, model_path, out_dir / "teacher")


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg`` and run its stage; write and return the result record (``result.json``)."""
    validate(cfg)
    t0 = time.time()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(cfg.model.name_or_path)
    record: dict[str, Any] = {"task": cfg.task.name, "model": str(cfg.model.name_or_path), "stage": cfg.stage,
                              "seed": cfg.seed, "metric": cfg.task.metric}
    if cfg.stage == "teacher":
        path, teacher = train_teacher(cfg, model_path, out_dir)
        record.update(metrics=teacher["metrics"], best=teacher["value"], teacher_dir=str(path))
        print_summary(f"teacher {cfg.task.name}", [(f"dev {k}", fmt(v)) for k, v in teacher["metrics"].items()]
                      + [("wall time (s)", f"{teacher['wall_time_s']:.0f}"), ("saved to", str(path))])
    else:
        from kdlsq_pl.student import train_student
        record.update(train_student(cfg, model_path, out_dir))
    record.update(wall_time_s=round(time.time() - t0, 1), git_commit=git_commit(), versions=versions(),
                  config=OmegaConf.to_container(cfg, resolve=True), status="finished")
    atomic_write_json(out_dir / RESULT_FILE, record)
    log.info("result record: %s", out_dir / RESULT_FILE)
    return record
