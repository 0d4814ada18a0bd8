"""The classifier head's pooling (kdlsq_pl.models.pooling) on the real MiniLM: mean over real tokens checked
by hand on a padded batch, the config round trip, and quantizer insertion on the path the head uses."""

from __future__ import annotations

import pytest
import torch

from kdlsq_pl.callbacks.quantization import calibrate
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.export import export_packed, load_packed
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.quant.modules import QuantLinear, quantize_
from test_quant_insert import quant_cfg

TASK = {"labels": ["0", "1"]}
A = ["A man is playing a guitar on the stage tonight.", "A cat."]
B = ["Someone plays music.", "An animal sleeps."]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def batch(tokenizer):
    out = dict(tokenizer(A, B, padding=True, return_tensors="pt"))
    assert out["attention_mask"][1].sum() < out["attention_mask"].shape[1]  # the second pair is padded
    return out


def model(minilm_path, pooling, pooler_dense=True):
    torch.manual_seed(0)  # the new classifier head
    return load_classifier(minilm_path, TASK, ATTN_IMPLEMENTATION, head={"pooling": pooling, "pooler_dense": pooler_dense}).eval()


@pytest.mark.parametrize("pooler_dense", [True, False])
def test_mean_pooling_equals_hand_computation_on_padded_batch(minilm_path, batch, pooler_dense):
    m = model(minilm_path, "mean", pooler_dense)
    with torch.no_grad():
        logits = m(**batch).logits
        hidden = m.bert(**batch).last_hidden_state  # [B, T, D]
        rows = []
        for b in range(hidden.shape[0]):
            n = int(batch["attention_mask"][b].sum())  # real tokens come first (right padding)
            v = sum(hidden[b, t] for t in range(n)) / n
            if pooler_dense:
                v = torch.tanh(m.bert.pooler.dense.weight @ v + m.bert.pooler.dense.bias)
            rows.append(m.classifier.weight @ v + m.classifier.bias)
    torch.testing.assert_close(logits, torch.stack(rows), rtol=1e-5, atol=1e-5)


def test_mean_pooling_ignores_padding(minilm_path, tokenizer, batch):
    """The padded pair's logits equal those of the same pair run alone, without padding."""
    m = model(minilm_path, "mean")
    alone = dict(tokenizer(A[1:], B[1:], return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(m(**batch).logits[1], m(**alone).logits[0], rtol=1e-5, atol=1e-5)
    cls = model(minilm_path, "cls")
    with torch.no_grad():  # and differs from the [CLS] head with the same weights
        assert not torch.allclose(cls(**batch).logits, m(**batch).logits, atol=1e-3)


def test_cls_pooling_is_bert_head_unchanged(minilm_path, batch):
    m = model(minilm_path, "cls")
    assert type(m.bert.pooler).__name__ == "BertPooler"  # nothing replaced
    assert m.config.classifier_pooling == "cls" and m.config.classifier_pooler_dense is True


def test_pooling_saved_in_config_and_reloaded(minilm_path, batch, tmp_path):
    m = model(minilm_path, "mean", False)
    m.save_pretrained(tmp_path / "t")
    again = load_classifier(str(tmp_path / "t"), TASK, ATTN_IMPLEMENTATION).eval()  # a student of that teacher
    assert again.config.classifier_pooling == "mean" and again.bert.pooler.dense is None
    with torch.no_grad():
        assert torch.equal(m(**batch).logits, again(**batch).logits)


def test_quantizers_cover_mean_pooling_path_and_packed_export(minilm_path, batch, tmp_path):
    m = model(minilm_path, "mean")
    cfg = quant_cfg("w2a8")
    quantize_(m, cfg)
    dense = m.bert.pooler.dense
    assert isinstance(dense, QuantLinear) and dense.input_quantizer is not None
    calibrate(m, [batch])
    seen = []
    dense.input_quantizer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    m.eval()
    with torch.no_grad():
        before = m(**batch).logits
    assert seen == [torch.Size([2, m.config.hidden_size])]  # the pooled mean goes through the quantized dense
    export_packed(m, cfg, tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "packed")(**batch).logits, before)


def test_no_dense_pooling_leaves_no_pooler_quantizer(minilm_path):
    m = model(minilm_path, "mean", False)
    ins = quantize_(m, quant_cfg("w2a8"))
    assert not any("pooler" in k for k in [*ins.weight, *ins.act])


def test_bad_pooling_is_one_line_error(minilm_path):
    with pytest.raises(ConfigError, match="pooling='max' is not allowed; allowed: cls, mean"):
        model(minilm_path, "max")


@pytest.mark.parametrize("pooler_dense", [True, False])
def test_teacher_fp32_size_from_a_skeleton_counts_the_saved_head(minilm_path, tmp_path, pooler_dense):
    from kdlsq_pl.stages.common import teacher_fp32_bytes
    model = load_classifier(minilm_path, TASK, head={"pooling": "mean", "pooler_dense": pooler_dense})
    model.save_pretrained(tmp_path)
    # the reference a shallower student is measured against: the saved teacher's parameters, 4 bytes each
    dense = 384 * 384 + 384
    expected = 4 * sum(p.numel() for p in load_classifier(minilm_path, TASK).parameters()) - (0 if pooler_dense else 4 * dense)
    assert teacher_fp32_bytes(tmp_path, TASK) == expected
