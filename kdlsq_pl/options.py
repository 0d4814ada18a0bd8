"""The allowed values of every choice in the config, stated once (standard-library typing only, so the
quantizers import it without the schema's pydantic).

``kdlsq_pl.schema`` builds the config's pydantic models from these aliases; the library's constructors
(``LSQQuantizer``, ``make_quantizer``, ``soft_cross_entropy``, the teacher cache, the data module, the pooling)
check their arguments against the same values, so a new option is added here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Stage = Literal["teacher", "student"]
Metric = Literal["acc", "f1", "mcc", "pearson", "spearman",  # GLUE (kdlsq_pl.metrics)
                 "exact_match", "exact", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"]  # SQuAD v1.1 / v2.0
TaskKind = Literal["classification", "qa"]  # qa: extractive question answering (SQuAD, kdlsq_pl.data.squad)
SquadProtocol = Literal["auto", "official-dev", "offline-dev-split"]
Pooling = Literal["cls", "mean"]
#: The new classifier head's bias at the start of fine-tuning (``kdlsq_pl.models.loading.init_head_bias_``).
HeadBias = Literal["zero", "prior"]
Padding = Literal["dynamic", "max_length"]
Grid = Literal["symmetric", "lsq"]
Param = Literal["clip", "step"]
RangeTest = Literal["unrounded", "rounded"]
Init = Literal["lsq", "percentile", "kl", "minmax"]
Kind = Literal["weight", "activation"]
WeightQuantizer = Literal["lsq", "twn", "dynamic_max"]
ActQuantizer = Literal["lsq", "dynamic_max", "ema_max"]
Reduction = Literal["mean", "batchmean"]
RegressionTarget = Literal["label", "teacher"]
CacheDtype = Literal["float16", "float32"]
TeacherDtype = Literal["float32", "bfloat16"]  # the live teacher's forward (teacher.forward_dtype)
AdamWImpl = Literal["foreach", "fused"]  # torch AdamW's implementation (optim.adamw)
TokenRule = Literal["first", "cls_attention"]  # minimal hidden-state knowledge: which k tokens (kdlsq_pl.distill.selection)
WidthRule = Literal["magnitude", "random"]  # ... and which dimensions of each kept hidden vector
ReplacingScheduler = Literal["linear", "constant"]  # BERT-of-Theseus: p = min(1, k t + b), or a constant p

#: Bit-widths of a quantized role; 32 leaves the role in full precision.
MIN_BITS, MAX_BITS, FULL_PRECISION_BITS = 2, 8, 32


def allowed(alias: Any) -> tuple:
    """The values of a ``Literal`` alias, in order: ``allowed(Init) == ("lsq", "percentile", "kl", "minmax")``."""
    return get_args(alias)
