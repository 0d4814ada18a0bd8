"""The teacher store is keyed by the teacher's recipe: a changed recipe trains a new teacher, an unchanged one
(whatever the student's seed, bits or loss) reuses the stored one."""

from __future__ import annotations

import shutil

import pytest

from conftest import GLUE
from kdlsq_pl.stages import teacher as teacher_stage
from kdlsq_pl.models.loading import TeacherStore, recipe_digest, resolve_model_path
from kdlsq_pl.stages.teacher import teacher_recipe

SMALL = ("task=rte", "data.limit_train_examples=32", "data.limit_eval_examples=32")


def digest(make_cfg, *overrides):
    cfg = make_cfg(*SMALL, *overrides)
    return recipe_digest(teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path)))


# each a value other than RTE's default (conf/task/rte.yaml: 5 epochs, mean pooling, no pooler dense)
@pytest.mark.parametrize("change", ["task.teacher.lr=1e-4", "task.teacher.epochs=4", "task.teacher.pooling=cls",
                                    "task.teacher.pooler_dense=true", "task.teacher.classifier_dropout=0.2",
                                    "task.teacher.batch_size=16", "task.teacher.head_bias=prior", "task.teacher.symmetric_pairs=true", "task.teacher.warmup_ratio=0", "task.max_length=64",
                                    "teacher.seed=1", "task=mrpc", "data.group_by_length=false", "data.limit_train_examples=16"])
def test_recipe_changes_with_what_shapes_the_teacher(make_cfg, change):
    assert digest(make_cfg, change) != digest(make_cfg)


@pytest.mark.parametrize("same", ["seed=7", "quant=w4a8", "loss.gt=1", "method=lsq", "trainer.max_epochs=1",
                                  "optim.lr=1e-4", "data.batch_size=8", "teacher_cache.enabled=true", "+task.pred_reduction=batchmean"])
def test_recipe_unchanged_by_student_settings(make_cfg, same):
    assert digest(make_cfg, same) == digest(make_cfg)


def test_recipe_of_a_later_option_at_its_default_is_the_recipe_without_it(make_cfg):
    # head_bias was added after teachers were stored: at its default (what the code did before) the recipe,
    # and so every stored teacher's digest, is the one without the key
    assert digest(make_cfg, "task.teacher.head_bias=zero") == digest(make_cfg, "~task.teacher.head_bias")
    assert digest(make_cfg, "task.teacher.head_bias=prior") != digest(make_cfg, "~task.teacher.head_bias")
    assert digest(make_cfg, "task.teacher.symmetric_pairs=false") == digest(make_cfg, "~task.teacher.symmetric_pairs")


def test_recipe_changes_with_data_file_bytes(make_cfg, tmp_path):
    glue = tmp_path / "glue"
    shutil.copytree(GLUE / "RTE", glue / "RTE")
    before = digest(make_cfg, f"data.glue_dir={glue}")
    assert before == digest(make_cfg)  # the same bytes elsewhere: the same recipe
    with open(glue / "RTE" / "train.tsv", "a", encoding="utf-8") as f:
        f.write("\n")
    assert digest(make_cfg, f"data.glue_dir={glue}") != before


def test_recipe_changes_with_model_weights(make_cfg, tmp_path, minilm_path):
    copy = tmp_path / "minilm"
    shutil.copytree(minilm_path, copy)
    base = digest(make_cfg, f"model.name_or_path={copy}")
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert digest(make_cfg, f"model.name_or_path={copy}") != base


def test_changed_recipe_trains_new_teacher_unchanged_reuses(make_cfg, monkeypatch, tmp_path):
    trained = []

    def fake_train(cfg, model_path, out_dir, recipe=None):  # stands in for the fine-tune: publishes a record only
        trained.append(recipe_digest(recipe))
        store = teacher_stage.teacher_store(cfg)
        path = store.path(recipe)
        path.mkdir(parents=True)
        (path / "teacher.json").write_text('{"value": 1.0}')
        return path, store.record(recipe)

    monkeypatch.setattr(teacher_stage, "train_teacher", fake_train)
    cfg = make_cfg(*SMALL)
    model_path = resolve_model_path(cfg.model.name_or_path)
    first, _ = teacher_stage.ensure_teacher(cfg, model_path, tmp_path / "out")
    again, _ = teacher_stage.ensure_teacher(make_cfg(*SMALL, "seed=3", "quant=w4a8"), model_path, tmp_path / "out")
    assert again == first and len(trained) == 1  # a student of another seed or bit-width reuses it
    other, _ = teacher_stage.ensure_teacher(make_cfg(*SMALL, "task.teacher.pooling=cls"), model_path, tmp_path / "out")
    assert other != first and len(trained) == 2 and other.parent == first.parent
    assert TeacherStore(cfg.teacher.store).has(teacher_recipe(cfg, model_path))
