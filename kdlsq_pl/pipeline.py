"""One run: validate, dispatch to its stage (``kdlsq_pl.stages``), write its result record."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdlsq_pl.config import validate
from kdlsq_pl.models.loading import resolve_model_path
from kdlsq_pl.report import fmt, print_summary
from kdlsq_pl.results import RESULT_FILE, atomic_write_json, git_commit, read_result, versions

log = logging.getLogger("kdlsq_pl")


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


SAME_CELL_WAYS_OUT = ("allowed: the same settings (the cell is skipped), another output folder (experiment_name or "
                      "hydra.sweep.dir), or delete its result.json")
_UNKNOWN = object()
#: Settings that change a cell's result but not its folder name (``kdlsq_pl.cell_name``: stage, method, task, bits,
#: seed), with their value in records written before the setting existed (``_UNKNOWN``: not compared then).
CELL_SETTINGS = {"student.init": "teacher", "student.layers": None, "loss.selection": _UNKNOWN,
                 "trainer.max_epochs": _UNKNOWN, "optim.lr": _UNKNOWN, "quant.overrides": None,
                 "teacher.forward_dtype": "float32", "optim.adamw": "foreach", "loss.regression_target": "label"}
#: Settings of CELL_SETTINGS that shape only a regression task's result (STS-B), not compared for a classifier.
REGRESSION_ONLY = {"loss.regression_target"}


def check_same_cell(cfg: DictConfig, previous: dict, out_dir: Path) -> None:
    """Refuse to skip a cell whose finished record was trained with other :data:`CELL_SETTINGS` than ``cfg``, or (a
    student) distilled from another teacher than the current recipe's: a grid rerun with, say, ``student.layers=3``
    or a changed ``task.teacher`` would otherwise report the earlier result as its own.

    Raises:
        ConfigError: one line naming the first differing setting, both values and the ways out.
    """
    from kdlsq_pl.errors import ConfigError

    if cfg.stage == "teacher":  # its identity is its recipe (task.teacher, data, model, teacher.seed)
        if previous.get("recipe_digest"):
            from kdlsq_pl.models.loading import recipe_digest
            from kdlsq_pl.stages.teacher import teacher_recipe
            current = recipe_digest(teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path)))
            if previous["recipe_digest"] != current:
                raise ConfigError(f"{out_dir} holds a finished teacher of recipe {previous['recipe_digest']}, not of this config's "
                                  f"{current}; {SAME_CELL_WAYS_OUT}")
        return
    from kdlsq_pl.models.loading import is_regression
    old_cfg = OmegaConf.create(previous.get("config") or {})
    regression = is_regression(cfg.task)
    for key, before in CELL_SETTINGS.items():
        if key in REGRESSION_ONLY and not regression:
            continue
        old = OmegaConf.select(old_cfg, key, default=before)
        new = OmegaConf.select(cfg, key, default=before)
        old, new = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in (old, new))
        if old is not _UNKNOWN and old != new:
            raise ConfigError(f"{out_dir} holds a finished result with {key}={old}, not {key}={new}; {SAME_CELL_WAYS_OUT}")
    if previous.get("teacher_dir"):  # a student (teachers returned above)
        from kdlsq_pl.stages.teacher import teacher_recipe, teacher_store
        current = teacher_store(cfg).path(teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path))).name
        if Path(previous["teacher_dir"]).name != current:
            raise ConfigError(f"{out_dir} holds a finished result distilled from teacher {Path(previous['teacher_dir']).name}, "
                              f"not from this task.teacher recipe's {current}; {SAME_CELL_WAYS_OUT}")


def run(cfg: DictConfig, validated: bool = False) -> dict:
    """Validate ``cfg`` (unless the caller already did) and run its stage; write and return the result record."""
    if not validated:
        validate(cfg)
    t0 = time.time()
    prov = provenance(cfg)  # the commit the run starts from (a checkout during a long run must not relabel it)
    out_dir = Path(cfg.paths.output_dir)
    previous = read_result(out_dir)
    if previous and previous.get("status") == "finished":
        check_same_cell(cfg, previous, out_dir)
        log.info("%s already holds a finished result; skipping this cell (delete result.json to redo it)", out_dir)
        return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("keep_freed_memory", True):
        from kdlsq_pl.kernels import keep_freed_memory
        keep_freed_memory()
    model_path = resolve_model_path(cfg.model.name_or_path)
    record: dict[str, Any] = cell_fields(cfg)
    if cfg.stage == "teacher":
        from kdlsq_pl.stages.teacher import train_teacher
        path, teacher = train_teacher(cfg, model_path, out_dir)
        record.update(seed=teacher["seed"], metrics=teacher["metrics"], best=teacher["value"], teacher_dir=str(path),
                      recipe_digest=teacher["recipe_digest"], **{k: teacher[k] for k in ("squad_protocol",) if k in teacher})
        protocol = teacher.get("squad_protocol", {}).get("protocol")  # offline-dev-split: never mistaken for official dev
        print_summary(f"teacher {cfg.task.name}" + (f" ({protocol})" if protocol else ""), [(f"dev {k}", fmt(v)) for k, v in teacher["metrics"].items()]
                      + [("wall time (s)", f"{teacher['wall_time_s']:.0f}"), ("saved to", str(path))])
    else:
        from kdlsq_pl.stages.student import train_student
        record.update(train_student(cfg, model_path, out_dir))
    record.update(wall_time_s=round(time.time() - t0, 1), status="finished", **prov)
    atomic_write_json(out_dir / RESULT_FILE, record)
    log.info("result record: %s", out_dir / RESULT_FILE)
    return record
