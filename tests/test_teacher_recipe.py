"""The teacher store is keyed by the teacher's recipe: a changed recipe trains a new teacher, an unchanged one
(whatever the student's seed, bits or loss) reuses the stored one."""

from __future__ import annotations

import shutil

import pytest

from conftest import GLUE
from kdlsq_pl.errors import ConfigError
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
    assert digest(make_cfg, "task.teacher.init_from=null") == digest(make_cfg, "~task.teacher.init_from")


def test_recipe_names_the_source_teacher_of_init_from(make_cfg):
    # RTE's teacher starting from STS-B's (its default, conf/task/rte.yaml): its recipe holds the digest of the STS-B
    # teacher's own recipe, composed here from task=stsb with the same data options; without init_from there is none
    cfg = make_cfg(*SMALL, "task.teacher.init_from=stsb")
    recipe = teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path))
    assert recipe["init_teacher"] == {"task": "stsb", "recipe_digest": digest(make_cfg, "task=stsb")}
    assert "init_teacher" not in teacher_recipe(make_cfg(*SMALL, "task.teacher.init_from=null"), resolve_model_path(cfg.model.name_or_path))
    assert len({digest(make_cfg, f"task.teacher.init_from={t}") for t in ("mrpc", "stsb", "null")}) == 3


@pytest.mark.parametrize("bad, message", [("rte", "not another task's config; allowed: cola, mnli, mrpc"),
                                          ("nope", "init_from='nope': not another task's config"),
                                          ("../experiment/paper", "not another task's config"),
                                          ("squad", "question answering has no sentence classifier")])
def test_init_from_refuses_what_is_not_another_glue_task(make_cfg, bad, message):
    from kdlsq_pl.config import validate
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*SMALL, f"task.teacher.init_from={bad}", "stage=teacher"))


def test_source_task_cfg_is_the_other_tasks_file_with_this_teacher_seed(make_cfg):
    from kdlsq_pl.config import source_task_cfg
    src = source_task_cfg(make_cfg(*SMALL, "task.teacher.init_from=stsb", "teacher.seed=43", "teacher.retrain=true", "task.teacher.lr=1e-4"))
    assert src.task.name == "stsb" and src.task.teacher.lr == 5e-5 and src.task.teacher.head_bias == "prior"  # conf/task/stsb.yaml
    assert src.teacher.seed == 43 and src.teacher.retrain is False and src.data.limit_train_examples == 32


def test_transfer_encoder_copies_the_source_encoder_and_keeps_the_new_head(make_cfg, minilm_path, tmp_path):
    # a source teacher (STS-B's head: [CLS] + pooler dense, one output) with every encoder weight moved, and the RTE
    # target (mean pooling, no pooler dense, two classes): after the transfer the target's encoder, embeddings
    # included, equal the source's, its classifier is the one it was built with, and its logits equal those of the
    # source's encoder run through the target's own mean pooling and classifier, computed by hand
    import torch
    from kdlsq_pl.models.loading import load_classifier
    stsb, rte = make_cfg("task=stsb").task, make_cfg(*SMALL).task
    torch.manual_seed(0)
    source = load_classifier(minilm_path, stsb, head=dict(stsb.teacher))
    with torch.no_grad():
        for p in source.base_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    source.save_pretrained(tmp_path / "src")
    target = load_classifier(minilm_path, rte, head=dict(rte.teacher))
    head = {k: v.clone() for k, v in target.classifier.state_dict().items()}
    teacher_stage.transfer_encoder_(target, tmp_path / "src", stsb)
    src_state, own = source.base_model.state_dict(), target.base_model.state_dict()
    assert all(torch.equal(own[k], src_state[k]) for k in own)
    assert all(torch.equal(v, head[k]) for k, v in target.classifier.state_dict().items())
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    mask = (ids != 0).long()
    source.eval(), target.eval()
    with torch.no_grad():
        h = source.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert torch.allclose(target(input_ids=ids, attention_mask=mask).logits, target.classifier(pooled), atol=1e-5)


def test_recipe_changes_with_data_file_bytes(make_cfg, tmp_path):
    glue = tmp_path / "glue"
    for task in ("RTE", "STS-B"):  # RTE's teacher starting from STS-B's (init_from): both tasks' files shape it
        shutil.copytree(GLUE / task, glue / task)
    stilts = ("task.teacher.init_from=stsb",)
    before = digest(make_cfg, f"data.glue_dir={glue}", *stilts)
    assert before == digest(make_cfg, *stilts)  # the same bytes elsewhere: the same recipe
    seen = {before}
    for task in ("RTE", "STS-B"):
        with open(glue / task / "train.tsv", "a", encoding="utf-8") as f:
            f.write("\n")
        seen.add(digest(make_cfg, f"data.glue_dir={glue}", *stilts))
    assert len(seen) == 3


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
