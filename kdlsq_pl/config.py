"""Validation of the composed Hydra config, before anything heavy starts.

Every check raises ``ConfigError`` with one line naming the field, the bad value and what is
allowed. ``run.py`` prints it and exits with status 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdlsq_pl.data.tsv import read_glue_tsv, resolve_glue_dir, task_files
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import resolve_model_path

STAGES = ("teacher", "student")
#: GLUE metric names (``kdlsq_pl.metrics`` builds them).
METRICS = ("acc", "f1", "mcc", "pearson", "spearman")
BITS = tuple(range(2, 9))
FULL_PRECISION_BITS = 32
#: The classifier head's pooling (``kdlsq_pl.models.pooling``).
POOLINGS = ("cls", "mean")


def conf_options(group: str) -> list[str]:
    """The option names of a config group (the ``conf/<group>/*.yaml`` file stems)."""
    folder = Path(__file__).resolve().parents[1] / "conf" / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as e:  # an interpolation that cannot be resolved
        raise ConfigError(f"{key}: cannot be resolved ({str(e).splitlines()[0]})") from None


def number(cfg: DictConfig, key: str, *, lo: float | None = None, hi: float | None = None,
           integer: bool = False, lo_open: bool = False, optional: bool = False) -> float | int | None:
    """Check that ``cfg[key]`` is a number (an int if ``integer``) within ``[lo, hi]``; return it.

    ``lo_open`` makes the lower bound strict (``> lo``). ``optional`` admits ``null``.
    """
    value = _get(cfg, key)
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key}={value!r} is not {kind}; allowed: {_range(lo, hi, lo_open)}")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        raise ConfigError(f"{key}={value} is out of range; allowed: {_range(lo, hi, lo_open)}")
    return value


def _range(lo, hi, lo_open) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}" if not lo_open else f"> {lo} and <= {hi}"
    if lo is not None:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"<= {hi}"


def choice(cfg: DictConfig, key: str, allowed: tuple | list) -> Any:
    value = _get(cfg, key)
    flags = all(isinstance(a, bool) for a in allowed)  # a flag takes true/false, not 1/0 (1 == True in Python)
    if value not in allowed or (flags and not isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
    return value


def validate_bits(cfg: DictConfig, key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or (value not in BITS and value != FULL_PRECISION_BITS):
        raise ConfigError(f"{key}={value!r} is out of range; allowed: 2..8 or 32 (full precision)")
    return value


def validate(cfg: DictConfig) -> None:
    """Check the composed config and the task's data files; raise ``ConfigError`` on the first problem."""
    choice(cfg, "stage", STAGES)
    number(cfg, "seed", lo=0, integer=True)
    choice(cfg, "keep_freed_memory", (True, False))
    task = cfg.task
    choice(cfg, "task.name", conf_options("task"))
    number(cfg, "task.max_length", lo=8, hi=512, integer=True)
    for m in task.metrics:
        if m not in METRICS:
            raise ConfigError(f"task.metrics: {m!r} is not a metric; allowed: {', '.join(METRICS)}")
    for key in ("batch_size", "eval_batch_size"):
        number(cfg, f"data.{key}", lo=1, integer=True)
    for key in ("limit_train_examples", "limit_eval_examples"):
        number(cfg, f"data.{key}", lo=1, integer=True, optional=True)
    choice(cfg, "data.group_by_length", (True, False))
    choice(cfg, "data.padding", ("dynamic", "max_length"))
    number(cfg, "trainer.max_epochs", lo=1, integer=True)
    for key, integer in (("lr", False), ("epochs", True), ("batch_size", True)):
        number(cfg, f"task.teacher.{key}", lo=0, lo_open=True, integer=integer)
    number(cfg, "task.teacher.warmup_ratio", lo=0, hi=0.99)
    number(cfg, "task.teacher.weight_decay", lo=0)
    choice(cfg, "task.teacher.pooling", POOLINGS)
    choice(cfg, "task.teacher.pooler_dense", (True, False))
    number(cfg, "task.teacher.classifier_dropout", lo=0, hi=0.99, optional=True)
    number(cfg, "teacher.seed", lo=0, integer=True)
    if cfg.stage == "student":
        validate_student(cfg)
    resolve_model_path(_get(cfg, "model.name_or_path"))
    validate_data(cfg)


#: Quantizer families allowed per role (``kdlsq_pl.quant.modules.make_quantizer``).
WEIGHT_QUANTIZERS = ("lsq", "twn", "dynamic_max")
ACT_QUANTIZERS = ("lsq", "dynamic_max", "ema_max")


def validate_student(cfg: DictConfig) -> None:
    """Method, bits, quantizer options, loss weights and learning rates of the student stage."""
    choice(cfg, "method.name", conf_options("method"))
    choice(cfg, "export_packed", (True, False))
    choice(cfg, "method.train", (True, False))
    for key in ("weight_bits", "embedding_bits", "act_bits"):
        validate_bits(cfg, f"quant.{key}")
    choice(cfg, "quant.weight.quantizer", WEIGHT_QUANTIZERS)
    choice(cfg, "quant.act.quantizer", ACT_QUANTIZERS)
    choice(cfg, "quant.weight.embedding_per_row", (True, False))
    for side in ("weight", "act"):
        number(cfg, f"quant.{side}.clip", lo=0, lo_open=True, optional=True)
    number(cfg, "quant.act.ema_decay", lo=0, hi=0.999999)
    for side in ("weight", "act"):
        choice(cfg, f"quant.{side}.init", ("lsq", "percentile", "kl", "minmax"))
        choice(cfg, f"quant.{side}.grid", ("symmetric", "lsq"))
        choice(cfg, f"quant.{side}.param", ("clip", "step"))
        choice(cfg, f"quant.{side}.range_test", ("unrounded", "rounded"))
        number(cfg, f"quant.{side}.percentile", lo=50, lo_open=True, hi=100)
        for flag in ("grad_scale", "ste_clip"):
            choice(cfg, f"quant.{side}.{flag}", (True, False))
    choice(cfg, "quant.weight.per_channel", (True, False))
    choice(cfg, "quant.act.per_channel", (False,))  # one step size per activation tensor
    choice(cfg, "quant.quantize_attention", (True, False))
    choice(cfg, "quant.fused_kernel", (True, False))
    number(cfg, "quant.calibration_batches", lo=1, integer=True)
    for key in ("pred", "attn", "hidden", "gt"):
        number(cfg, f"loss.{key}", lo=0)
    number(cfg, "loss.temperature", lo=0, lo_open=True)
    number(cfg, "loss.intermediate_epochs", lo=0, hi=int(_get(cfg, "trainer.max_epochs")) - 1, integer=True)  # then pred + gt
    choice(cfg, "loss.pred_reduction", ("mean", "batchmean"))
    choice(cfg, "loss.regression_target", ("label", "teacher"))
    validate_teacher_cache(cfg)
    for key in ("lr", "weight_step_lr", "act_step_lr"):
        number(cfg, f"optim.{key}", lo=0, lo_open=True)
    for key in ("weight_decay", "weight_step_weight_decay", "act_step_weight_decay"):
        number(cfg, f"optim.{key}", lo=0)
    number(cfg, "optim.warmup_ratio", lo=0, hi=0.99)
    number(cfg, "quant.freeze_step_sizes_at_step", lo=0, integer=True, optional=True)
    number(cfg, "quant.freeze_step_sizes_at_epoch", lo=0, integer=True, optional=True)


def validate_teacher_cache(cfg: DictConfig) -> None:
    """``teacher_cache.*`` and its one coupling: the cache stores no padding, so ``loss.mask_padding`` must be on."""
    enabled = choice(cfg, "teacher_cache.enabled", (True, False))
    mask = choice(cfg, "loss.mask_padding", (True, False))
    choice(cfg, "teacher_cache.dtype", ("float16", "float32"))
    number(cfg, "teacher_cache.max_gb", lo=0, lo_open=True)
    number(cfg, "teacher_cache.max_tokens", lo=1, integer=True, optional=True)
    for key in ("hidden_layers", "attn_layers"):
        value = _get(cfg, f"teacher_cache.{key}")
        if value is not None and (not OmegaConf.is_list(value)
                                  or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
            raise ConfigError(f"teacher_cache.{key}={value!r} is not allowed; allowed: null (all) or a list of layer indices >= 0")
    if enabled and not mask:
        raise ConfigError("loss.mask_padding=false is not allowed with teacher_cache.enabled=true: "
                          "the cache stores no padded positions; allowed: loss.mask_padding=true")


def validate_data(cfg: DictConfig) -> None:
    """Find the task's local TSVs and read them once (columns and labels); the hub is checked on load."""
    root = resolve_glue_dir(cfg.data.glue_dir)
    if root is None:
        return
    for path in task_files(cfg.task, root).values():
        read_glue_tsv(path, cfg.task)
