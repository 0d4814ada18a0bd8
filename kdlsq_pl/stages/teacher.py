"""The teacher stage: fine-tune the full-precision teacher once per recipe and publish it to the teacher store."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.seed import isolate_rng
from torch import nn

from kdlsq_pl import cell_name
from kdlsq_pl.config import source_task_cfg
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import TeacherStore, init_head_bias_, is_qa, load_classifier, recipe_digest
from kdlsq_pl.models.modules import TeacherModule
from kdlsq_pl.results import git_commit
from kdlsq_pl.stages.common import build_datamodule, build_trainer, finish_loggers, fit, protocol_fields, restore_best

log = logging.getLogger("kdlsq_pl")


#: Bumped when what a teacher recipe holds changes, so teachers are never matched across formats.
RECIPE_FORMAT = 1
#: Task keys that do not shape the teacher (left out of the recipe): read by the student stage only
#: (``pred_reduction``) or describing the task for validation (``symmetric``).
NOT_RECIPE_TASK_KEYS = ("pred_reduction", "symmetric")
#: ``task.teacher`` options added after teachers were stored: left out of the recipe at these values (what
#: the code did before they existed), so adding an option never orphans the teachers already in the store.
LATER_TEACHER_DEFAULTS = {"head_bias": "zero", "symmetric_pairs": False, "init_from": None}


def transfer_encoder_(model: nn.Module, teacher_dir: Path, task: DictConfig) -> None:
    """Copy a stored teacher's encoder (embeddings, layers and, where ``model`` keeps one, the pooler's dense
    layer) into ``model``, in place; ``model``'s classifier head stays as initialised (a new head).

    Raises:
        ConfigError: the teacher lacks an encoder weight ``model`` has (another architecture or size).
    """
    source = load_classifier(str(teacher_dir), task)
    src, own = source.base_model.state_dict(), model.base_model.state_dict()
    missing = [k for k in own if k not in src and not k.startswith("pooler.")]
    if missing or any(src[k].shape != own[k].shape for k in own if k in src):
        raise ConfigError(f"task.teacher.init_from: the teacher in {teacher_dir} does not fit this model "
                          f"({len(missing)} missing encoder weights, e.g. {missing[:2]}); allowed: a teacher of the same model")
    model.base_model.load_state_dict({k: v for k, v in src.items() if k in own}, strict=False)


def teacher_recipe(cfg: DictConfig, model_path: str) -> dict:
    """Everything that shapes the fine-tuned teacher: the key of the teacher store.

    The model (name and, for a local directory, the digest of its config and weight files), the task
    config (columns, labels, metric, max length and ``task.teacher``: lr, epochs, batch size, warm-up,
    weight decay, pooling, dropout, head bias, symmetric pairs; :data:`LATER_TEACHER_DEFAULTS` left out at
    their defaults), the teacher seed, the data options that change training (``group_by_length``,
    ``padding``, row limits) and the digest of the task's data files (or the hub dataset's name when no
    local copy is used). ``NOT_RECIPE_TASK_KEYS`` are left out.
    """
    from kdlsq_pl.data.tsv import resolve_glue_dir, task_files
    from kdlsq_pl.models.loading import files_digest, model_digest

    task = OmegaConf.to_container(cfg.task, resolve=True)
    for key in NOT_RECIPE_TASK_KEYS:
        task.pop(key, None)
    for key, default in LATER_TEACHER_DEFAULTS.items():
        if task.get("teacher", {}).get(key, default) == default:
            task.get("teacher", {}).pop(key, None)
    glue_root = resolve_glue_dir(cfg.data.glue_dir)
    if is_qa(task):
        data = squad_data_digest(task, cfg.data.get("squad_dir"))
    elif glue_root is not None:
        data = {split: files_digest([path]) for split, path in task_files(task, glue_root).items()}
    else:
        data = {"hub": task.get("hub")}
    recipe = {"format": RECIPE_FORMAT, "model": str(cfg.model.name_or_path), "model_digest": model_digest(model_path),
              "task": cfg.task.name, "seed": int(cfg.teacher.seed), "task_config": task,
              "data": {k: cfg.data[k] for k in ("group_by_length", "padding", "limit_train_examples", "limit_eval_examples")},
              "data_files": data}
    src = source_task_cfg(cfg)
    if src is not None:  # the source teacher's own recipe, by digest: a changed source makes a new teacher
        recipe["init_teacher"] = {"task": src.task.name, "recipe_digest": recipe_digest(teacher_recipe(src, model_path))}
    return recipe


def squad_data_digest(task: dict, squad_dir: str | None) -> dict:
    """The SQuAD files a teacher is trained from, by digest (the protocol decides which), or the hub's name."""
    from kdlsq_pl.data import squad
    from kdlsq_pl.models.loading import files_digest

    protocol = squad.resolve_protocol(task.get("protocol", "auto"), task["version"], squad_dir)
    root = squad.resolve_squad_dir(squad_dir)
    if root is None:
        return {"protocol": protocol, "hub": squad.HUB_DATASETS[task["version"]]}
    splits = ("dev",) if protocol == squad.OFFLINE_PROTOCOL else ("train", "dev")
    return {"protocol": protocol, **{s: files_digest([squad.squad_file(root, task["version"], s)]) for s in splits}}


def train_teacher(cfg: DictConfig, model_path: str, out_dir: Path, recipe: dict | None = None) -> tuple[Path, dict]:
    """Fine-tune the full-precision teacher on ``cfg.task`` and save the best dev checkpoint to the store.

    Hyper-parameters come from ``cfg.task.teacher`` (lr, epochs, batch size, warm-up, weight decay, pooling,
    classifier dropout, the head's initial bias, pairs in both orders, the task whose stored teacher it starts from:
    ``init_from``, that teacher trained first if the store has none); the seed is ``cfg.teacher.seed``. Returns the
    teacher directory and its record (dev metrics x100, wall time in seconds, the recipe).
    """
    t0 = time.time()
    recipe = recipe or teacher_recipe(cfg, model_path)
    tcfg = cfg.task.teacher
    seed = int(cfg.teacher.seed)
    pl.seed_everything(seed, workers=True)
    dm = build_datamodule(cfg, model_path, tcfg.batch_size, seed=seed, symmetric_pairs=bool(tcfg.get("symmetric_pairs", False)))
    model = load_classifier(model_path, cfg.task, head=OmegaConf.to_container(tcfg, resolve=True))
    src = source_task_cfg(cfg)
    if src is not None:  # intermediate-task training: start from the source task's stored teacher
        # trained first if the store has none, with the random state put back afterwards: this teacher's random
        # draws are the same whether its source was trained in this process or read from the store
        with isolate_rng():
            src_dir, _ = ensure_teacher(src, model_path, out_dir / f"init_{src.task.name}")
        transfer_encoder_(model, src_dir, src.task)
        log.info("teacher: encoder from the %s teacher %s", src.task.name, src_dir)
    if tcfg.get("head_bias", "zero") == "prior":
        dm.setup("fit")
        init_head_bias_(model, dm.splits["train"]["labels"])
    module = TeacherModule(model, cfg.task, lr=tcfg.lr, weight_decay=tcfg.weight_decay, warmup_ratio=tcfg.warmup_ratio)
    trainer = build_trainer(cfg, out_dir, cell_name("teacher", "", cfg.task.name, "", seed), max_epochs=tcfg.epochs, val_check_interval=1.0)
    try:
        fit(trainer, module, dm)
        best_ckpt = restore_best(trainer, module)
        module.best, module.best_row, module.last = {}, {}, {}
        trainer.validate(module, datamodule=dm, verbose=False)
    finally:
        finish_loggers(trainer)
    record = {"task": cfg.task.name, "model": str(cfg.model.name_or_path), "seed": seed,
              "metric": cfg.task.metric, "value": module.last.get(cfg.task.metric), "metrics": dict(module.last),
              "hparams": OmegaConf.to_container(tcfg, resolve=True), "wall_time_s": round(time.time() - t0, 1),
              "checkpoint": best_ckpt, "git_commit": git_commit(), **protocol_fields(dm)}
    store = teacher_store(cfg)
    path = store.save(module.model, dm.tokenizer, record, recipe)
    return path, store.record(recipe)


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
