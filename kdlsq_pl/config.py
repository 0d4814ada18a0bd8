"""Validation of the composed Hydra config, before anything heavy starts.

Field rules (types, allowed values, ranges) are the schema's (``kdlsq_pl.schema``); the rules that tie
fields together, option names from ``conf/``, the model directory and the task's data files are checked
here. Every problem raises ``ConfigError`` with one line naming the field, the bad value and what is
allowed. ``run.py`` prints it and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdlsq_pl import schema
from kdlsq_pl.data.tsv import read_glue_tsv, resolve_glue_dir, task_files
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import resolve_model_path

#: GLUE metric names (``kdlsq_pl.metrics`` builds them).
METRICS = schema.allowed(schema.Metric)
#: The classifier head's pooling (``kdlsq_pl.models.pooling``).
POOLINGS = schema.allowed(schema.Pooling)


def conf_options(group: str) -> list[str]:
    """The option names of a config group (the ``conf/<group>/*.yaml`` file stems)."""
    folder = Path(__file__).resolve().parents[1] / "conf" / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def _resolved(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception as e:  # an interpolation that cannot be resolved
        raise ConfigError(f"{key}: cannot be resolved ({str(e).splitlines()[0]})") from None


def _option(cfg: DictConfig, key: str, group: str) -> None:
    value = _resolved(cfg, key)
    if value not in (options := conf_options(group)):
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(options)}")


def validate(cfg: DictConfig) -> None:
    """Check the composed config and the task's data files; raise ``ConfigError`` on the first problem."""
    try:
        schema.check({key: _resolved(cfg, key) for key in schema.Config.model_fields if key in cfg})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _option(cfg, "task.name", "task")
    if cfg.stage == "student":
        validate_student(cfg)
    resolve_model_path(_resolved(cfg, "model.name_or_path"))
    validate_data(cfg)


def validate_student(cfg: DictConfig) -> None:
    """The student stage's cross-field rules (its field rules are the schema's)."""
    _option(cfg, "method.name", "method")
    last = int(cfg.trainer.max_epochs) - 1
    if int(cfg.loss.intermediate_epochs) > last:  # then predictions: at least one epoch of them
        raise ConfigError(f"loss.intermediate_epochs={cfg.loss.intermediate_epochs} is out of range; allowed: 0..{last}")
    if cfg.teacher_cache.enabled and not cfg.loss.mask_padding:
        raise ConfigError("loss.mask_padding=false is not allowed with teacher_cache.enabled=true: "
                          "the cache stores no padded positions; allowed: loss.mask_padding=true")


def validate_data(cfg: DictConfig) -> None:
    """Find the task's local TSVs and read them once (columns and labels); the hub is checked on load."""
    root = resolve_glue_dir(cfg.data.glue_dir)
    if root is None:
        return
    for path in task_files(cfg.task, root).values():
        read_glue_tsv(path, cfg.task)
