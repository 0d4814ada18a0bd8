"""The config schema: every allowed value and range of the composed Hydra config, stated once.

The pydantic models below mirror ``conf/`` (strict types: a flag takes ``true``/``false``, not ``1``; an
integer is not ``1.5``). ``kdlsq_pl.config.validate`` checks the composed config against them before
anything heavy is imported, and :func:`one_line` turns pydantic's first error into the project's one-line
message: ``<key>=<value> is out of range; allowed: <range>`` or ``... is not allowed; allowed: <values>``.
The allowed values themselves live in ``kdlsq_pl.options`` (the ``Literal`` aliases), which the library's
constructors check against too, so a new option is added in one place.

Cross-field rules (``loss.intermediate_epochs`` below ``trainer.max_epochs``, the teacher cache needing
``loss.mask_padding``, option names from the ``conf/`` folders, the model and data files) are checked in
``kdlsq_pl.config`` after the schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from kdlsq_pl.options import (  # noqa: F401  (re-exported: the schema's field types)
    FULL_PRECISION_BITS, MAX_BITS, MIN_BITS, ActQuantizer, AdamWImpl, CacheDtype, TeacherDtype, Grid, HeadBias, Init, Metric, Padding, Param, Pooling,
    RangeTest, Reduction, RegressionTarget, ReplacingScheduler, SquadProtocol, Stage, TaskKind, TokenRule, WeightQuantizer, WidthRule, allowed)


def _bits(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (MIN_BITS <= value <= MAX_BITS or value == FULL_PRECISION_BITS):
        raise PydanticCustomError("bits", "is out of range; allowed: 2..8 or 32 (full precision)")
    return value


def _layer_list(value: Any) -> Any:
    ok = value is None or (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value))
    if not ok:
        raise PydanticCustomError("layers", "is not allowed; allowed: null (all) or a list of layer indices >= 0")
    return value


Bits = Annotated[Any, BeforeValidator(_bits)]
Layers = Annotated[Any, BeforeValidator(_layer_list)]
Count = Annotated[int, Ge(1)]
Index = Annotated[int, Ge(0)]
Positive = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
Ratio = Annotated[float, Ge(0), Le(0.99)]


class _Section(BaseModel):
    # strict types; keys the schema does not name (names, paths, hub settings) pass through
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class TaskTeacher(_Section):
    lr: Positive
    epochs: Annotated[int, Gt(0)]
    batch_size: Annotated[int, Gt(0)]
    warmup_ratio: Ratio
    weight_decay: NonNegative
    pooling: Pooling
    pooler_dense: bool
    classifier_dropout: Optional[Ratio] = None
    head_bias: HeadBias = "zero"
    symmetric_pairs: bool = False
    init_from: Optional[str] = None  # another task's name (checked in kdlsq_pl.config.source_task_cfg)


class Task(_Section):
    max_length: Annotated[int, Ge(8), Le(512)]
    metrics: list[Metric]
    teacher: TaskTeacher
    kind: TaskKind = "classification"
    symmetric: bool = False  # the label does not depend on the order of the two texts (task.teacher.symmetric_pairs)
    # kind=qa (conf/task/squad*.yaml): windows, answer decoding and the offline protocol (kdlsq_pl.data.squad)
    version: Optional[Literal["1.1", "2.0"]] = None
    doc_stride: Optional[Index] = None
    n_best_size: Optional[Count] = None
    max_answer_length: Optional[Count] = None
    null_score_diff_threshold: Optional[float] = None
    protocol: Optional[SquadProtocol] = None
    eval_fraction: Optional[Annotated[float, Gt(0), Le(0.9)]] = None
    split_seed: Optional[Index] = None
    pred_reduction: Optional[Reduction] = None  # a task whose "classes" are positions (QA) overrides loss.pred_reduction


class Data(_Section):
    batch_size: Count
    eval_batch_size: Count
    limit_train_examples: Optional[Count] = None
    limit_eval_examples: Optional[Count] = None
    group_by_length: bool
    padding: Padding


class Trainer(_Section):
    max_epochs: Count


class Teacher(_Section):
    seed: Index
    forward_dtype: TeacherDtype = "float32"


class QuantSide(_Section):
    quantizer: str
    init: Init
    grid: Grid
    param: Param
    range_test: RangeTest
    percentile: Annotated[float, Gt(50), Le(100)]
    grad_scale: bool
    ste_clip: bool
    clip: Optional[Positive] = None


class WeightSide(QuantSide):
    quantizer: WeightQuantizer
    per_channel: bool
    embedding_per_row: bool


class ActSide(QuantSide):
    quantizer: ActQuantizer
    per_channel: Literal[False]  # one step size per activation tensor
    ema_decay: Annotated[float, Ge(0), Le(0.999999)]


class Quant(_Section):
    weight_bits: Bits
    embedding_bits: Bits
    act_bits: Bits
    overrides: Optional[dict[str, Bits]] = None  # mixed precision: glob over module paths -> weight bits (quantize_ checks the matches)
    weight: WeightSide
    act: ActSide
    quantize_attention: bool
    integer_ops: bool = False
    fused_kernel: bool
    calibration_batches: Count
    freeze_step_sizes_at_step: Optional[Index] = None
    freeze_step_sizes_at_epoch: Optional[Index] = None


class Selection(_Section):
    top_layers: Optional[Count] = None
    map_top: Optional[Count] = None
    tokens: Optional[Count] = None
    token_rule: TokenRule = "first"
    keep_sep: bool = False
    width: Optional[Annotated[float, Gt(0), Le(1)]] = None
    width_rule: WidthRule = "magnitude"
    seed: Index = 0


class Loss(_Section):
    pred: NonNegative
    attn: NonNegative
    hidden: NonNegative
    gt: NonNegative
    temperature: Positive
    intermediate_epochs: Index
    pred_reduction: Reduction
    regression_target: RegressionTarget
    mask_padding: bool
    selection: Optional[Selection] = None


class Optim(_Section):
    lr: Positive
    weight_step_lr: Positive
    act_step_lr: Positive
    weight_decay: NonNegative
    weight_step_weight_decay: NonNegative
    act_step_weight_decay: NonNegative
    warmup_ratio: Ratio
    adamw: AdamWImpl = "foreach"


class TeacherCache(_Section):
    enabled: bool
    dtype: CacheDtype
    max_gb: Positive
    max_tokens: Optional[Count] = None
    hidden_layers: Layers = None
    attn_layers: Layers = None


class Theseus(_Section):
    successor_layers: Annotated[int, Gt(0)]
    scheduler: ReplacingScheduler
    k: NonNegative
    b: Annotated[float, Ge(0), Le(1)]
    rate: Annotated[float, Ge(0), Le(1)]
    lr: Positive
    weight_decay: NonNegative


class Student(_Section):
    init: str  # teacher | pretrained | a model directory (checked in kdlsq_pl.config)
    layers: Optional[Count] = None


class Method(_Section):
    train: bool
    theseus: Optional[Theseus] = None


class Config(_Section):
    """The composed config (``conf/config.yaml``); the student sections are checked for ``stage=student`` only."""

    stage: Stage
    seed: Index
    keep_freed_memory: bool
    task: Task
    data: Data
    trainer: Trainer
    teacher: Teacher
    export_packed: Optional[bool] = None
    method: Optional[Method] = None
    quant: Optional[Quant] = None
    loss: Optional[Loss] = None
    optim: Optional[Optim] = None
    teacher_cache: Optional[TeacherCache] = None
    student: Optional[Student] = None


STUDENT_SECTIONS = ("export_packed", "method", "quant", "loss", "optim", "teacher_cache", "student")


def _field_type(loc: tuple) -> Any:
    """The annotation of the field at ``loc`` (a pydantic error location) in :class:`Config`."""
    model: Any = Config
    ann: Any = None
    for part in loc:
        if isinstance(part, int):  # a list item: the list's item type
            ann = get_args(_unwrap(ann))[0]
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        ann = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        inner = _unwrap(ann)
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return ann


def _levels(ann: Any):
    """Each level of an annotation from the outside in: ``Optional[Annotated[int, Ge(1)]]`` yields the Optional,
    the Annotated, then ``int``."""
    while True:
        yield ann
        if get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
        elif get_origin(ann) is Union:
            ann = next(a for a in get_args(ann) if a is not type(None))
        else:
            return


def _unwrap(ann: Any) -> Any:
    """``Optional[X]`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    *_, inner = _levels(ann)
    return inner


def _bounds(ann: Any) -> str:
    lo = hi = None
    lo_open = False
    for level in _levels(ann):
        for m in get_args(level)[1:] if get_origin(level) is Annotated else ():
            if isinstance(m, Ge):
                lo = m.ge
            elif isinstance(m, Gt):
                lo, lo_open = m.gt, True
            elif isinstance(m, Le):
                hi = m.le
    if lo is not None and hi is not None:
        return f"{lo}..{hi}" if not lo_open else f"> {lo} and <= {hi}"
    if lo is not None:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"<= {hi}" if hi is not None else "any"


def one_line(err: dict) -> str:
    """The project's one-line message for one pydantic error (``ValidationError.errors()[i]``)."""
    key = ".".join(str(p) for p in err["loc"])
    value = err["input"]
    kind = err["type"]
    ann = _field_type(err["loc"])
    if kind in ("bits", "layers"):
        return f"{key}={value!r} {err['msg']}"
    if kind in ("literal_error", "bool_type"):
        values = allowed(_unwrap(ann)) if kind == "literal_error" else (True, False)
        return f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, values))}"
    if kind in ("int_type", "int_from_float"):
        return f"{key}={value!r} is not an integer; allowed: {_bounds(ann)}"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"{key}={value!r} is not a number; allowed: {_bounds(ann)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}={value} is out of range; allowed: {_bounds(ann)}"
    if kind == "missing":
        return f"{key} is missing from the config"
    return f"{key}={value!r}: {err['msg']}"


def check(container: dict) -> Config:
    """Validate a resolved config (``OmegaConf.to_container(cfg, resolve=True)``) against :class:`Config`.

    Raises:
        ValueError: one line for the first problem (:func:`one_line`); ``kdlsq_pl.config`` re-raises it as
        ``ConfigError``.
    """
    data = dict(container)
    if data.get("stage") != "student":
        for key in STUDENT_SECTIONS:
            data.pop(key, None)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ValueError(one_line(e.errors()[0])) from None
