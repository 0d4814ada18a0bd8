"""A finished grid cell is skipped only when it was trained with the same settings: ``student.layers=3`` (or another
epoch count, lr, knowledge selection, init) on the command line never reports the cell's earlier result as its own."""

from __future__ import annotations

import json

import pytest

from conftest import compose_cfg
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.pipeline import provenance, run

SMALL = ("task=rte", "data.limit_train_examples=32", "data.limit_eval_examples=32")


def finished(tmp_path, *overrides, drop=()):
    """A finished record in the cell's folder, as the run of ``overrides`` wrote it (``drop``: config sections an
    older record lacks)."""
    cfg = compose_cfg(tmp_path, *SMALL, *overrides)
    config = provenance(cfg)["config"]
    for key in drop:
        config.pop(key)
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"status": "finished", "best": 61.5, "config": config}))


def test_same_settings_skip_the_finished_cell(tmp_path):
    finished(tmp_path, "student.layers=3", "trainer.max_epochs=2")
    assert run(compose_cfg(tmp_path, *SMALL, "student.layers=3", "trainer.max_epochs=2"))["best"] == 61.5


@pytest.mark.parametrize("before, now, message", [
    (["student.layers=3"], [], r"with student.layers=3, not student.layers=None"),
    ([], ["student.layers=3"], r"with student.layers=None, not student.layers=3"),
    ([], ["student.init=pretrained"], r"with student.init=teacher, not student.init=pretrained"),
    ([], ["trainer.max_epochs=5"], r"with trainer.max_epochs=3, not trainer.max_epochs=5"),
    ([], ["optim.lr=1e-4"], r"with optim.lr=5e-05, not optim.lr=0.0001"),
    ([], ["hkd=top1"], r"with loss.selection={.name.: .full.*, not loss.selection={.name.: .top1.*"),
])
def test_other_settings_refuse_and_keep_the_record(tmp_path, before, now, message):
    finished(tmp_path, *before)
    kept = (tmp_path / "out" / "result.json").read_text()
    with pytest.raises(ConfigError, match=r"out holds a finished result " + message + r"; allowed: the same settings"):
        run(compose_cfg(tmp_path, *SMALL, *now))
    assert (tmp_path / "out" / "result.json").read_text() == kept


def test_regression_target_identifies_a_regression_cell_only(tmp_path):
    """STS-B cells with another ``loss.regression_target`` refuse; a classifier's (RTE) is skipped whatever the value,
    as the term it selects does not exist there (records of shallow_kd's MRPC cells differ only in it)."""
    stsb = ("task=stsb", "data.limit_train_examples=32", "data.limit_eval_examples=32")
    cfg = compose_cfg(tmp_path, *stsb)
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "finished", "best": 61.5, "config": provenance(cfg)["config"]}))
    with pytest.raises(ConfigError, match=r"with loss.regression_target=label, not loss.regression_target=teacher"):
        run(compose_cfg(tmp_path, *stsb, "loss.regression_target=teacher"))
    finished(tmp_path)  # RTE, label
    assert run(compose_cfg(tmp_path, *SMALL, "loss.regression_target=teacher"))["best"] == 61.5


def test_record_older_than_the_student_section_counts_as_its_default(tmp_path):
    finished(tmp_path, drop=("student",))
    assert run(compose_cfg(tmp_path, *SMALL))["best"] == 61.5
    with pytest.raises(ConfigError, match=r"with student.layers=None, not student.layers=2"):
        run(compose_cfg(tmp_path, *SMALL, "student.layers=2"))


def test_student_cell_of_another_teacher_recipe_refuses(tmp_path):
    from kdlsq_pl.models.loading import resolve_model_path
    from kdlsq_pl.stages.teacher import teacher_recipe, teacher_store
    cfg = compose_cfg(tmp_path, *SMALL)
    teacher = teacher_store(cfg).path(teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path)))
    out = tmp_path / "out"
    out.mkdir()
    record = {"status": "finished", "best": 61.5, "config": provenance(cfg)["config"], "teacher_dir": str(teacher)}
    (out / "result.json").write_text(json.dumps(record))
    assert run(compose_cfg(tmp_path, *SMALL))["best"] == 61.5  # the same teacher recipe: skipped
    with pytest.raises(ConfigError, match=rf"distilled from teacher {teacher.name}, not from this task.teacher recipe's seed42-"):
        run(compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=4"))


def test_teacher_cell_is_identified_by_its_recipe(tmp_path):
    from kdlsq_pl.models.loading import recipe_digest, resolve_model_path
    from kdlsq_pl.stages.teacher import teacher_recipe
    cfg = compose_cfg(tmp_path, *SMALL, "stage=teacher")
    digest = recipe_digest(teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "finished", "stage": "teacher", "best": 58.0, "recipe_digest": digest,
                                                 "config": provenance(cfg)["config"]}))
    # the student's settings do not shape a teacher: skipped
    assert run(compose_cfg(tmp_path, *SMALL, "stage=teacher", "optim.lr=1e-4", "trainer.max_epochs=7"))["best"] == 58.0
    with pytest.raises(ConfigError, match=rf"holds a finished teacher of recipe {digest}, not of this config's "):
        run(compose_cfg(tmp_path, *SMALL, "stage=teacher", "task.teacher.head_bias=prior"))
