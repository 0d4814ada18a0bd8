"""GLUE metrics (torchmetrics) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kdlsq_pl.metrics import build_metrics

PREDS = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0])
TARGET = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
# TP=3 (0,3,6), FP=1 (1), FN=1 (4), TN=3 (2,5,7)


def test_accuracy_f1_mcc_by_hand():
    m = build_metrics({"labels": ["0", "1"], "metrics": ["acc", "f1", "mcc"]})
    out = m(PREDS, TARGET)
    tp, fp, fn, tn = 3, 1, 1, 3
    assert out["acc"].item() == pytest.approx((tp + tn) / 8)
    assert out["f1"].item() == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert out["mcc"].item() == pytest.approx(mcc)  # 0.5


def test_pearson_spearman_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 7.0])
    m = build_metrics({"labels": [], "metrics": ["pearson", "spearman"]})
    out = m(x, y)
    mx, my = x.mean(), y.mean()
    r = ((x - mx) * (y - my)).sum() / torch.sqrt(((x - mx) ** 2).sum() * ((y - my) ** 2).sum())
    assert out["pearson"].item() == pytest.approx(r.item(), abs=1e-6)
    ranks_y = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])  # ranks of y; x is already its own rank
    d2 = ((x - ranks_y) ** 2).sum().item()
    assert out["spearman"].item() == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)), abs=1e-6)  # 0.8


def test_three_class_accuracy():
    m = build_metrics({"labels": ["a", "b", "c"], "metrics": ["acc"]})
    assert m(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 2, 2, 2]))["acc"].item() == pytest.approx(0.75)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown \\['bleu'\\]; allowed: acc, f1, mcc, pearson, spearman"):
        build_metrics({"labels": ["0", "1"], "metrics": ["bleu"]})
