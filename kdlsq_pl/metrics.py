"""GLUE's official metrics through torchmetrics (Wang et al., ICLR 2019, Table 1).

CoLA: Matthews correlation; MRPC and QQP: F1 of the positive class and accuracy; STS-B: Pearson and
Spearman correlation; the others: accuracy. Values are reported x100 (GLUE's convention).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from kdlsq_pl.config import METRICS  # noqa: E402  (names validated before any heavy import)


def build_metrics(task: Mapping[str, Any]) -> MetricCollection:
    """A ``MetricCollection`` of the task's metrics, keyed by short name (``acc``, ``f1`` ...).

    Classification metrics take ``preds`` = predicted class ids ``[B]`` and ``target`` ``[B]``;
    regression metrics take float predictions and scores ``[B]``.

    Raises:
        ValueError: a metric name not in ``METRICS``.
    """
    num_classes = max(len(task["labels"]), 2)
    makers = {
        "acc": lambda: MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "f1": BinaryF1Score,
        "mcc": BinaryMatthewsCorrCoef,
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    bad = [m for m in task["metrics"] if m not in makers]
    if bad:
        raise ValueError(f"task.metrics={list(task['metrics'])}: unknown {bad}; allowed: {', '.join(METRICS)}")
    return MetricCollection({m: makers[m]() for m in task["metrics"]})


def predictions(logits: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Class ids (argmax over ``[B, C]``) or the regression output ``[B]`` from ``[B, 1]``."""
    return logits.squeeze(-1).float() if is_regression else logits.argmax(-1)
