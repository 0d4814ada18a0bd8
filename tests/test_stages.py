"""Teacher and student stages on the real MiniLM and real RTE rows (fast_dev_run-sized)."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from conftest import GLUE, compose_cfg
from kdlsq_pl.models.loading import TeacherStore, resolve_model_path
from kdlsq_pl.pipeline import run
from kdlsq_pl.stages.common import build_datamodule
from kdlsq_pl.stages.teacher import teacher_recipe
from kdlsq_pl.stages.student import build_student_module, quant_callbacks

SMALL = ("task=rte", "data.limit_train_examples=32", "data.limit_eval_examples=32", "data.batch_size=16")
RTE_DEV = GLUE / "RTE" / "dev.tsv"


@torch.no_grad()
def hand_dev_accuracy(model, tokenizer_path, n: int = 32, batched: bool = False) -> float:
    """Accuracy (x100) of ``model`` on the first ``n`` RTE dev rows, read from the TSV by hand (index, sentence1,
    sentence2, label; class id = position in conf/task/rte.yaml's labels) and run one pair at a time, or with
    ``batched`` as one batch padded to its longest pair (what the stages' evaluation of these rows runs: a model
    whose activation ranges are the batch's own maximum, TernaryBERT's, predicts differently one pair at a time)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    rows = [line.rstrip("\n").split("\t") for line in RTE_DEV.read_text(encoding="utf-8").splitlines()[1:n + 1]]
    gold = [["entailment", "not_entailment"].index(label) for *_, label in rows]
    model.eval()
    if batched:
        enc = tok([r[1] for r in rows], [r[2] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=128)
        pred = model(**enc).logits.argmax(-1).tolist()
    else:
        pred = [int(model(**tok(a, b, return_tensors="pt", truncation=True, max_length=128)).logits.argmax(-1)) for _, a, b, _ in rows]
    return 100.0 * sum(p == g for p, g in zip(pred, gold)) / len(rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A teacher fine-tuned for one step on 32 real RTE rows and published to a temporary store."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = compose_cfg(root, "stage=teacher", *SMALL, "task.teacher.epochs=1")
    record = run(cfg)
    return root, cfg, record


def test_teacher_stage_publishes_to_store(store):
    root, cfg, record = store
    st = TeacherStore(cfg.teacher.store)
    recipe = teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path))
    path = st.path(recipe)
    assert st.has(recipe) and (path / "model.safetensors").is_file()
    assert st.record(recipe)["recipe"]["task_config"]["teacher"]["lr"] == cfg.task.teacher.lr  # teacher.json shows the recipe
    assert (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()
    saved = json.loads((root / "out" / "result.json").read_text())
    assert saved["stage"] == "teacher" and saved["task"] == "rte" and saved["status"] == "finished"
    assert set(saved["metrics"]) == {"acc"}
    # the stored teacher is the best evaluation's model: its accuracy on the 32 dev rows, counted by hand
    from kdlsq_pl.models.loading import load_classifier
    assert saved["best"] == pytest.approx(hand_dev_accuracy(load_classifier(str(path), cfg.task), str(path)), abs=1e-6)
    assert saved["git_commit"] and saved["versions"]["torch"].startswith("2.13") and saved["config"]["task"]["name"] == "rte"
    assert not list(path.parent.glob("*.tmp-*"))  # no half-written directory left behind


def test_teacher_fast_dev_run_publishes_only_to_the_smoke_store(tmp_path):
    cfg = compose_cfg(tmp_path, "stage=teacher", *SMALL, "trainer.fast_dev_run=true")
    record = run(cfg)
    real, smoke = TeacherStore(tmp_path / "teachers"), TeacherStore(tmp_path / "teachers" / "fast_dev_run")
    recipe = teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path))
    assert record["stage"] == "teacher" and smoke.has(recipe)
    assert not real.has(recipe)  # a smoke teacher never stands in for a real one
    # the student stage's fast_dev_run on real RTE rows finds that smoke teacher
    student = run(compose_cfg(tmp_path, *SMALL, "quant=w2a8", "trainer.fast_dev_run=true", "paths.output_dir=" + str(tmp_path / "s")))
    assert student["stage"] == "student" and student["teacher_dir"].startswith(str(tmp_path / "teachers" / "fast_dev_run"))
    assert student["quant"] == "w2a8" and 0.0 <= student["best"] <= 100.0


def test_student_stage_reuses_teacher(store, tmp_path, caplog):
    root, _, teacher = store
    cfg = compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=1", "quant=w2a8", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                      "trainer.limit_val_batches=1", "callbacks.model_checkpoint=null", f"teacher.store={root}/teachers")
    with caplog.at_level("INFO", logger="kdlsq_pl"):
        record = run(cfg)
    assert "teacher: reusing" in caplog.text
    assert record["teacher_metric"] == teacher["best"]
    assert record["bits"] == {"weight_bits": 2, "embedding_bits": 2, "act_bits": 8}
    assert 14 < record["compression_ratio"] < 17 and record["size_bytes"] < record["fp32_bytes"] / 14
    assert record["status"] == "finished" and record["method"] == "kdlsq"
    # the packed export is written and measured on disk: W2A8 at least 12x under the FP32 safetensors
    packed = tmp_path / "out" / "packed" / "model.packed.safetensors"
    assert record["packed_bytes"] == packed.stat().st_size and record["packed_compression_ratio"] >= 12
    # one evaluation (one epoch of one batch), so the exported student is the best one: its accuracy on the
    # 32 dev rows, counted by hand on the reloaded packed model, is the recorded best
    from kdlsq_pl.export import load_packed
    assert record["best"] == pytest.approx(hand_dev_accuracy(load_packed(packed.parent), record["teacher_dir"]), abs=1e-6)


def test_mixed_precision_student_records_its_bits_and_exports_them(store, tmp_path):
    root, _, _ = store
    cfg = compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=1", "quant=w2a8_emb4", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                      "trainer.limit_val_batches=1", "callbacks.model_checkpoint=null", f"teacher.store={root}/teachers")
    record = run(cfg)
    assert record["status"] == "finished" and record["quant"] == "w2a8_emb4" and record["bit_overrides"] == {"*.embeddings.*": 4}
    d = 384
    pooler = d * d if cfg.task.teacher.pooler_dense else 0  # RTE's default head reads the mean-pooled vector: no dense
    emb, linears = (30522 + 512) * d, 6 * (4 * d * d + 2 * 1536 * d) + pooler  # the MiniLM's tables; its Linears (+ pooler)
    assert record["avg_weight_bits"] == pytest.approx((4 * emb + 2 * linears) / (emb + linears), rel=1e-12)
    packed = json.loads((tmp_path / "out" / "packed" / "packed.json").read_text())["packed"]
    assert {k: v["bits"] for k, v in packed.items() if "embeddings" in k} == {
        "bert.embeddings.word_embeddings.weight": 4, "bert.embeddings.position_embeddings.weight": 4}
    assert {v["bits"] for k, v in packed.items() if "embeddings" not in k} == {2}


def test_three_layer_w2a8_student_distils_from_the_six_layer_teacher(store, tmp_path):
    """Depth and bits together: a KDLSQ W2A8 student of the teacher's bottom 3 layers (``student.layers=3``), its
    hidden-state and attention terms mapped to the teacher's layers 2, 4, 6 by the uniform layer map; the packed export
    holds 3 layers and reloads to the recorded accuracy, and ``infer`` rebuilds the same student from the record."""
    from kdlsq_pl.export import load_packed
    from kdlsq_pl.infer import evaluate
    root, _, teacher = store
    cfg = compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=1", "quant=w2a8", "student.layers=3", "trainer.max_epochs=1",
                      "trainer.limit_train_batches=1", "callbacks.model_checkpoint=null", f"teacher.store={root}/teachers")
    record = run(cfg)
    assert record["status"] == "finished" and record["student_layers"] == 3 and record["student_init"] == "teacher"
    packed = load_packed(tmp_path / "out" / "packed")
    assert packed.config.num_hidden_layers == 3 and len(packed.bert.encoder.layer) == 3
    from kdlsq_pl.models.loading import load_classifier
    from kdlsq_pl.quant.modules import model_size_bytes
    six = load_classifier(record["teacher_dir"], cfg.task)  # the FP32 size by hand: the teacher less three of its layers
    full = sum(p.numel() for p in six.parameters()) - 3 * sum(p.numel() for p in six.bert.encoder.layer[0].parameters())
    # sizes against the 6-layer FP32 teacher (its parameters, and its safetensors file for the packed export)
    assert record["fp32_bytes"] == 4 * sum(p.numel() for p in six.parameters()) and record["compression_ratio"] > 18
    assert record["packed_compression_ratio"] > 18 and model_size_bytes(packed)["fp32_bytes"] == 4 * full
    assert record["best"] == pytest.approx(hand_dev_accuracy(packed, record["teacher_dir"]), abs=1e-6)
    assert evaluate(tmp_path / "out", "fake", limit=32)["dev"]["metrics"]["acc"] == pytest.approx(record["best"], abs=1e-6)


def test_minimal_knowledge_with_a_three_layer_student_maps_to_the_teachers_top(store, tmp_path):
    """``hkd=top1`` on a 3-layer student: only its top hidden state (index 3) is distilled, from the 6-layer teacher's
    top state (index 6), and the record's knowledge fraction is 1 state of the student's 4 = 0.25 (by hand)."""
    root, _, _ = store
    cfg = compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=1", "quant=w2a8", "student.layers=3", "hkd=top1", "trainer.max_epochs=1",
                      "trainer.limit_train_batches=1", "callbacks.model_checkpoint=null", f"teacher.store={root}/teachers")
    teacher_dir = TeacherStore(cfg.teacher.store).path(teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path)))
    dm = build_datamodule(cfg, str(teacher_dir), cfg.data.batch_size)
    assert build_student_module(cfg, teacher_dir, dm).loss.hidden_map == [None, None, None, 6]
    record = run(cfg)
    assert record["status"] == "finished" and record["student_layers"] == 3 and record["hidden_fraction"] == pytest.approx(0.25)


def test_infer_reproduces_the_recorded_metric_and_labels_a_pair(store, tmp_path):
    from kdlsq_pl.infer import evaluate, label_text
    root, _, _ = store
    cfg = compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=1", "quant=w8a8", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                      "trainer.limit_val_batches=2", "callbacks.model_checkpoint=null", f"teacher.store={root}/teachers")
    record = run(cfg)
    fake = evaluate(tmp_path / "out", "fake", limit=32)
    assert fake["dev"]["examples"] == 32 and fake["dev"]["metrics"]["acc"] == pytest.approx(record["best"], abs=1e-6)
    integer = evaluate(tmp_path / "out", "integer", limit=32)
    assert integer["dev"]["examples"] == 32 and abs(integer["dev"]["metrics"]["acc"] - record["best"]) <= 100 * 4 / 32
    onnx = evaluate(tmp_path / "out", "onnx", limit=32)  # the QDQ graph in ONNX Runtime: at most two answers differ
    assert onnx["dev"]["examples"] == 32 and abs(onnx["dev"]["metrics"]["acc"] - record["best"]) <= 100 * 2 / 32
    assert label_text(tmp_path / "out", "integer", "A man plays a guitar.", "Someone makes music.") in ("entailment", "not_entailment")


def test_student_checkpoint_round_trip_same_logits(store, tmp_path):
    """A student restored from a Lightning checkpoint (quantizers re-inserted by the callback) gives the same logits."""
    root, _, _ = store
    cfg = compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=1", "quant=w2a8", "trainer.max_epochs=1", "trainer.val_check_interval=1.0",
                      f"teacher.store={root}/teachers", "callbacks.progress_bar=null")
    teacher_dir = TeacherStore(cfg.teacher.store).path(teacher_recipe(cfg, resolve_model_path(cfg.model.name_or_path)))
    dm = build_datamodule(cfg, str(teacher_dir), 16)
    module = build_student_module(cfg, teacher_dir)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                         callbacks=[ckpt, *quant_callbacks(cfg)], enable_progress_bar=False)
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        before = module.eval_logits(batch)

    restored = build_student_module(cfg, teacher_dir)
    trainer2 = pl.Trainer(logger=False, callbacks=quant_callbacks(cfg), enable_progress_bar=False)
    trainer2.validate(restored, datamodule=dm, ckpt_path=ckpt.last_model_path, verbose=False)
    restored.eval()
    with torch.no_grad():
        after = restored.eval_logits(batch)
    assert torch.equal(before, after)
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)  # the teacher is not duplicated into checkpoints
    assert any(k.endswith("weight_quantizer.scale") for k in state)
    # the load is strict for everything but the teacher: a checkpoint missing one step size is refused
    ckpt_obj = torch.load(ckpt.last_model_path, weights_only=True)
    missing = next(k for k in ckpt_obj["state_dict"] if k.endswith("weight_quantizer.scale"))
    del ckpt_obj["state_dict"][missing]
    torch.save(ckpt_obj, tmp_path / "broken.ckpt")
    trainer3 = pl.Trainer(logger=False, callbacks=quant_callbacks(cfg), enable_progress_bar=False)
    with pytest.raises(RuntimeError, match=f"Missing key.*{missing.removeprefix('student.')}"):
        trainer3.validate(build_student_module(cfg, teacher_dir), datamodule=dm, ckpt_path=str(tmp_path / "broken.ckpt"), verbose=False)


@pytest.mark.slow  # about 70 s: a real 2-step Theseus run on the store's teacher
def test_theseus_stage_trains_the_successor_and_saves_it(store, tmp_path):
    root, _, teacher = store
    cfg = compose_cfg(tmp_path, *SMALL, "task.teacher.epochs=1", "method=theseus", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                      "callbacks.model_checkpoint=null", f"teacher.store={root}/teachers")
    record = run(cfg)
    assert record["status"] == "finished" and record["method"] == "theseus" and record["quant"] == "fp32"
    assert record["successor_layers"] == 3 and record["teacher_metric"] == teacher["best"]
    from kdlsq_pl.models.loading import load_classifier
    successor = load_classifier(record["successor_dir"], cfg.task)
    assert successor.config.num_hidden_layers == 3
    # its size by hand: the teacher's parameters minus three of its six (identical) layers, 4 bytes each
    full = load_classifier(record["teacher_dir"], cfg.task)
    layer = sum(p.numel() for p in full.bert.encoder.layer[0].parameters())
    assert record["size_bytes"] == 4 * (sum(p.numel() for p in full.parameters()) - 3 * layer)
    # one evaluation, so the saved successor is the evaluated one: its accuracy on the 32 dev rows by hand
    assert record["best"] == pytest.approx(hand_dev_accuracy(successor, record["teacher_dir"]), abs=1e-6)
