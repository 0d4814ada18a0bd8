"""``task.teacher.head_bias=prior``: a new classifier head starts at the training labels' prior (the mean
STS-B score, or the log class frequencies), checked against the real data files read by hand."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import GLUE, compose_cfg
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import init_head_bias_, load_classifier
from kdlsq_pl.pipeline import run
from kdlsq_pl.stages import teacher as teacher_stage


def tsv_column(path, column, limit=None):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[column] for r in rows[:limit]]


@pytest.fixture(scope="module")
def stsb_model(minilm_path):
    return load_classifier(minilm_path, {"name": "stsb", "labels": []})


def test_regression_head_starts_at_the_mean_training_score(stsb_model):
    scores = [float(s) for s in tsv_column(GLUE / "STS-B" / "train.tsv", 9)]
    mean = math.fsum(scores) / len(scores)  # 2.70 on STS-B's 5 749 training pairs
    x = torch.tensor([[101, 1037, 3899, 102, 1037, 4937, 102]])
    before = stsb_model(input_ids=x).logits.item()
    init_head_bias_(stsb_model, torch.tensor(scores))
    assert stsb_model.classifier.bias.item() == pytest.approx(mean, abs=1e-5) and 2.6 < mean < 2.8
    # only the bias moved: the prediction is shifted by exactly the mean (the HF head's bias starts at 0)
    assert stsb_model(input_ids=x).logits.item() - before == pytest.approx(mean, abs=1e-4)


def test_classification_head_starts_at_the_smoothed_log_prior(minilm_path):
    model = load_classifier(minilm_path, {"name": "mrpc", "labels": ["0", "1"]})
    init_head_bias_(model, torch.tensor([0, 1, 1, 1, 1]))
    # counts 1 and 4 of N=5, add-one smoothing over C=2: (1+1)/(5+2), (4+1)/(5+2)
    assert torch.softmax(model.classifier.bias, 0).tolist() == pytest.approx([2 / 7, 5 / 7], abs=1e-6)
    assert model.classifier.bias.tolist() == pytest.approx([math.log(2 / 7), math.log(5 / 7)], abs=1e-6)
    # a class absent from the labels still gets a finite bias
    init_head_bias_(model, torch.tensor([1, 1, 1]))
    assert model.classifier.bias.tolist() == pytest.approx([math.log(1 / 5), math.log(4 / 5)], abs=1e-6)


def test_no_labels_is_a_one_line_error(stsb_model):
    with pytest.raises(ConfigError, match="the training split has no labels"):
        init_head_bias_(stsb_model, torch.tensor([]))


@pytest.mark.parametrize("head_bias", ["prior", "zero"])
def test_teacher_stage_starts_its_head_at_the_prior_of_its_training_rows(tmp_path, monkeypatch, head_bias):
    seen = []

    def spy(model, labels, *args, **kwargs):
        seen.append([float(v) for v in labels])
        return init_head_bias_(model, labels, *args, **kwargs)

    monkeypatch.setattr(teacher_stage, "init_head_bias_", spy)
    run(compose_cfg(tmp_path, "stage=teacher", "task=stsb", "data.limit_train_examples=24", "data.limit_eval_examples=16",
                    "trainer.fast_dev_run=true", f"task.teacher.head_bias={head_bias}"))
    if head_bias == "zero":
        assert seen == []  # HF's own head, as before the option existed
    else:  # the labels of the (limited) training split, read from the TSV by hand
        assert seen == [pytest.approx([float(s) for s in tsv_column(GLUE / "STS-B" / "train.tsv", 9, limit=24)])]


def test_shallow_student_with_a_new_head_starts_at_the_prior_too(tmp_path, minilm_path):
    """method=shallow_ft (``student.init=pretrained``): its new head follows the teacher recipe's ``head_bias``."""
    from kdlsq_pl.stages.common import build_datamodule
    from kdlsq_pl.stages.student import build_student_module
    cfg = compose_cfg(tmp_path, "task=stsb", "method=shallow_ft", "data.limit_train_examples=40", "task.teacher.head_bias=prior")
    module = build_student_module(cfg, minilm_path, build_datamodule(cfg, minilm_path, 16))
    scores = [float(s) for s in tsv_column(GLUE / "STS-B" / "train.tsv", 9, limit=40)]
    assert module.teacher is None and len(module.student.bert.encoder.layer) == 3
    assert module.student.classifier.bias.item() == pytest.approx(math.fsum(scores) / 40, abs=1e-5)


def test_symmetric_pairs_train_on_both_orders_of_the_real_rows(tmp_path, minilm_path):
    """``task.teacher.symmetric_pairs=true``: the training split holds every STS-B pair as (A, B) and then as (B, A),
    tokenised as the tokenizer does each order by hand; the dev split is untouched."""
    from transformers import AutoTokenizer
    from kdlsq_pl.stages.common import build_datamodule
    cfg = compose_cfg(tmp_path, "task=stsb", "data.limit_train_examples=12", "data.limit_eval_examples=8")
    dm = build_datamodule(cfg, minilm_path, 4, symmetric_pairs=True)
    dm.setup("fit")
    a, b = tsv_column(GLUE / "STS-B" / "train.tsv", 7, 12), tsv_column(GLUE / "STS-B" / "train.tsv", 8, 12)
    scores = [float(s) for s in tsv_column(GLUE / "STS-B" / "train.tsv", 9, 12)]
    tok = AutoTokenizer.from_pretrained(minilm_path)
    train = dm.splits["train"]
    assert len(train) == 24 and len(dm.splits["dev"]) == 8
    for i in (0, 5, 11):
        assert train[i]["input_ids"].tolist() == tok(a[i], b[i], truncation=True, max_length=128)["input_ids"]
        assert train[12 + i]["input_ids"].tolist() == tok(b[i], a[i], truncation=True, max_length=128)["input_ids"]
        assert train[12 + i]["labels"].item() == pytest.approx(scores[i]) and train[12 + i]["idx"] == train[i]["idx"]
    plain = build_datamodule(cfg, minilm_path, 4)  # the default: one order, its own tokenised cache
    plain.setup("fit")
    assert len(plain.splits["train"]) == 12


def test_teacher_stage_trains_on_both_orders_with_symmetric_pairs(tmp_path, monkeypatch):
    built = []

    def spy(*args, **kwargs):
        built.append(teacher_stage_build(*args, **kwargs))
        return built[-1]

    teacher_stage_build = teacher_stage.build_datamodule
    monkeypatch.setattr(teacher_stage, "build_datamodule", spy)
    run(compose_cfg(tmp_path, "stage=teacher", "task=mrpc", "data.limit_train_examples=10", "data.limit_eval_examples=8",
                    "trainer.fast_dev_run=true", "task.teacher.symmetric_pairs=true"))
    assert len(built) == 1 and len(built[0].splits["train"]) == 20 and len(built[0].splits["dev"]) == 8
