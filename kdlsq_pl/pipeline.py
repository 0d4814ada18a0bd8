"""The stages of one run: teacher fine-tuning and KDLSQ student training, from a composed config."""

from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from kdlsq_pl import cell_name
from kdlsq_pl.config import validate
from kdlsq_pl.data.glue import GLUEDataModule
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import TeacherStore, load_classifier, resolve_model_path
from kdlsq_pl.module import TeacherModule
from kdlsq_pl.results import RESULT_FILE, atomic_write_json, git_commit, read_result, versions

log = logging.getLogger("kdlsq_pl")


def build_datamodule(cfg: DictConfig, tokenizer_path: str, batch_size: int, seed: int | None = None) -> GLUEDataModule:
    """The GLUE data module for ``cfg.task`` with the given training batch size (shuffled by ``seed``, default ``cfg.seed``)."""
    return GLUEDataModule(
        OmegaConf.to_container(cfg.task, resolve=True), tokenizer_path, cfg.data.glue_dir, cfg.paths.cache_dir,
        batch_size=batch_size, eval_batch_size=cfg.data.eval_batch_size, max_length=cfg.task.max_length,
        limit_train_examples=cfg.data.limit_train_examples, limit_eval_examples=cfg.data.limit_eval_examples,
        num_workers=cfg.data.num_workers, seed=cfg.seed if seed is None else seed, group_by_length=cfg.data.group_by_length,
        padding=cfg.data.padding)


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


#: Bumped when what a teacher recipe holds changes, so teachers are never matched across formats.
RECIPE_FORMAT = 1


def teacher_recipe(cfg: DictConfig, model_path: str) -> dict:
    """Everything that shapes the fine-tuned teacher: the key of the teacher store.

    The model (name and, for a local directory, the digest of its config and weight files), the task
    config (columns, labels, metric, max length and ``task.teacher``: lr, epochs, batch size, warm-up,
    weight decay, pooling, dropout), the teacher seed, the data options that change training
    (``group_by_length``, ``padding``, row limits) and the digest of the task's data files (or the hub
    dataset's name when no local copy is used).
    """
    from kdlsq_pl.data.tsv import resolve_glue_dir, task_files
    from kdlsq_pl.models.loading import files_digest, model_digest

    task = OmegaConf.to_container(cfg.task, resolve=True)
    glue_root = resolve_glue_dir(cfg.data.glue_dir)
    if glue_root is not None:
        data = {split: files_digest([path]) for split, path in task_files(task, glue_root).items()}
    else:
        data = {"hub": task.get("hub")}
    return {"format": RECIPE_FORMAT, "model": str(cfg.model.name_or_path), "model_digest": model_digest(model_path),
            "task": cfg.task.name, "seed": int(cfg.teacher.seed), "task_config": task,
            "data": {k: cfg.data[k] for k in ("group_by_length", "padding", "limit_train_examples", "limit_eval_examples")},
            "data_files": data}


def train_teacher(cfg: DictConfig, model_path: str, out_dir: Path, recipe: dict | None = None) -> tuple[Path, dict]:
    """Fine-tune the full-precision teacher on ``cfg.task`` and save the best dev checkpoint to the store.

    Hyper-parameters come from ``cfg.task.teacher`` (lr, epochs, batch size, warm-up, weight decay, pooling,
    classifier dropout); the seed is ``cfg.teacher.seed``. Returns the teacher directory and its record
    (dev metrics x100, wall time in seconds, the recipe).
    """
    t0 = time.time()
    recipe = recipe or teacher_recipe(cfg, model_path)
    tcfg = cfg.task.teacher
    seed = int(cfg.teacher.seed)
    pl.seed_everything(seed, workers=True)
    dm = build_datamodule(cfg, model_path, tcfg.batch_size, seed=seed)
    model = load_classifier(model_path, cfg.task, head=OmegaConf.to_container(tcfg, resolve=True))
    module = TeacherModule(model, cfg.task, lr=tcfg.lr, weight_decay=tcfg.weight_decay, warmup_ratio=tcfg.warmup_ratio)
    trainer = build_trainer(cfg, out_dir, cell_name("teacher", "", cfg.task.name, "", seed), max_epochs=tcfg.epochs, val_check_interval=1.0)
    try:
        fit(trainer, module, dm)
        best_ckpt = restore_best(trainer, module)
        module.best, module.last = {}, {}
        trainer.validate(module, datamodule=dm, verbose=False)
    finally:
        finish_loggers(trainer)
    record = {"task": cfg.task.name, "model": str(cfg.model.name_or_path), "seed": seed,
              "metric": cfg.task.metric, "value": module.last.get(cfg.task.metric), "metrics": dict(module.last),
              "hparams": OmegaConf.to_container(tcfg, resolve=True), "wall_time_s": round(time.time() - t0, 1),
              "checkpoint": best_ckpt, "git_commit": git_commit()}
    path = teacher_store(cfg).save(module.model, dm.tokenizer, record, recipe)
    return path, teacher_store(cfg).record(recipe)


def teacher_store(cfg: DictConfig) -> TeacherStore:
    """The teacher store; smoke runs (``trainer.fast_dev_run``) use ``<store>/fast_dev_run`` so they never mix with real teachers."""
    root = Path(cfg.teacher.store)
    return TeacherStore(root / "fast_dev_run" if cfg.trainer.get("fast_dev_run") else root)


def ensure_teacher(cfg: DictConfig, model_path: str, out_dir: Path) -> tuple[Path, dict]:
    """The stored teacher of this config's recipe (``teacher_recipe``), training it first if the store has none.

    A file lock per recipe makes parallel grid cells wait for one training instead of racing to train
    the same teacher.
    """
    store = teacher_store(cfg)
    recipe = teacher_recipe(cfg, model_path)
    path = store.path(recipe)
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if store.has(recipe) and not cfg.teacher.retrain:
            log.info("teacher: reusing %s", path)
            return path, store.record(recipe)
        log.info("teacher: none in the store for this recipe (model=%s, task=%s, seed=%s, digest %s); training it first",
                 recipe["model"], recipe["task"], recipe["seed"], path.name.rsplit("-", 1)[-1])
        return train_teacher(cfg, model_path, out_dir / "teacher", recipe)


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def provenance(cfg: DictConfig) -> dict:
    """Git commit, library versions and the resolved config, as every result record carries."""
    return {"git_commit": git_commit(), "versions": versions(), "config": OmegaConf.to_container(cfg, resolve=True)}


def cell_fields(cfg: DictConfig) -> dict:
    """The fields that identify a grid cell in its result record."""
    return {"task": cfg.task.name, "model": str(cfg.model.name_or_path), "stage": cfg.stage, "seed": cfg.seed,
            "metric": cfg.task.metric, "quant": cfg.quant.name if cfg.stage == "student" else None,
            "method": cfg.method.name if cfg.stage == "student" else "teacher"}


def record_failure(cfg: DictConfig, error: BaseException) -> dict:
    """Write a ``failed`` result record for this cell (never over a finished one); return it."""
    out_dir = Path(cfg.paths.output_dir)
    previous = read_result(out_dir)
    if previous and previous.get("status") == "finished":
        return previous
    record = {**cell_fields(cfg), "status": "failed", "error": f"{type(error).__name__}: {error}"}
    try:
        record.update(provenance(cfg))
    except Exception:  # an unresolvable config is itself the failure
        pass
    atomic_write_json(out_dir / RESULT_FILE, record)
    return record


def run(cfg: DictConfig, validated: bool = False) -> dict:
    """Validate ``cfg`` (unless the caller already did) and run its stage; write and return the result record."""
    if not validated:
        validate(cfg)
    t0 = time.time()
    prov = provenance(cfg)  # the commit the run starts from (a checkout during a long run must not relabel it)
    out_dir = Path(cfg.paths.output_dir)
    previous = read_result(out_dir)
    if previous and previous.get("status") == "finished":
        log.info("%s already holds a finished result; skipping this cell (delete result.json to redo it)", out_dir)
        return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("keep_freed_memory", True):
        from kdlsq_pl.kernels import keep_freed_memory
        keep_freed_memory()
    model_path = resolve_model_path(cfg.model.name_or_path)
    record: dict[str, Any] = cell_fields(cfg)
    if cfg.stage == "teacher":
        path, teacher = train_teacher(cfg, model_path, out_dir)
        record.update(seed=teacher["seed"], metrics=teacher["metrics"], best=teacher["value"], teacher_dir=str(path),
                      recipe_digest=teacher["recipe_digest"])
        print_summary(f"teacher {cfg.task.name}", [(f"dev {k}", fmt(v)) for k, v in teacher["metrics"].items()]
                      + [("wall time (s)", f"{teacher['wall_time_s']:.0f}"), ("saved to", str(path))])
    else:
        from kdlsq_pl.student import train_student
        record.update(train_student(cfg, model_path, out_dir))
    record.update(wall_time_s=round(time.time() - t0, 1), status="finished", **prov)
    atomic_write_json(out_dir / RESULT_FILE, record)
    log.info("result record: %s", out_dir / RESULT_FILE)
    return record
