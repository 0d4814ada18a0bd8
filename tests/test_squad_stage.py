"""SQuAD through the stages: the data module on the real dev file (offline protocol), the span head's logits and
targets in the distillation loss against hand computations, the evaluator's gathering over padded batches, and
(slow) a teacher and a W2A8 student trained on real questions whose recorded F1 is re-scored independently."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from kdlsq_pl.data import squad as S
from kdlsq_pl.distill.losses import KDLoss
from kdlsq_pl.models.modules import MASKED_LOGIT, head_logits, targets
from kdlsq_pl.stages.common import build_datamodule

from test_squad import _squad_dir  # the real ../shared/data/squad (skips where it is absent)

SQUAD_DIR = _squad_dir()
needs_data = pytest.mark.skipif(SQUAD_DIR is None, reason="no ../shared/data/squad/dev-v1.1.json")


# ------------------------------------------------------------------------------- loss terms by hand
class _SpanOut:
    def __init__(self, start, end):
        self.start_logits, self.end_logits = start, end


def _batch(mask_rows):
    mask = torch.tensor(mask_rows)
    return {"attention_mask": mask, "start_positions": torch.tensor([1, 3]), "end_positions": torch.tensor([2, 3])}


def test_span_logits_and_targets_stack_start_then_end_with_padding_masked():
    start, end = torch.arange(8.0).view(2, 4), -torch.arange(8.0).view(2, 4)
    batch = _batch([[1, 1, 1, 0], [1, 1, 1, 1]])
    z = head_logits(_SpanOut(start, end), batch)
    assert z.shape == (4, 4)
    assert z[0].tolist() == [0.0, 1.0, 2.0, MASKED_LOGIT] and z[1].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert z[2].tolist() == [0.0, -1.0, -2.0, MASKED_LOGIT] and z[3].tolist() == [-4.0, -5.0, -6.0, -7.0]
    assert targets(batch).tolist() == [1, 3, 2, 3]


def _hand_soft_ce(s_rows, t_rows, lengths, T):
    """Sum over rows and real positions of -softmax(t)[j] log softmax(s)[j] (softmax over the real positions only),
    divided by every entry of the [rows, T] tensor (the released code's mean reduction)."""
    total = 0.0
    for s, t, n in zip(s_rows, t_rows, lengths):
        zs, zt = sum(math.exp(x) for x in s[:n]), sum(math.exp(x) for x in t[:n])
        total += sum(-(math.exp(t[j]) / zt) * (s[j] - math.log(zs)) for j in range(n))
    return total / (len(s_rows) * T)


def test_soft_cross_entropy_over_start_and_end_ignores_padding():
    g = torch.Generator().manual_seed(0)
    s_start, s_end, t_start, t_end = (torch.randn(2, 5, generator=g) for _ in range(4))
    batch = _batch([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = KDLoss(pred=1.0, attn=0.0, hidden=0.0)
    total, parts = loss({"logits": head_logits(_SpanOut(s_start, s_end), batch)},
                        {"logits": head_logits(_SpanOut(t_start, t_end), batch)}, targets(batch))
    rows = lambda a, b: [r.tolist() for r in torch.cat([a, b])]  # noqa: E731
    hand = _hand_soft_ce(rows(s_start, s_end), rows(t_start, t_end), [3, 5, 3, 5], T=5)
    assert float(parts["pred"]) == pytest.approx(hand, rel=1e-5)
    # the padding of the first example must not matter: change it and the loss stays
    s_start[0, 3:], t_end[0, 3:] = 50.0, -50.0
    again, _ = loss({"logits": head_logits(_SpanOut(s_start, s_end), batch)},
                    {"logits": head_logits(_SpanOut(t_start, t_end), batch)}, targets(batch))
    assert float(again) == pytest.approx(float(total), rel=1e-6)


def test_ground_truth_term_is_the_mean_of_start_and_end_cross_entropy():
    g = torch.Generator().manual_seed(1)
    start, end = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    batch = _batch([[1, 1, 1, 1], [1, 1, 1, 1]])
    _, parts = KDLoss(pred=0.0, attn=0.0, hidden=0.0, gt=1.0)({"logits": head_logits(_SpanOut(start, end), batch)}, None, targets(batch))

    def ce(row, k):
        return math.log(sum(math.exp(x) for x in row)) - row[k]

    hand = (ce(start[0].tolist(), 1) + ce(start[1].tolist(), 3) + ce(end[0].tolist(), 2) + ce(end[1].tolist(), 3)) / 4
    assert float(parts["gt"]) == pytest.approx(hand, rel=1e-6)


# ------------------------------------------------------------------------------------- evaluation
@needs_data
def test_evaluator_gathers_padded_batches_in_any_order(minilm_path):
    """Gold-peaked logits of real dev questions, fed as shuffled batches each padded to its own longest window
    (padding filled with large logits that must be cut off), decode to the gold answers: EM = F1 = 100."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    dev, _ = S.load_squad("1.1", "dev", SQUAD_DIR)
    recs = random.Random(7).sample(dev, 60)
    feats = S.eval_features(recs, tok, max_length=128, doc_stride=48)
    labels = S.train_features(recs, tok, max_length=128, doc_stride=48).with_format(None)
    lengths = [len(x) for x in feats["input_ids"]]
    order = list(range(len(feats)))
    random.Random(3).shuffle(order)
    ev = S.SpanEvaluator()
    for k in range(0, len(order), 16):
        rows = order[k:k + 16]
        T = max(lengths[i] for i in rows)
        start, end, mask = torch.full((len(rows), T), 99.0), torch.full((len(rows), T), 99.0), torch.zeros(len(rows), T, dtype=torch.long)
        for r, i in enumerate(rows):
            start[r, :lengths[i]] = end[r, :lengths[i]] = 0.0
            mask[r, :lengths[i]] = 1
            s, e = labels["start_positions"][i], labels["end_positions"][i]
            if s:
                start[r, s] = end[r, e] = 10.0
        ev.update(torch.tensor(rows), start, end, mask)
    assert ev.compute(recs, feats, max_answer_length=128) == {"exact_match": 100.0, "f1": 100.0}
    assert ev.questions == 60


def test_evaluator_without_features_is_an_error():
    with pytest.raises(ValueError, match="no evaluation feature"):
        S.SpanEvaluator().compute([], [])


# ----------------------------------------------------------------------------------- the data module
@needs_data
def test_datamodule_offline_protocol_on_the_real_dev_file(tmp_path, minilm_path):
    cfg = compose_cfg(tmp_path, "task=squad", f"data.squad_dir={SQUAD_DIR}", "data.limit_eval_examples=50")
    dm = build_datamodule(cfg, minilm_path, 8)
    dm.setup("fit")
    raw = json.loads((SQUAD_DIR / "dev-v1.1.json").read_text())["data"]
    n_questions = sum(len(p["qas"]) for a in raw for p in a["paragraphs"])
    train, held, _ = dm.examples()
    assert len(train) + len(held) == n_questions  # every question in exactly one part
    assert not {ex["title"] for ex in train} & {ex["title"] for ex in held}  # no article in both
    rec = dm.protocol_record
    assert rec["protocol"] == "offline-dev-split" and rec["train_articles"] + rec["eval_articles"] == len(raw)
    assert rec["train_questions"] == len(train) and rec["eval_questions"] == 50 and dm.eval_examples == held[:50]
    # every training window's labels decode to its answer or point at [CLS]; idx is the row
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions", "idx"}
    train = dm.splits["train"].with_format(None)
    assert train["idx"][:5] == [0, 1, 2, 3, 4] and len(train) == rec["train_features"]
    ev_batch = next(iter(dm.val_dataloader()))
    assert ev_batch["idx"].tolist() == list(range(len(ev_batch["idx"])))
    assert len(dm.eval_features) == rec["eval_features"] >= 50


# ------------------------------------------------------------------------------------ the two stages
@pytest.mark.slow  # about 3 minutes: a real teacher step and a real W2A8 student on 48 training questions
@needs_data
def test_squad_teacher_and_w2a8_student_stages_record_what_rescoring_finds(tmp_path):
    """The stages run offline under the offline protocol and say so in every record; the student's recorded best
    exact match / F1 equals a re-scoring of its packed export (reloaded) by post-processing and the official
    metric, outside the Lightning loop."""
    from kdlsq_pl.data.glue import model_inputs
    from kdlsq_pl.export import load_packed
    from kdlsq_pl.pipeline import run

    small = ("task=squad", f"data.squad_dir={SQUAD_DIR}", "data.limit_train_examples=48", "data.limit_eval_examples=24",
             "data.batch_size=16", "data.eval_batch_size=8")
    teacher = run(compose_cfg(tmp_path, "stage=teacher", *small, "task.teacher.epochs=1"))
    assert teacher["squad_protocol"]["protocol"] == "offline-dev-split" and teacher["squad_protocol"]["eval_questions"] == 24
    cfg = compose_cfg(tmp_path, *small, "quant=w2a8", "trainer.max_epochs=1", "trainer.val_check_interval=1.0",
                      f"paths.output_dir={tmp_path}/student")
    rec = run(cfg)
    assert rec["squad_protocol"]["protocol"] == "offline-dev-split" and rec["bits"]["weight_bits"] == 2
    assert rec["teacher_metric"] == teacher["best"]

    student = load_packed(tmp_path / "student" / "packed").eval()
    assert type(student).__name__ == "BertForQuestionAnswering"
    dm = build_datamodule(cfg, rec["teacher_dir"], 16)
    dm.setup("validate")
    starts, ends = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            out = student(**model_inputs(batch))
            for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                starts.append(out.start_logits[row, :n].numpy())
                ends.append(out.end_logits[row, :n].numpy())
    preds = S.postprocess_predictions(dm.eval_examples, dm.eval_features, starts, ends)
    scores = S.squad_v1_metrics(preds, dm.eval_examples)
    assert rec["best_metrics"]["f1"] == pytest.approx(scores["f1"], abs=1e-4)
    assert rec["best_metrics"]["exact_match"] == pytest.approx(scores["exact_match"], abs=1e-4)
